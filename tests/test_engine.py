"""The engine: step-level batching gives exactly the solo result, queues are bounded, requests can be cancelled."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

from unmask.decoding import GenerationConfig, ar_generate, generate, infill
from unmask.engine import Engine, EngineClosed, EngineRequest, Final, Frame, QueueFull
from unmask.errors import UnmaskError
from unmask.loading import load


def sharpened(model):
    """A random tiny model predicts near-uniformly, so its candidates' scores tie to within 1e-6 and
    the rounding of a padded batch may reorder them; scaled-up logits make the order well defined."""
    with torch.no_grad():
        model.norm.weight.mul_(50.0)
    return model


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return sharpened(load(tiny_model_dir, device="cpu").model)


@pytest.fixture(scope="module")
def ar_model(tiny_ar_model_dir):
    return sharpened(load(tiny_ar_model_dir, device="cpu").model)


def mixed_requests(vocab: int, count: int, seed: int = 0) -> list[EngineRequest]:
    """Requests of different prompt lengths, lengths, policies and sampling settings."""
    rng = random.Random(seed)
    policies = ["confidence", "margin", "entropy", "threshold", "factor", "random_count", "random"]
    out = []
    for i in range(count):
        prompt = [rng.randrange(8, vocab) for _ in range(rng.randint(1, 12))]
        n = rng.choice([5, 8, 13, 16])
        config = GenerationConfig(
            max_new_tokens=n,
            block_size=rng.choice([4, 8, None]),
            steps=rng.choice([None, n // 2 + 1]),
            policy=policies[i % len(policies)],
            threshold=0.5,
            temperature=rng.choice([0.0, 0.0, 0.8]),
            top_k=rng.choice([None, 20]),
        )
        out.append(EngineRequest(prompt, config, seed=1000 + i))
    return out


def run_all(model, requests: list[EngineRequest], **engine_kw) -> list[Final]:
    """Submit every request at once to a fresh engine and wait for all of them."""
    return run_on(Engine(model, **engine_kw), requests)


def run_on(engine: Engine, requests: list[EngineRequest], stagger_s: float = 0.0) -> list[Final]:
    """Start ``engine``, submit the requests ``stagger_s`` apart (later ones join mid-flight), wait, shut down."""
    engine.start()
    try:
        handles = []
        for request in requests:
            handles.append(engine.submit(request))
            time.sleep(stagger_s)
        return [h.result() for h in handles]
    finally:
        engine.shutdown_sync()


def solo(model, request: EngineRequest):
    if request.suffix is not None:
        return infill(model, [request.prompt], [request.suffix], request.config, seeds=[request.seed])
    return generate(model, [request.prompt], request.config, seeds=[request.seed])


def test_step_level_batching_equals_solo_decoding(model):
    """Requests joining a running batch at different steps get exactly what they get alone."""
    requests = mixed_requests(model.config.vocab_size, 14)
    engine = Engine(model, max_batch=5, max_queue=32)
    finals = run_on(engine, requests, stagger_s=0.002)
    for request, final in zip(requests, finals):
        expected = solo(model, request)
        assert final.tokens == expected.sequences[0]
        assert final.finish_reason == expected.finish_reasons[0]
        assert final.steps == expected.steps[0]
    stats = engine.stats()
    assert stats["request_steps"] == sum(f.steps for f in finals)
    assert stats["forward_passes"] < stats["request_steps"]  # requests really shared forward passes


def test_fill_in_the_middle_equals_infill(model):
    rng = random.Random(3)
    vocab = model.config.vocab_size
    requests = [
        EngineRequest(
            [rng.randrange(8, vocab) for _ in range(rng.randint(1, 9))],
            GenerationConfig(max_new_tokens=rng.choice([4, 9]), block_size=None),
            suffix=[rng.randrange(8, vocab) for _ in range(rng.randint(0, 7))],
            seed=i,
        )
        for i in range(6)
    ]
    finals = run_all(model, requests, max_batch=4)
    for request, final in zip(requests, finals):
        assert final.tokens == solo(model, request).sequences[0]


def test_frames_resolve_the_canvas_monotonically(model):
    config = GenerationConfig(max_new_tokens=12, block_size=4, steps=6)
    engine = Engine(model).start()
    try:
        events = list(engine.submit(EngineRequest([9, 10, 11], config, seed=5)))
    finally:
        engine.shutdown_sync()
    frames, final = events[:-1], events[-1]
    assert isinstance(final, Final) and all(isinstance(f, Frame) for f in frames)
    assert [f.step for f in frames] == list(range(1, len(frames) + 1)) and len(frames) == final.steps
    masked = [f.canvas.count(f.mask_id) for f in frames]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0
    for before, after in zip(frames, frames[1:]):
        changed = [i for i, (a, b) in enumerate(zip(before.canvas, after.canvas)) if a != b]
        assert set(changed) <= set(after.committed)
        assert all(before.canvas[i] == before.mask_id for i in changed)  # decided tokens never change
    assert frames[-1].canvas[: len(final.tokens)] == final.tokens


def test_autoregressive_engine_equals_ar_generate(ar_model):
    rng = random.Random(7)
    vocab = ar_model.config.vocab_size
    requests = [
        EngineRequest(
            [rng.randrange(8, vocab) for _ in range(rng.randint(1, 10))],
            GenerationConfig(max_new_tokens=rng.choice([3, 9]), temperature=rng.choice([0.0, 1.0])),
            seed=i,
        )
        for i in range(6)
    ]
    finals = run_all(ar_model, requests, max_batch=3)
    for request, final in zip(requests, finals):
        expected = ar_generate(ar_model, [request.prompt], request.config, seeds=[request.seed])
        assert final.tokens == expected.sequences[0]
        assert final.finish_reason == expected.finish_reasons[0]


def test_stop_ids_end_the_answer(model):
    """A stop id ends the answer like EOS: force it by making it the only token the model may pick."""
    vocab = model.config.vocab_size
    stop = 7
    config = GenerationConfig(max_new_tokens=6, block_size=None, top_k=1, stop_ids=(stop,))
    bias = torch.full((vocab,), -1e4)
    bias[stop] = 1e4
    original = model.head.bias
    model.head.bias = torch.nn.Parameter(bias)
    try:
        final = Engine(model).start().submit(EngineRequest([9, 10], config, seed=0)).result()
    finally:
        model.head.bias = original
    assert final.finish_reason == "stop" and final.tokens == []


def test_queue_bound_cancel_and_shutdown(model):
    slow = GenerationConfig(max_new_tokens=64, block_size=None, steps=None)
    engine = Engine(model, max_batch=1, max_queue=2)
    # Not started: nothing is admitted, so the bound is exactly max_batch free slots + max_queue.
    handles = [engine.submit(EngineRequest([9], slow, seed=i)) for i in range(3)]
    with pytest.raises(QueueFull):
        engine.submit(EngineRequest([9], slow, seed=9))
    handles[1].cancel()
    engine.start()
    assert handles[1].result().finish_reason == "cancelled"
    # Cancel the running one after a few of its steps: it ends within a step of the cancel (the engine
    # thread may have run on while this one read the frames, so count from the steps taken by then).
    events, taken = [], None
    for event in handles[0]:
        events.append(event)
        if len(events) == 3:
            handles[0].cancel()
            taken = handles[0].job.steps
    final = events[-1]
    assert final.finish_reason == "cancelled" and 3 <= taken <= final.steps <= taken + 1 < 64
    engine.shutdown_sync(timeout=0.0)
    assert handles[2].result().finish_reason in ("aborted", "length")
    with pytest.raises(EngineClosed):
        engine.submit(EngineRequest([9], slow))
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


def test_graceful_shutdown_finishes_in_flight_requests(model):
    engine = Engine(model, max_batch=2).start()
    config = GenerationConfig(max_new_tokens=16, block_size=8)
    handles = [engine.submit(EngineRequest([9, 10], config, seed=i)) for i in range(4)]
    engine.shutdown_sync(timeout=30.0)
    assert [h.result().finish_reason for h in handles] == [solo(model, h.request).finish_reasons[0] for h in handles]


def test_bad_requests_fail_at_submit(model, ar_model):
    engine = Engine(model)
    with pytest.raises(UnmaskError, match="context"):
        engine.submit(EngineRequest([9] * 100, GenerationConfig(max_new_tokens=64)))
    with pytest.raises(UnmaskError, match="vocabulary"):
        engine.submit(EngineRequest([10**6], GenerationConfig(max_new_tokens=4)))
    with pytest.raises(UnmaskError, match="fill-in-the-middle"):
        Engine(ar_model).submit(EngineRequest([9], GenerationConfig(max_new_tokens=4), suffix=[9]))
    assert engine.stats()["waiting"] == 0


def test_async_submitters_are_served_concurrently(model):
    """Many asyncio clients at once (as the server does): each gets its own, uncrossed result."""
    requests = mixed_requests(model.config.vocab_size, 10, seed=1)
    engine = Engine(model, max_batch=4, max_queue=16).start()

    async def client(request: EngineRequest) -> tuple[int, list[int]]:
        frames = 0
        async for event in engine.submit(request):
            if isinstance(event, Frame):
                frames += 1
            else:
                return frames, event.tokens
        raise AssertionError("no final event")

    async def main():
        return await asyncio.gather(*(client(r) for r in requests))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown_sync()
    for request, (frames, tokens) in zip(requests, results):
        expected = solo(model, request)
        assert tokens == expected.sequences[0] and frames == expected.steps[0]
    assert threading.active_count() >= 1


def test_engine_block_cache_alone_equals_the_cached_decoder(model):
    """One request at a time, the engine's dual cache does exactly what `generate(cache="dual")` does."""
    requests = mixed_requests(model.config.vocab_size, 5, seed=2)
    finals = run_all(model, requests, max_batch=1, cache="dual")
    for request, final in zip(requests, finals):
        cached = GenerationConfig(**{**request.config.__dict__, "cache": "dual"})
        assert final.tokens == generate(model, [request.prompt], cached, seeds=[request.seed]).sequences[0]


def test_engine_cache_is_exact_for_block_causal_models():
    """Block-causal models have an exact cache: batched, staggered, cached = solo and uncached."""
    from test_caches import make_model

    block_model = make_model("block", shifted=True)
    with torch.no_grad():  # let attention, not the token's own embedding, decide the output
        for layer in block_model.layers:
            layer.attn.v_proj.weight.mul_(8.0)
    requests = [
        EngineRequest(p, GenerationConfig(max_new_tokens=n, block_size=4, policy=policy, threshold=0.5), seed=i)
        for i, (p, n, policy) in enumerate(
            [([5, 6, 7], 9, "confidence"), ([8], 12, "threshold"), ([9, 10, 11, 12, 13], 7, "confidence"),
             ([14, 15], 10, "threshold"), ([16] * 6, 8, "entropy")]
        )
    ]
    finals = run_on(Engine(block_model, max_batch=3, cache="dual"), requests, stagger_s=0.002)
    for request, final in zip(requests, finals):
        assert final.tokens == solo(block_model, request).sequences[0]


def test_static_engine_selects_on_the_device_and_equals_solo_decoding(model, monkeypatch):
    """The static-shape path (bucketed canvases, batched on-device selection) changes no answer."""
    import unmask.decoding.step as step

    calls = []
    real = step.select_on_device
    monkeypatch.setattr(step, "select_on_device", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    rng = random.Random(11)
    vocab = model.config.vocab_size
    requests = [
        EngineRequest(
            [rng.randrange(8, vocab) for _ in range(rng.randint(1, 12))],
            GenerationConfig(max_new_tokens=12, block_size=4, policy=policy, threshold=0.5),
            seed=i,
        )
        for i, policy in enumerate(["threshold"] * 4 + ["confidence"] * 4)
    ]
    engine = Engine(model, max_batch=4, static=True)
    finals = run_on(engine, requests, stagger_s=0.002)
    for request, final in zip(requests, finals):
        expected = solo(model, request)
        assert final.tokens == expected.sequences[0] and final.steps == expected.steps[0]
    assert calls and max(shape[0] for shape in calls) > 1  # batched selection really ran
