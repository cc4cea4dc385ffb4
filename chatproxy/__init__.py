"""chatproxy: a Flask proxy between web apps and the OpenAI API that keeps the key on the server."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request

from . import (
    batch,
    budget,
    chat,
    classify,
    compat,
    cooldowns,
    errors,
    guards,
    logs,
    openapi,
    ops,
    prices,
    reports,
    security,
    usage,
)
from .config import SettingsError, raw_settings, validate

ROOT = Path(__file__).resolve().parent.parent
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

__all__ = ["SettingsError", "create_app"]


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
    settings = validate(app.config)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["chatproxy.settings"] = settings

    logs.init_app(app)  # first, so start-up messages are JSON lines too
    errors.init_app(app)
    prices.init_app(app)
    usage.init_app(app)
    budget.init_app(app)  # after usage: its SQL counters live in the ledger's database
    reports.init_app(app)
    security.init_app(app)
    guards.init_app(app)
    cooldowns.init_app(app)
    chat.init_app(app)
    compat.init_app(app)  # /v1: the OpenAI-compatible API for token holders
    classify.init_app(app)
    batch.init_app(app)  # after usage: batches live in the ledger's database
    ops.init_app(app)
    openapi.init_app(app)  # GET /api/openapi.json, built from the routes registered above

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
