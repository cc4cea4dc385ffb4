"""Who may call: origin check, page session + CSRF, bearer tokens, anonymous; rate limits and stream slots."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import click
import redis
from flask import Flask, Request, Response, current_app, g, request, session
from flask.sessions import SecureCookieSessionInterface
from flask_cors import CORS
from flask_limiter import Limiter, RequestLimit
from werkzeug.middleware.proxy_fix import ProxyFix

from . import redis_client
from .config import Settings, parse_tokens
from .errors import ApiError

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"
GUARDED_PREFIXES = ("/api/", "/v1/")


@dataclass(frozen=True)
class Caller:
    """The identity a request is counted under, and which limit applies to it."""

    identity: str  # session:<id>, token:<name>, origin:<origin>, ip:<addr>
    kind: str  # page, token, origin, anonymous
    limit_key: str


class PageSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie session, marked Secure whenever the request came over https."""

    def get_cookie_secure(self, app: Flask) -> bool:
        """Secure on https (behind a trusted proxy, ProxyFix makes the scheme right)."""
        return request.is_secure or super().get_cookie_secure(app)


def init_app(app: Flask) -> None:
    """Wire ProxyFix, sessions, CORS, caller identification, rate limits and stream slots."""
    settings: Settings = app.extensions["chatproxy.settings"]
    if settings.trusted_proxies:
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n, x_port=n)  # type: ignore[method-assign]
    app.secret_key = settings.secret_key or secrets.token_hex(32)
    if not settings.secret_key:
        log.warning("CHATPROXY_SECRET_KEY is not set: page sessions are valid in this process only")
    app.config.update(SESSION_COOKIE_NAME="chatproxy_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", PERMANENT_SESSION_LIFETIME=86400)
    app.session_interface = PageSessionInterface()
    app.extensions["chatproxy.tokens"] = parse_tokens(settings.api_tokens)
    if settings.allowed_origins:
        CORS(app, resources={r"/api/*": {"origins": list(settings.allowed_origins)}, r"/v1/*": {
            "origins": list(settings.allowed_origins)}}, supports_credentials=False,
             allow_headers=["Content-Type", "Authorization"],
             expose_headers=["Retry-After", "X-Request-ID", "X-Chatproxy-Model"], max_age=600)
    app.before_request(identify_caller)  # before the limiter's own before_request: limits need the caller
    storage = settings.redis_url or "memory://"
    limiter = Limiter(key_func=_limit_key, app=app, storage_uri=storage, strategy="fixed-window",
                      application_limits=[_limit_for_caller], application_limits_exempt_when=_not_limited,
                      on_breach=_rate_limited, key_prefix="chatproxy",
                      in_memory_fallback_enabled=True,
                      storage_options={"connection_pool": redis_client.pool(settings.redis_url)}
                      if settings.redis_url else {})
    app.extensions["chatproxy.limiter"] = limiter
    # A lease outlives any stream: the relay cuts a stream at the total timeout, noticed within a read timeout.
    lease = settings.total_timeout + settings.read_timeout + 60
    app.extensions["chatproxy.streams"] = (RedisStreamSlots(settings.redis_url, lease) if settings.redis_url
                                           else MemoryStreamSlots())
    app.cli.add_command(new_token)


def hash_token(token: str) -> str:
    """The settings form of a token's hash."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def token_name(header: str, tokens: dict[str, bytes]) -> str | None:
    """The name of the token in an `Authorization: Bearer` header, compared in constant time; None if invalid."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    digest = hashlib.sha256(token.strip().encode()).digest()
    found = None
    for name, expected in tokens.items():
        if hmac.compare_digest(digest, expected):
            found = name
    return found


def own_origin(req: Request) -> str:
    """scheme://host[:port] of this app as the browser sees it."""
    return req.host_url.rstrip("/")


def csrf_token() -> str:
    """The page session's CSRF token, creating the session on first use."""
    if "sid" not in session:
        session["sid"] = secrets.token_urlsafe(16)
        session["csrf"] = secrets.token_urlsafe(32)
        session.permanent = True
    return session["csrf"]


def identify_caller() -> None:
    """Decide who is calling an API route, or refuse: 403 forbidden_origin, 403 csrf_failed, 401."""
    if request.method == "OPTIONS" or not request.path.startswith(GUARDED_PREFIXES):
        return
    settings: Settings = current_app.extensions["chatproxy.settings"]
    origin = request.headers.get("Origin")
    if origin and origin != own_origin(request) and origin not in settings.allowed_origins:
        raise ApiError(403, "forbidden_origin", "Requests from this origin are not allowed.")
    ip = request.remote_addr or "unknown"
    auth = request.headers.get("Authorization")
    if auth is not None:
        name = token_name(auth, current_app.extensions["chatproxy.tokens"])
        if name is None:
            raise ApiError(401, "unauthorized", "The bearer token is not valid.")
        g.caller = Caller(f"token:{name}", "token", f"token:{name}")
    elif "sid" in session:
        if request.method not in SAFE_METHODS and not _csrf_ok(request.headers.get(CSRF_HEADER, "")):
            raise ApiError(403, "csrf_failed", "The page's security token is missing or wrong. Reload the page.")
        g.caller = Caller(f"session:{session['sid']}", "page", f"session:{session['sid']}")
    elif origin and origin in settings.allowed_origins:
        g.caller = Caller(f"origin:{origin}", "origin", f"origin-ip:{ip}")
    elif settings.allow_anonymous:
        g.caller = Caller(f"ip:{ip}", "anonymous", f"ip:{ip}")
    else:
        raise ApiError(401, "unauthorized", "Use the chat page, an allowed origin or a bearer token.")
    g.identity = g.caller.identity


def _csrf_ok(sent: str) -> bool:
    expected = session.get("csrf", "")
    return bool(sent) and bool(expected) and hmac.compare_digest(sent.encode(), expected.encode())


def _limit_key() -> str:
    caller = g.get("caller")
    return caller.limit_key if caller else f"page-ip:{request.remote_addr}"


def _limit_for_caller() -> str:
    settings: Settings = current_app.extensions["chatproxy.settings"]
    caller = g.get("caller")
    kind = caller.kind if caller else "page"
    return {"page": settings.rate_limit_page, "token": settings.rate_limit_token,
            "origin": settings.rate_limit_origin, "anonymous": settings.rate_limit_anonymous}[kind]


def _rate_limited(limit: RequestLimit) -> Response:
    """The contract's 429 with Retry-After until the window resets (Flask-Limiter's headers would stamp every reply)."""
    retry_after = max(1, math.ceil(limit.reset_at - time.time()))
    return ApiError(429, "rate_limited", f"Too many requests. Try again in {retry_after} seconds.",
                    retry_after=retry_after).response()


def _not_limited() -> bool:
    """Limits apply to API calls and to loading the page (which mints sessions); not to health or static files."""
    if request.method == "OPTIONS":
        return True
    return not (request.path.startswith(GUARDED_PREFIXES) or request.endpoint == "chat.page")


class MemoryStreamSlots:
    """Simultaneous streams per key, counted in this process."""

    def __init__(self) -> None:
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str, limit: int) -> str | None:
        """Take a slot if fewer than `limit` are open; returns the slot's id, or None."""
        with self._lock:
            if self._open.get(key, 0) >= limit:
                return None
            self._open[key] = self._open.get(key, 0) + 1
            return LOCAL_SLOT

    def release(self, key: str, slot: str) -> None:
        """Give a slot back."""
        with self._lock:
            left = self._open.get(key, 0) - 1
            if left > 0:
                self._open[key] = left
            else:
                self._open.pop(key, None)


LOCAL_SLOT = "local"  # the id of a slot counted in this process


class RedisStreamSlots:
    """Simultaneous streams per key, shared by all workers: a sorted set of slot ids scored by lease expiry.

    A slot a dead worker never gave back lapses when its lease (longer than any stream may run) ends;
    a refused caller does not extend anything.
    """

    _ACQUIRE = """
    local t = redis.call('TIME')
    local now = t[1] * 1000 + math.floor(t[2] / 1000)
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
    if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
    """

    def __init__(self, url: str, lease_seconds: float) -> None:
        self._redis = redis_client.client(url)
        self._acquire = self._redis.register_script(self._ACQUIRE)
        self._lease_ms = math.ceil(lease_seconds * 1000)
        self._fallback = MemoryStreamSlots()

    def acquire(self, key: str, limit: int) -> str | None:
        """Take a slot; with Redis down, count in this process instead."""
        slot = secrets.token_hex(8)
        try:
            taken = self._acquire(keys=[f"chatproxy:streams:{key}"], args=[limit, self._lease_ms, slot])
        except redis.RedisError:
            log.error("redis unreachable: counting streams per process")
            return self._fallback.acquire(key, limit)
        return slot if taken else None

    def release(self, key: str, slot: str) -> None:
        """Give a slot back (a slot Redis could not be told about lapses with its lease)."""
        if slot == LOCAL_SLOT:
            self._fallback.release(key, slot)
            return
        try:
            self._redis.zrem(f"chatproxy:streams:{key}", slot)
        except redis.RedisError:
            log.warning("redis unreachable: a stream slot of %s lapses with its lease", key)


def take_stream_slot() -> Callable[[], None]:
    """Take one of the caller's stream slots, or refuse with 429; returns the (idempotent) release.

    Slots are counted per rate-limit key: for an allowed origin that is origin and client IP, since
    anyone can send that Origin and must not lock the frontend's other users out.
    """
    settings: Settings = current_app.extensions["chatproxy.settings"]
    slots = current_app.extensions["chatproxy.streams"]
    key = _limit_key()
    slot = slots.acquire(key, settings.max_streams)
    if slot is None:
        raise ApiError(429, "rate_limited", f"At most {settings.max_streams} answers can stream at once. "
                       "Wait for one to finish.", retry_after=1)
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            slots.release(key, slot)

    return release


@click.command("new-token")
@click.argument("name")
def new_token(name: str) -> None:
    """Print a new bearer token for NAME and the CHATPROXY_API_TOKENS entry holding its hash."""
    token = "cpx_" + secrets.token_urlsafe(32)
    click.echo(f"token (give it to the client, shown once): {token}")
    click.echo(f"setting entry: {name}={hash_token(token)}")
