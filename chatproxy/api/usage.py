"""GET /api/usage: the ledger's report, for admin tokens."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from ..callers import admin_required
from ..errors import invalid
from ..reports import parse_day
from ..state import state
from ..usage import default_range

bp = Blueprint("reports", __name__)
QUERY = frozenset({"since", "until"})


@bp.get("/api/usage")
@admin_required("read usage")
def usage_report() -> Response:
    """The report from ?since= to ?until= (UTC days, both included; default: the last 30 days)."""
    unknown = sorted(set(request.args) - QUERY)
    if unknown:
        raise invalid(f"Unknown query parameter: {unknown[0][:64]!r}. /api/usage takes since and until (YYYY-MM-DD).")
    repeated = sorted(name for name in QUERY if len(request.args.getlist(name)) > 1)
    if repeated:
        raise invalid(f"{repeated[0]} is given more than once.")
    since, until = default_range(
        parse_day(request.args.get("since"), "since"), parse_day(request.args.get("until"), "until")
    )
    if since > until:
        raise invalid("since must not be after until.")
    response = jsonify(state().ledger.report(since, until))
    response.headers["Cache-Control"] = "no-store"
    return response
