"""/admin: the operator's page. Sign in once with an admin token; then a page session (with CSRF) calls /api/admin."""

from __future__ import annotations

import hmac
import secrets
from datetime import timedelta

from flask import Blueprint, Response, redirect, render_template, request, session, url_for

from ..callers import admin_session, csrf_token, token_name
from ..errors import ApiError
from ..reports import spend_chart_svg
from ..state import state
from ..usage import utc_now

bp = Blueprint("admin_page", __name__)
NO_STORE = {"Cache-Control": "no-store"}


@bp.get("/admin")
def page() -> Response:
    """The dashboard for a signed-in admin, else the sign-in form."""
    signed_in = admin_session(state())
    template = "admin.html" if signed_in else "admin_sign_in.html"
    error = session.pop("admin_error", None)
    return Response(render_template(template, csrf_token=csrf_token(), error=error), headers=NO_STORE)


@bp.post("/admin/sign-in")
def sign_in() -> Response:
    """Trade an admin token for an admin page session (a new session id: no fixation); back to /admin either way.

    A refusal is said on the page it redirects to (post, redirect, get: a reload never sends the token again).
    """
    if not _csrf_ok():
        return _back("The page's security token is missing or wrong. Reload the page.")
    app_state = state()
    name = token_name(f"Bearer {request.form.get('token', '')}", app_state.tokens)
    if name is None or name not in app_state.settings.admin_tokens:
        return _back("That is not an admin token.")
    session.clear()
    csrf_token()  # a fresh session id and CSRF token
    session["admin"] = name
    return redirect(url_for("admin_page.page"), 303)


@bp.post("/admin/sign-out")
def sign_out() -> Response:
    """End the admin session."""
    if _csrf_ok():
        session.pop("admin", None)
        session["sid"] = secrets.token_urlsafe(16)
    return redirect(url_for("admin_page.page"), 303)


@bp.get("/admin/chart.svg")
def chart() -> Response:
    """Spend per day over the last 30 days, by model or by key (?by=key)."""
    if not admin_session(state()):
        raise ApiError(403, "forbidden", "Sign in to /admin with an admin token first.")
    by = request.args.get("by", "model")
    if by not in ("model", "key"):
        raise ApiError(404, "not_found", "There is a chart by model and one by key (?by=key).")
    today = utc_now().date()
    svg = spend_chart_svg(state().ledger.report(today - timedelta(days=29), today), by=by)
    return Response(svg, mimetype="image/svg+xml", headers=NO_STORE)


def _csrf_ok() -> bool:
    sent, expected = request.form.get("csrf", ""), session.get("csrf", "")
    return bool(sent) and bool(expected) and hmac.compare_digest(sent.encode(), expected.encode())


def _back(message: str) -> Response:
    session["admin_error"] = message
    return redirect(url_for("admin_page.page"), 303)
