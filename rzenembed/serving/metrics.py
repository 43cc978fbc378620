"""What the endpoint counts, in Prometheus' text format (``GET /metrics``).

Each HTTP replica keeps its own registry (Prometheus sums replicas when it scrapes them):

- ``rzenembed_requests_total{route, code}``: answers by route and HTTP status;
- ``rzenembed_request_seconds{route}``: a histogram of answer times;
- ``rzenembed_items_total`` / ``rzenembed_tokens_total``: items embedded and the prompt
  tokens they took (visual tokens included);
- ``rzenembed_batch_items``: a histogram of the model replica's batch sizes (items across
  requests, as ``@serve.batch`` formed them);
- ``rzenembed_in_flight``: requests this replica holds now (the queue depth back-pressure
  acts on);
- ``rzenembed_model_info{version, digest}``: 1 for the version that answered last.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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

    def serving(self, version: str, digest: str) -> None:
        if self._model != (version, digest):
            if self._model is not None:
                self.model.remove(*self._model)
            self.model.labels(version=version, digest=digest).set(1)
            self._model = (version, digest)

    def text(self) -> bytes:
        return generate_latest(self.registry)
