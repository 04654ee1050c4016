"""Held-out perplexity: windows, the AR figure against a direct computation, the ELBO estimate
against exact enumeration, the held-out data sources, and the command end to end."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CODE, make_model_dir

from unmask.cli import main
from unmask.diffusion.exact import exact_elbo
from unmask.diffusion.schedule import DEFAULT_EPS
from unmask.errors import UnmaskError
from unmask.eval.heldout import heldout_documents, heldout_tokens
from unmask.eval.perplexity import make_windows, score
from unmask.loading import load
from unmask.tokenizer import train_tokenizer
from unmask.train.build import BuildOptions, build_shards
from unmask.train.shards import open_split


def test_windows_are_consecutive_and_the_ar_view_adds_one_token_before() -> None:
    tokens = np.arange(1000)
    w = make_windows(tokens, 16)
    assert w.shape == ((1000 - 1) // 16, 17)
    assert torch.equal(w[:, 1:].flatten(), torch.arange(1, 1 + w.shape[0] * 16))  # non-overlapping, no gaps
    assert torch.equal(w[:, 0], w[:, 1] - 1)
    few = make_windows(tokens, 16, limit=5)
    assert few.shape == (5, 17) and int(few[0, 1]) == 1 and int(few[-1, -1]) == w[-1, -1]
    with pytest.raises(UnmaskError, match="fewer than one window"):
        make_windows(np.arange(10), 16)


def test_ar_perplexity_is_the_exact_next_token_likelihood_of_the_same_tokens(tiny_ar_model_dir: Path) -> None:
    model = load(tiny_ar_model_dir, device="cpu").model
    windows = make_windows(np.random.default_rng(0).integers(3, 250, size=400), 24)
    out = score(model, windows, batch_size=5)
    with torch.no_grad():
        logp = F.log_softmax(model(windows[:, :-1]).double(), dim=-1)
    direct = -logp.gather(-1, windows[:, 1:, None]).mean().item()
    assert out["objective"] == "ar" and out["kind"] == "exact"
    assert out["nll_per_token"] == pytest.approx(direct, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(direct), rel=1e-5)
    assert out["tokens_scored"] == windows.shape[0] * 24


def test_the_elbo_estimate_converges_to_the_exact_bound(tiny_model_dir: Path, tiny_tokenizer) -> None:
    model = load(tiny_model_dir, device="cpu").model
    windows = make_windows(np.asarray(tiny_tokenizer.encode("".join(CODE))), 5, limit=4)
    exact = np.mean([exact_elbo(model, w[1:], eps=DEFAULT_EPS) for w in windows]) / 5
    estimate = score(model, windows, samples=2000, batch_size=500)
    assert estimate["kind"] == "upper bound (ELBO)" and estimate["time_samples_per_window"] == 2000
    assert estimate["nll_per_token"] == pytest.approx(exact, rel=0.04)
    one = score(model, windows, samples=1, batch_size=500)["nll_per_token"]
    assert one != estimate["nll_per_token"]  # more diffusion times per window is a different (finer) estimate


def _corpus(tmp_path: Path, n: int = 24) -> list[Path]:
    files = []
    for i in range(n):
        path = tmp_path / "corpus" / f"m{i}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n")
        files.append(path)
    return files


def test_the_training_split_is_rebuilt_from_the_record(tmp_path: Path, tiny_tokenizer) -> None:
    files = _corpus(tmp_path)
    record = {"config": {"data": {"paths": [str(tmp_path / "corpus")], "suffixes": [".py"], "val_fraction": 0.25}}}
    held = heldout_documents(record)
    expected = sorted(
        str(p) for p in files if int(hashlib.sha256(p.read_text().encode()).hexdigest()[:16], 16) / 2**64 < 0.25
    )
    assert sorted(name for name, _ in held.documents) == expected and expected
    assert "validation split" in held.source
    tokens, source = heldout_tokens(tiny_tokenizer, record)
    joined = [t for _, text in held.documents for t in tiny_tokenizer.encode(text) + [tiny_tokenizer.eos_id]]
    assert tokens.tolist() == joined and source == held.source
    root = tmp_path / "built"  # what the trainer builds from the same paths: the same validation tokens
    build_shards([str(tmp_path / "corpus")], root, tiny_tokenizer, BuildOptions(val_fraction=0.25, progress=False))
    assert tokens.tolist() == np.concatenate(open_split(root, "val")).tolist()
    capped = {"config": {"data": {**record["config"]["data"], "max_tokens": 40}}}
    assert heldout_tokens(tiny_tokenizer, capped)[0].tolist() == joined[:10]  # the trainer's budget: 40 x 0.25


def test_shard_directories_and_token_files_give_their_validation_tokens(tmp_path: Path, tiny_tokenizer) -> None:
    _corpus(tmp_path)
    root = tmp_path / "shards"
    build_shards([str(tmp_path / "corpus")], root, tiny_tokenizer, BuildOptions(val_fraction=0.3, progress=False))
    tokens, source = heldout_tokens(tiny_tokenizer, {}, [str(root)])
    assert tokens.tolist() == np.concatenate(open_split(root, "val")).tolist() and tokens.size
    held = heldout_documents({}, [str(root)])
    assert "shard directory" in held.source and len(held.documents) >= 1
    other = train_tokenizer(CODE * 4 + ["x = 1\n"] * 8, vocab_size=280)
    with pytest.raises(UnmaskError, match="another tokenizer"):
        heldout_tokens(other, {}, [str(root)])
    npy = tmp_path / "val.npy"
    np.save(npy, np.arange(50, dtype=np.uint16))
    assert heldout_tokens(tiny_tokenizer, {}, [str(npy)])[0].tolist() == list(range(50))


def test_eval_ppl_scores_both_models_on_the_same_tokens(
    tiny_model_dir: Path, tiny_ar_model_dir: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "held.py"
    data.write_text("".join(CODE) * 3)
    out = tmp_path / "ppl.json"
    code = main(["eval", "ppl", "--model", str(tiny_model_dir), "--ar-model", str(tiny_ar_model_dir),
                 "--data", str(data), "--seq-len", "32", "--samples", "2", "--device", "cpu", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "upper bound" in captured.out and "exact" in captured.out and "ratio" in captured.out
    record = json.loads(out.read_text())
    bound, ar = record["models"]
    assert (bound["objective"], ar["objective"]) == ("diffusion", "ar")
    assert bound["tokens_scored"] == ar["tokens_scored"] and bound["windows"] == ar["windows"]
    assert record["ratio_bound_to_ar"] == pytest.approx(bound["perplexity"] / ar["perplexity"])


def test_eval_ppl_refuses_models_with_different_tokenizers(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    other = make_model_dir(tmp_path / "other", train_tokenizer(CODE * 4 + ["y = 2\n"] * 8, vocab_size=280), "causal")
    code = main(["eval", "ppl", "--model", str(tiny_model_dir), "--ar-model", str(other), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1 and "different tokenizers" in captured.err and "Traceback" not in captured.err


def test_a_recorded_shard_directory_that_is_missing_is_one_clear_error(tmp_path: Path) -> None:
    record = {"config": {"data": {"shards": str(tmp_path / "gone")}}}
    with pytest.raises(UnmaskError, match="not here.*model card, or pass --data"):
        heldout_documents(record)
