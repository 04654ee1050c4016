"""Published checkpoint layouts (LLaDA, Dream, Fast-dLLM v2, SDAR) loaded into unmask's own Transformer.

The checkpoints are tiny random ones written by ``hf_fixtures`` in the exact published layouts;
``hf_reference`` is an independent float64 implementation of each architecture. Nothing here
imports anything from the checkpoint directories, and a test checks that nothing there ran.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_fixtures as fx
from hf_reference import reference_logits
from unmask.errors import UnmaskError
from unmask.loading import default_model_dir, load
from unmask.models.hf import FAMILIES as HF_FAMILIES
from unmask.models.hf import is_hf_checkpoint
from unmask.models.transformer import KVCache

FAMILIES = fx.FAMILIES
SHARDS = {"llada": 3, "dream": 1, "fast_dllm_v2": 2, "sdar": 3}  # as released: LLaDA 6, Dream 4, ... (scaled)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {f: fx.write_checkpoint(tmp_path_factory.mktemp(f), f, shards=SHARDS[f]) for f in FAMILIES}


@pytest.fixture(scope="module")
def loaded(ckpt: dict[str, Path]):
    return {f: load(ckpt[f], device="cpu") for f in FAMILIES}


def stored_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def special_ids(directory: Path) -> dict[str, int]:
    decoder = json.loads((directory / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    return {entry["content"]: int(i) for i, entry in decoder.items()}


def sample_ids(tokenizer, batch: int = 2, length: int = 22, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, tokenizer.vocab_size, (batch, length), generator=g)
    ids[0, 3] = tokenizer.mask_id
    return ids


# ----------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_an_independent_implementation(family: str, ckpt, loaded) -> None:
    lm = loaded[family]
    ids = sample_ids(lm.tokenizer)
    with torch.no_grad():
        ours = lm.model(ids).double()
    ref = reference_logits(family, stored_weights(ckpt[family]), fx.read_config(ckpt[family]), ids)
    assert ours.shape == ref.shape
    # rows past the tokenizer's vocabulary (padded embeddings) are never predicted by the loaded model
    usable = lm.tokenizer.vocab_size
    assert lm.model.config.usable_vocab in (None, usable) and bool((ours[..., usable:] == float("-inf")).all())
    ours, ref = ours[..., :usable], ref[..., :usable]
    assert ref.abs().max() > 0.5  # logits of a size at which a wrong mapping would show
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_the_parity_check_catches_a_wrong_mapping(family: str, ckpt, loaded) -> None:
    """Swapping the MLP's gate and up matrices in the reference moves the logits far beyond 1e-4."""
    weights = stored_weights(ckpt[family])
    gate, up = ("ff_proj", "up_proj") if family == "llada" else ("mlp.gate_proj", "mlp.up_proj")
    g = next(n for n in weights if f".0.{gate}." in n)
    u = g.replace(gate, up)
    weights[g], weights[u] = weights[u], weights[g]
    ids = sample_ids(loaded[family].tokenizer)
    with torch.no_grad():
        ours = loaded[family].model(ids).double()
    wrong = reference_logits(family, weights, fx.read_config(ckpt[family]), ids)
    assert (ours - wrong).abs().max().item() > 1e-2


def test_model_configs_follow_each_family(ckpt, loaded) -> None:
    c = {f: loaded[f].model.config for f in FAMILIES}
    assert (c["llada"].attention, c["llada"].shifted, c["llada"].tie_embeddings, c["llada"].qkv_bias) == (
        "bidirectional", False, False, False)
    assert (c["dream"].attention, c["dream"].shifted, c["dream"].qkv_bias, c["dream"].n_kv_heads) == (
        "bidirectional", True, True, 2)
    assert (c["fast_dllm_v2"].attention, c["fast_dllm_v2"].block_size, c["fast_dllm_v2"].shifted) == ("block", 8, True)
    sdar = c["sdar"]
    assert (sdar.attention, sdar.block_size, sdar.shifted, sdar.qk_norm, sdar.tie_embeddings) == ("block", 4, False, True, True)
    assert sdar.head_dim == 16 and sdar.d_model // sdar.n_heads == 12  # explicit head_dim, as in Qwen3-4B
    for family in FAMILIES:
        ids, cfg = special_ids(ckpt[family]), c[family]
        mask = {"llada": "<|mdm_mask|>", "dream": "<|mask|>", "fast_dllm_v2": "|<MASK>|", "sdar": "<|MASK|>"}[family]
        assert cfg.mask_token_id == ids[mask] == loaded[family].tokenizer.mask_id
        assert cfg.vocab_size == fx.EMBED_ROWS > loaded[family].tokenizer.vocab_size
        assert cfg.extra["hf_family"] == family
    assert c["llada"].eos_token_id == special_ids(ckpt["llada"])["<|endoftext|>"]
    assert c["dream"].pad_token_id == special_ids(ckpt["dream"])["<|endoftext|>"]


# ----------------------------------------------------------------------------------- layouts and dtypes


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_and_unsharded_checkpoints_load_the_same(family: str, tmp_path: Path) -> None:
    one = load(fx.write_checkpoint(tmp_path / "one", family, shards=1, seed=3), device="cpu")
    many = load(fx.write_checkpoint(tmp_path / "many", family, shards=4, seed=3), device="cpu")
    assert len(list((tmp_path / "many").glob("model-*-of-00004.safetensors"))) == 4
    a, b = one.model.state_dict(), many.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    text = "def add(a, b): return a + b"
    assert one.tokenizer.encode(text) == many.tokenizer.encode(text)


@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_bfloat16_checkpoints_load_exactly_in_either_dtype(family: str, tmp_path: Path) -> None:
    directory = fx.write_checkpoint(tmp_path, family, shards=2, dtype=torch.bfloat16)
    stored = stored_weights(directory)
    half = load(directory, device="cpu", dtype=torch.bfloat16)
    wide = load(directory, device="cpu")  # CPU default: widened to float32
    mapping = next(f for f in HF_FAMILIES if f.name == family).tensor_names(half.model.config)
    for ours, theirs in mapping.items():
        assert half.model.get_parameter(ours).dtype == torch.bfloat16
        assert torch.equal(half.model.get_parameter(ours), stored[theirs])
        assert wide.model.get_parameter(ours).dtype == torch.float32
        assert torch.equal(wide.model.get_parameter(ours), stored[theirs].float())
    ids = sample_ids(half.tokenizer)
    with torch.no_grad():
        out = half.model(ids).double()
    ref = reference_logits(family, stored, fx.read_config(directory), ids)
    out, ref = out[..., : half.tokenizer.vocab_size], ref[..., : half.tokenizer.vocab_size]  # padded rows are -inf
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # bfloat16 arithmetic, same weights


def test_dream_vocab_and_merges_tokenize_like_tokenizer_json(tmp_path: Path, ckpt) -> None:
    assert not (ckpt["dream"] / "tokenizer.json").exists() and (ckpt["dream"] / "merges.txt").exists()
    slow = load(ckpt["dream"], device="cpu").tokenizer
    fast = load(fx.write_checkpoint(tmp_path, "dream", tokenizer_json=True), device="cpu").tokenizer
    texts = ["def fib(n):\n    return n", "Héllo wörld — ünïcode ✓ 123456", "<|im_end|> typed by a user", "  spaces\t\ttabs\n\n"]
    for text in texts:
        assert slow.encode(text) == fast.encode(text)
        assert slow.decode(slow.encode(text)) == text
    assert slow.mask_id == fast.mask_id and slow.stop_ids == fast.stop_ids


# ----------------------------------------------------------------------------------- chat


def test_llada_chat_template_and_stop_ids(ckpt, loaded) -> None:
    tok, ids = loaded["llada"].tokenizer, special_ids(ckpt["llada"])
    messages = [{"role": "user", "content": "  Hi there  "}]
    text = tok.apply_chat_template(messages)
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    encoded = tok.encode_chat(messages)
    assert encoded[0] == ids["<|startoftext|>"] and ids["<|eot_id|>"] in encoded
    assert {ids["<|endoftext|>"], ids["<|eot_id|>"]} <= tok.stop_ids
    assert ids["<|mdm_mask|>"] not in tok.stop_ids


@pytest.mark.parametrize("family", ["dream", "fast_dllm_v2", "sdar"])
def test_chatml_families_render_their_template_and_stop_at_im_end(family: str, ckpt, loaded) -> None:
    tok, ids = loaded[family].tokenizer, special_ids(ckpt[family])
    messages = [{"role": "user", "content": "Say <|im_end|> please"}]
    text = tok.apply_chat_template(messages)
    assert text.endswith("<|im_start|>user\nSay <|im_end|> please<|im_end|>\n<|im_start|>assistant\n")
    system = {"dream": "You are a helpful assistant.", "fast_dllm_v2": "You are Qwen, created by Alibaba Cloud."}
    if family in system:
        assert text.startswith("<|im_start|>system\n" + system[family])
    encoded = tok.encode_chat(messages)
    assert encoded.count(ids["<|im_end|>"]) == (2 if family in system else 1)  # the user's "<|im_end|>" stays text
    assert {ids["<|im_end|>"], ids["<|endoftext|>"]} <= tok.stop_ids


def test_sdar_template_comes_from_chat_template_jinja(ckpt, loaded) -> None:
    assert "chat_template" not in json.loads((ckpt["sdar"] / "tokenizer_config.json").read_text())
    tok = loaded["sdar"].tokenizer
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>\n\n4"},
                {"role": "user", "content": "and 3+3?"}]
    text = tok.apply_chat_template(messages)
    assert "<|im_start|>assistant\n4<|im_end|>" in text and "<think>add" not in text


# ----------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("family", ["fast_dllm_v2", "sdar"])
def test_block_models_have_an_exact_kv_cache(family: str, loaded) -> None:
    model = loaded[family].model
    size = model.config.block_size
    ids = sample_ids(loaded[family].tokenizer, batch=1, length=3 * size)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.allocate(model.config, 1, ids.shape[1], torch.float32, "cpu")
        model(ids[:, : 2 * size], cache=cache)
        last = model(ids[:, 2 * size :], cache=cache)
    usable = loaded[family].tokenizer.vocab_size  # rows past it are -inf in both
    assert (last - full[:, 2 * size :])[..., :usable].abs().max() < 1e-5


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "unmask", *args], capture_output=True, text=True, timeout=120, env=env)


def test_cli_generates_from_each_family(ckpt) -> None:
    """``unmask generate --model DIR`` for every family, in one real process (one torch import)."""
    code = (
        "import sys\n"
        "from unmask.cli import main\n"
        "codes = [main(['generate', 'def add(a, b):', '--model', d, '--max-new-tokens', '8', '--device', 'cpu',"
        " '--quiet']) for d in sys.argv[1:]]\n"
        "print('EXIT', *codes)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *(str(ckpt[f]) for f in FAMILIES)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines()[-1] == "EXIT" + " 0" * len(FAMILIES)


# ----------------------------------------------------------------------------------- safety and bad checkpoints


def test_nothing_from_the_directory_runs(ckpt, loaded) -> None:
    for family in FAMILIES:
        assert fx.read_config(ckpt[family])["auto_map"]
        assert any(ckpt[family].glob("*.py"))
        assert not (ckpt[family] / fx.MARKER).exists()
    assert not any(name.startswith(("modeling_", "configuration_", "tokenization_")) for name in sys.modules)


def test_native_directories_stay_native(tiny_model_dir: Path) -> None:
    assert not is_hf_checkpoint(tiny_model_dir) and not is_hf_checkpoint(default_model_dir("coder-nano-cpu"))


class _Payload:
    """Unpickling this writes a marker file: proof that a loader unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",))


def _break(directory: Path, how: str, family: str) -> tuple[str, ...]:
    """Damage a checkpoint; returns the strings the one-line error must contain."""
    shard2 = directory / "model-00002-of-00003.safetensors"
    if how == "missing shard":
        shard2.unlink()
        return (shard2.name, "missing")
    if how == "shape":
        fx.edit_config(directory, **({"mlp_hidden_size": 80} if family == "llada" else {"intermediate_size": 80}))
        return (".safetensors", "shape", "80")
    if how == "architecture":
        fx.edit_config(directory, model_type="gpt2", architectures=["GPT2LMHeadModel"])
        return ("config.json", "unknown architecture", "GPT2LMHeadModel")
    if how == "truncated":
        data = shard2.read_bytes()
        shard2.write_bytes(data[: len(data) - 100])
        return (shard2.name, "safetensors")
    if how == "missing key":
        key = "n_heads" if family == "llada" else "num_attention_heads"
        fx.edit_config(directory, drop=[key])
        return ("config.json", key)
    if how == "missing tensor":
        tensors = load_file(shard2)
        gone = sorted(tensors)[0]
        del tensors[gone]
        save_file(tensors, shard2)
        return (shard2.name, gone)
    if how == "unsupported variant":
        fx.edit_config(directory, **({"block_type": "sequential"} if family == "llada" else {"rope_scaling": {"type": "yarn", "factor": 4.0}}))
        return ("config.json", "block_type" if family == "llada" else "rope_scaling", "not supported")
    if how == "pickle only":
        for file in [*directory.glob("*.safetensors"), directory / "model.safetensors.index.json"]:
            file.unlink()
        (directory / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(directory / "UNPICKLED")}))
        return ("pytorch_model.bin", "safetensors", "weights_only=True", "model.safetensors")
    raise ValueError(how)


BAD = ["missing shard", "shape", "architecture", "truncated", "missing key", "missing tensor", "unsupported variant", "pickle only"]


@pytest.mark.parametrize("family", ["llada", "sdar"])
@pytest.mark.parametrize("how", BAD)
def test_bad_checkpoints_fail_with_one_line_naming_the_file(how: str, family: str, tmp_path: Path) -> None:
    directory = fx.write_checkpoint(tmp_path, family, shards=3)
    needles = _break(directory, how, family)
    with pytest.raises(UnmaskError) as info:
        load(directory, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert not (directory / "UNPICKLED").exists()


def test_missing_tensor_in_a_single_file_is_named(tmp_path: Path) -> None:
    directory = fx.write_checkpoint(tmp_path, "dream", shards=1)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(UnmaskError, match=r"model\.safetensors: missing tensor model\.layers\.1\.self_attn\.k_proj\.bias"):
        load(directory, device="cpu")


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path: Path) -> None:
    directory = fx.write_checkpoint(tmp_path, "llada", shards=3)
    _break(directory, "truncated", "llada")
    proc = run_cli("generate", "hi", "--model", str(directory), "--device", "cpu")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("unmask: error:") and "model-00002-of-00003.safetensors" in lines[0]
