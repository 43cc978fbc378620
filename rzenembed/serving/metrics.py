"""What the endpoint counts, in Prometheus' text format (``GET /metrics``).

Each HTTP replica counts in its own registry and sends a snapshot of it to the
application's ``MetricsBoard`` (at most ``PUSH_EVERY_S`` after its last request, and at once
before it answers ``/metrics``); ``/metrics`` answers the board's sum over every HTTP replica
that ever ran in the application, whichever replica the scrape reached. Counters keep the
totals of replaced replicas (a front restarted by a settings change does not reset them);
gauges count only replicas heard from within ``STALE_S``.

- ``rzenembed_requests_total{route, code}``: answers by route and HTTP status;
- ``rzenembed_request_seconds{route}``: a histogram of answer times;
- ``rzenembed_items_total`` / ``rzenembed_tokens_total``: items embedded and the prompt
  tokens they took (visual tokens included);
- ``rzenembed_batch_items``: a histogram of the model replica's batch sizes (items across
  requests, as ``@serve.batch`` formed them);
- ``rzenembed_stage_seconds{stage}``: where an embedded request's time went: ``decode``
  (JSON parsing and media decoding in the HTTP replica), ``model`` (the model replicas'
  processor and forward pass for the batches the request's chunks joined, summed) and
  ``queue`` (the rest of the wait for the model: a batch forming, a free replica, Ray's
  calls);
- ``rzenembed_in_flight``: requests the HTTP replicas hold now (the queue depth
  back-pressure acts on, per replica);
- ``rzenembed_model_info{version, digest}``: 1 for the version that answered last (two
  during a rollout, one per version).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PUSH_EVERY_S = 1.0  # how far behind /metrics may be for another replica's requests
STALE_S = 15.0  # a replica silent for this long holds no requests (its gauges drop out)

# One sample: (family name, type, help, sample name, labels as sorted pairs, value).
Sample = tuple[str, str, str, str, tuple[tuple[str, str], ...], float]


class EndpointMetrics:
    """The counters of one HTTP replica."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rzenembed_requests",
            "Answers by route and status",
            ["route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "rzenembed_request_seconds",
            "Seconds to answer",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.items = Counter("rzenembed_items", "Items embedded", registry=self.registry)
        self.tokens = Counter("rzenembed_tokens", "Prompt tokens embedded", registry=self.registry)
        self.batch = Histogram(
            "rzenembed_batch_items",
            "Items per model batch",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "rzenembed_stage_seconds",
            "Seconds per request spent decoding, queueing and in the model",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge("rzenembed_in_flight", "Requests held", registry=self.registry)
        self.model = Gauge(
            "rzenembed_model_info",
            "The model version that answered last",
            ["version", "digest"],
            registry=self.registry,
        )
        self._model: tuple[str, str] | None = None

    def answered(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route=route, code=str(code)).inc()
        self.latency.labels(route=route).observe(seconds)

    def embedded(self, items: int, tokens: int, batches: list[int]) -> None:
        self.items.inc(items)
        self.tokens.inc(tokens)
        for size in batches:
            self.batch.observe(size)

    def stages(self, decode_s: float, queue_s: float, model_s: float) -> None:
        self.stage.labels(stage="decode").observe(decode_s)
        self.stage.labels(stage="queue").observe(queue_s)
        self.stage.labels(stage="model").observe(model_s)

    def serving(self, version: str, digest: str) -> None:
        if self._model != (version, digest):
            if self._model is not None:
                self.model.remove(*self._model)
            self.model.labels(version=version, digest=digest).set(1)
            self._model = (version, digest)

    def snapshot(self) -> list[Sample]:
        """Every sample of this replica's registry, as plain tuples (sent to the board)."""
        return [
            (
                family.name,
                family.type,
                family.documentation,
                sample.name,
                tuple(sorted(sample.labels.items())),
                float(sample.value),
            )
            for family in self.registry.collect()
            for sample in family.samples
            if not sample.name.endswith("_created")  # per-process creation times: not summed
        ]


def merged_text(snapshots: dict[str, tuple[float, list[Sample]]], now: float) -> bytes:
    """Prometheus text for the sum of the replicas' ``snapshots`` (replica -> (time sent,
    samples)): counters and histograms add up over every replica; gauges over the replicas
    heard from within ``STALE_S``, the model-info gauge as the largest value (1 for every
    version some replica answered with last)."""
    families: dict[str, Metric] = {}
    values: dict[tuple[str, str, tuple], float] = {}
    for sent, samples in snapshots.values():
        for family, kind, doc, name, labels, value in samples:
            if family not in families:
                families[family] = Metric(family, doc, kind)
            if kind == "gauge" and now - sent > STALE_S:
                continue
            key = (family, name, labels)
            if family == "rzenembed_model_info":
                values[key] = max(values.get(key, 0.0), value)
            else:
                values[key] = values.get(key, 0.0) + value
    for (family, name, labels), value in values.items():
        families[family].add_sample(name, dict(labels), value)

    registry = CollectorRegistry()
    registry.register(_Collected(list(families.values())))
    return generate_latest(registry)


class _Collected:
    """Metric families built by hand, as a collector ``generate_latest`` can write."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Any:
        return iter(self.families)


class MetricsBoard:
    """The application's metrics (a one-replica Serve deployment, versioned by its code
    only: rollouts never restart it): the latest snapshot of every HTTP replica."""

    def __init__(self) -> None:
        self.snapshots: dict[str, tuple[float, list[Sample]]] = {}

    async def put(self, replica: str, samples: list[Sample]) -> None:
        self.snapshots[replica] = (time.time(), samples)

    async def text(self) -> bytes:
        return merged_text(self.snapshots, time.time())
