"""Cross-implementation: llama.cpp (built by scripts/build_llama_cpp.sh) runs unmask's exports as unmask does.

Diffusion: ``llama-diffusion-cli`` is greedy only with ``--top-k 1`` (at ``--temp 0`` its sampler
chain still draws from the softmax); then every candidate's confidence is 1 and, like unmask's
``top_k=1``, ties go to the earlier position, so algorithms 4/1/2 and unmask's confidence/entropy/
margin policies all commit a block's masked positions left to right, the block's tokens spread
over its steps with the remainder first (both). llama.cpp's ``-ub`` canvas counts the prompt and
gives every ``block`` of it ``steps / (canvas / block)`` steps, so with prompt and answer lengths
multiples of the block, ``--diffusion-steps S`` equals unmask's ``steps = S * N / canvas``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import llama_cpp
from unmask.decoding import GenerationConfig, decode, generate
from unmask.hub import resolve_model
from unmask.loading import load
from unmask.models.gguf.write import export_gguf
from unmask.models.transformer import Transformer

PROMPT = "def __repr__(self):"  # 16 tokens in the default model's chat template; top-2 logit gaps >= 0.017
ANSWER = 32
SCHEDULES = [(8, 4), (8, 3), (16, 8)]  # (block length, steps per block)
ALGORITHMS = [(4, "confidence"), (1, "entropy"), (2, "margin")]  # llama.cpp --diffusion-algorithm -> unmask policy
AR_PROMPTS = ["def is_prime(n):", "The capital of France is", "for i in range(10):", "SELECT name FROM"]


@pytest.fixture(autouse=True)
def built() -> None:
    """Skip (or in CI fail) before any work when llama.cpp is not built."""
    for name in ("llama-diffusion-cli", "llama-completion"):
        llama_cpp.binary(name)


@pytest.fixture(scope="module")
def default():
    return load("coder-nano-cpu", device="cpu")


def as_dream(model: Transformer) -> Transformer:
    """The default model's weights read as a shifted (Dream-layout) model with q/k/v biases: not a
    language model, but with well separated argmaxes, which is all an exact comparison needs."""
    config = dataclasses.replace(model.config, shifted=True, qkv_bias=True)
    dream = Transformer(config).eval()
    torch.manual_seed(0)
    state = {k: v for k, v in model.state_dict().items()}
    for name, p in dream.state_dict().items():
        if name.endswith(".bias"):
            state[name] = 0.05 * torch.randn_like(p)
    dream.load_state_dict(state)
    return dream


def min_gap(model: Transformer, prompt: list[int], trace: list[torch.Tensor]) -> float:
    """Smallest top-1/top-2 logit gap (over the full vocabulary, [MASK] included, as llama.cpp sees
    it) at the positions each step committed; asserts each committed token was that argmax."""
    shift, canvas, gaps = int(model.config.shifted), torch.tensor(prompt + [model.config.mask_token_id] * ANSWER), []
    for region in trace:
        with torch.no_grad():
            logits = model(canvas[None])[0]
        for pos in (region[0] != canvas[len(prompt):]).nonzero().flatten().tolist():
            top = logits[len(prompt) + pos - shift].topk(2)
            assert int(top.indices[0]) == int(region[0, pos])
            gaps.append(float(top.values[0] - top.values[1]))
        canvas[len(prompt):] = region[0]
    return min(gaps)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_diffusion_cli_writes_what_unmask_writes(tmp_path, default, arch):
    model = default.model if arch == "llada" else as_dream(default.model)
    tok = default.tokenizer
    report = export_gguf(model, tok, tmp_path / f"{arch}.gguf")
    assert report.arch == arch
    prompt = tok.encode_chat([{"role": "user", "content": PROMPT}])  # llama-diffusion-cli always applies it
    canvas = len(prompt) + ANSWER
    for block, per_block in SCHEDULES:
        assert len(prompt) % block == 0 and ANSWER % block == 0  # where --diffusion-steps maps exactly
        for algorithm, policy in ALGORITHMS:
            config = GenerationConfig(
                max_new_tokens=ANSWER, block_size=block, steps=per_block * ANSWER // block, policy=policy,
                top_k=1, stop_at_eos=False, trace=True,
            )
            result = generate(model, [prompt], config)
            assert min_gap(model, prompt, result.trace) > 1e-3  # F32 logits of the two agree far closer
            ours = tok.decode(result.sequences[0])
            theirs = llama_cpp.diffusion(
                report.path, PROMPT, canvas=canvas, steps=per_block * canvas // block, block=block, algorithm=algorithm
            )
            assert theirs == ours, (arch, block, per_block, policy)


@pytest.fixture(scope="module")
def smollm2():
    """The SmolLM2 file, unmask's load of it, and unmask's greedy 32 tokens after each prompt with
    the top-1/top-2 logit gap at each of them."""
    path = resolve_model("smollm2-135m")
    loaded = load(str(path), device="cpu")
    runs = {}
    for prompt in AR_PROMPTS:
        ids = loaded.tokenizer.encode(prompt)
        result = decode(loaded.model, [ids], GenerationConfig(max_new_tokens=32))
        with torch.no_grad():
            top = loaded.model(torch.tensor([ids + result.sequences[0]]))[0, len(ids) - 1 : -1].topk(2).values
        runs[prompt] = (result, (top[:, 0] - top[:, 1]).tolist())
    return path, loaded, runs


def test_ar_greedy_matches_llama_cpp_on_the_same_weights(tmp_path, smollm2):
    """The Q4_1 file's weights, dequantised (what unmask computes with), exported as F32: llama.cpp's
    greedy continuation equals unmask's, token for token, EOS included."""
    _, loaded, runs = smollm2
    report = export_gguf(loaded.model, loaded.tokenizer, tmp_path / "smollm2-f32.gguf")
    assert report.arch == "llama"
    for prompt, (result, _) in runs.items():
        theirs, ended = llama_cpp.completion(report.path, prompt, 32)
        assert theirs == loaded.tokenizer.decode(result.sequences[0]), prompt
        assert ended == (result.finish_reasons[0] == "stop"), prompt


def test_ar_greedy_on_the_q4_1_file_agrees_until_a_near_tie(smollm2):
    """llama.cpp multiplies Q4_1 weights by Q8_1-quantised activations, unmask by float32 ones, so
    logits differ by a few tenths (measured: continuations part only where unmask's top-2 gap is
    <= 0.29). Asserted: the texts agree at least up to the first token whose gap is under 0.5."""
    path, loaded, runs = smollm2
    for prompt, (result, gaps) in runs.items():
        seq = result.sequences[0]
        safe = next((i for i, g in enumerate(gaps) if g < 0.5), len(seq))
        theirs, _ = llama_cpp.completion(path, prompt, 32)
        assert theirs.startswith(loaded.tokenizer.decode(seq[:safe])), (prompt, safe)


# Largest |dequantised - source| over a tensor, as a fraction of its largest |value|, for llama.cpp's
# K-quant block formats (super-blocks of 256 with quantised sub-block scales): about one
# quantisation step of the format, with room for its 6-/8-bit scales.
K_QUANT_BOUND = {"Q6_K": 0.025, "Q5_K": 0.05, "Q4_K": 0.1, "Q3_K": 0.25}  # measured: 0.016, 0.035, 0.061, 0.160


@pytest.mark.parametrize("kind", sorted(K_QUANT_BOUND))
def test_k_quants_from_llama_quantize_load_within_their_bound(tmp_path, tiny_tokenizer, kind):
    """llama.cpp's own quantiser writes the K-quant file; unmask reads it back close to the F32 source."""
    import subprocess

    from test_gguf_read import source_model, write_gguf
    from unmask.models.gguf import GGUFFile, load_gguf

    source = source_model("llama", tiny_tokenizer, d_model=256)  # K-quant rows are multiples of 256
    f32, quantised = tmp_path / "f32.gguf", tmp_path / f"{kind}.gguf"
    write_gguf(f32, "llama", source, tiny_tokenizer, "F32")
    preset = {"Q6_K": "Q6_K", "Q5_K": "Q5_K_S", "Q4_K": "Q4_K_S", "Q3_K": "Q3_K_S"}[kind]
    proc = subprocess.run([str(llama_cpp.binary("llama-quantize")), "--pure", str(f32), str(quantised), preset],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    file = GGUFFile.open(quantised)
    assert {file.type_name(n) for n in file.tensors if len(file.shape(n)) == 2} == {kind}
    loaded, _ = load_gguf(quantised)
    for name, ref in source.state_dict().items():
        rel = float((loaded.state_dict()[name] - ref).abs().max() / ref.abs().max())
        assert rel <= (K_QUANT_BOUND[kind] if ref.dim() == 2 else 0.0), (name, rel)
