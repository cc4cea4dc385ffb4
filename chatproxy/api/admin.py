"""/api/admin: API keys managed over HTTP (the same store and checks as `flask keys`) and the overview, for admins."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from flask import Blueprint, Response, jsonify, request
from sqlalchemy.exc import SQLAlchemyError

from ..callers import admin_required
from ..errors import ApiError, invalid
from ..keys import KeyRefused, NoSuchKey, check_name, parse_fields, utc_now
from ..state import state
from ..strict import parse_json_body
from ..usage import is_end_user, key_of, usd

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
    return _run(lambda: parse_fields(body, state().settings.every_model, utc_now()))


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


@bp.get("/overview")
@admin_required("read the overview")
def overview() -> Response:
    """Spend today and this month against the service's caps, spend per key, the top end users, errors by code."""
    app_state = state()
    budget, settings = app_state.budget, app_state.settings
    today = utc_now().date()
    month = today.replace(day=1)
    try:
        report = app_state.ledger.report(min(month, today - timedelta(days=29)), today)
        caps = budget.standing(budget.caps_for("admin:overview", "page")[:2])  # the global and public rows
    except SQLAlchemyError:
        raise ApiError(503, "ledger_unavailable", "The ledger cannot be read right now.", retry_after=5) from None
    this_month = [g for g in report["groups"] if g["day"] >= month.isoformat()]
    by_key: dict[str, dict[str, int]] = {}
    end_users: dict[str, int] = {}
    for group in this_month:
        spent = by_key.setdefault(key_of(group["identity"]), {"today": 0, "month": 0})
        spent["month"] += group["cost_micros"]
        spent["today"] += group["cost_micros"] if group["day"] == today.isoformat() else 0
        if is_end_user(group["identity"]):
            end_users[group["identity"]] = end_users.get(group["identity"], 0) + group["cost_micros"]
    top = sorted(end_users.items(), key=lambda item: (-item[1], item[0]))[:10]
    return _shown(
        {
            "today": usd(sum(g["cost_micros"] for g in this_month if g["day"] == today.isoformat())),
            "month": usd(sum(g["cost_micros"] for g in this_month)),
            "daily_cap_usd": usd(settings.daily_budget_micros) if settings.daily_budget_micros else None,
            "caps": caps,
            "keys": [
                {"key": k, "today_usd": usd(v["today"]), "month_usd": usd(v["month"])}
                for k, v in sorted(by_key.items())
            ],
            "top_end_users": [{"identity": who, "month_usd": usd(micros)} for who, micros in top],
            "errors": {code: n for code, n in report["outcomes"].items() if code not in ("ok", "fallback")},
            "since": report["since"],
        }
    )
