"""Token data for training: split by file, cache reuse, windows that are functions of the step."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from unmask.errors import UnmaskError
from unmask.train.config import load_train_config
from unmask.train.data import TokenWindows, build_token_cache, corpus_files, split_documents

EOS = 0


def char_encode(texts):
    """A stand-in tokenizer: one id per character (ids 1..255), so arrays decode back to text."""
    return [[min(ord(c), 255) or 1 for c in text] for text in texts]


def make_corpus(root: Path, n: int = 40) -> list[Path]:
    paths = []
    for i in range(n):
        path = root / f"pkg{i % 3}" / f"mod{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"def f{i}():\n    return {i * 7919}\n" * (1 + i % 4))
        paths.append(path)
    return paths


def documents(arr: np.ndarray) -> set[str]:
    """The texts of a split: the array cut at EOS and mapped back to characters."""
    text = "".join("\x00" if t == EOS else chr(t) for t in arr.tolist())
    return {doc for doc in text.split("\x00") if doc}


def build(tmp_path: Path, files: list[Path], key: dict, calls: list[int] | None = None, **kw):
    def encode(texts):
        if calls is not None:
            calls.append(len(texts))
        return char_encode(texts)

    return build_token_cache(files, encode, EOS, 256, tmp_path / "cache", source_key=key, val_fraction=kw.pop("val_fraction", 0.25), **kw)


def test_split_is_by_file_and_independent_of_order():
    docs = [(hashlib.sha256(str(i).encode()).hexdigest(), f"text {i}") for i in range(200)]
    train, val = split_documents(docs, 0.2)
    train2, val2 = split_documents(list(reversed(docs)), 0.2)
    assert {d[0] for d in train} == {d[0] for d in train2} and {d[0] for d in val} == {d[0] for d in val2}
    assert not {d[0] for d in train} & {d[0] for d in val}
    assert len(train) + len(val) == len(docs)
    assert 20 <= len(val) <= 60  # about 20% of 200


def test_tiny_corpus_still_gets_a_validation_file():
    docs = [(hashlib.sha256(b"a").hexdigest(), "a"), (hashlib.sha256(b"b").hexdigest(), "b")]
    train, val = split_documents(docs, 0.01)
    assert len(train) == 1 and len(val) == 1


def test_cache_splits_by_file_and_is_reused(tmp_path):
    files = make_corpus(tmp_path / "src")
    calls: list[int] = []
    data = build(tmp_path, files, {"v": 1}, calls)
    train_docs, val_docs = documents(data.train), documents(data.val)
    assert train_docs and val_docs and not train_docs & val_docs
    assert train_docs | val_docs == {p.read_text() for p in files}
    assert data.info["files"]["train"] + data.info["files"]["val"] == len(files)
    assert data.train.dtype == np.uint16

    n_calls = len(calls)
    again = build(tmp_path, files, {"v": 1}, calls)
    assert len(calls) == n_calls  # manifest matched: nothing re-tokenised
    assert np.array_equal(again.train, data.train) and np.array_equal(again.val, data.val)
    build(tmp_path, files, {"v": 2}, calls)
    assert len(calls) > n_calls  # a different source key tokenises again


def test_max_files_and_max_tokens(tmp_path):
    files = make_corpus(tmp_path / "src")
    few = build(tmp_path / "a", files, {}, max_files=10)
    assert few.info["files"]["train"] + few.info["files"]["val"] == 10
    capped = build(tmp_path / "b", files, {}, max_tokens=300)
    assert capped.train.size + capped.val.size <= 300


def test_windows_are_a_function_of_the_step():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = TokenWindows(tokens, 16), TokenWindows(tokens.copy(), 16)
    x = a.batch(4, seed=3, step=7, micro=1)
    assert x.shape == (4, 16)
    assert np.array_equal(x.numpy(), b.batch(4, seed=3, step=7, micro=1).numpy())
    assert not np.array_equal(x.numpy(), a.batch(4, seed=3, step=8, micro=1).numpy())
    assert not np.array_equal(x.numpy(), a.batch(4, seed=3, step=7, micro=0).numpy())
    assert not np.array_equal(x.numpy(), a.batch(4, seed=4, step=7, micro=1).numpy())
    for row in x.numpy():  # every window is a contiguous slice of the stream
        assert np.array_equal(row, tokens[row[0] : row[0] + 16])
    fixed = a.fixed(8)
    assert np.array_equal(fixed.numpy(), b.fixed(8).numpy())
    starts = fixed[:, 0].numpy()
    assert starts[0] == 0 and starts[-1] == 1000 - 16 and len(set(starts.tolist())) == 8


def test_short_split_is_a_clear_error():
    with pytest.raises(UnmaskError, match="fewer than seq_len"):
        TokenWindows(np.arange(10), 16, "validation")


def test_stdlib_placeholder_and_site_packages_left_out(tmp_path):
    config = tmp_path / "c.toml"
    (tmp_path / "tok").mkdir()
    config.write_text('[data]\npaths = ["{stdlib}/json"]\ntokenizer = "tok"\n')
    cfg = load_train_config(config)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert Path(cfg.data.paths[0]) == stdlib / "json"
    files = corpus_files(cfg.data.paths, cfg.data.suffixes)
    assert files and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
