"""Per-model cooldowns, a circuit breaker: skip a model whose calls mostly fail, then let one probe decide.

Every attempt on a model is a call: an answer (even a refusal) is a success, a retryable failure
(429, 5xx, timeout, connection error, unreadable answer) a failure. When at least `min_calls` calls
fell within the last `window` seconds and at least `rate` of them failed, the model trips and is
skipped for max(`seconds`, the upstream's Retry-After). When that time is over, the next caller gets
the probe: it alone may call the model (for at most `lease` seconds) while everyone else keeps
skipping it; its answer closes the breaker and forgets the window, its failure trips it again.
The window is kept in BUCKETS slots of window/BUCKETS seconds (1 s with the default 60 s window).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import redis

from . import redis_client
from .config import Settings

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "chatproxy:cooldown:"
MAX_HINT = 3600.0  # an upstream Retry-After longer than this is not believed
STATE_TTL_MS = 86_400_000  # a tripped model nobody asks for is forgotten a day after its cooldown
BUCKETS = 60  # slots of the sliding window


class Gate(enum.Enum):
    """What `acquire` allows: call the model, call it as the one probe, or skip it."""

    OPEN = 0
    PROBE = 1
    CLOSED = 2


class Cooldowns(Protocol):
    """The interface both backends implement."""

    def acquire(self, model: str) -> Gate:
        """May this request call `model` now?"""

    def success(self, model: str, probe: bool = False) -> None:
        """Count an answered call; the probe's answer (`probe`) closes the breaker."""

    def failure(self, model: str, retry_after: float | None = None, *, counted: bool = False) -> bool:
        """Count a failed call (`counted`: the call was already counted as answered, e.g. a stream that broke
        after its first delta); True when `model` is (now) cooling down."""

    def remaining(self, model: str) -> float:
        """Seconds until `model`'s cooldown ends (0: not cooling down)."""


@dataclass(frozen=True)
class Limits:
    """When a model trips, and for how long."""

    rate: float  # failed calls / calls in the window at or above which the model trips
    min_calls: int  # calls the window must hold before the rate counts
    window: float  # seconds
    seconds: float  # the cooldown
    lease: float  # how long the probe may take before another caller gets it

    def trips(self, calls: int, failures: int) -> bool:
        """Whether these counts trip the breaker (integer arithmetic, as the Lua script does)."""
        return calls >= self.min_calls and failures * 1_000_000 >= _ppm(self.rate) * calls


def from_settings(settings: Settings) -> Cooldowns:
    """The backend the settings ask for."""
    limits = Limits(
        rate=settings.cooldown_failure_rate,
        min_calls=settings.cooldown_min_calls,
        window=settings.cooldown_window,
        seconds=settings.cooldown_seconds,
        lease=settings.total_timeout,
    )
    if settings.redis_url:
        return RedisCooldowns(
            redis_client.client(settings.redis_url), limits, key_prefix=settings.redis_prefix + "cooldown:"
        )
    return MemoryCooldowns(limits)


def _duration(seconds: float, retry_after: float | None) -> float:
    """How long a trip lasts: the configured time, or longer when the upstream asked for it."""
    return max(seconds, min(retry_after or 0.0, MAX_HINT))


def _ppm(rate: float) -> int:
    return round(rate * 1_000_000)


@dataclass
class _State:
    """One model's calls and failures per slot of the window and, once tripped, when its cooldown and probe end."""

    slots: dict[int, list[int]] = field(default_factory=dict)  # slot number -> [calls, failures]
    until: float | None = None
    probe_until: float = 0.0


class MemoryCooldowns:
    """Cooldowns kept in this process (one gunicorn worker each)."""

    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._width = limits.window / BUCKETS
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
            state.probe_until = now + self.limits.lease
            return Gate.PROBE

    def success(self, model: str, probe: bool = False) -> None:
        """Count an answered call; the probe's answer forgets the model's window and cooldown."""
        with self._lock:
            state = self._states.get(model)
            if probe:
                self._states.pop(model, None)
            elif state is None or state.until is None:  # a straggler answering during a cooldown changes nothing
                self._count(self._states.setdefault(model, _State()), self._clock(), failed=False)

    def failure(self, model: str, retry_after: float | None = None, *, counted: bool = False) -> bool:
        """Count a failure; trip at the failure rate, or again when a probe (or a late straggler) fails."""
        with self._lock:
            now = self._clock()
            state = self._states.setdefault(model, _State())
            if state.until is not None and now < state.until:
                state.until = max(state.until, now + min(retry_after or 0.0, MAX_HINT))
                return True
            if state.until is None:
                calls, failures = self._count(state, now, failed=True, counted=counted)
                if not self.limits.trips(calls, failures):
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

    def _count(self, state: _State, now: float, *, failed: bool, counted: bool = False) -> tuple[int, int]:
        """Add one call (unless `counted`) and maybe a failure to the current slot; the window's totals."""
        current = int(now // self._width)
        slot = state.slots.setdefault(current, [0, 0])
        slot[0] += 0 if counted else 1
        slot[1] += 1 if failed else 0
        for old in [n for n in state.slots if n <= current - BUCKETS]:
            del state.slots[old]
        return sum(c for c, _ in state.slots.values()), sum(f for _, f in state.slots.values())

    def _trip(self, model: str, state: _State, now: float, retry_after: float | None) -> None:
        duration = _duration(self.limits.seconds, retry_after)
        state.until, state.probe_until = now + duration, 0.0
        state.slots.clear()
        log.warning("model %s is cooling down for %.0f s after repeated failures", model, duration)


# Lua: every operation reads and writes one model's keys atomically, with the Redis server's clock
# (the same on every host). KEYS[1] is the state hash (until, probe), KEYS[2] the window hash: for each
# of BUCKETS slots, n<i> (the slot number it holds), c<i> (calls) and f<i> (failures).
_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

# Count a call in the current slot. ARGV[1] slot width ms, ARGV[2] buckets, ARGV[3] window ms; `calls` and
# `fails` (0 or 1) are set by the caller.
_COUNT = """
local width, buckets = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = math.floor(now / width)
local i = tostring(n % buckets)
if tonumber(redis.call('HGET', KEYS[2], 'n' .. i)) ~= n then
  redis.call('HSET', KEYS[2], 'n' .. i, string.format('%.0f', n), 'c' .. i, 0, 'f' .. i, 0)
end
if calls > 0 then redis.call('HINCRBY', KEYS[2], 'c' .. i, calls) end
if fails > 0 then redis.call('HINCRBY', KEYS[2], 'f' .. i, fails) end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
"""

_ACQUIRE = (
    _NOW
    + """
local untilv = redis.call('HGET', KEYS[1], 'until')
if not untilv then return 0 end
if now < tonumber(untilv) then return 2 end
local probe = redis.call('HGET', KEYS[1], 'probe')
if probe and now < tonumber(probe) then return 2 end
redis.call('HSET', KEYS[1], 'probe', string.format('%.0f', now + tonumber(ARGV[1])))
return 1
"""
)

# ARGV 1-3 as _COUNT, ARGV[4] 1 for the probe. The probe's answer deletes both keys (the breaker closes);
# any other answer is counted, unless the model is tripped (a straggler answering during a cooldown).
_SUCCESS = (
    _NOW
    + """
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local calls, fails = 1, 0
"""
    + _COUNT
    + """
return 1
"""
)

# ARGV 1-3 as _COUNT, then min calls, rate (parts per million), cooldown ms, retry-after ms, state ttl ms,
# counted (1: add the failure only, the call was counted as answered).
# Returns {0} (still open), {1} (already cooling down) or {2, cooldown ms} (just tripped).
_FAILURE = (
    _NOW
    + """
local untilv = redis.call('HGET', KEYS[1], 'until')
local hint = tonumber(ARGV[7])
if untilv and now < tonumber(untilv) then
  if now + hint > tonumber(untilv) then
    redis.call('HSET', KEYS[1], 'until', string.format('%.0f', now + hint))
    redis.call('PEXPIRE', KEYS[1], hint + tonumber(ARGV[8]))
  end
  return {1}
end
if not untilv then
  local calls, fails = 1 - tonumber(ARGV[9]), 1
"""
    + _COUNT
    + """
  local fields, slots = redis.call('HGETALL', KEYS[2]), {}
  for j = 1, #fields, 2 do slots[fields[j]] = tonumber(fields[j + 1]) end
  local total, failed = 0, 0
  for j = 0, buckets - 1 do
    local held = slots['n' .. j]
    if held and held > n - buckets then
      total = total + slots['c' .. j]
      failed = failed + slots['f' .. j]
    end
  end
  if total < tonumber(ARGV[4]) or failed * 1000000 < tonumber(ARGV[5]) * total then return {0} end
end
local duration = math.max(tonumber(ARGV[6]), hint)
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'until', string.format('%.0f', now + duration))
redis.call('HDEL', KEYS[1], 'probe')
redis.call('PEXPIRE', KEYS[1], duration + tonumber(ARGV[8]))
return {2, duration}
"""
)

_REMAINING = (
    _NOW
    + """
local untilv = redis.call('HGET', KEYS[1], 'until')
if not untilv then return 0 end
return math.max(0, tonumber(untilv) - now)
"""
)


class RedisCooldowns:
    """Cooldowns in Redis, shared by every worker and host that uses the same URL and prefix."""

    def __init__(self, client: redis.Redis, limits: Limits, *, key_prefix: str = DEFAULT_PREFIX) -> None:
        self.limits = limits
        self.client, self.key_prefix = client, key_prefix
        self._window = [max(1, _ms(limits.window) // BUCKETS), BUCKETS, _ms(limits.window)]
        self._acquire = client.register_script(_ACQUIRE)
        self._success = client.register_script(_SUCCESS)
        self._failure = client.register_script(_FAILURE)
        self._remaining = client.register_script(_REMAINING)

    def keys(self, model: str) -> list[str]:
        """The model's state hash and window hash (one hash slot, so Redis Cluster runs the scripts)."""
        base = f"{self.key_prefix}{{{model}}}"
        return [base, base + ":window"]

    def acquire(self, model: str) -> Gate:
        """OPEN unless tripped; after the cooldown, PROBE for exactly one caller across all workers."""
        try:
            return Gate(int(self._acquire(keys=self.keys(model), args=[_ms(self.limits.lease)])))
        except redis.RedisError as exc:
            log.warning("cooldown store unavailable (%s): trying %s anyway", type(exc).__name__, model)
            return Gate.OPEN

    def success(self, model: str, probe: bool = False) -> None:
        """Count an answered call (one script call); the probe's answer forgets the model's window and cooldown."""
        try:
            self._success(keys=self.keys(model), args=[*self._window, 1 if probe else 0])
        except redis.RedisError as exc:
            log.warning("cooldown store unavailable (%s): answer of %s not counted", type(exc).__name__, model)

    def failure(self, model: str, retry_after: float | None = None, *, counted: bool = False) -> bool:
        """Count a failure; trip at the failure rate, or again when a probe (or a late straggler) fails."""
        hint = _ms(min(retry_after or 0.0, MAX_HINT))
        args = [
            *self._window,
            self.limits.min_calls,
            _ppm(self.limits.rate),
            _ms(self.limits.seconds),
            hint,
            STATE_TTL_MS,
            1 if counted else 0,
        ]
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
