"""GET /api/limits: what the caller may still spend today and this month, and its rate limit."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from sqlalchemy.exc import SQLAlchemyError

from ..budget import GLOBAL, PUBLIC_SHARE
from ..callers import current_caller
from ..errors import ApiError
from ..limits import rate_limit_state
from ..state import state

bp = Blueprint("limits", __name__)
SHARED = frozenset({GLOBAL, PUBLIC_SHARE})  # service-wide caps: what everyone spends is not a caller's business


@bp.get("/api/limits")
def limits() -> Response:
    """The caller's identity, its budgets' remainders with their resets, and its rate limit's window."""
    caller = current_caller()
    budget = state().budget
    caps = budget.caps_for(caller.identity, caller.kind, request.remote_addr, caller.key, caller.end_user_micros)
    try:
        standing = budget.standing([cap for cap in caps if cap.name not in SHARED])
    except SQLAlchemyError:
        raise ApiError(
            503, "budget_unavailable", "Spending limits cannot be read right now. Try again shortly.", retry_after=5
        ) from None
    response = jsonify({"identity": caller.identity, "budgets": standing, "rate_limit": rate_limit_state(writes=True)})
    response.headers["Cache-Control"] = "no-store"
    return response
