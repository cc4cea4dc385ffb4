"""The one state object of an app: what create_app builds from the settings, read through `state()`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import Flask, current_app

if TYPE_CHECKING:  # types only: every module may import this one, so it imports none of them
    from flask_limiter import Limiter
    from openai import OpenAI
    from redis import Redis

    from .batches.store import BatchStore
    from .budget import Budget
    from .config import Settings
    from .cooldowns import Cooldowns
    from .keys import KeyStore
    from .limits import Slots
    from .models import ModelTable, Retirement
    from .schemas import RequestModels
    from .usage import Ledger

KEY = "chatproxy"


@dataclass(frozen=True)
class AppState:
    """Settings and the long-lived objects built from them: one per app, shared by its threads."""

    settings: Settings
    client: OpenAI  # one per process, after gunicorn forks; reused by every request
    models: ModelTable  # what each model takes and costs
    requests: RequestModels  # the request models, with this app's allowlist and caps
    retiring: tuple[Retirement, ...]  # configured models within 30 days of their shutdown
    ledger: Ledger
    budget: Budget  # counters in the ledger's database
    batches: BatchStore  # in the ledger's database
    cooldowns: Cooldowns
    tokens: dict[str, bytes]  # bearer token name -> SHA-256 digest (CHATPROXY_API_TOKENS)
    keys: KeyStore  # API keys in the ledger's database
    limiter: Limiter
    slots: Slots  # requests in flight: per caller, per client IP, streams; shared through Redis when set
    redis: Redis | None


def init_app(app: Flask, app_state: AppState) -> None:
    """Keep `app_state` as the app's state."""
    app.extensions[KEY] = app_state


def state(app: Flask | None = None) -> AppState:
    """The state of `app`, or of the current app."""
    return (app or current_app).extensions[KEY]
