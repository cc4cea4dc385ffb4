"""Logs as JSON lines: time, level, logger, pid, message, request_id (and the exception, redacted)."""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, has_app_context
from flask.logging import default_handler

from .security import redact

# The request id for log lines written after the view returned (a stream's generator runs outside the
# request context, in the same thread); cleared when the response is closed.
_request_id: ContextVar[str | None] = ContextVar("chatproxy_request_id", default=None)
_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
# Terminal colour codes (werkzeug colours its request lines): noise in a JSON log, and they confuse log viewers.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
QUIET = ("httpx2", "httpx", "httpcore")  # one INFO line per upstream call: noise at INFO, kept at WARNING


class JsonFormatter(logging.Formatter):
    """One JSON object per line; record attributes passed with `extra=` become fields too."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line; message and exception are redacted once more here."""
        extra = {
            k: redact(v) if isinstance(v, str) else v
            for k, v in vars(record).items()
            if k not in _RESERVED and not k.startswith("_")
        }
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": redact(_ANSI.sub("", record.getMessage())),
            "request_id": extra.pop("request_id", None) or current_request_id(),
        }
        entry.update({k: v for k, v in extra.items() if k not in entry})
        if record.exc_info or record.exc_text:
            entry["exception"] = redact(record.exc_text or self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


def current_request_id() -> str | None:
    """The id of the request this thread is serving, if any."""
    if has_app_context():
        return g.get("request_id")
    return _request_id.get()


def configure(stream: Any = None) -> None:
    """Send the root logger's records to `stream` (stderr) as JSON lines, unless logging is already set up.

    gunicorn sets up logging itself (gunicorn.conf.py's logconfig_dict, with this formatter), and so do
    test runners; then this does nothing.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def init_app(app: Flask) -> None:
    """JSON logs for this app: configure the root logger and keep the request id for streamed responses."""
    configure()
    app.logger.removeHandler(default_handler)  # records propagate to the root's JSON handler

    @app.after_request
    def _keep_request_id(response: Response) -> Response:
        _request_id.set(g.get("request_id"))
        response.call_on_close(lambda: _request_id.set(None))
        return response
