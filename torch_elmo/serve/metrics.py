"""The Prometheus metrics of `elmo serve` (prometheus_client), in one registry per app, so several
apps in one process (tests, a user's own ASGI server) never clash. GET /metrics renders them.

* elmo_requests_total{endpoint,status}, elmo_request_seconds{endpoint} (latency histogram),
  elmo_requests_in_flight: every HTTP request, labelled by its route template (unknown paths are
  "other", so a scanner cannot blow up the label set).
* elmo_queue_depth{model}, elmo_queue_wait_seconds{model}: jobs waiting for the worker.
* elmo_batch_size{model} (texts), elmo_batch_tokens{model} (padded: rows x longest),
  elmo_batch_seconds{model} (forward time), elmo_tokens_total{model} (real tokens run;
  rate() of it is tokens/s), elmo_tokens_per_second{model} (of the last batch).
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("elmo_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("elmo_request_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("elmo_requests_in_flight", "admitted inference requests", registry=r)
        self.queue_depth = Gauge("elmo_queue_depth", "requests waiting for the worker", ["model"],
                                 registry=r)
        self.queue_wait = Histogram("elmo_queue_wait_seconds", "time from queued to taken",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("elmo_batch_size", "texts per batch", ["model"],
                                    buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("elmo_batch_tokens", "padded tokens per batch", ["model"],
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.batch_seconds = Histogram("elmo_batch_seconds", "forward time per batch", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("elmo_tokens", "tokens run through the model", ["model"], registry=r)
        self.tokens_per_second = Gauge("elmo_tokens_per_second", "tokens/s of the last batch",
                                       ["model"], registry=r)

    def observe_batch(self, model: str, texts: int, padded: int, tokens: int,
                      seconds: float) -> None:
        self.batch_size.labels(model).observe(texts)
        self.batch_tokens.labels(model).observe(padded)
        self.batch_seconds.labels(model).observe(seconds)
        self.tokens.labels(model).inc(tokens)
        self.tokens_per_second.labels(model).set(tokens / seconds if seconds > 0 else 0.0)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
