"""Prometheus metrics for one app: requests by status, errors by kind, batch sizes, latency.

Each app has its own `CollectorRegistry`, so several apps in one process (tests, notebooks)
never mix their counts or collide on metric names.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "prefixcap_requests", "Caption requests answered, by HTTP status", ["status"], registry=self.registry
        )
        self.errors = Counter(
            "prefixcap_errors", "Error responses from any endpoint, by kind", ["kind"], registry=self.registry
        )
        self.images = Counter("prefixcap_images", "Images captioned", registry=self.registry)
        self.batch_size = Histogram(
            "prefixcap_batch_size",
            "Images per model batch",
            buckets=_batch_buckets(max_batch_size),
            registry=self.registry,
        )
        self.latency = Histogram(
            "prefixcap_request_duration_seconds",
            "Caption request latency, from the first byte read to the answer",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _batch_buckets(max_batch_size: int) -> list[float]:
    """Powers of two up to the largest possible batch, which gets a bucket of its own."""
    powers = [2**i for i in range(max_batch_size.bit_length()) if 2**i < max_batch_size]
    return [*powers, max_batch_size]


class RequestMetricsMiddleware:
    """Count and time every request to one path, whatever answers it: the endpoint, an error
    handler, or nobody (a crash counts as 500)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, path: str):
        self.app, self.metrics, self.path = app, metrics, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(str(status)).inc()
            self.metrics.latency.observe(time.perf_counter() - start)
