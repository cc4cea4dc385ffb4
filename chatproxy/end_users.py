"""Signed end-user tokens: a JWT an app's backend mints for its signed-in user, sent by its page as a bearer token.

The token names its API key in the header's `kid` and its user in `sub`; it is signed with HS256 and the key's
end-user secret (derived from CHATPROXY_SECRET_KEY and the key, so the database alone cannot mint one), or with
EdDSA/ES256 and a private key whose public half the API key holds. It must carry `aud` (CHATPROXY_TOKEN_AUDIENCE)
and an `exp` at most an hour away. The caller's identity is `token:<key>/<sub>`: rate limits, stream slots and
the key's per-end-user budget count per user. Only the algorithm the key is set up for is accepted, never `none`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519

from .errors import ApiError
from .keys import HS256, ApiKey, KeyRefused, load_public_key, micros_of

MAX_LIFETIME_S = 3600  # the longest an end-user token may live
LEEWAY_S = 30  # clock skew allowed between the app's backend and us
SUB = re.compile(r"[A-Za-z0-9._@:+=-]{1,128}")
SUB_RULE = "1 to 128 letters, digits or . _ @ : + = -"


@dataclass(frozen=True)
class EndUser:
    """Who a verified token speaks for, and the tighter daily budget its app gave them, if any."""

    key_name: str
    sub: str
    daily_micros: int | None = None  # the token's `limits.daily_usd`: at most the key's end-user budget applies


def looks_like_jwt(token: str) -> bool:
    """Whether a bearer token is a JWT (three base64url parts) rather than an API key."""
    return token.count(".") == 2 and token.startswith("eyJ")


def key_name(token: str) -> str:
    """The API key a token says signed it (its header's kid), read before anything is verified; or 401."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise ApiError(401, "token_invalid", "The end-user token is not a valid JWT.") from None
    if str(header.get("alg", "")).lower() == "none":
        raise ApiError(401, "token_invalid", "Unsigned end-user tokens (alg: none) are not accepted.")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ApiError(401, "token_invalid", "The end-user token's header must name its API key in `kid`.")
    return kid


def end_user_secret(secret_key: str, key: ApiKey) -> str:
    """The HS256 secret of `key`'s end-user tokens: changes when the key is rotated or the server secret is."""
    message = f"chatproxy end-user tokens\0{key.name}\0{key.token_hash}".encode()
    return hmac.new(secret_key.encode(), message, hashlib.sha256).hexdigest()


def verify(token: str, key: ApiKey, secret: str | None, audience: str) -> EndUser:
    """The end user of a token `key` signed, or 401 saying what is wrong; `secret` is its HS256 secret if any."""
    algorithm, verifying_key = _verifier(key, secret)
    try:
        claims = jwt.decode(
            token,
            verifying_key,
            algorithms=[algorithm],
            audience=audience,
            leeway=LEEWAY_S,
            options={"require": ["exp", "sub", "aud"]},
        )
    except jwt.ExpiredSignatureError:
        raise ApiError(401, "token_expired", "The end-user token has expired. Get a new one from the app.") from None
    except jwt.ImmatureSignatureError:
        raise ApiError(401, "token_not_yet_valid", "The end-user token is not valid yet.") from None
    except jwt.InvalidAudienceError:
        raise ApiError(401, "token_wrong_audience", f"The end-user token's audience must be {audience!r}.") from None
    except jwt.InvalidAlgorithmError:
        raise ApiError(401, "token_invalid", f"This API key's end-user tokens are signed with {algorithm}.") from None
    except jwt.InvalidSignatureError:
        raise ApiError(401, "token_invalid_signature", "The end-user token's signature is not valid.") from None
    except jwt.PyJWTError:
        raise ApiError(401, "token_invalid", "The end-user token is not valid: it needs exp, sub and aud.") from None
    return EndUser(key.name, _checked(claims), _tighter(claims.get("limits")))


def _tighter(limits: Any) -> int | None:
    """The token's own daily budget for its user (`"limits": {"daily_usd": "0.10"}`), or None."""
    if limits is None:
        return None
    if not isinstance(limits, dict) or set(limits) - {"daily_usd"}:
        raise ApiError(401, "token_invalid", "The end-user token's limits may only hold daily_usd.")
    try:
        return micros_of("limits.daily_usd", limits["daily_usd"]) if "daily_usd" in limits else None
    except KeyRefused as refused:
        raise ApiError(401, "token_invalid", f"The end-user token's {refused}") from None


def _checked(claims: dict[str, Any]) -> str:
    """The token's sub, once its lifetime and sub are within bounds."""
    issued = claims.get("iat")
    lifetime = claims["exp"] - issued if isinstance(issued, (int, float)) else 0
    if claims["exp"] - time.time() > MAX_LIFETIME_S + LEEWAY_S or lifetime > MAX_LIFETIME_S + LEEWAY_S:
        raise ApiError(401, "token_invalid", f"An end-user token may live at most {MAX_LIFETIME_S} seconds (exp).")
    sub = claims["sub"]
    if not isinstance(sub, str) or not SUB.fullmatch(sub):
        raise ApiError(401, "token_invalid", f"The end-user token's sub must be {SUB_RULE}.")
    return sub


def _verifier(key: ApiKey, secret: str | None) -> tuple[str, Any]:
    """The one algorithm `key` accepts and what verifies it."""
    if key.end_user_key == HS256:
        if not secret:
            raise ApiError(401, "token_invalid", "End-user tokens need CHATPROXY_SECRET_KEY on the server.")
        return "HS256", secret
    public = load_public_key(key.end_user_key or "")
    return ("EdDSA" if isinstance(public, ed25519.Ed25519PublicKey) else "ES256"), public
