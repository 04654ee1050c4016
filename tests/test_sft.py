"""SFT: the JSONL format and its tokenised form, windows, prompt-aware objectives, the trainer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import unmask.train.trainer as trainer
from unmask.diffusion.adapt import adapt_loss
from unmask.diffusion.objectives import ar_loss, diffusion_loss
from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig
from unmask.models.io import read_safetensors
from unmask.models.transformer import Transformer
from unmask.train.config import load_train_config
from unmask.train.metrics import read_metrics
from unmask.train.sft import SFTWindows, build_sft, open_sft, sft_data
from unmask.train.trainer import run_training

from conftest import CODE, make_model_dir
from test_trainer import write_config


def examples(n: int = 24) -> list[dict]:
    out = []
    for k in range(n):
        code = CODE[k % len(CODE)]
        if k % 2:
            out.append({"messages": [{"role": "user", "content": f"write snippet {k}"},
                                     {"role": "assistant", "content": code}], "source": f"x.py:{k}"})
        else:
            out.append({"prompt": f"# snippet {k}\n", "completion": code})
    return out


def write_jsonl(path: Path, records: list, blank_at: int | None = None) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    if blank_at is not None:
        lines.insert(blank_at, "   ")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_format_round_trip(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    records = examples(24)
    path = write_jsonl(tmp_path / "sft.jsonl", records + [records[3]], blank_at=5)  # a duplicate and a blank line
    manifest = build_sft(path, tmp_path / "out", tok, val_fraction=0.3)
    assert manifest["counts"]["duplicate"] == 1 and manifest["counts"]["lines"] == 25
    train, val = open_sft(tmp_path / "out", "train"), open_sft(tmp_path / "out", "val")
    assert len(train) + len(val) == 24 and len(train) > 0 and len(val) > 0
    assert manifest["examples"] == {"train": len(train), "val": len(val)}
    expected = set()
    for r in records:
        if "messages" in r:
            prompt = tok.encode_chat(r["messages"][:-1], add_generation_prompt=True)
            full = tok.encode_chat(r["messages"], add_generation_prompt=False)
            assert tok.decode(full[len(prompt):], skip_special=True).startswith(r["messages"][-1]["content"])
        else:
            prompt = tok.encode(r["prompt"])
            full = prompt + tok.encode(r["completion"]) + [tok.eos_id]
        expected.add((tuple(prompt), tuple(full)))
    got = set()
    for split in (train, val):
        for start, plen, length in split.index.tolist():
            ids = tuple(int(i) for i in split.tokens[start : start + length])
            got.add((ids[:plen], ids))
    assert got == expected
    # the split is decided by each record's content: another order of the lines gives the same split
    again = build_sft(write_jsonl(tmp_path / "rev.jsonl", records[::-1]), tmp_path / "out2", tok, val_fraction=0.3)
    assert again["examples"] == manifest["examples"]
    # a second build with the same inputs reuses the directory
    stamp = (tmp_path / "out" / "train-tokens.npy").stat().st_mtime_ns
    assert build_sft(path, tmp_path / "out", tok, val_fraction=0.3)["key"] == manifest["key"]
    assert (tmp_path / "out" / "train-tokens.npy").stat().st_mtime_ns == stamp


def test_separate_validation_file_drops_its_examples_from_training(tmp_path, tiny_tokenizer):
    records = examples(10)
    train_path = write_jsonl(tmp_path / "train.jsonl", records)
    val_path = write_jsonl(tmp_path / "val.jsonl", records[:3])
    manifest = build_sft(train_path, tmp_path / "out", tiny_tokenizer, val_path=val_path)
    assert manifest["examples"] == {"train": 7, "val": 3} and manifest["counts"]["in_val_file"] == 3


@pytest.mark.parametrize("line, match", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"text": "x"}', "expected 'messages' or 'prompt' \\+ 'completion'"),
    ('{"prompt": "x", "completion": 3}', "'completion' must be a string"),
    ('{"prompt": "x", "completion": ""}', "'completion' is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "at least two messages"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}', "must be the assistant's"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "message 0"),
    ('{"messages": [{"role": "<|im_end|>", "content": "a"}, {"role": "assistant", "content": "x"}]}', "role"),
])
def test_a_bad_line_is_a_one_line_error_naming_file_and_line(tmp_path, tiny_tokenizer, line, match):
    path = write_jsonl(tmp_path / "sft.jsonl", examples(2) + [line], blank_at=1)  # the bad record is on line 4
    with pytest.raises(UnmaskError, match=match) as info:
        build_sft(path, tmp_path / "out", tiny_tokenizer)
    assert str(info.value).startswith(f"{path}:4: ") and "\n" not in str(info.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_windows_pad_modes_skip_long_examples_and_are_a_function_of_the_step(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    records = [{"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
               {"prompt": "x = 1\n", "completion": CODE[1] * 4}]  # too long for the window
    build_sft(write_jsonl(tmp_path / "sft.jsonl", records), tmp_path / "out", tok, val_fraction=0.0)
    data = sft_data(tmp_path / "out")
    plen = len(tok.encode(records[0]["prompt"]))
    length = plen + len(tok.encode(records[0]["completion"])) + 1
    seq_len = length + 5
    for pad, fill in (("eos", tok.eos_id), ("ignore", tok.pad_id)):
        windows = SFTWindows(data.train, seq_len, fill, pad)
        assert len(windows) == 1 and windows.too_long == 1
        ids, fixed = windows.batch(3, seed=0, step=0)
        assert ids.shape == fixed.shape == (3, seq_len)
        assert (ids[:, length:] == fill).all() and ids[0, length - 1] == tok.eos_id
        assert fixed[:, :plen].all() and not fixed[:, plen:length].any()
        assert bool(fixed[:, length:].all()) == (pad == "ignore")
    with pytest.raises(UnmaskError, match="raise seq_len"):
        SFTWindows(data.train, length - 1, tok.eos_id)
    many = examples(12)
    build_sft(write_jsonl(tmp_path / "many.jsonl", many), tmp_path / "many", tok, val_fraction=0.0)
    windows = SFTWindows(sft_data(tmp_path / "many").train, 128, tok.eos_id)
    assert len(windows) == 12
    first = [windows.batch(4, 7, step)[0] for step in range(3)]  # 12 examples: one epoch, each once
    assert torch.equal(first[1], SFTWindows(windows.examples, 128, tok.eos_id).batch(4, 7, 1)[0])
    rows = {tuple(r.tolist()) for batch in first for r in batch}
    assert len(rows) == 12
    ids, _ = windows.fixed(100)
    assert ids.shape[0] == 12 and len({tuple(r.tolist()) for r in ids}) == 12


# --- the objectives: prompt tokens are never masked and never targets; the loss is normalised per answer ---

VOCAB, MASK = 12, 1


def constant_model(attention: str, shifted: bool, seed: int = 0) -> Transformer:
    """Every token embeds to the same vector, so every position's logits are the same vector c:
    the NLL of a target is f(token) = -log softmax(c without [MASK])[token], whatever the noise."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=32, attention=attention,
                         block_size=4, shifted=shifted, mask_token_id=MASK)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.embed.weight.copy_(model.embed.weight[0].expand(VOCAB, -1))
        model.head.weight.mul_(40.0)  # sharp, so tokens' NLLs differ a lot
    return model


def token_nll(model: Transformer, diffusion: bool = True) -> Tensor:
    """f: the NLL of each token under the constant logits ([MASK] excluded for diffusion objectives)."""
    with torch.no_grad():
        logits = model(torch.zeros(1, 1, dtype=torch.long))[0, 0].clone()
    if diffusion:
        logits[MASK] = float("-inf")
    return -F.log_softmax(logits, dim=-1)


class Spy(nn.Module):
    """Passes calls through and records the ids each call saw."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config, self.ids = model, model.config, []

    def forward(self, ids: Tensor, *args, **kwargs) -> Tensor:
        self.ids.append(ids.clone())
        return self.model(ids, *args, **kwargs)


def sft_batch(f: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rows of 12 with prompts of 1, 3 and 6 tokens and (row 2) 2 ignored pad tokens at the end.

    Given token NLLs ``f``: row 0 answers with the likeliest token, row 2 with the least likely
    one, and the prompts and pads use the opposite ones, so that counting a prompt token, or
    averaging over all answer tokens instead of per row, moves the loss."""
    fixed = torch.arange(12)[None] < torch.tensor([[1], [3], [6]])
    fixed[2, 10:] = True
    if f is None:
        return torch.randint(2, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0)), fixed
    order = [int(i) for i in f.argsort() if int(i) != MASK]
    lo, hi = order[0], order[-1]
    x0 = torch.tensor([[hi] + [lo] * 11, [lo] * 3 + [lo, hi] * 4 + [hi], [lo] * 6 + [hi] * 4 + [lo] * 2])
    return x0, fixed


def per_answer_mean(f: Tensor, x0: Tensor, fixed: Tensor, shifted: bool) -> tuple[float, float]:
    """(mean over rows of each row's mean f over its answer, mean f over all answer tokens)."""
    answer = ~fixed
    if shifted:
        answer[:, 0] = False  # nothing predicts position 0
    per_row = [float(f[x0[r][answer[r]]].mean()) for r in range(x0.shape[0])]
    return float(np.mean(per_row)), float(f[x0[answer]].mean())


@pytest.mark.parametrize("kind", ["sft", "adapt-block", "adapt-bidirectional", "ar"])
def test_loss_is_the_mean_of_per_answer_means_and_prompt_tokens_are_never_targets(kind):
    attention = {"sft": "bidirectional", "adapt-block": "block", "adapt-bidirectional": "bidirectional", "ar": "causal"}[kind]
    model = constant_model(attention, shifted=kind != "sft")
    f = token_nll(model, diffusion=kind != "ar")
    x0, fixed = sft_batch(f)
    want, token_mean = per_answer_mean(f, x0, fixed, shifted=kind != "sft")
    assert abs(want - token_mean) > 0.2  # the batch tells the two normalisations apart
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        if kind == "sft":  # at t = 1 every answer token is masked
            out = diffusion_loss(model, x0, t=torch.ones(3), prompt_mask=fixed, generator=gen)
        elif kind == "ar":
            out = ar_loss(model, x0, prompt_mask=fixed)
        else:  # the two complementary views make every answer token a target exactly once
            out = adapt_loss(model, x0, prompt_mask=fixed, generator=gen)
        assert float(out.loss.detach()) == pytest.approx(want, rel=1e-5)
        assert out.n_tokens == int((~fixed).sum())


@pytest.mark.parametrize("attention", ["block", "bidirectional"])
def test_adapt_never_masks_the_prompt_in_either_view(attention):
    model = Spy(constant_model(attention, shifted=True))
    x0, fixed = sft_batch()
    for seed in range(10):
        adapt_loss(model, x0, prompt_mask=fixed, generator=torch.Generator().manual_seed(seed))
    masked_somewhere = torch.zeros_like(fixed)
    for ids in model.ids:
        views = ids[:, : 2 * 12].reshape(3, 2, 12).transpose(0, 1) if attention == "block" else ids.view(2, 3, 12)
        assert torch.equal(views[:, fixed], x0[fixed].expand(2, -1))  # never masked, in either view
        assert torch.equal(views[0] == MASK, ~fixed & (views[1] != MASK))  # complementary on the answer
        masked_somewhere |= views[0] == MASK
    assert masked_somewhere[~fixed].any()


def test_adapt_without_a_prompt_mask_is_unchanged():
    """The SFT arguments leave the pretraining loss as it was: same draws, same value."""
    model = constant_model("block", shifted=True)
    x0, _ = sft_batch()
    plain = adapt_loss(model, x0, generator=torch.Generator().manual_seed(3))
    nothing = adapt_loss(model, x0, prompt_mask=torch.zeros_like(x0, dtype=torch.bool), generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain.nll_sum, nothing.nll_sum)
    assert float(plain.loss.detach()) == pytest.approx(float(nothing.loss.detach()), rel=1e-6)  # all rows are equally long


# --- the trainer ---


def sft_config(tmp_path: Path, tokenizer, objective: str = "sft", **train) -> Path:
    tokenizer.save(tmp_path / "tok")
    write_jsonl(tmp_path / "sft.jsonl", examples(30))
    model = {"d_model": 32, "n_layers": 1, "n_heads": 2, "block_size": 8}
    data = {"sft": "sft.jsonl", "tokenizer": "tok", "seq_len": 72, "val_fraction": 0.25}
    settings = {"objective": objective, "steps": 8, "decay_steps": 8, "batch_size": 3, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                "eval_every": 4, "eval_batches": 2, "ckpt_every": 2, "log_every": 1, "out_dir": "out", "seed": 3}
    settings.update(train)
    if objective != "sft":
        model = {"block_size": 8}
    return write_config(tmp_path, {"model": model, "data": data, "train": settings})


def test_trainer_runs_sft_and_resumes_exactly(tmp_path, tiny_tokenizer):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = run_training(sft_config(tmp_path / "a", tiny_tokenizer), quiet=True)
    config_b = sft_config(tmp_path / "b", tiny_tokenizer)
    run_training(config_b, overrides={"train": {"steps": 5}}, quiet=True)
    checkpoints = tmp_path / "b" / "out" / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000005")  # died after logging step 5, before its checkpoint
    (checkpoints / "latest").write_text("step-00000004\n")
    resumed = run_training(config_b, quiet=True)
    a = read_metrics(tmp_path / "a" / "out" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / "out" / "metrics.jsonl")
    assert [(r["step"], r["loss"], r.get("val_nll")) for r in a] == [(r["step"], r["loss"], r.get("val_nll")) for r in b]
    assert [r["step"] for r in a] == list(range(1, 9)) and "val_nll" in a[3] and np.isfinite(a[-1]["val_nll"])
    wa, wb = read_safetensors(whole / "model.safetensors"), read_safetensors(resumed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    info = json.loads((whole / "training.json").read_text())
    assert info["objective"] == "sft" and info["data"]["examples"]["train"] + info["data"]["examples"]["val"] == 30
    lengths = open_sft(tmp_path / "a" / "out" / "sft", "train").index[:, 2]
    assert info["data"]["too_long"]["train"] == int((lengths > 72).sum()) > 0  # skipped and counted


def test_trainer_passes_the_prompt_mask_to_every_objective(tmp_path, tiny_tokenizer, monkeypatch):
    seen = []
    original = trainer.compute_loss
    monkeypatch.setattr(trainer, "compute_loss", lambda *a, **k: seen.append(k["prompt_mask"]) or original(*a, **k))
    run_training(sft_config(tmp_path, tiny_tokenizer, steps=2), quiet=True)
    assert len(seen) == 4 and all(m is not None and m.any() and not m.all() for m in seen)
    spied = []
    adapt = trainer.adapt_loss
    monkeypatch.setattr(trainer, "adapt_loss", lambda *a, **k: spied.append(k["prompt_mask"]) or adapt(*a, **k))
    base = make_model_dir(tmp_path / "base", tiny_tokenizer, attention="causal")
    for objective, extra in (("adapt", {"init_from": str(base), "distill": 0.5}), ("ar", {})):
        (tmp_path / objective).mkdir()
        config = sft_config(tmp_path / objective, tiny_tokenizer, objective, steps=2, eval_every=1, **extra)
        run_training(config, quiet=True)
        records = read_metrics(tmp_path / objective / "out" / "metrics.jsonl")
        assert [r["step"] for r in records] == [1, 2] and np.isfinite(records[-1]["val_nll"])
    # adapt: 2 steps x 2 micro-batches, then 2 validations of at least one batch; ar: its 4 micro-batches
    assert len(spied) >= 4 + 2 and all(m is not None and m.any() for m in spied)
    assert len(seen) == 4 + 4 and all(m is not None and m.any() for m in seen)


def test_sft_config_errors(tmp_path, tiny_tokenizer):
    config = sft_config(tmp_path, tiny_tokenizer)
    for overrides, match in [
        ({"train": {"objective": "diffusion"}}, "sft trains objective"),
        ({"data": {"sft_val": "nope.jsonl"}}, "sft_val .*nope.jsonl does not exist"),
        ({"data": {"sft_pad": "zero"}}, "sft_pad"),
        ({"data": {"max_tokens": 100}}, "max_tokens"),
    ]:
        with pytest.raises(UnmaskError, match=match):
            load_train_config(config, overrides=overrides)
    untokenized = write_config(tmp_path, {"data": {"sft": "sft.jsonl"}, "train": {"objective": "sft"}}, "notok.toml")
    with pytest.raises(UnmaskError, match="sft needs a tokenizer"):
        load_train_config(untokenized)
    plain = write_config(tmp_path, {"data": {"train_tokens": "x.npy"}, "train": {"objective": "sft"}}, "plain.toml")
    np.save(tmp_path / "x.npy", np.zeros(10, dtype=np.uint16))
    with pytest.raises(UnmaskError, match="objective 'sft' needs \\[data\\] sft"):
        load_train_config(plain)
    write_jsonl(tmp_path / "sft.jsonl", examples(3) + ['{"prompt": 1, "completion": "x"}'])
    with pytest.raises(UnmaskError, match="sft.jsonl:4: 'prompt' must be a string"):
        run_training(config, quiet=True)
