"""Limits: rate limits per caller (Flask-Limiter), new page sessions per IP, and requests in flight.

Requests in flight are counted per caller, per client IP (for callers that cost nothing to mint) and per
worker process (a few threads stay free for /healthz, /readyz and /metrics), and streams per caller: in
Redis when configured, so every worker and host counts together, else in this process.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
from flask import Flask, Response, g, request
from flask_limiter import Limiter, RequestLimit
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from . import redis_client
from .callers import GUARDED_PREFIXES, SAFE_METHODS, Caller
from .config import Settings
from .errors import ApiError
from .state import state

log = logging.getLogger(__name__)

HEALTH_RESERVE = 2  # threads per worker that guarded requests leave free, so /healthz, /readyz and /metrics answer
LEASE_MARGIN_S = 60  # a slot's lease outlives the longest a request may run by this much


def make_limiter(settings: Settings) -> Limiter:
    """The rate limiter: per caller and kind (CHATPROXY_RATE_LIMIT_*), shared through Redis when configured."""
    return Limiter(
        key_func=_limit_key,
        storage_uri=settings.redis_url or "memory://",
        strategy="fixed-window",
        application_limits=[_limit_for_caller],
        application_limits_exempt_when=_not_limited,
        on_breach=_rate_limited,
        key_prefix=settings.redis_prefix.rstrip(":"),
        in_memory_fallback_enabled=True,
        storage_options={"connection_pool": redis_client.pool(settings.redis_url)} if settings.redis_url else {},
    )


def make_slots(settings: Settings) -> Slots:
    """The counts of requests in flight; a lease outlives any request (the relay cuts a stream at the total timeout)."""
    lease = settings.total_timeout + settings.read_timeout + LEASE_MARGIN_S
    shared = RedisSlots(settings.redis_url, lease, settings.redis_prefix) if settings.redis_url else MemorySlots()
    return Slots(
        shared, MemorySlots(), max(1, settings.threads - HEALTH_RESERVE), FixedWindowRateLimiter(MemoryStorage())
    )


def init_app(app: Flask) -> None:
    """Rate limits (after identify_caller: limits need the caller), then the in-flight counts."""
    state(app).limiter.init_app(app)
    app.after_request(_rate_limit_headers)
    app.before_request(hold_slots)  # after the limiter's hook: a rate-limited request takes no slot
    app.after_request_funcs.setdefault(None, []).insert(0, _release_on_close)  # the last after_request to run
    app.teardown_request(_release_unless_streaming)


def count_new_session() -> None:
    """Count a session about to be started against its client IP, or refuse with 429 (sessions are free to mint)."""
    settings = state().settings
    ids = ("chatproxy", "sessions", request.remote_addr or "unknown")
    for limit in parse_many(settings.rate_limit_sessions):
        try:
            reset = _hit(state().limiter.limiter, limit, ids)
        except redis.RedisError:  # count in this process while Redis is down, as the rate limits do
            log.error("rate limit storage unreachable: counting new sessions per process")
            reset = _hit(state().slots.sessions_fallback, limit, ids)
        if reset is not None:
            retry_after = max(1, math.ceil(reset - time.time()))
            raise ApiError(
                429,
                "rate_limited",
                f"Too many new chat sessions from your network. Try again in {retry_after} seconds.",
                retry_after=retry_after,
            )


def _hit(strategy: FixedWindowRateLimiter, limit: RateLimitItem, ids: tuple[str, ...]) -> float | None:
    """Count one hit: None if it is allowed, else when the window resets."""
    if strategy.hit(limit, *ids):
        return None
    return strategy.get_window_stats(limit, *ids).reset_time


def _limit_key() -> str:
    """The caller's rate-limit bucket; reads (GET, HEAD) have one of their own at the same rate.

    So the page's own GET /api/models, or polling a batch, never uses up the messages a caller may send,
    and reads are still limited. Page loads (no caller yet) are counted per client IP.
    """
    caller = g.get("caller")
    if caller is None:
        return f"page-ip:{request.remote_addr}"
    return f"read:{caller.limit_key}" if request.method in SAFE_METHODS else caller.limit_key


def _limit_for_caller() -> str:
    settings = state().settings
    caller = g.get("caller")
    if caller is not None and caller.key is not None and caller.key.rate_limit:
        return caller.key.rate_limit  # an API key's own, per end user for its end-user tokens
    kind = caller.kind if caller else "page"
    return {
        "page": settings.rate_limit_page,
        "token": settings.rate_limit_token,
        "end_user": settings.rate_limit_token,
        "origin": settings.rate_limit_origin,
        "anonymous": settings.rate_limit_anonymous,
    }[kind]


def rate_limit_state(writes: bool = False) -> dict[str, int] | None:
    """The caller's rate limit as counted for this request: limit, remaining, reset (epoch seconds); None if none.

    With `writes`, the bucket the caller's POSTs count in, whatever this request's method (reads have their own).
    """
    current = state().limiter.current_limit
    caller = g.get("caller")
    if current is None or caller is None:
        return None
    try:
        read = f"read:{caller.limit_key}"
        if writes and read in current.request_args:  # [key prefix, bucket, scope]: the same limit, the other bucket
            args = [caller.limit_key if arg == read else arg for arg in current.request_args]
            reset, remaining = state().limiter.limiter.get_window_stats(current.limit, *args)
            return {"limit": current.limit.amount, "remaining": remaining, "reset": int(reset + 1)}
        return {"limit": current.limit.amount, "remaining": current.remaining, "reset": current.reset_at}
    except redis.RedisError:
        return None  # the limiter counts per process meanwhile; no numbers are better than wrong ones


def _rate_limit_headers(response: Response) -> Response:
    """X-RateLimit-Limit, -Remaining and -Reset (epoch seconds) of the bucket an API request counted in."""
    shown = rate_limit_state()
    if shown is not None:
        for name, value in shown.items():
            response.headers[f"X-RateLimit-{name.title()}"] = str(value)
    return response


def _rate_limited(limit: RequestLimit) -> Response:
    """The contract's 429 with Retry-After until the window resets (Flask-Limiter's headers would stamp every reply)."""
    retry_after = max(1, math.ceil(limit.reset_at - time.time()))
    return ApiError(
        429, "rate_limited", f"Too many requests. Try again in {retry_after} seconds.", retry_after=retry_after
    ).response()


def _not_limited() -> bool:
    """Limits apply to API calls and to loading the page (which mints sessions); not to health or static files."""
    if request.method == "OPTIONS":
        return True
    return not (request.path.startswith(GUARDED_PREFIXES) or request.endpoint in ("chat.page", "admin_page.sign_in"))


@dataclass(frozen=True)
class Claim:
    """One count a request is held under: its key, how many may be open at once, and the error when all are."""

    key: str
    limit: int
    refusal: ApiError


class MemorySlots:
    """Requests in flight per key, counted in this process."""

    def __init__(self) -> None:
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, slot: str, claims: Sequence[Claim]) -> Claim | None:
        """Take a slot under every claim if each has room (all or none); else return the first full claim."""
        with self._lock:
            full = next((claim for claim in claims if self._open.get(claim.key, 0) >= claim.limit), None)
            if full is None:
                for claim in claims:
                    self._open[claim.key] = self._open.get(claim.key, 0) + 1
            return full

    def release(self, slot: str, keys: Sequence[str]) -> None:
        """Give a slot back under every key."""
        with self._lock:
            for key in keys:
                left = self._open.get(key, 0) - 1
                if left > 0:
                    self._open[key] = left
                else:
                    self._open.pop(key, None)


class RedisSlots:
    """Requests in flight per key, shared by all workers: per key, a sorted set of slot ids scored by lease expiry.

    A slot a dead worker never gave back lapses when its lease (longer than any request may run) ends;
    a refused caller does not extend anything.
    """

    # 0 when a slot was taken under every key; else the (1-based) index of the first full key, and nothing taken.
    _ACQUIRE = """
    local t = redis.call('TIME')
    local now = t[1] * 1000 + math.floor(t[2] / 1000)
    for i, key in ipairs(KEYS) do
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      if redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then return i end
    end
    for _, key in ipairs(KEYS) do
      redis.call('ZADD', key, now + tonumber(ARGV[1]), ARGV[2])
      redis.call('PEXPIRE', key, ARGV[1])
    end
    return 0
    """

    def __init__(self, url: str, lease_seconds: float, prefix: str) -> None:
        self.prefix = prefix + "slots:"
        self._redis = redis_client.client(url)
        self._acquire = self._redis.register_script(self._ACQUIRE)
        self._lease_ms = math.ceil(lease_seconds * 1000)
        self._fallback = MemorySlots()
        self._local: set[str] = set()  # slots counted by the fallback while Redis was unreachable
        self._lock = threading.Lock()

    def acquire(self, slot: str, claims: Sequence[Claim]) -> Claim | None:
        """Take a slot under every claim (all or none), or return the first full claim; Redis down: per process."""
        try:
            full = self._acquire(
                keys=[self.prefix + claim.key for claim in claims],
                args=[self._lease_ms, slot, *(claim.limit for claim in claims)],
            )
        except redis.RedisError:
            log.error("redis unreachable: counting requests in flight per process")
            refused = self._fallback.acquire(slot, claims)
            if refused is None:
                with self._lock:
                    self._local.add(slot)
            return refused
        return claims[int(full) - 1] if full else None

    def release(self, slot: str, keys: Sequence[str]) -> None:
        """Give a slot back (a slot Redis could not be told about lapses with its lease)."""
        with self._lock:
            local = slot in self._local
            self._local.discard(slot)
        if local:
            self._fallback.release(slot, keys)
            return
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.zrem(self.prefix + key, slot)
                pipe.execute()
        except redis.RedisError:
            log.warning("redis unreachable: a slot of %s lapses with its lease", ", ".join(keys))


@dataclass(frozen=True)
class Slots:
    """One app's counts of requests in flight."""

    shared: MemorySlots | RedisSlots  # per caller, per client IP, streams per caller: in Redis when configured
    worker: MemorySlots  # guarded requests in flight in this process
    worker_cap: int  # this process's threads minus HEALTH_RESERVE
    sessions_fallback: FixedWindowRateLimiter  # counts new sessions while the limiter's storage is unreachable


def hold(slots: MemorySlots | RedisSlots, claims: Sequence[Claim]) -> Callable[[], None]:
    """Take a slot under every claim, or raise the first full claim's refusal; returns the (idempotent) release."""
    slot = secrets.token_hex(8)
    full = slots.acquire(slot, claims)
    if full is not None:
        raise full.refusal
    keys = [claim.key for claim in claims]
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            slots.release(slot, keys)

    return release


def hold_slots() -> None:
    """Count a guarded request as in flight until its response is done, or refuse it at once.

    503 server_busy past this worker's share of its threads (the rest stay free for /healthz, /readyz and
    /metrics); 429 past the caller's cap, and past the client IP's for callers that cost nothing to mint
    (page sessions, an allowed origin, anonymous): one IP with many sessions gets no more than its cap.
    """
    caller: Caller | None = g.get("caller")
    if caller is None:  # not an API route, or a CORS preflight
        return
    app_state = state()
    settings, slots = app_state.settings, app_state.slots
    release_worker = hold(
        slots.worker,
        [
            Claim(
                "worker",
                slots.worker_cap,
                ApiError(503, "server_busy", "The server is busy. Try again in a moment.", retry_after=1),
            )
        ],
    )
    claims = [
        Claim(
            f"requests:{caller.limit_key}",
            settings.max_concurrent,
            ApiError(
                429,
                "rate_limited",
                f"Too many requests at once: one caller may have {settings.max_concurrent} running. "
                "Wait for one to finish.",
                retry_after=1,
            ),
        )
    ]
    if caller.kind != "token":
        ip, cap = request.remote_addr or "unknown", settings.max_concurrent_per_ip
        claims.append(
            Claim(
                f"requests-ip:{ip}",
                cap,
                ApiError(
                    429,
                    "rate_limited",
                    f"Too many requests at once from your network: at most {cap} may run together. "
                    "Wait for one to finish.",
                    retry_after=1,
                ),
            )
        )
    try:
        release = hold(slots.shared, claims)
    except BaseException:
        release_worker()
        raise
    g.held_slots = (release, release_worker)


def take_held_slots() -> Callable[[], None]:
    """Take over the request's slots from the end of the request: a stream gives them back when its answer ends."""
    held = g.pop("held_slots", ())
    return lambda: _release(held)


def _release_on_close(response: Response) -> Response:
    """A streamed body outlives the view: its request's slots go back when the server closes the response."""
    held = g.get("held_slots", ())
    if held and response.is_streamed:
        g.held_slots = ()
        response.call_on_close(lambda: _release(held))
    return response


def _release_unless_streaming(_error: BaseException | None) -> None:
    """Any other request's slots go back when the request ends (its whole body is built by then)."""
    _release(g.pop("held_slots", ()))


def _release(held: Sequence[Callable[[], None]]) -> None:
    for release in held:
        release()


def take_stream_slot() -> Callable[[], None]:
    """Take one of the caller's stream slots, or refuse with 429; returns the (idempotent) release.

    Slots are counted per rate-limit key: for an allowed origin that is origin and client IP, since
    anyone can send that Origin and must not lock the frontend's other users out. An API key may set its own
    number (max_streams).
    """
    key = g.caller.key
    most = key.max_streams if key is not None and key.max_streams else state().settings.max_streams
    return hold(
        state().slots.shared,
        [
            Claim(
                f"streams:{g.caller.limit_key}",
                most,
                ApiError(
                    429,
                    "rate_limited",
                    f"At most {most} answers can stream at once. Wait for one to finish.",
                    retry_after=1,
                ),
            )
        ],
    )
