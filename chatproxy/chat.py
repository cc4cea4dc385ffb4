"""The chat blueprint: the page, POST /api/chat (JSON or SSE) and GET /api/models; owns the OpenAI client."""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template, request
from openai import OpenAI

from . import cooldowns, metrics
from .config import Settings
from .guards import csrf_token, take_stream_slot
from .metering import Meter
from .router import MODEL_HEADER, complete, make_client
from .schemas import parse_chat_request, parse_json_body
from .streaming import SSE_HEADERS, open_stream, relay

bp = Blueprint("chat", __name__)


def init_app(app: Flask) -> None:
    """Create the app's one OpenAI client and register the blueprint."""
    app.extensions["chatproxy.client"] = make_client(app.extensions["chatproxy.settings"])
    app.register_blueprint(bp)


def settings() -> Settings:
    """The current app's validated settings."""
    return current_app.extensions["chatproxy.settings"]


def client() -> OpenAI:
    """The current app's OpenAI client."""
    return current_app.extensions["chatproxy.client"]


@bp.get("/")
def page() -> str:
    """The chat page."""
    conf = settings()
    return render_template(
        "chat.html",
        models=conf.models,
        default_model=conf.default_model,
        demo=conf.demo,
        max_messages=conf.max_messages,
        max_total_chars=conf.max_total_chars,
        csrf_token=csrf_token(),
    )


@bp.get("/api/models")
def models() -> Response:
    """The models a client may ask for, and the default."""
    conf = settings()
    return jsonify({"models": list(conf.models), "default": conf.default_model})


@bp.post("/api/chat")
def chat() -> Response:
    """Answer a chat request as one JSON reply, or as an SSE stream when `stream` is true."""
    conf = settings()
    chat_request = parse_chat_request(parse_json_body(request.get_data(cache=False), request.content_type), conf)
    gates, deadline = cooldowns.of(current_app), time.monotonic() + conf.total_timeout
    if not chat_request.stream:
        meter = Meter(chat_request, conf)
        try:
            reply = complete(client(), chat_request, conf, gates, deadline, meter)
        finally:
            meter.settle()
        _count_fallback(chat_request.model, reply["model"])
        response = jsonify(reply)
        response.headers[MODEL_HEADER] = reply["model"]
        return response
    release_slot = take_stream_slot()
    try:
        meter = Meter(chat_request, conf)
    except BaseException:
        release_slot()
        raise
    try:
        # Opened up to the first delta before the first byte: a refused call still gets a proper JSON
        # error, and the router can still fall back to another model.
        routed = open_stream(client(), chat_request, conf, gates, deadline, meter)
    except BaseException:
        meter.settle()
        release_slot()
        raise
    _count_fallback(chat_request.model, routed.model)
    response = Response(
        relay(routed, conf.keepalive_seconds, deadline, gates, meter),
        mimetype="text/event-stream",
        headers={**SSE_HEADERS, MODEL_HEADER: routed.model},
    )
    response.call_on_close(routed.value.close)  # also when the generator never started
    response.call_on_close(meter.abandon)  # records the attempt if the generator never ran; else a no-op
    response.call_on_close(release_slot)
    return response


def _count_fallback(asked: str, answered: str) -> None:
    if asked != answered:
        metrics.record_fallback(asked, answered)
