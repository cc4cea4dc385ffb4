"""/api/admin/keys: API keys managed over HTTP, for admin tokens (the same store and checks as `flask keys`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Response, jsonify, request
from sqlalchemy.exc import SQLAlchemyError

from ..callers import admin_required
from ..errors import ApiError, invalid
from ..keys import KeyRefused, NoSuchKey, check_name, parse_fields, utc_now
from ..schemas import parse_json_body
from ..state import state

bp = Blueprint("admin", __name__, url_prefix="/api/admin")
MANAGE = "manage API keys"
T = TypeVar("T")


def _run(action: Callable[[], T]) -> T:
    """Run a store action: its refusal as 404 or 400, a database failure as 503."""
    try:
        return action()
    except NoSuchKey as missing:
        raise ApiError(404, "not_found", str(missing)) from None
    except KeyRefused as refused:
        raise invalid(str(refused)) from None
    except SQLAlchemyError:
        raise ApiError(
            503, "keys_unavailable", "API keys cannot be read or changed right now. Try again shortly.", retry_after=5
        ) from None


def _fields(body: dict[str, Any]) -> dict[str, Any]:
    return _run(lambda: parse_fields(body, state().settings.models, utc_now()))


def _shown(value: Any, status: int = 200) -> Response:
    response = jsonify(value)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"  # a new token is in some of these; none belongs in a cache
    return response


@bp.get("/keys")
@admin_required(MANAGE)
def list_keys() -> Response:
    """Every key, revoked ones too."""
    now = utc_now()
    return _shown({"data": [key.public(now) for key in _run(state().keys.all)]})


@bp.post("/keys")
@admin_required(MANAGE)
def create_key() -> Response:
    """Make a key: 201 with its token, shown this once."""
    body = parse_json_body(request.get_data(cache=False), request.content_type)
    name = _run(lambda: check_name(body.pop("name", None)))
    if name in state().tokens:
        raise invalid(f"CHATPROXY_API_TOKENS has a token named {name!r}: `keys import {name}` moves it here.")
    values = _fields(body)
    key, token = _run(lambda: state().keys.create(name, values))
    return _shown({"key": key.public(utc_now()), "token": token}, 201)


@bp.get("/keys/<name>")
@admin_required(MANAGE)
def show_key(name: str) -> Response:
    """One key."""
    return _shown(_run(lambda: state().keys.get(name)).public(utc_now()))


@bp.patch("/keys/<name>")
@admin_required(MANAGE)
def update_key(name: str) -> Response:
    """Change a key's limits (null clears one); every worker applies it within CHATPROXY_KEY_CACHE_SECONDS."""
    values = _fields(parse_json_body(request.get_data(cache=False), request.content_type))
    if not values:
        raise invalid("Nothing to change: send at least one field.")
    return _shown(_run(lambda: state().keys.update(name, values)).public(utc_now()))


@bp.post("/keys/<name>/revoke")
@admin_required(MANAGE)
def revoke_key(name: str) -> Response:
    """Revoke a key for good."""
    return _shown(_run(lambda: state().keys.revoke(name)).public(utc_now()))


@bp.post("/keys/<name>/rotate")
@admin_required(MANAGE)
def rotate_key(name: str) -> Response:
    """A new token for a key; the old one stops working."""
    key, token = _run(lambda: state().keys.rotate(name))
    return _shown({"key": key.public(utc_now()), "token": token})
