"""The Batch API for bearer tokens: POST /api/batches, GET /api/batches/<id>[/results]."""

from __future__ import annotations

from flask import Blueprint, Response, g, jsonify, request, url_for

from ..batches import service
from ..callers import tokens_only
from ..state import state
from ..strict import parse_json_body

bp = Blueprint("batch", __name__)
TOKENS_ONLY = "The Batch API is for bearer tokens: send Authorization: Bearer <token>."


@bp.post("/api/batches")
@tokens_only(TOKENS_ONLY)
def create_batch() -> Response:
    """Submit a batch: 202 with its id and status."""
    settings = state().settings
    request.max_content_length = settings.batch_max_body_bytes  # batches may be larger than chat bodies
    body = parse_json_body(request.get_data(cache=False), request.content_type)
    view = service.submit(service.parse_requests(body), g.identity, g.caller.key)
    response = jsonify(view)
    response.status_code = 202
    response.headers["Location"] = url_for("batch.batch_status", batch_id=view["id"])
    return response


@bp.get("/api/batches/<batch_id>")
@tokens_only(TOKENS_ONLY)
def batch_status(batch_id: str) -> Response:
    """A batch's status and request counts."""
    return jsonify(service.status(batch_id, g.identity))


@bp.get("/api/batches/<batch_id>/results")
@tokens_only(TOKENS_ONLY)
def batch_results(batch_id: str) -> Response:
    """A finished batch's answers and errors per custom_id; 409 while it runs."""
    return jsonify(service.results(batch_id, g.identity))
