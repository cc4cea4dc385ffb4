"""The router: try the model asked for, retry it, fall back along the chain, and honour cooldowns.

Retries live here and only here: the SDK client is built with max_retries=0. The router sees
every attempt, so it can keep one deadline per request (CHATPROXY_TOTAL_TIMEOUT), refuse to sleep
through a long Retry-After (it falls back to the next model instead), count failures per model
for the cooldowns, and tell the client which model answered. Two retry layers would multiply
(SDK retries x router retries x models) and hide attempts from all of that.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import openai

from . import metrics
from .config import Settings
from .cooldowns import Cooldowns, Gate
from .errors import ApiError
from .upstream import DEFAULT_RETRY_AFTER, AttemptFailed, NotSent, as_failure

log = logging.getLogger(__name__)

T = TypeVar("T")
BACKOFF_BASE = 0.5  # seconds before the first retry (then doubling, capped by CHATPROXY_RETRY_MAX_WAIT)


@dataclass(frozen=True)
class Routed(Generic[T]):
    """What an attempt returned, the model that answered, and whether it was a fallback."""

    value: T
    model: str
    degraded: bool


_FAILED: Any = object()  # _attempts gave up on a model


def candidates(model: str, settings: Settings) -> list[str]:
    """The requested model, then the models after it in the fallback chain that are also allowlisted."""
    chain = settings.fallback_chain
    if model not in chain:
        return [model]
    return [model, *(m for m in chain[chain.index(model) + 1 :] if m in settings.models and m != model)]


def route(
    attempt: Callable[[str, openai.Timeout], T],
    chain: Sequence[str],
    settings: Settings,
    cooldowns: Cooldowns,
    deadline: float,
) -> Routed[T]:
    """Call `attempt(model, timeout)` for the model asked for (chain[0]) and then its fallbacks until one answers."""
    model = chain[0]
    hints: dict[str, float] = {}
    for name in chain:
        gate = cooldowns.acquire(name)
        if gate is Gate.CLOSED:
            log.info("skipping %s: cooling down", name)
            continue
        try:
            value = _attempts(attempt, name, settings, cooldowns, deadline, hints)
        except NotSent as exc:
            raise exc.error from exc.error.__cause__
        except ApiError:
            cooldowns.success(name, probe=gate is Gate.PROBE)  # the model answered, if only to refuse
            raise
        if value is not _FAILED:
            cooldowns.success(name, probe=gate is Gate.PROBE)
            if gate is Gate.PROBE:
                metrics.set_cooldown(name, False)
            if name != model:
                log.warning("answered by fallback model %s instead of %s", name, model)
            return Routed(value, name, name != model)
        if time.monotonic() >= deadline:
            log.warning("no answer within CHATPROXY_TOTAL_TIMEOUT (%g s)", settings.total_timeout)
            raise ApiError(504, "upstream_timeout", "The model provider took too long to answer. Try again.")
    raise _unavailable(chain, cooldowns, hints)


def _attempts(
    attempt: Callable[[str, openai.Timeout], T],
    model: str,
    settings: Settings,
    cooldowns: Cooldowns,
    deadline: float,
    hints: dict[str, float],
) -> T:
    """Try one model up to 1 + max_retries times; _FAILED when it should be given up for the next one."""
    tries = settings.max_retries + 1
    for number in range(tries):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _FAILED
        try:
            return attempt(model, _timeout(settings, remaining))
        except (ApiError, NotSent):
            raise
        except Exception as exc:  # noqa: BLE001 - as_failure() re-raises what it does not know
            failure = as_failure(exc, settings)
        log.warning("upstream attempt %d/%d on %s failed: %s", number + 1, tries, model, failure.reason)
        if failure.retry_after is not None:
            hints[model] = max(hints.get(model, 0.0), failure.retry_after)
        cooling = cooldowns.failure(model, failure.retry_after)
        metrics.set_cooldown(model, cooling)
        wait = retry_wait(failure, number, settings.retry_max_wait)
        if cooling or wait is None or number + 1 == tries or time.monotonic() + wait >= deadline:
            return _FAILED
        time.sleep(wait)
    return _FAILED


def retry_wait(failure: AttemptFailed, number: int, max_wait: float) -> float | None:
    """Seconds to wait before retrying the same model, or None to fall back now."""
    if not failure.retryable:
        return None
    if failure.retry_after is not None:
        return failure.retry_after if failure.retry_after <= max_wait else None
    step = min(max_wait, BACKOFF_BASE * 2**number)
    return step / 2 + random.uniform(0, step / 2)  # exponential backoff, "equal jitter"


def _timeout(settings: Settings, remaining: float) -> openai.Timeout:
    """This attempt's timeouts: the configured ones, cut to what is left of the request's deadline."""
    return openai.Timeout(min(settings.read_timeout, remaining), connect=min(settings.connect_timeout, remaining))


def _unavailable(chain: Sequence[str], cooldowns: Cooldowns, hints: dict[str, float]) -> ApiError:
    """503 when no model in the chain answered; Retry-After is when the first of them may be back."""
    waits = [w for w in (max(cooldowns.remaining(m), hints.get(m, 0.0)) for m in chain) if w > 0]
    retry = max(1, math.ceil(min(waits))) if waits else DEFAULT_RETRY_AFTER
    log.warning("no model could answer (chain %s); Retry-After %d s", ", ".join(chain), retry)
    return ApiError(
        503, "upstream_unavailable", "No model is available right now. Try again shortly.", retry_after=retry
    )
