"""Prometheus metrics of one app, in a registry of its own (several apps can live in one process).

Engine figures (running, waiting, tokens, steps) are read from ``Engine.stats()`` at scrape
time; request latency and outcomes are recorded by the server as requests end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from unmask.serve.settings import ServedModel

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineCollector(Collector):
    def __init__(self, models: Mapping[str, ServedModel]) -> None:
        self.models = models

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily("unmask_requests_running", "Requests in the running batch", labels=["model"])
        waiting = GaugeMetricFamily("unmask_requests_waiting", "Requests waiting for a batch slot", labels=["model"])
        tokens = CounterMetricFamily("unmask_generated_tokens", "Answer tokens of finished requests", labels=["model"])
        steps = CounterMetricFamily("unmask_denoising_steps", "Request steps taken (one per request per forward pass)",
                                    labels=["model"])
        passes = CounterMetricFamily("unmask_forward_passes", "Model forward passes (a batch counts once)",
                                     labels=["model"])
        for name, served in self.models.items():
            stats = served.engine.stats()
            running.add_metric([name], stats.get("running", 0))
            waiting.add_metric([name], stats.get("waiting", 0))
            tokens.add_metric([name], stats.get("tokens_generated", 0))
            steps.add_metric([name], stats.get("request_steps", 0))
            passes.add_metric([name], stats.get("forward_passes", 0))
        yield from (running, waiting, tokens, steps, passes)


class ServerMetrics:
    """The app's registry and the instruments the request handlers update."""

    def __init__(self, models: Mapping[str, ServedModel]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(models))
        self.latency = Histogram(
            "unmask_request_latency_seconds", "Seconds from receipt to the last byte of a generating request",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.requests = Counter(
            "unmask_requests", "Generating requests by outcome (ok, rejected, disconnected, aborted, error)",
            ["model", "endpoint", "outcome"], registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
