"""`unmask data build`: skips never fatal, duplicates out, workers agree, resume after a crash, shards train."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import unmask.train.build as build_module
from unmask.cli import main as cli_main
from unmask.errors import UnmaskError
from unmask.models.io import load_model
from unmask.train.build import BuildOptions, build_shards
from unmask.train.corpus import UNREADABLE, read_document
from unmask.train.data import shard_data
from unmask.train.shards import read_manifest
from unmask.train.trainer import run_training

from conftest import CODE
from test_train_data import EOS, CharEncoder, documents
from test_trainer import write_config


class BigVocabEncoder(CharEncoder):
    """The character stand-in with a vocabulary too large for uint16."""

    vocab_size = 70_000
    fingerprint = "chars-70k"


def write_tree(root: Path) -> dict[str, str]:
    """A small source tree with one file of every kind the builder must cope with; returns the usable texts."""
    root.mkdir(parents=True)
    texts = {f"m{i}.py": CODE[i % len(CODE)] + f"value_{i} = {i}\n" * (i + 1) for i in range(30)}
    for name, text in texts.items():
        (root / name).write_text(text)
    (root / "zz_copy_of_m3.py").write_text(texts["m3.py"])  # an exact duplicate
    (root / "nul.py").write_bytes(b"x = 1\x00\n")  # binary
    (root / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))  # not UTF-8
    (root / "huge.py").write_text("x = 1\n" * 400)  # over the size limit set below
    (root / "blank.py").write_text("\n   \n")
    (root / "notes.txt").write_text("not collected: wrong suffix\n")
    return texts


def all_tokens(root: Path, split: str) -> np.ndarray:
    stream = getattr(shard_data(root), split)
    return stream.take(np.zeros(1, dtype=np.int64), stream.size)[0] if stream.size else np.zeros(0)


def test_skips_are_counted_and_duplicates_removed(tmp_path):
    texts = write_tree(tmp_path / "src")
    result = build_shards([str(tmp_path / "src")], tmp_path / "out", CharEncoder(),
                          BuildOptions(val_fraction=0.2, max_doc_bytes=2000, shard_bytes=500))
    manifest = read_manifest(tmp_path / "out")
    assert manifest == result.manifest and manifest["complete"]
    assert manifest["totals"]["skipped"] == {"binary": 2, "duplicate": 1, "empty": 1, "oversized": 1}
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert reasons["nul.py"] == reasons["latin1.py"] == "binary" and reasons["huge.py"] == "oversized"
    assert reasons["zz_copy_of_m3.py"] == "duplicate"  # the first path in sorted order stays
    kept = {Path(f["path"]).name for f in manifest["files"]}
    assert kept == set(texts)
    train, val = documents(all_tokens(tmp_path / "out", "train")), documents(all_tokens(tmp_path / "out", "val"))
    assert train | val == set(texts.values()) and not train & val and val
    # the manifest accounts for every token, per file and per shard
    assert sum(f["tokens"] for f in manifest["files"]) == sum(manifest["totals"]["tokens"].values())
    for shard in manifest["shards"]:
        assert shard["tokens"] == sum(f["tokens"] for f in manifest["files"] if f["shard"] == shard["name"])
        assert np.load(tmp_path / "out" / shard["file"], mmap_mode="r").size == shard["tokens"]
    files_by_hash = {f["hash"]: f["split"] for f in manifest["files"]}
    assert len(files_by_hash) == len(manifest["files"])  # no content twice, so none in both splits
    assert read_document(tmp_path / "missing.py") == (None, UNREADABLE)


def test_workers_give_the_same_shards(tmp_path, tiny_tokenizer):
    write_tree(tmp_path / "src")
    options = BuildOptions(val_fraction=0.2, max_doc_bytes=2000, shard_bytes=500)
    one = build_shards([str(tmp_path / "src")], tmp_path / "one", tiny_tokenizer, options)
    options.workers = 2  # spawned processes, each loading the tokenizer copy in two/tokenizer
    two = build_shards([str(tmp_path / "src")], tmp_path / "two", tiny_tokenizer, options)
    assert one.manifest == two.manifest
    for shard in one.manifest["shards"]:
        assert np.array_equal(np.load(tmp_path / "one" / shard["file"]), np.load(tmp_path / "two" / shard["file"]))


def test_interrupted_build_resumes(tmp_path, monkeypatch):
    write_tree(tmp_path / "src")
    options = BuildOptions(val_fraction=0.2, max_doc_bytes=2000, shard_bytes=400)
    whole = build_shards([str(tmp_path / "src")], tmp_path / "whole", CharEncoder(), options)
    n_shards = len(whole.manifest["shards"])
    assert n_shards >= 4

    original, written = build_module.write_array_atomic, []

    def crash_after_two(path, arr):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path.name)
        original(path, arr)

    monkeypatch.setattr(build_module, "write_array_atomic", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_shards([str(tmp_path / "src")], tmp_path / "part", CharEncoder(), options)
    manifest = read_manifest(tmp_path / "part")
    assert not manifest["complete"] and [s["name"] for s in manifest["shards"] if s["done"]] == [Path(w).stem for w in written]
    assert not list((tmp_path / "part").glob(".*tmp*"))  # no half-written shard left behind
    with pytest.raises(UnmaskError, match="did not finish"):
        shard_data(tmp_path / "part")

    monkeypatch.setattr(build_module, "write_array_atomic", original)
    encoder = CharEncoder()
    resumed = build_shards([str(tmp_path / "src")], tmp_path / "part", encoder, options)
    assert (resumed.written, resumed.reused) == (n_shards - 2, 2)
    assert resumed.manifest == whole.manifest
    for shard in whole.manifest["shards"]:
        assert np.array_equal(np.load(tmp_path / "whole" / shard["file"]), np.load(tmp_path / "part" / shard["file"]))


def test_jsonl_records_and_dtype(tmp_path):
    lines = [json.dumps({"content": f"def f{i}():\n    return {i}\n"}) for i in range(6)]
    lines += ["not json", json.dumps({"text": "wrong field"}), json.dumps(["a list"]), "", json.dumps({"content": "  "})]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    result = build_shards([str(tmp_path / "data.jsonl")], tmp_path / "out", BigVocabEncoder(),
                          BuildOptions(val_fraction=0.3, text_field="content"))
    manifest = result.manifest
    assert manifest["dtype"] == "uint32"
    assert manifest["totals"]["skipped"] == {"bad_record": 3, "empty": 1}
    assert sorted(f["record"] for f in manifest["files"]) == list(range(6))
    got = documents(all_tokens(tmp_path / "out", "train")) | documents(all_tokens(tmp_path / "out", "val"))
    assert got == {json.loads(line)["content"] for line in lines[:6]}
    with pytest.raises(UnmaskError, match="uint16"):
        build_shards([str(tmp_path / "data.jsonl")], tmp_path / "out2", BigVocabEncoder(), BuildOptions(dtype="uint16"))


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"class C{i}:\n    x = {i}\n" for i in range(7)] + [None, ""]
    pq.write_table(pa.table({"text": texts}), tmp_path / "rows.parquet", row_group_size=3)
    result = build_shards([str(tmp_path / "rows.parquet")], tmp_path / "out", CharEncoder(), BuildOptions(val_fraction=0.3))
    assert result.manifest["totals"]["skipped"] == {"bad_record": 1, "empty": 1}
    got = documents(all_tokens(tmp_path / "out", "train")) | documents(all_tokens(tmp_path / "out", "val"))
    assert got == set(texts[:7])


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UnmaskError, match="pyarrow"):
        build_shards([str(tmp_path / "rows.parquet")], tmp_path / "out", CharEncoder())


def test_cli_build_then_train_from_shards(tmp_path, tiny_tokenizer, capsys):
    write_tree(tmp_path / "src")
    tiny_tokenizer.save(tmp_path / "tok")
    argv = ["data", "build", str(tmp_path / "src"), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "shards"),
            "--workers", "1", "--val-fraction", "0.2", "--max-file-mb", "0.002"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "skipped: duplicate" in out and "tokens train" in out and "wall time" in out
    assert cli_main(["data", "build", str(tmp_path / "src"), "--tokenizer", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 1
    assert "tokenizer directory not found" in capsys.readouterr().err

    model = {"d_model": 32, "n_layers": 1, "n_heads": 2}
    data = {"shards": "shards", "seq_len": 16}
    train = {"steps": 3, "batch_size": 2, "eval_batches": 1, "out_dir": "out", "log_every": 1}
    config = write_config(tmp_path, {"model": model, "data": data, "train": train})
    final = run_training(config, quiet=True)
    loaded = load_model(final)
    assert loaded.config.vocab_size == tiny_tokenizer.vocab_size and (final / "tokenizer.json").is_file()
    info = json.loads((final / "training.json").read_text())
    assert info["data"]["tokens"]["train"] == read_manifest(tmp_path / "shards")["totals"]["tokens"]["train"]

    other = tmp_path / "other-tok"
    from unmask.tokenizer import train_tokenizer

    train_tokenizer(CODE * 2, vocab_size=290).save(other)
    with pytest.raises(UnmaskError, match="not the tokenizer"):
        run_training(config, overrides={"data": {"tokenizer": str(other)}}, resume=False, quiet=True)
    with pytest.raises(UnmaskError, match="exactly one"):
        run_training(config, overrides={"data": {"train_tokens": "x.npy"}}, quiet=True)


def test_eos_ends_every_document(tmp_path):
    write_tree(tmp_path / "src")
    build_shards([str(tmp_path / "src")], tmp_path / "out", CharEncoder(), BuildOptions(val_fraction=0.2, max_doc_bytes=2000))
    manifest = read_manifest(tmp_path / "out")
    for shard in manifest["shards"]:
        arr = np.load(tmp_path / "out" / shard["file"])
        assert arr[-1] == EOS and int((arr == EOS).sum()) == shard["files"]
