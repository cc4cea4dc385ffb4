"""The dev app: with no OPENAI_API_KEY, `make run` and the command line start the demo upstream in-process.

Development only: `gunicorn wsgi:app` and `flask --app chatproxy` never fall back to the demo.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask

from .. import create_app
from ..config import ROOT, SettingsError, raw_settings, validate
from .upstream import FakeOpenAI

DEMO_KEY = "sk-demo-offline-not-a-real-key"


def wanted(raw: Mapping[str, Any]) -> bool:
    """Whether these settings name no upstream credentials (Azure mode needs no OpenAI key)."""
    return not str(raw["OPENAI_API_KEY"]).strip() and not str(raw["AZURE_OPENAI_ENDPOINT"]).strip()


def start_upstream() -> dict[str, object]:
    """Serve the demo upstream in this process; the settings that point an app at it."""
    fake = FakeOpenAI(demo=True).start()
    return {"OPENAI_API_KEY": DEMO_KEY, "OPENAI_BASE_URL": fake.base_url, "CHATPROXY_DEMO": True}


def create_dev_app(overrides: Mapping[str, object] | None = None, say: Callable[[str], None] = print) -> Flask:
    """create_app from .env and the environment, with the demo standing in for a missing key.

    A bad setting exits with one line, `chatproxy: <what is wrong>`, and status 1: no traceback.
    """
    config = dict(overrides or {})
    raw = {**raw_settings(ROOT / ".env"), **config}
    try:
        if wanted(raw):
            validate({**raw, "OPENAI_API_KEY": DEMO_KEY})  # a bad setting stops us before the demo starts
            config.update(start_upstream())
            say(
                f"No OPENAI_API_KEY set: using the OFFLINE DEMO upstream at {config['OPENAI_BASE_URL']}.\n"
                "Answers are canned echoes, not OpenAI. Put a key in .env to use the real API."
            )
        return create_app(config)
    except SettingsError as exc:
        raise SystemExit(f"chatproxy: {exc}") from None
