"""Who is calling: page session (with CSRF), bearer token or API key, end-user token, allowed origin, anonymous."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from flask import Flask, Request, g, has_app_context, request, session
from flask.sessions import SecureCookieSessionInterface
from flask_cors import CORS
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.middleware.proxy_fix import ProxyFix

from .config import Settings
from .end_users import end_user_secret, key_name, looks_like_jwt, verify
from .errors import ApiError
from .keys import DISABLED, EXPIRED, HS256, REVOKED, ApiKey, utc_now
from .state import AppState, state

if TYPE_CHECKING:
    from .schemas.base import Policy

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"
GUARDED_PREFIXES = ("/api/", "/v1/")


@dataclass(frozen=True)
class Caller:
    """The identity a request is counted under, and which limit applies to it."""

    identity: str  # session:<id>, token:<name>, token:<key>/<end user>, origin:<origin>, ip:<addr>
    kind: str  # page, token, end_user, origin, anonymous
    limit_key: str
    key: ApiKey | None = None  # the database key of a bearer token (None for CHATPROXY_API_TOKENS and others)
    admin: bool = False  # a page session signed in to /admin with an admin token
    end_user_micros: int | None = None  # an end-user token's own daily budget (tighter than its key's)


class PageSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie session, marked Secure whenever the request came over https."""

    def get_cookie_secure(self, app: Flask) -> bool:
        """Secure on https (behind a trusted proxy, ProxyFix makes the scheme right)."""
        return request.is_secure or super().get_cookie_secure(app)


def init_app(app: Flask) -> None:
    """Wire ProxyFix, sessions, CORS and caller identification (before the rate limiter, which needs the caller)."""
    settings = state(app).settings
    if settings.trusted_proxies:
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n, x_port=n)  # type: ignore[method-assign]
    app.secret_key = settings.secret_key or secrets.token_hex(32)
    if not settings.secret_key:
        log.warning("CHATPROXY_SECRET_KEY is not set: page sessions are valid in this process only")
    app.config.update(
        SESSION_COOKIE_NAME="chatproxy_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=86400,
    )
    app.session_interface = PageSessionInterface()
    if settings.allowed_origins:
        # Exactly what the routes take: GET and POST (HEAD is always allowed), and the headers a frontend sends.
        CORS(
            app,
            resources={
                r"/api/*": {"origins": list(settings.allowed_origins)},
                r"/v1/*": {"origins": list(settings.allowed_origins)},
            },
            supports_credentials=False,
            methods=["GET", "POST"],
            allow_headers=["Content-Type", "Authorization", "X-Request-ID"],
            expose_headers=[
                "Retry-After",
                "X-Request-ID",
                "X-Chatproxy-Model",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
            ],
            max_age=600,
        )
    app.before_request(identify_caller)


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


def has_page_session() -> bool:
    """Whether this request carries a page session."""
    return "sid" in session


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
    app_state = state()
    settings = app_state.settings
    origin = request.headers.get("Origin")
    if origin and origin != own_origin(request) and origin not in settings.allowed_origins:
        raise ApiError(403, "forbidden_origin", "Requests from this origin are not allowed.")
    ip = request.remote_addr or "unknown"
    auth = request.headers.get("Authorization")
    if auth is not None:
        g.caller = bearer_caller(auth, app_state)
    elif "sid" in session:
        if request.method not in SAFE_METHODS and not _csrf_ok(request.headers.get(CSRF_HEADER, "")):
            raise ApiError(403, "csrf_failed", "The page's security token is missing or wrong. Reload the page.")
        sid = session["sid"]
        g.caller = Caller(f"session:{sid}", "page", f"session:{sid}", admin=admin_session(app_state))
    elif origin and origin in settings.allowed_origins:
        g.caller = Caller(f"origin:{origin}", "origin", f"origin-ip:{ip}")
    elif settings.allow_anonymous:
        g.caller = Caller(f"ip:{ip}", "anonymous", f"ip:{ip}")
    else:
        raise ApiError(401, "unauthorized", "Use the chat page, an allowed origin or a bearer token.")
    g.identity = g.caller.identity


def bearer_caller(header: str, app_state: AppState) -> Caller:
    """The caller of an `Authorization` header: a CHATPROXY_API_TOKENS token, else a database key; or 401."""
    name = token_name(header, app_state.tokens)
    if name is not None:
        return Caller(f"token:{name}", "token", f"token:{name}")
    scheme, _, token = header.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if looks_like_jwt(token):
        return end_user_caller(token, app_state)
    key = _lookup(lambda: app_state.keys.find(token)) if token else None
    if key is None:
        raise ApiError(401, "unauthorized", "The bearer token is not valid.")
    _check_state(key)
    _touch(key, app_state)
    return Caller(f"token:{key.name}", "token", f"token:{key.name}", key)


def end_user_caller(token: str, app_state: AppState) -> Caller:
    """The end user of a signed end-user token, verified against its API key; or 401 saying why.

    The signature is checked before the key's state: what a key is (revoked, disabled) is told only to holders
    of a token it signed.
    """
    name = key_name(token)
    key = _lookup(lambda: app_state.keys.named(name))
    if key is None or not key.end_user_key:
        raise ApiError(401, "token_invalid", "The end-user token names no API key that takes end-user tokens.")
    settings = app_state.settings
    hs256 = key.end_user_key == HS256 and settings.secret_key  # without it, workers would disagree on the secret
    secret = end_user_secret(settings.secret_key, key) if hs256 else None
    user = verify(token, key, secret, settings.token_audience)
    _check_state(key)
    _touch(key, app_state)
    identity = f"token:{key.name}/{user.sub}"
    return Caller(identity, "end_user", identity, key, end_user_micros=user.daily_micros)


def _touch(key: ApiKey, app_state: AppState) -> None:
    try:
        app_state.keys.touch(key)
    except SQLAlchemyError:
        log.warning("cannot record that key %s was used", key.name, exc_info=True)


def _lookup(find: Callable[[], ApiKey | None]) -> ApiKey | None:
    try:
        return find()
    except SQLAlchemyError:
        log.exception("cannot look API keys up")
        raise ApiError(
            503, "keys_unavailable", "API keys cannot be checked right now. Try again shortly.", retry_after=5
        ) from None


def _check_state(key: ApiKey) -> None:
    """401 for a key that exists but does not work now."""
    status = key.status(utc_now())
    if status == REVOKED:
        raise ApiError(401, "key_revoked", "This API key has been revoked.")
    if status == EXPIRED:
        raise ApiError(401, "key_expired", "This API key has expired.")
    if status == DISABLED:
        raise ApiError(401, "key_disabled", "This API key is disabled.")


def allowed_models(settings: Settings | None = None, *, embedding: bool = False) -> tuple[str, ...]:
    """The allowlisted chat models (`embedding`: then the embedding models) this request's caller may ask for (an
    API key may have fewer); all outside a request."""
    settings = settings or state().settings
    return _for_caller(settings.every_model if embedding else settings.models)


def default_model(allowlist: Settings | Policy) -> str:
    """The model a request without one gets: CHATPROXY_DEFAULT_MODEL, or the first its API key may use (a key
    without a chat model gets the default, which the pipeline refuses it)."""
    allowed = _for_caller(allowlist.models)
    return allowlist.default_model if allowlist.default_model in allowed or not allowed else allowed[0]


def _for_caller(models: tuple[str, ...]) -> tuple[str, ...]:
    caller = g.get("caller") if has_app_context() else None
    if caller is None or caller.key is None:
        return models
    return tuple(model for model in models if caller.key.allows(model))


def _csrf_ok(sent: str) -> bool:
    expected = session.get("csrf", "")
    return bool(sent) and bool(expected) and hmac.compare_digest(sent.encode(), expected.encode())


def current_caller() -> Caller:
    """The caller identify_caller found for this request."""
    return g.caller


def token_required(message: str) -> Callable[[F], F]:
    """A route only bearer-token holders may call: 401 unauthorized with `message` for anyone else."""

    def refuse() -> None:
        raise ApiError(401, "unauthorized", message)

    return _tokens_only(refuse)


def tokens_only(message: str) -> Callable[[F], F]:
    """A route other callers are known but not allowed on: 403 forbidden with `message` for them."""

    def refuse() -> None:
        raise ApiError(403, "forbidden", message)

    return _tokens_only(refuse)


def _tokens_only(refuse: Callable[[], None]) -> Callable[[F], F]:
    def decorate(view: F) -> F:
        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            caller = g.get("caller")
            if caller is None or caller.kind != "token":
                refuse()
            return view(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorate


def admin_session(app_state: AppState) -> bool:
    """Whether this page session signed in to /admin with a token that is still an admin token."""
    name = session.get("admin")
    return bool(name) and name in app_state.settings.admin_tokens and name in app_state.tokens


def is_admin(caller: Caller | None) -> bool:
    """Whether `caller` holds a CHATPROXY_API_TOKENS token named in CHATPROXY_ADMIN_TOKENS (never a database key),
    or is a page session signed in to /admin with one."""
    if caller is not None and caller.admin:
        return True
    if caller is None or caller.kind != "token" or caller.key is not None:
        return False
    return caller.identity.removeprefix("token:") in state().settings.admin_tokens


def admin_required(what: str) -> Callable[[F], F]:
    """A route only admin tokens may call to `what` (e.g. "read usage"): 401 without an identity, else 403."""

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            caller = g.get("caller")
            if caller is None:
                raise ApiError(401, "unauthorized", f"Send an admin bearer token to {what}.")
            if not is_admin(caller):
                raise ApiError(403, "forbidden", f"Only admin tokens may {what}.")
            return view(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorate
