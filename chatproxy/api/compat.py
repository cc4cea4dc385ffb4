"""The OpenAI-compatible API for token holders: POST /v1/chat/completions (JSON or SSE) and GET /v1/models.

The official SDKs work with `base_url=<proxy>/v1` and a chatproxy token as their api_key. The same
policy as /api/chat applies (allowlist, caps, our system prompt, budgets, ledger, retries, fallback,
cooldowns); only the wire format is OpenAI's. Errors keep our contract's body and add OpenAI's
`type` and `param`, which the SDKs read.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from .. import sse
from ..callers import allowed_models, token_required
from ..dialects import Answer, Tally
from ..errors import ApiError
from ..pipeline import serve
from ..relay import Upstream
from ..router import Routed
from ..sse import Event
from ..state import state
from ..strict import parse_json_body

bp = Blueprint("compat", __name__, url_prefix="/v1")
DONE = b"data: [DONE]\n\n"
TOKENS_ONLY = "The OpenAI-compatible API needs a token: send it as the API key (Authorization: Bearer <token>)."


@bp.after_request
def openai_error_fields(response: Response) -> Response:
    """Error bodies keep our `code` and `message` and add OpenAI's `type` and `param`."""
    if response.status_code < 400 or not response.is_json:
        return response
    body = response.get_json(silent=True)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        error.setdefault("type", error_type(response.status_code, str(error.get("code"))))
        error.setdefault("param", None)
        response.set_data(current_app.json.dumps(body))
    return response


def error_type(status: int, code: str) -> str:
    """OpenAI's error `type` for one of our errors."""
    if status == 429:
        return "insufficient_quota" if code == "budget_exceeded" else "rate_limit_error"
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error"}.get(status, "invalid_request_error")


@bp.get("/models")
@token_required(TOKENS_ONLY)
def models() -> Response:
    """The allowlisted models this caller may use (chat, then embedding), as OpenAI lists models."""
    return jsonify({"object": "list", "data": [_model(name) for name in allowed_models(embedding=True)]})


@bp.get("/models/<path:model>")
@token_required(TOKENS_ONLY)
def model(model: str) -> Response:
    """One allowlisted model; any other name is OpenAI's 404 for a model that does not exist."""
    if model not in allowed_models(embedding=True):
        raise ApiError(404, "not_found", f"The model '{model[:64]}' does not exist or you do not have access to it.")
    return jsonify(_model(model))


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "chatproxy"}


@bp.post("/chat/completions")
@token_required(TOKENS_ONLY)
def chat_completions() -> Response:
    """A chat completion as one JSON object, or as `chat.completion.chunk` events when `stream` is true."""
    body = parse_json_body(request.get_data(cache=False), request.content_type)
    req = state().requests.compat.parse(body)
    return serve(req.call(), OpenAIChunks(req.include_usage, g.request_id))


class OpenAIChunks:
    """OpenAI's wire format: a `chat.completion`, or `chat.completion.chunk` events, usage (if asked) and [DONE]."""

    def __init__(self, include_usage: bool, request_id: str) -> None:
        self.include_usage = include_usage
        self.request_id = request_id
        self.stream_id = "chatcmpl-proxy"  # replaced by the upstream's id

    def reply(self, answer: Answer, routed: Routed[Answer]) -> Response:
        """The `chat.completion`, naming the model alias that answered."""
        body = answer.body
        choice = body["choices"][0]
        upstream_message = choice["message"]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": upstream_message.get("content"),
            "refusal": upstream_message.get("refusal"),
        }
        if upstream_message.get("tool_calls"):
            message["tool_calls"] = upstream_message["tool_calls"]
        return jsonify(
            {
                "id": body.get("id"),
                "object": "chat.completion",
                "created": body.get("created"),
                "model": routed.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}],
                "usage": body.get("usage"),
            }
        )

    def opened(self, first: Event) -> None:
        """Every first output is relayed as it is (a filtered one too: the SDK reads its finish reason)."""

    def start(self, routed: Routed[Upstream]) -> bytes:
        """Nothing before the first chunk."""
        return b""

    def event(self, event: Event, text: str, routed: Routed[Upstream]) -> bytes:
        """One `chat.completion.chunk` with the delta's role, content, refusal and tool calls.

        Chunks without choices (the usage chunk, sent at the end if asked; Azure's prompt-filter results) are not
        relayed.
        """
        choices = event.get("choices")
        if not choices:
            return b""
        choice = choices[0]
        self.stream_id = event.get("id") or self.stream_id
        upstream_delta = choice.get("delta") or {}
        delta = {
            name: upstream_delta[name]
            for name in ("role", "content", "refusal")
            if upstream_delta.get(name) is not None
        }
        if upstream_delta.get("tool_calls"):
            delta["tool_calls"] = upstream_delta["tool_calls"]
        body: dict[str, Any] = {
            "id": event.get("id"),
            "object": "chat.completion.chunk",
            "created": event.get("created"),
            "model": routed.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": choice.get("finish_reason")}],
        }
        if self.include_usage:
            body["usage"] = None  # as OpenAI sends it: only the last chunk carries usage
        return sse.data(body)

    def done(self, tally: Tally, routed: Routed[Upstream]) -> bytes:
        """The usage chunk (if asked), then [DONE]."""
        if not self.include_usage:
            return DONE
        usage = tally.usage.public() if tally.usage else None
        last = {
            "id": self.stream_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": routed.model,
            "choices": [],
            "usage": usage,
        }
        return sse.data(last) + DONE

    def error(self, error: ApiError) -> bytes:
        """The final event of a stream that could not finish: the SDKs raise APIError on it."""
        body = {
            "code": error.code,
            "message": error.message,
            "type": error_type(error.status, error.code),
            "param": None,
            "request_id": self.request_id,
        }
        return sse.data({"error": body})
