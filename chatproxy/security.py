"""Security headers on every response, and a log-record factory that redacts keys and Authorization values."""

from __future__ import annotations

import logging
import re

from flask import Flask, Response, request

from .config import Settings

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
HSTS = "max-age=31536000; includeSubDomains"

# OpenAI keys (sk-..., sk-proj-..., sess-...), our own bearer tokens, and any Authorization/api-key value.
_SECRET = re.compile(
    r"\b(?:sk|sess|cpx)[-_][A-Za-z0-9_\-]{8,}"
    r"|(?i:(?<=authorization: )|(?<=authorization': ')|(?<=bearer )|(?<=api-key: )|(?<=api-key': '))[^\s'\",]+"
)
REDACTED = "[REDACTED]"
# The configured keys themselves, for keys with no recognisable shape (Azure's are 32 hex characters).
# Process-wide, like the log-record factory that uses them.
_KNOWN_SECRETS: set[str] = set()
MIN_KNOWN_SECRET = 16  # shorter values (e.g. Ollama's "ollama") are not secrets worth blanking everywhere


def redact(text: str) -> str:
    """Replace the configured keys, and anything shaped like a key or an Authorization value."""
    for secret in tuple(_KNOWN_SECRETS):
        text = text.replace(secret, REDACTED)
    return _SECRET.sub(REDACTED, text)


def remember_secret(value: str) -> None:
    """Redact this exact value from every log line from now on."""
    if len(value) >= MIN_KNOWN_SECRET:
        _KNOWN_SECRETS.add(value)


def init_app(app: Flask, settings: Settings) -> None:
    """Add the security headers to every response and redact secrets from every log record."""
    install_log_redaction()
    for key in (settings.openai_api_key, settings.azure_api_key):
        remember_secret(key)

    @app.after_request
    def _security_headers(response: Response) -> Response:
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        if request.is_secure:
            response.headers.setdefault("Strict-Transport-Security", HSTS)
        if request.path.startswith(("/api/", "/v1/")):
            response.headers.setdefault("Cache-Control", "no-store")
        return response


def install_log_redaction() -> None:
    """Wrap the log-record factory once, so records from every logger (ours, the SDK's, gunicorn's) are redacted."""
    current = logging.getLogRecordFactory()
    if getattr(current, "chatproxy_redacting", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = current(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not break logging
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    factory.chatproxy_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
