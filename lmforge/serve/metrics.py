"""Prometheus metrics of one server (its own registry, so several apps can live in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmforge_requests", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("lmforge_request_seconds", "request latency", ["route", "status"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("lmforge_queue_depth", "requests waiting for a batch", ["model"], registry=r)
        self.queue_seconds = Histogram("lmforge_queue_seconds", "time from arrival to the start of its batch",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("lmforge_batch_size", "inputs per model call", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.tokens_in = Counter("lmforge_tokens_in", "prompt/input tokens", ["model"], registry=r)
        self.tokens_cached = Counter("lmforge_tokens_cached", "prompt tokens taken from the prefix cache",
                                     ["model"], registry=r)
        self.tokens_out = Counter("lmforge_tokens_out", "generated tokens", ["model"], registry=r)
        self.time_to_first_token = Histogram("lmforge_time_to_first_token_seconds", "time to first token",
                                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram("lmforge_time_per_output_token_seconds",
                                               "time per generated token after the first", ["model"],
                                               buckets=TOKEN_BUCKETS, registry=r)
