"""Prometheus metrics of one server (its own registry: two apps in a process never share counts)."""

from __future__ import annotations

from setok.optional import require

SERVE_HINT = "fastapi, uvicorn and prometheus-client are needed for `setok serve`: pip install 'setok[serve]'"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ROUTES = ("/v1/chat/completions", "/v1/segment", "/v1/tokenize", "/v1/models", "/health", "/ready", "/metrics")


class Metrics:
    def __init__(self, max_batch: int):
        prom = require("prometheus_client", SERVE_HINT)
        self.prom = prom
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter("setok_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = prom.Histogram("setok_request_seconds", "Request latency (to the last byte)", ["route"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.stage = prom.Histogram("setok_stage_seconds", "Time in each runtime stage per run (a batch is one run)",
                                    ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = prom.Histogram("setok_batch_size", "Requests per batched answer run",
                                    buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.tokens = prom.Counter("setok_tokens", "Tokens by kind", ["kind"], registry=r)
        self.queue_depth = prom.Gauge("setok_queue_depth", "Greedy requests waiting to be batched", registry=r)
        self.in_flight = prom.Gauge("setok_in_flight", "Requests admitted and not finished", registry=r)

    @staticmethod
    def route(path: str) -> str:
        return path if path in ROUTES else "other"  # unknown paths must not grow the label set

    def observe_stages(self, timings: dict[str, float]) -> None:
        for name, seconds in timings.items():
            self.stage.labels(name).observe(seconds)

    def observe_completion(self, c) -> None:
        self.tokens.labels("prompt").inc(c.prompt_tokens)
        self.tokens.labels("completion").inc(len(c.token_ids))
        self.tokens.labels("vision").inc(c.vision_tokens)

    def exposition(self) -> tuple[bytes, str]:
        return self.prom.generate_latest(self.registry), self.prom.CONTENT_TYPE_LATEST
