"""Operational routes: liveness."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, jsonify

bp = Blueprint("ops", __name__)


def init_app(app: Flask) -> None:
    """Register the operational routes."""
    app.register_blueprint(bp)


@bp.get("/healthz")
def healthz() -> Response:
    """Alive: the process answers. Never calls the upstream."""
    return jsonify({"status": "ok"})
