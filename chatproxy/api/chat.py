"""The chat page, POST /api/chat (a JSON reply, or our SSE events) and GET /api/models."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, jsonify, render_template, request

from .. import sse
from ..callers import allowed_models, csrf_token, default_model, has_page_session
from ..dialects import Answer, Tally, Usage
from ..errors import ApiError
from ..limits import count_new_session
from ..pipeline import serve
from ..relay import Upstream
from ..router import Routed
from ..sse import Event
from ..state import state
from ..strict import parse_json_body
from ..upstream import content_filtered
from ..usage import estimate_tokens

log = logging.getLogger(__name__)

bp = Blueprint("chat", __name__)


@bp.get("/")
def page() -> str:
    """The chat page (it starts the visitor's page session, counted per client IP)."""
    settings = state().settings
    if not has_page_session():
        count_new_session()
    return render_template(
        "chat.html",
        models=settings.models,
        details=model_details(),
        default_model=settings.default_model,
        demo=settings.demo,
        max_messages=settings.max_messages,
        max_total_chars=settings.max_total_chars,
        max_body_bytes=settings.max_body_bytes,
        max_image_bytes=settings.max_image_bytes,
        max_images=settings.max_images,
        max_images_per_message=settings.max_images_per_message,
        csrf_token=csrf_token(),
    )


@bp.get("/api/models")
def models() -> Response:
    """The models a client may ask for, and the default."""
    names = allowed_models()
    details = model_details()
    return jsonify(
        {"models": list(names), "default": default_model(state().settings), "details": {n: details[n] for n in names}}
    )


def model_details() -> dict[str, dict[str, Any]]:
    """What the page shows of each allowlisted model (models.json): whether it reasons, sees images, retires."""
    app_state = state()
    details = {}
    for name in app_state.settings.models:
        spec = app_state.models.spec(name)
        details[name] = {
            "reasoning": spec.reasons,
            "images": spec.images,
            "shutdown": spec.shutdown.isoformat() if spec.shutdown else None,
        }
    return details


@bp.post("/api/chat")
def chat() -> Response:
    """Answer a chat request as one JSON reply, or as an SSE stream when `stream` is true."""
    body = parse_json_body(request.get_data(cache=False), request.content_type)
    app_state = state()
    call = app_state.requests.chat.parse(body).call()

    def prompt(model: str) -> int:
        return call.prompt_estimate + app_state.models.image_tokens(model, call.images)

    return serve(call, ChatWire(structured="response_format" in call.body, prompt=prompt))


class ChatWire:
    """Our wire format: {role, content, model, degraded, finish_reason, usage[, parsed]}, or start/delta/done events."""

    def __init__(self, *, structured: bool, prompt: Callable[[str], int]) -> None:
        self.structured = structured
        self.prompt = prompt  # the prompt's estimate on a model, for a stream whose upstream reports no usage

    def reply(self, answer: Answer, routed: Routed[Answer]) -> Response:
        """The JSON reply; a filtered answer (recorded: it was billed) is refused."""
        choice = answer.body["choices"][0]
        if answer.finish_reason == "content_filter":
            raise content_filtered()
        reply: dict[str, Any] = {
            "role": "assistant",
            "content": choice["message"].get("content") or "",
            "model": routed.model,
            "degraded": routed.degraded,
            "finish_reason": answer.finish_reason,
            "usage": answer.usage.public() if answer.usage else None,
        }
        if self.structured:
            reply["parsed"] = parsed(choice)
        return jsonify(reply)

    def opened(self, first: Event) -> None:
        """A stream filtered before its first text is refused as a whole (a JSON error, not a stream)."""
        if first["choices"][0].get("finish_reason") == "content_filter":
            raise content_filtered()

    def start(self, routed: Routed[Upstream]) -> bytes:
        """The `start` event: which model answers."""
        return sse.data({"type": "start", "model": routed.model, "degraded": routed.degraded})

    def event(self, event: Event, text: str, routed: Routed[Upstream]) -> bytes:
        """A `delta` event for each piece of text."""
        return sse.data({"type": "delta", "content": text}) if text else b""

    def done(self, tally: Tally, routed: Routed[Upstream]) -> bytes:
        """The `done` event, or an `error` event for an answer the upstream filtered part-way."""
        if tally.finish_reason == "content_filter":
            return self.error(content_filtered())
        if tally.usage is not None:
            usage = tally.usage.public()
        else:  # some servers (llama.cpp) ignore stream_options.include_usage: say what we estimate instead
            usage = {**Usage(self.prompt(routed.model), estimate_tokens(tally.text)).public(), "estimated": True}
        return sse.data(
            {
                "type": "done",
                "finish_reason": tally.finish_reason,
                "usage": usage,
                "model": routed.model,
                "degraded": routed.degraded,
            }
        )

    def error(self, error: ApiError) -> bytes:
        """The final `error` event."""
        return sse.data({"type": "error", "code": error.code, "message": error.message})


def parsed(choice: dict[str, Any]) -> Any:
    """The decoded JSON of a structured answer, or a clear error for a refusal, a cut-off or invalid JSON."""
    message = choice["message"]
    refusal = message.get("refusal")
    if refusal:
        raise ApiError(422, "model_refused", f"The model declined to answer: {str(refusal)[:500]}")
    if choice.get("finish_reason") == "length":
        raise ApiError(
            502,
            "invalid_model_output",
            "The answer reached max_tokens before its JSON was complete. Allow more tokens.",
        )
    try:
        return json.loads(message.get("content") or "")
    except (ValueError, TypeError):
        log.warning("the model's structured answer is not valid JSON")
        raise ApiError(502, "invalid_model_output", "The model's answer was not valid JSON. Try again.") from None
