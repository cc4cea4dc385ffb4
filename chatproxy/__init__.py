"""chatproxy: a Flask proxy between web apps and the OpenAI API that keeps the key on the server."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, g, request

from . import (
    api,
    callers,
    commands,
    errors,
    limits,
    logs,
    models,
    openapi,
    ops,
    redis_client,
    security,
    sse,
    startup,
    state,
)
from .batches.store import BatchStore
from .budget import Budget, Caps, SqlCounters
from .config import ROOT, Settings, SettingsError, parse_tokens, raw_settings
from .cooldowns import from_settings as cooldowns_from
from .keys import KeyStore
from .schemas import request_models
from .upstream import make_client
from .usage import Ledger, default_database_url

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

__all__ = ["ROOT", "SettingsError", "create_app"]


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: defaults, then .env and the environment, then `test_config`; fail fast on a bad setting."""
    app = Flask(
        __name__,
        template_folder=str(ROOT / "templates"),
        static_folder=str(ROOT / "static"),
        instance_path=str(ROOT / "instance"),
    )
    app.config.from_mapping(raw_settings(ROOT / ".env"))
    if test_config is not None:
        app.config.update(test_config)
    settings, table, found = startup.check(app.config)  # refuses a retired model; warns about one about to retire
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False

    logs.init_app(app)  # first, so start-up messages are JSON lines too
    for warning in found.warnings:
        log.warning("%s", warning)
    state.init_app(app, build_state(settings, table, found.retiring, app.instance_path))
    errors.init_app(app)
    security.init_app(app, settings)
    ops.init_app(app)  # its timer is the first before_request hook: refused requests are timed too
    app.wsgi_app = sse.expose_write(app.wsgi_app)  # type: ignore[method-assign]  # pings mid-read (sse.IdlePings)
    callers.init_app(app)  # who is calling, before the limits that count them
    limits.init_app(app)
    api.init_app(app)
    openapi.init_app(app)  # GET /api/openapi.json, built from the routes registered above
    commands.init_app(app)

    def _request_id() -> None:
        # Ours, always new: the ledger's rows are grouped by it, so a client must not choose it (nor reuse one).
        # A sane id the client sent is kept beside it (ledger column client_request_id, the access log line).
        g.request_id = uuid.uuid4().hex
        given = request.headers.get("X-Request-ID", "")
        g.client_request_id = given if _REQUEST_ID.fullmatch(given) else None

    # Before every other hook: requests the guards or the rate limiter refuse get an id too.
    app.before_request_funcs.setdefault(None, []).insert(0, _request_id)

    @app.after_request
    def _send_request_id(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        return response

    return app


def build_state(
    settings: Settings, table: models.ModelTable, retiring: tuple[models.Retirement, ...], instance_path: str
) -> state.AppState:
    """Every long-lived object, built from validated settings; nothing connects yet (the database on first use)."""
    ledger = Ledger(settings.database_url or default_database_url(instance_path))
    counters = SqlCounters(ledger.engine)
    batches = BatchStore(ledger)
    keys = KeyStore(ledger.engine, cache_seconds=settings.key_cache_seconds)
    ledger.schema.add(counters.metadata)  # created with the ledger's tables, on first use
    ledger.schema.add(batches.metadata)
    ledger.schema.add(keys.metadata)
    return state.AppState(
        settings=settings,
        client=make_client(settings),
        models=table,
        requests=request_models(settings),
        retiring=retiring,
        ledger=ledger,
        budget=Budget(counters, Caps.from_settings(settings)),
        batches=batches,
        cooldowns=cooldowns_from(settings),
        tokens=parse_tokens(settings.api_tokens),
        keys=keys,
        limiter=limits.make_limiter(settings),
        slots=limits.make_slots(settings),
        redis=redis_client.client(settings.redis_url) if settings.redis_url else None,
    )
