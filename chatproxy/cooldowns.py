"""Per-model cooldowns: skip a model that keeps failing, then let exactly one probe request decide it is back.

A model trips after `failures` failed attempts within `window` seconds and is skipped for
max(`seconds`, the upstream's Retry-After). When that time is over, the next caller gets the
probe: it alone may call the model (for at most `lease` seconds) while everyone else keeps
skipping it; its success clears the cooldown, its failure trips it again.

Two backends with one interface: `MemoryCooldowns` (one process) and `RedisCooldowns` (shared by
every worker and host; each operation is one atomic Lua script using the Redis clock).
Cooldowns are an optimisation, so the Redis backend fails open: with Redis down every model is
tried and a warning is logged.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis
from flask import Flask

from . import redis_client
from .config import Settings

log = logging.getLogger(__name__)

EXTENSION = "chatproxy.cooldowns"
DEFAULT_PREFIX = "chatproxy:cooldown:"
MAX_HINT = 3600.0  # an upstream Retry-After longer than this is not believed
STATE_TTL_MS = 86_400_000  # a tripped model nobody asks for is forgotten a day after its cooldown


class Gate(enum.Enum):
    """What `acquire` allows: call the model, call it as the one probe, or skip it."""

    OPEN = 0
    PROBE = 1
    CLOSED = 2


class Cooldowns(Protocol):
    """The interface both backends implement."""

    def acquire(self, model: str) -> Gate:
        """May this request call `model` now?"""

    def success(self, model: str) -> None:
        """The probe got an answer: `model` is back."""

    def failure(self, model: str, retry_after: float | None = None) -> bool:
        """Count a failed attempt; True when `model` is (now) cooling down."""

    def remaining(self, model: str) -> float:
        """Seconds until `model`'s cooldown ends (0: not cooling down)."""


def init_app(app: Flask, *, key_prefix: str = DEFAULT_PREFIX) -> None:
    """Create the app's cooldowns: in Redis when CHATPROXY_REDIS_URL is set, else in this process."""
    app.extensions[EXTENSION] = from_settings(app.extensions["chatproxy.settings"], key_prefix=key_prefix)


def of(app: Flask) -> Cooldowns:
    """The app's cooldowns (made on first use when the factory did not call `init_app`)."""
    found = app.extensions.get(EXTENSION)
    if found is None:
        found = app.extensions.setdefault(EXTENSION, from_settings(app.extensions["chatproxy.settings"]))
    return found


def from_settings(settings: Settings, *, key_prefix: str = DEFAULT_PREFIX) -> Cooldowns:
    """The backend the settings ask for."""
    limits = dict(failures=settings.cooldown_failures, window=settings.cooldown_window,
                  seconds=settings.cooldown_seconds, lease=settings.total_timeout)
    if settings.redis_url:
        return RedisCooldowns(redis_client.client(settings.redis_url), key_prefix=key_prefix, **limits)
    return MemoryCooldowns(**limits)


def _duration(seconds: float, retry_after: float | None) -> float:
    """How long a trip lasts: the configured time, or longer when the upstream asked for it."""
    return max(seconds, min(retry_after or 0.0, MAX_HINT))


@dataclass
class _State:
    """One model's recent failures and, once tripped, when its cooldown and the current probe end."""

    failures: deque[float]
    until: float | None = None
    probe_until: float = 0.0


class MemoryCooldowns:
    """Cooldowns kept in this process (one gunicorn worker each)."""

    def __init__(self, *, failures: int, window: float, seconds: float, lease: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.window, self.seconds, self.lease = failures, window, seconds, lease
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _State] = {}

    def acquire(self, model: str) -> Gate:
        """OPEN unless tripped; after the cooldown, PROBE for exactly one caller at a time."""
        with self._lock:
            state = self._states.get(model)
            if state is None or state.until is None:
                return Gate.OPEN
            now = self._clock()
            if now < state.until or now < state.probe_until:
                return Gate.CLOSED
            state.probe_until = now + self.lease
            return Gate.PROBE

    def success(self, model: str) -> None:
        """Forget the model's failures and cooldown."""
        with self._lock:
            self._states.pop(model, None)

    def failure(self, model: str, retry_after: float | None = None) -> bool:
        """Count a failure; trip at the threshold, or again when a probe (or a late straggler) fails."""
        with self._lock:
            now = self._clock()
            state = self._states.setdefault(model, _State(deque(maxlen=self.failures)))
            if state.until is not None and now < state.until:
                state.until = max(state.until, now + min(retry_after or 0.0, MAX_HINT))
                return True
            if state.until is None:
                state.failures.append(now)
                if len(state.failures) < self.failures or state.failures[0] <= now - self.window:
                    return False
            self._trip(model, state, now, retry_after)
            return True

    def remaining(self, model: str) -> float:
        """Seconds left in the cooldown."""
        with self._lock:
            state = self._states.get(model)
            if state is None or state.until is None:
                return 0.0
            return max(0.0, state.until - self._clock())

    def _trip(self, model: str, state: _State, now: float, retry_after: float | None) -> None:
        duration = _duration(self.seconds, retry_after)
        state.until, state.probe_until = now + duration, 0.0
        state.failures.clear()
        log.warning("model %s is cooling down for %.0f s after repeated failures", model, duration)


# Lua: every operation reads and writes one model's keys atomically, with the Redis server's clock
# (the same on every host). KEYS[1] is the state hash (until, probe), KEYS[2] the failure zset.
_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

_ACQUIRE = _NOW + """
local untilv = redis.call('HGET', KEYS[1], 'until')
if not untilv then return 0 end
if now < tonumber(untilv) then return 2 end
local probe = redis.call('HGET', KEYS[1], 'probe')
if probe and now < tonumber(probe) then return 2 end
redis.call('HSET', KEYS[1], 'probe', string.format('%.0f', now + tonumber(ARGV[1])))
return 1
"""

# ARGV: threshold, window ms, cooldown ms, retry-after ms, unique member, state ttl ms.
# Returns {0} (still open), {1} (already cooling down) or {2, cooldown ms} (just tripped).
_FAILURE = _NOW + """
local untilv = redis.call('HGET', KEYS[1], 'until')
local hint = tonumber(ARGV[4])
if untilv and now < tonumber(untilv) then
  if now + hint > tonumber(untilv) then
    redis.call('HSET', KEYS[1], 'until', string.format('%.0f', now + hint))
    redis.call('PEXPIRE', KEYS[1], hint + tonumber(ARGV[6]))
  end
  return {1}
end
if not untilv then
  redis.call('ZADD', KEYS[2], now, ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[1]) then return {0} end
end
local duration = math.max(tonumber(ARGV[3]), hint)
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'until', string.format('%.0f', now + duration))
redis.call('HDEL', KEYS[1], 'probe')
redis.call('PEXPIRE', KEYS[1], duration + tonumber(ARGV[6]))
return {2, duration}
"""

_REMAINING = _NOW + """
local untilv = redis.call('HGET', KEYS[1], 'until')
if not untilv then return 0 end
return math.max(0, tonumber(untilv) - now)
"""


class RedisCooldowns:
    """Cooldowns in Redis, shared by every worker and host that uses the same URL and prefix."""

    def __init__(self, client: redis.Redis, *, failures: int, window: float, seconds: float, lease: float,
                 key_prefix: str = DEFAULT_PREFIX) -> None:
        self.failures, self.window, self.seconds, self.lease = failures, window, seconds, lease
        self.client, self.key_prefix = client, key_prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._failure = client.register_script(_FAILURE)
        self._remaining = client.register_script(_REMAINING)

    def keys(self, model: str) -> list[str]:
        """The model's state hash and failure set (one hash slot, so Redis Cluster runs the scripts)."""
        base = f"{self.key_prefix}{{{model}}}"
        return [base, base + ":fails"]

    def acquire(self, model: str) -> Gate:
        """OPEN unless tripped; after the cooldown, PROBE for exactly one caller across all workers."""
        try:
            return Gate(int(self._acquire(keys=self.keys(model), args=[_ms(self.lease)])))
        except redis.RedisError as exc:
            log.warning("cooldown store unavailable (%s): trying %s anyway", type(exc).__name__, model)
            return Gate.OPEN

    def success(self, model: str) -> None:
        """Forget the model's failures and cooldown."""
        try:
            self.client.delete(*self.keys(model))
        except redis.RedisError as exc:
            log.warning("cooldown store unavailable (%s): %s not marked healthy", type(exc).__name__, model)

    def failure(self, model: str, retry_after: float | None = None) -> bool:
        """Count a failure; trip at the threshold, or again when a probe (or a late straggler) fails."""
        hint = _ms(min(retry_after or 0.0, MAX_HINT))
        args = [self.failures, _ms(self.window), _ms(self.seconds), hint, uuid.uuid4().hex, STATE_TTL_MS]
        try:
            result = self._failure(keys=self.keys(model), args=args)
        except redis.RedisError as exc:
            log.warning("cooldown store unavailable (%s): failure of %s not counted", type(exc).__name__, model)
            return False
        if result[0] == 2:
            log.warning("model %s is cooling down for %.0f s after repeated failures", model, result[1] / 1000)
        return result[0] > 0

    def remaining(self, model: str) -> float:
        """Seconds left in the cooldown."""
        try:
            return int(self._remaining(keys=self.keys(model))) / 1000
        except redis.RedisError:
            return 0.0


def _ms(seconds: float) -> int:
    return int(seconds * 1000)
