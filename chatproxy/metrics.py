"""Prometheus metrics: the definitions, and small recording functions the request path calls.

Metrics are per process by nature (like loggers), so they live at module level in
prometheus-client's default registry, and the recording functions work anywhere: in a view,
in a stream generator after the request context is gone, in a helper thread.

Under gunicorn, gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before any worker imports
prometheus_client: every worker then writes its samples to files there, and /metrics (whichever
worker answers) sums them. In one process (tests, `make run`) the normal registry is used.

API for the request path (every label value must come from a bounded set: allowlisted
model names, our own snake_case error codes):

    record_upstream(model, prompt_tokens, completion_tokens, cost_micros, ttft_seconds)
    record_upstream_error(code)
    record_fallback(from_model, to_model)
    set_cooldown(model, active)

`record_request(route, method, status, seconds)` is called by ops.py for every request.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = [
    "CONTENT_TYPE_LATEST",
    "exposition",
    "multiprocess_dir",
    "record_fallback",
    "record_request",
    "record_upstream",
    "record_upstream_error",
    "set_cooldown",
]

# Seconds: from milliseconds (health checks, refusals) to a long stream.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUESTS = Counter(
    "chatproxy_requests", "HTTP requests answered, by route pattern, method and status.", ["route", "method", "status"]
)
REQUEST_SECONDS = Histogram(
    "chatproxy_request_duration_seconds",
    "Time from a request's arrival to its last byte (a stream's whole life), by route.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
TTFT_SECONDS = Histogram(
    "chatproxy_time_to_first_token_seconds",
    "Time from a chat request's arrival to the first answer text, by the model that answered.",
    ["model"],
    buckets=TTFT_BUCKETS,
)
UPSTREAM_RESPONSES = Counter("chatproxy_upstream_responses", "Upstream answers settled, by model.", ["model"])
TOKENS = Counter("chatproxy_tokens", "Tokens used, by model and kind (prompt or completion).", ["model", "kind"])
COST = Counter("chatproxy_cost_microdollars", "Spend in micro-dollars (1e-6 USD), by model.", ["model"])
UPSTREAM_ERRORS = Counter("chatproxy_upstream_errors", "Upstream failures, by our error code.", ["code"])
FALLBACKS = Counter("chatproxy_fallbacks", "Requests answered by a fallback model.", ["from_model", "to_model"])
# "mostrecent": across workers, the last value any worker set wins (cooldowns are shared state in Redis).
COOLDOWN = Gauge(
    "chatproxy_model_cooldown",
    "1 while a model is cooling down (skipped), 0 when it is back.",
    ["model"],
    multiprocess_mode="mostrecent",
)


def record_request(route: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request and its duration; `route` is the URL rule, never the raw path."""
    REQUESTS.labels(route, method if method in METHODS else "other", str(status)).inc()
    REQUEST_SECONDS.labels(route).observe(seconds)


def record_upstream(
    model: str, prompt_tokens: int, completion_tokens: int, cost_micros: int, ttft_seconds: float | None = None
) -> None:
    """Record one settled upstream answer: tokens, cost and (streams) time to first token, under the answering model."""
    UPSTREAM_RESPONSES.labels(model).inc()
    TOKENS.labels(model, "prompt").inc(max(0, prompt_tokens))
    TOKENS.labels(model, "completion").inc(max(0, completion_tokens))
    COST.labels(model).inc(max(0, cost_micros))
    if ttft_seconds is not None:
        TTFT_SECONDS.labels(model).observe(ttft_seconds)


def record_upstream_error(code: str) -> None:
    """Count one upstream failure by our snake_case code (upstream_timeout, upstream_unavailable, ...)."""
    UPSTREAM_ERRORS.labels(code).inc()


def record_fallback(from_model: str, to_model: str) -> None:
    """Count one request that `to_model` answered instead of `from_model`."""
    FALLBACKS.labels(from_model, to_model).inc()


def set_cooldown(model: str, active: bool) -> None:
    """Mark `model` as cooling down (True) or back in service (False)."""
    COOLDOWN.labels(model).set(1 if active else 0)


def multiprocess_dir() -> str | None:
    """The directory gunicorn's workers share their samples through, when running under gunicorn.conf.py."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition() -> bytes:
    """Every metric in Prometheus text format: summed over all workers in multiprocess mode."""
    if multiprocess_dir() is None:
        return generate_latest(REGISTRY)
    from prometheus_client import multiprocess

    registry = CollectorRegistry()  # a fresh one per scrape, as prometheus-client documents
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)
