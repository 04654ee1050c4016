"""Low-rank training (trainable = "lora:R"): what trains is exactly what ships as a delta."""

from __future__ import annotations

import json

import pytest
import torch

import unmask
from unmask.diffusion.adapt import adapt_loss
from unmask.errors import UnmaskError
from unmask.models.delta import load_delta, save_delta
from unmask.models.io import fold_factors, load_model
from unmask.train.checkpoint import list_checkpoints
from unmask.train.config import load_train_config
from unmask.train.lora import LowRankLinear, attach, balanced, low_rank_layers, start_from_delta
from unmask.train.trainer import run_training

from conftest import CODE, make_model_dir
from test_adapt import batch, model_of
from test_trainer import write_config


def test_balanced_factors_keep_the_product_and_share_each_singular_value():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 3, generator=gen, dtype=torch.float64) * 5, torch.randn(3, 9, generator=gen, dtype=torch.float64)
    a2, b2 = balanced(a, b)
    torch.testing.assert_close(a2 @ b2, a @ b)
    s = torch.linalg.svdvals(a @ b)[:3]
    torch.testing.assert_close(a2.norm(dim=0), s.sqrt())
    torch.testing.assert_close(b2.norm(dim=1), s.sqrt())


def test_a_fresh_low_rank_model_is_its_base_and_only_factors_and_norms_get_gradients():
    model = model_of("block")
    x0, _ = batch(0)
    with torch.no_grad():
        before = model(x0)
    trainable = attach(model, 3)
    assert len(low_rank_layers(model)) == 7 * model.config.n_layers
    with torch.no_grad():
        torch.testing.assert_close(model(x0), before, rtol=0, atol=0)
    out = adapt_loss(model.train(), x0, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if n.endswith(("delta_a", "delta_b", "norm.weight"))}
    assert "embed.weight" not in grads and not any(n.endswith("proj.weight") for n in grads)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in grads)


def test_a_low_rank_layer_computes_the_folded_weight():
    linear = torch.nn.Linear(10, 6)
    layer = LowRankLinear(linear, 2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.delta_a.normal_()
    x = torch.randn(4, 10)
    folded = fold_factors({f"p.{k}": v for k, v in layer.state_dict().items()})
    assert set(folded) == {"p.weight", "p.bias"}
    torch.testing.assert_close(layer(x), x @ folded["p.weight"].T + folded["p.bias"])


def lora_run(tmp_path, tiny_tokenizer, steps: int = 4, **extra):
    base = make_model_dir(tmp_path / "base", tiny_tokenizer, attention="causal")
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for k, text in enumerate(CODE * 3):
        (corpus / f"f{k}.py").write_text(text)
    train = {"objective": "adapt", "init_from": str(base), "distill": 0.5, "trainable": "lora:4", "steps": steps,
             "batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "eval_every": 0, "eval_batches": 1, "ckpt_every": 2,
             "keep_checkpoints": 3, "log_every": 1, "out_dir": "out", **extra}
    config = write_config(tmp_path, {"model": {"block_size": 4}, "data": {"paths": [str(corpus)], "tokenizer": str(base),
                                                                         "seq_len": 16, "val_fraction": 0.3},
                                     "train": train})
    return base, config


def test_lora_training_ships_as_an_exact_low_rank_delta(tmp_path, tiny_tokenizer):
    base, config = lora_run(tmp_path, tiny_tokenizer)
    final = run_training(config, quiet=True)
    trained = unmask.load(final, device="cpu").model
    source = unmask.load(base, device="cpu").model
    after, before = trained.state_dict(), source.state_dict()
    assert torch.equal(after["embed.weight"], before["embed.weight"])
    changes = {k: after[k] - before[k] for k in after if k.endswith("proj.weight")}
    assert all(float(d.abs().max()) > 0 for d in changes.values())
    # every matrix moved by a change of rank at most 4: singular values past the 4th are rounding
    for name, change in changes.items():
        s = torch.linalg.svdvals(change.double())
        assert float(s[4:].max()) < 1e-5 * float(s[0]), name
    record = save_delta(trained, str(base), base / "model.safetensors", before, tmp_path / "delta", dtype=None, rank=4)
    assert max(record["truncation_error"].values()) < 1e-4
    info = json.loads((final / "training.json").read_text())
    assert info["trainable_parameters"] == sum(4 * (w.shape[0] + w.shape[1]) for w in changes.values()) + sum(
        v.numel() for k, v in before.items() if k.endswith("norm.weight"))
    # the last checkpoint, read as a model (factors folded in), is the final model
    checkpoint = load_model(list_checkpoints(tmp_path / "out")[-1], dtype=torch.float32)
    ids = torch.tensor([tiny_tokenizer.encode("def add(a, b):")])
    with torch.no_grad():
        torch.testing.assert_close(checkpoint(ids), trained(ids))


def test_lora_resumes_to_the_same_weights_as_an_unbroken_run(tmp_path, tiny_tokenizer):
    _, config = lora_run(tmp_path, tiny_tokenizer)
    unbroken = unmask.load(run_training(config, quiet=True), device="cpu").model.state_dict()
    (tmp_path / "again").mkdir()
    _, config = lora_run(tmp_path / "again", tiny_tokenizer)
    run_training(config, overrides={"train": {"steps": 2}}, quiet=True)
    resumed = unmask.load(run_training(config, quiet=True), device="cpu").model.state_dict()
    for k in unbroken:
        torch.testing.assert_close(resumed[k], unbroken[k], rtol=0, atol=0, msg=k)


def test_init_delta_starts_where_the_delta_is(tmp_path, tiny_tokenizer):
    base = make_model_dir(tmp_path / "base", tiny_tokenizer, attention="causal")
    source = unmask.load(base, device="cpu").model
    state = source.state_dict()
    # an adapted model: every matrix moved by a rank-3 change, one norm changed
    gen = torch.Generator().manual_seed(3)
    adapted = type(source)(source.config).eval()
    moved = {}
    for k, v in state.items():
        if k.endswith("proj.weight"):
            v = v + 0.1 * torch.randn(v.shape[0], 3, generator=gen) @ torch.randn(3, v.shape[1], generator=gen)
        elif k == "layers.0.attn_norm.weight":
            v = v * 1.5
        moved[k] = v
    adapted.load_state_dict(moved)
    save_delta(adapted, str(base), base / "model.safetensors", state, tmp_path / "delta", dtype=None, rank=3)
    shipped = load_delta(tmp_path / "delta")
    student = type(source)(source.config)
    student.load_state_dict(state)
    attach(student, 5)
    start_from_delta(student, tmp_path / "delta", str(base))
    ids = torch.tensor([tiny_tokenizer.encode("def add(a, b):")])
    with torch.no_grad():
        torch.testing.assert_close(student(ids), shipped(ids), rtol=1e-5, atol=1e-5)
    # too many factors for the layers' rank, and a delta over another base: one-line errors
    small = type(source)(source.config)
    small.load_state_dict(state)
    attach(small, 2)
    with pytest.raises(UnmaskError, match="rank-2"):
        start_from_delta(small, tmp_path / "delta", str(base))
    other = make_model_dir(tmp_path / "other", tiny_tokenizer, attention="causal", seed=1)
    with pytest.raises(UnmaskError, match="not over init_from"):
        start_from_delta(student, tmp_path / "delta", str(other))


@pytest.mark.parametrize("train, message", [
    ({"trainable": "lora:0"}, "lora:R"),
    ({"trainable": "lora:x"}, "lora:R"),
    ({"trainable": "all", "init_delta": "."}, "init_delta needs"),
    ({"trainable": "lora:4", "init_delta": "missing"}, "not a directory"),
])
def test_bad_low_rank_settings_are_one_line_errors(tmp_path, tiny_tokenizer, train, message):
    _, config = lora_run(tmp_path, tiny_tokenizer, **train)
    with pytest.raises(UnmaskError, match=message):
        load_train_config(config)
