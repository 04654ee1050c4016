"""Token data for training: split by file, shard reuse, windows that are functions of the step."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from unmask.errors import UnmaskError
from unmask.train.build import BuildOptions, build_shards, split_documents
from unmask.train.config import load_train_config
from unmask.train.corpus import corpus_files
from unmask.train.data import TokenStream, TokenWindows, shard_data

EOS = 0


class CharEncoder:
    """A stand-in tokenizer: one id per character (ids 1..255), so arrays decode back to text."""

    vocab_size = 256
    eos_id = EOS
    fingerprint = "chars"

    def __init__(self) -> None:
        self.calls = 0

    def encode_batch(self, texts):
        self.calls += 1
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
    text = "".join("\x00" if t == EOS else chr(t) for t in np.asarray(arr).tolist())
    return {doc for doc in text.split("\x00") if doc}


def split_texts(root: Path) -> tuple[set[str], set[str]]:
    data = shard_data(root)
    return documents(data.train.take(np.zeros(1, dtype=np.int64), data.train.size)[0]), documents(
        data.val.take(np.zeros(1, dtype=np.int64), data.val.size)[0]
    )


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


def test_shards_split_by_file_and_are_reused(tmp_path):
    files = make_corpus(tmp_path / "src")
    encoder = CharEncoder()
    options = BuildOptions(val_fraction=0.25, shard_bytes=300)
    first = build_shards([str(tmp_path / "src")], tmp_path / "shards", encoder, options)
    train_docs, val_docs = split_texts(tmp_path / "shards")
    assert train_docs and val_docs and not train_docs & val_docs
    assert train_docs | val_docs == {p.read_text() for p in files}
    assert first.manifest["totals"]["files"] == len(files) and first.manifest["dtype"] == "uint16"
    assert first.manifest["totals"]["shards"]["train"] > 1  # several shards, read back as one stream

    calls = encoder.calls
    again = build_shards([str(tmp_path / "src")], tmp_path / "shards", encoder, options)
    assert encoder.calls == calls and again.written == 0  # every shard matched its key: nothing re-tokenised
    assert again.manifest == first.manifest
    build_shards([str(tmp_path / "src")], tmp_path / "shards", encoder, BuildOptions(val_fraction=0.5, shard_bytes=300))
    assert encoder.calls > calls  # a different split tokenises again


def test_max_files_and_max_tokens(tmp_path):
    make_corpus(tmp_path / "src")
    few = build_shards([str(tmp_path / "src")], tmp_path / "a", CharEncoder(), BuildOptions(val_fraction=0.25, max_files=10))
    assert few.manifest["totals"]["files"] == 10
    build_shards([str(tmp_path / "src")], tmp_path / "b", CharEncoder(), BuildOptions(val_fraction=0.25))
    capped = shard_data(tmp_path / "b", max_tokens=300)
    assert capped.train.size + capped.val.size == 300 and capped.val.size == 75
    assert capped.fingerprint != shard_data(tmp_path / "b").fingerprint


def test_stream_reads_across_arrays():
    flat = np.arange(100, dtype=np.uint16)
    stream = TokenStream([flat[:7], flat[7:7], flat[7:50], flat[50:]])
    starts = np.array([0, 3, 5, 40, 48, 84])
    assert np.array_equal(stream.take(starts, 16), flat[starts[:, None] + np.arange(16)])
    assert stream.size == 100 and stream.truncate(60).size == 60 and stream.max_id() == 99


def test_each_epoch_visits_every_window_once():
    windows = TokenWindows(np.arange(1000, dtype=np.uint16), 16)
    per_epoch = windows.n_windows
    starts = np.concatenate([windows.starts(4, seed=1, step=s, micro=m, micro_batches=3) for s in range(per_epoch) for m in range(3)])
    first, second = starts[:per_epoch], starts[per_epoch : 2 * per_epoch]
    for epoch in (first, second):
        assert len(set(epoch.tolist())) == per_epoch  # no window twice in an epoch
        assert len({s % 16 for s in epoch.tolist()}) == 1  # one offset per epoch: windows do not overlap
        assert epoch.max() + 16 <= 1000
    assert not np.array_equal(np.sort(first), np.sort(second)) or not np.array_equal(first, second)


def test_micro_batches_of_a_step_are_disjoint():
    windows = TokenWindows(np.arange(5000, dtype=np.uint16), 16)
    parts = [set(windows.starts(8, seed=0, step=5, micro=m, micro_batches=4).tolist()) for m in range(4)]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == 32  # what each process takes, no overlap


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
