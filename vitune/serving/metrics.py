"""The server's Prometheus metrics (`GET /metrics`, text format via `prometheus-client`), in a
registry of their own per app (two servers in one process do not share counters):

    vitune_requests_total{endpoint, status}       requests answered, by HTTP status
    vitune_prompt_tokens_total / vitune_completion_tokens_total
    vitune_queue_length                           requests waiting for a KV cache slot
    vitune_running_requests                       requests in the running batch
    vitune_request_latency_seconds{endpoint}      histogram: request start to last byte
    vitune_time_to_first_token_seconds            histogram: request start to the first token
    vitune_decode_batch_size                      histogram: rows of each decode step
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vitune.serving.engine import EngineStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self):
        r = self.registry
        self.requests = Counter("vitune_requests", "Requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("vitune_prompt_tokens", "Prompt tokens read (images included)", registry=r)
        self.completion_tokens = Counter("vitune_completion_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge("vitune_queue_length", "Requests waiting for a KV cache slot", registry=r)
        self.running = Gauge("vitune_running_requests", "Requests in the running batch", registry=r)
        self.latency = Histogram("vitune_request_latency_seconds", "Request start to last byte", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("vitune_time_to_first_token_seconds", "Request start to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("vitune_decode_batch_size", "Rows of each decode step", buckets=BATCH_BUCKETS,
                               registry=r)

    def watch(self, stats: EngineStats) -> None:
        """Read the engine's queue and batch as they are at each scrape; count its step sizes."""
        self.queue_length.set_function(lambda: stats.waiting)
        self.running.set_function(lambda: stats.running)
        stats.on_step = self.batch.observe

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics", "/")


class Observe:
    """ASGI middleware: every HTTP request's status and latency (start to last byte), labelled by
    its endpoint (unknown paths as "other", so random paths cannot grow the label set)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
        t0, status = time.monotonic(), [500]

        async def observed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - t0)
