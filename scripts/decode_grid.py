"""Every decoding path over a grid of settings on tiny random models; prints the outputs as JSON.

    PYTHONPATH=OLD_CHECKOUT/src .venv/bin/python scripts/decode_grid.py > old.json
    PYTHONPATH=src .venv/bin/python scripts/decode_grid.py > new.json
    python -c "import json; a, b = (json.load(open(f)) for f in ('old.json', 'new.json')); print([k for k in a if a[k] != b.get(k)])"

For refactors of the decoding code: the same file run against two checkouts (it uses only the
public API, and builds its models here) shows any setting whose sequences, per-row steps or forward
count changed. Covers generate over 4 attention/shift kinds x 7 policies x 3 caches x greedy and
sampled, infill, the fast paths and AR decoding, 5 prompts each.
"""
import json
import random

import torch

from unmask.decoding import GenerationConfig, ar_generate, generate, infill
from unmask.decoding.fast import FastARDecoder, FastDecoder
from unmask.models.config import ModelConfig
from unmask.models.transformer import Transformer


def make_model(attention: str = "bidirectional", shifted: bool = False, seed: int = 0, sharpen: float = 50.0) -> Transformer:
    """A tiny random model with peaked predictions (so rounding never reorders near-tied candidates): the
    one in tests/test_caches.py, built here because an older checkout's tests may not import."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
        attention=attention, block_size=4, shifted=shifted, mask_token_id=1, eos_token_id=0, pad_token_id=2,
    )
    model = Transformer(config).eval()
    with torch.no_grad():
        model.norm.weight.mul_(sharpen)
    return model


def grid() -> dict[str, list]:
    """Sequences, per-row steps and forward calls of every setting, keyed by path and setting."""
    out = {}
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 60) for _ in range(rng.randint(1, 9))] for _ in range(5)]
    for attention, shifted in (("bidirectional", False), ("bidirectional", True), ("block", True), ("block", False)):
        model = make_model(attention, shifted=shifted)
        for policy in ("confidence", "margin", "entropy", "threshold", "factor", "random", "random_count"):
            for cache in ("none", "prefix", "dual"):
                for temp in (0.0, 0.9):
                    bs = 4
                    cfg = GenerationConfig(max_new_tokens=12, block_size=bs, policy=policy, threshold=0.6, steps=None if policy in ("threshold", "factor") else 6, temperature=temp, cache=cache)
                    r = generate(model, prompts, cfg, seeds=list(range(5)))
                    out[f"gen/{attention}/{shifted}/{policy}/{cache}/{temp}"] = [r.sequences, r.steps, r.nfe]
        if attention == "bidirectional":
            sfx = [[7, 8], [], [9], [10, 11, 12], [13]]
            r = infill(model, prompts, sfx, GenerationConfig(max_new_tokens=8, block_size=None, steps=4), seeds=list(range(5)))
            out[f"infill/{shifted}"] = [r.sequences, r.steps, r.nfe]
            for policy in ("confidence", "threshold"):
                cfg = GenerationConfig(max_new_tokens=12, block_size=4, policy=policy, threshold=0.6, steps=6 if policy == "confidence" else None, cache="dual")
                r = FastDecoder(model).generate(prompts, cfg)
                out[f"fast/{shifted}/{policy}"] = [r.sequences, r.steps, r.nfe]
    ar = make_model("causal", shifted=True)
    for temp in (0.0, 1.0):
        r = ar_generate(ar, prompts, GenerationConfig(max_new_tokens=10, temperature=temp), seeds=list(range(5)))
        out[f"ar/{temp}"] = [r.sequences, r.steps, r.nfe]
    r = FastARDecoder(ar).generate(prompts, GenerationConfig(max_new_tokens=10))
    out["fastar"] = [r.sequences, r.steps, r.nfe]
    return out


if __name__ == "__main__":
    print(json.dumps(grid()))
