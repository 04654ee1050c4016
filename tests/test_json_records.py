"""The JSON records beside models and data (training.json, base.json, SFT and shard manifests,
trainer state) go through the one reader, ``files.read_json_object``: a record that is not a JSON
object, or a path that is not a regular file, is a one-line error or a record ignored, never a
traceback or a read that blocks."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from unmask.cli import main
from unmask.errors import UnmaskError
from unmask.models.delta import BASE_NAME, load_delta
from unmask.train.sft import MANIFEST_NAME, build_sft, sft_data
from unmask.train.shards import read_manifest


def _within(seconds: float, work):
    """``work()``'s result or exception, failing the test if it blocks."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # handed to the test below
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "the read blocked"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_info_ignores_a_training_record_that_is_not_an_object(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "training.json").write_text("[1, 2]")
    assert main(["info", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"] == {}
    assert main(["info", str(model)]) == 0
    assert "training." not in capsys.readouterr().out


def test_a_delta_base_record_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / BASE_NAME)
    with pytest.raises(UnmaskError, match="not a regular file"):
        _within(20, lambda: load_delta(tmp_path))


def test_sft_manifests_that_are_not_objects(tmp_path: Path, tiny_tokenizer) -> None:
    source = tmp_path / "sft.jsonl"
    source.write_text("\n".join(json.dumps({"prompt": f"# {k}\n", "completion": "x = 1\n"}) for k in range(6)) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).write_text("[]")  # damaged: built again
    assert build_sft(source, out, tiny_tokenizer, val_fraction=0.0)["examples"]
    (out / MANIFEST_NAME).write_text('"a string"')
    with pytest.raises(UnmaskError, match="not an SFT data directory .*expected a JSON object"):
        sft_data(out)


def test_a_shard_manifest_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(UnmaskError, match="expected a JSON object, got list"):
        read_manifest(tmp_path)
