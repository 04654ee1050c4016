"""Damaged and hostile model directories: one line naming the problem, no traceback, no hang, nothing allocated.

Sizes in ``config.json`` are checked against sane bounds and then against the safetensors headers
before anything is allocated; every field has its JSON type checked (bools are bools); special
files (a FIFO named ``config.json``) are refused instead of read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hf_fixtures as fx
from conftest import make_model_dir
from unmask.errors import UnmaskError
from unmask.loading import load

NATIVE_BAD = {
    "vocab_size": 10**12, "d_ff": 10**12, "n_layers": 10**7, "d_model": 10**9, "max_seq_len": 10**15,
    "rope_theta": "abc", "shifted": "no", "tie_embeddings": 1, "qk_norm": "false", "norm_eps": "1e-5",
    "attention": 5, "mask_token_id": "3", "n_heads": 4.0, "block_size": True, "init_std": [0.02], "extra": 3,
}
# Within the bounds, but not what the weights hold: refused from the headers, before allocation.
NATIVE_MISMATCH = {"vocab_size": 1 << 23, "d_ff": 1 << 19, "n_layers": 900, "max_seq_len": 64, "d_model": 1 << 15}


@pytest.fixture(scope="module")
def native(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("native") / "tiny", tiny_tokenizer)


def variant(source: Path, target: Path, **config: object) -> Path:
    shutil.copytree(source, target)
    data = json.loads((source / "config.json").read_text())
    data.update(config)
    (target / "config.json").write_text(json.dumps(data))
    return target


def one_line_error(directory: Path, *words: str) -> str:
    with pytest.raises(UnmaskError) as info:
        load(directory, device="cpu")
    message = str(info.value)
    assert "\n" not in message and str(directory) in message, message
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize("key", sorted(NATIVE_BAD))
def test_a_bad_native_config_field_is_one_line(native, tmp_path, key):
    one_line_error(variant(native, tmp_path / "m", **{key: NATIVE_BAD[key]}), "config.json", key)


@pytest.mark.parametrize("key", sorted(NATIVE_MISMATCH))
def test_native_sizes_are_checked_against_the_weight_headers_before_allocating(native, tmp_path, key):
    extra = {"n_heads": 8} if key == "d_model" else {}  # head_dim 4096: within bounds
    directory = variant(native, tmp_path / "m", **{key: NATIVE_MISMATCH[key]}, **extra)
    if key == "max_seq_len":  # not a weight shape: a smaller context loads
        assert load(directory, device="cpu").model.config.max_seq_len == 64
        return
    # In a child limited to 6 GiB of address space: allocating the d_model 32768 model first (over
    # 20 GiB) would fail there with an allocator traceback instead of the one line.
    script = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
              "from unmask.errors import UnmaskError\nfrom unmask.loading import load\n"
              "try:\n    load(sys.argv[1], device='cpu')\nexcept UnmaskError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and not proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.count("\n") == 1 and "model.safetensors" in proc.stdout, proc.stdout


def test_a_not_a_number_in_config_json_is_refused(native, tmp_path):
    directory = variant(native, tmp_path / "m")
    text = (directory / "config.json").read_text().replace('"rope_theta": 10000.0', '"rope_theta": NaN')
    (directory / "config.json").write_text(text)
    one_line_error(directory, "rope_theta")


HF_BAD = {
    "dream": {"vocab_size": 10**12, "intermediate_size": 10**12, "num_hidden_layers": 10**7, "rope_theta": "abc",
              "tie_word_embeddings": "no", "hidden_size": 10**9, "max_position_embeddings": 10**15},
    "llada": {"embedding_size": 10**12, "mlp_hidden_size": 10**12, "n_layers": 10**7, "weight_tying": "no",
              "rope_theta": "abc", "include_qkv_bias": 0},
}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    return {f: fx.write_checkpoint(tmp_path_factory.mktemp(f) / f, f) for f in HF_BAD}


@pytest.mark.parametrize("family,key", [(f, k) for f, keys in HF_BAD.items() for k in sorted(keys)])
def test_a_bad_published_config_field_is_one_line(published, tmp_path, family, key):
    directory = tmp_path / family
    shutil.copytree(published[family], directory)
    fx.edit_config(directory, **{key: HF_BAD[family][key]})
    one_line_error(directory, "config.json")


@pytest.mark.parametrize("family,key,value", [("dream", "vocab_size", 1 << 23), ("dream", "num_hidden_layers", 700),
                                              ("llada", "mlp_hidden_size", 1 << 19)])
def test_published_sizes_are_checked_against_the_headers(published, tmp_path, family, key, value):
    directory = tmp_path / family
    shutil.copytree(published[family], directory)
    fx.edit_config(directory, **{key: value})
    one_line_error(directory, "safetensors")


# Each special file is made in a copy of the directory; a child process loads them all, so a
# hang fails this test by its timeout instead of hanging the suite.
SPECIAL = {
    "native": ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
    "dream": ["config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json", "vocab.json"],
    "llada": ["tokenizer.json", "model.safetensors"],
}


def test_special_files_are_refused_not_read(native, published, tmp_path):
    sources = {"native": native, **published}
    cases = []
    for kind, names in SPECIAL.items():
        for name in names:
            directory = tmp_path / f"{kind}-{name}"
            shutil.copytree(sources[kind], directory)
            (directory / name).unlink()
            os.mkfifo(directory / name)
            cases.append(str(directory))
    big = tmp_path / "native-big-config"
    shutil.copytree(native, big)
    with (big / "tokenizer_config.json").open("r+b") as f:
        f.truncate(65 << 20)  # sparse: larger than any JSON file a model directory needs
    cases.append(str(big))
    script = (
        "import sys\nfrom unmask.errors import UnmaskError\nfrom unmask.loading import load\n"
        "for d in sys.argv[1:]:\n"
        "    try:\n        load(d, device='cpu')\n        print('LOADED', d)\n"
        "    except UnmaskError as e:\n        print('ERROR', str(e).replace(chr(10), ' | '))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *cases], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(cases), proc.stdout
    for case, line in zip(cases, lines):
        assert line.startswith("ERROR") and " | " not in line, line
        assert ("a FIFO" in line) if "big" not in case else ("larger than" in line), line


def test_the_cli_prints_one_line_and_exits(native, tmp_path):
    for key in ("vocab_size", "rope_theta", "shifted"):
        directory = variant(native, tmp_path / key, **{key: NATIVE_BAD[key]})
        proc = subprocess.run([sys.executable, "-m", "unmask", "generate", "--model", str(directory), "x"],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode != 0
        assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("unmask: error:"), proc.stderr
