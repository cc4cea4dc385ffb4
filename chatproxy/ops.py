"""Operational routes: liveness (/healthz), readiness (/readyz), Prometheus metrics (/metrics); request metrics."""

from __future__ import annotations

import functools
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Flask, Response, g, jsonify, request

from . import metrics
from .callers import token_name
from .errors import ApiError
from .state import state

log = logging.getLogger(__name__)

bp = Blueprint("ops", __name__)


def init_app(app: Flask) -> None:
    """Register the operational routes and the per-request metrics hooks."""
    # First of all before_request hooks, so requests the guards refuse are timed too.
    app.before_request_funcs.setdefault(None, []).insert(0, _start_timer)
    app.after_request(_count_request)
    app.register_blueprint(bp)


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _count_request(response: Response) -> Response:
    """Count the request once its last byte is sent (for a stream: when it ends), under its URL rule."""
    started = g.get("metrics_started", time.perf_counter())
    route = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
    method, status = request.method, response.status_code
    response.call_on_close(lambda: metrics.record_request(route, method, status, time.perf_counter() - started))
    return response


@bp.get("/healthz")
def healthz() -> Response:
    """Alive: the process answers. Never calls the upstream."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """Ready: the ledger database answers. Never calls the upstream.

    Redis (when configured) is checked and reported, but by default it does not fail readiness: without it
    every host still serves, with rate limits and stream slots counted per process and cooldowns off, so
    taking all of them out of the load balancer would be worse. CHATPROXY_READY_REQUIRES_REDIS makes it count.
    """
    app_state = state()
    checks = {"database": _check("database", lambda: _select_one(app_state.ledger.engine))}
    if app_state.redis is not None:
        checks["redis"] = _check("redis", app_state.redis.ping)
    redis_required = app_state.settings.ready_requires_redis
    failed = [name for name, check in checks.items() if check != "ok" and (name != "redis" or redis_required)]
    if failed:
        raise ApiError(503, "not_ready", f"Not ready: {' and '.join(failed)} unreachable.", retry_after=5)
    degraded = any(check != "ok" for check in checks.values())
    body: dict[str, Any] = {"status": "degraded" if degraded else "ready", "checks": checks}
    if app_state.retiring:  # still ready: the operator is told, in the log at start-up and here
        body["retiring_models"] = [
            {
                "model": r.model,
                "shutdown": r.shutdown.isoformat(),
                "replacement": r.replacement,
                "days_left": r.days_left,
            }
            for r in app_state.retiring
        ]
    return jsonify(body)


def _select_one(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))


def _check(name: str, probe: Any) -> str:
    """Run one probe: "ok", or "unreachable" with the reason logged (never sent to the client)."""
    try:
        probe()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; the reason goes to the log
        log.error("readiness: %s unreachable (%s: %s)", name, type(exc).__name__, exc)
        return "unreachable"
    return "ok"


def scrapers_only(view: Callable[[], Response]) -> Callable[[], Response]:
    """A route for the monitoring network (CHATPROXY_METRICS_NETWORKS) or an admin token; 403 for anyone else."""

    @functools.wraps(view)
    def guarded() -> Response:
        if not _may_scrape():
            raise ApiError(403, "forbidden", "Metrics are only for the monitoring network or an admin token.")
        return view()

    return guarded


@bp.get("/metrics")
@scrapers_only
def prometheus() -> Response:
    """Prometheus metrics."""
    return Response(
        metrics.exposition(), content_type=metrics.CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"}
    )


def _may_scrape() -> bool:
    """The client IP (after ProxyFix) is in CHATPROXY_METRICS_NETWORKS, or the bearer token is an admin's."""
    try:
        address = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    app_state = state()
    if address is not None and any(address in network for network in app_state.settings.metrics_networks):
        return True
    header = request.headers.get("Authorization")
    if header is None:
        return False
    name = token_name(header, app_state.tokens)
    return name is not None and name in app_state.settings.admin_tokens
