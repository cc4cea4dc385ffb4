"""The OpenAI-compatible API for token holders: POST /v1/chat/completions (JSON or SSE) and GET /v1/models.

The official SDKs work with `base_url=<proxy>/v1` and a chatproxy token as their api_key. The same
policy as /api/chat applies (allowlist, caps, our system prompt, budgets, ledger, retries, fallback,
cooldowns); only the wire format is OpenAI's. Errors keep our contract's body and add OpenAI's
`type` and `param`, which the SDKs read.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import openai
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from openai import OpenAI

from . import cooldowns, metrics
from .compat_schemas import CompatRequest, parse_compat_request
from .config import Settings
from .cooldowns import Cooldowns
from .errors import ApiError
from .guards import take_stream_slot
from .metering import Meter
from .router import (
    MODEL_HEADER,
    SHAPE_ERRORS,
    Routed,
    UnreadableAnswer,
    create_completion,
    route,
    upstream_error,
    upstream_model,
    usage_dict,
)
from .schemas import parse_json_body
from .streaming import PING, SSE_HEADERS, Upstream, read_to_first, sse, with_keepalive

log = logging.getLogger(__name__)

bp = Blueprint("compat", __name__, url_prefix="/v1")
DONE = b"data: [DONE]\n\n"


def init_app(app: Flask) -> None:
    """Register the /v1 blueprint."""
    app.register_blueprint(bp)


def settings() -> Settings:
    """The current app's validated settings."""
    return current_app.extensions["chatproxy.settings"]


def client() -> OpenAI:
    """The current app's OpenAI (or Azure OpenAI) client."""
    return current_app.extensions["chatproxy.client"]


@bp.before_request
def _token_holders_only() -> None:
    """Only bearer-token callers: the page, origins and anonymous callers have /api/*."""
    caller = g.get("caller")
    if request.method != "OPTIONS" and (caller is None or caller.kind != "token"):
        raise ApiError(
            401,
            "unauthorized",
            "The OpenAI-compatible API needs a token: send it as the API key (Authorization: Bearer <token>).",
        )


@bp.after_request
def _openai_error_fields(response: Response) -> Response:
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
def models() -> Response:
    """The allowlisted models, as OpenAI lists models."""
    return jsonify(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "chatproxy"} for name in settings().models
            ],
        }
    )


@bp.post("/chat/completions")
def chat_completions() -> Response:
    """A chat completion as one JSON object, or as `chat.completion.chunk` events when `stream` is true."""
    conf = settings()
    req = parse_compat_request(parse_json_body(request.get_data(cache=False), request.content_type), conf)
    deadline = time.monotonic() + conf.total_timeout
    return _stream(req, conf, deadline) if req.stream else _complete(req, conf, deadline)


def _complete(req: CompatRequest, conf: Settings, deadline: float) -> Response:
    """The whole answer (with retries and fallback), metered, as a `chat.completion` object."""
    meter = Meter(req.metered, conf)
    try:
        once = meter.attempt(
            lambda model: upstream_params(req, conf, model),
            lambda params, timeout, headers: create_completion(client(), params, timeout, headers),
        )
        routed = route(once, req.model, conf, cooldowns.of(current_app), deadline)
        completion = routed.value
        filtered = completion.choices[0].finish_reason == "content_filter"
        meter.finish(
            routed.model,
            usage_dict(completion.usage),
            _answer_text(completion),
            "content_filtered" if filtered else "ok",
        )
    finally:
        meter.settle()
    _count_fallback(req.model, routed.model)
    response = jsonify(completion_body(completion, routed.model))
    response.headers[MODEL_HEADER] = routed.model
    return response


def _stream(req: CompatRequest, conf: Settings, deadline: float) -> Response:
    """The answer as `chat.completion.chunk` events, then usage (if asked) and [DONE]."""
    release_slot = take_stream_slot()
    try:
        meter = Meter(req.metered, conf)
    except BaseException:
        release_slot()
        raise
    gates = cooldowns.of(current_app)
    try:
        # Opened up to the first delta before the first byte: a refusal is still a JSON error and the
        # router can still fall back to another model.
        once = meter.attempt(lambda model: upstream_params(req, conf, model), _open_once)
        routed = route(once, req.model, conf, gates, deadline)
    except BaseException:
        meter.settle()
        release_slot()
        raise
    _count_fallback(req.model, routed.model)
    response = Response(
        relay(routed, req.include_usage, conf.keepalive_seconds, deadline, gates, meter),
        mimetype="text/event-stream",
        headers={**SSE_HEADERS, MODEL_HEADER: routed.model},
    )
    response.call_on_close(routed.value.close)  # also when the generator never started
    response.call_on_close(meter.abandon)  # records the attempt if the generator never ran; else a no-op
    response.call_on_close(release_slot)
    return response


def upstream_params(req: CompatRequest, conf: Settings, model: str) -> dict[str, Any]:
    """The Chat Completions arguments for one model of the chain; usage is always asked for when streaming."""
    params = {"model": upstream_model(model, conf), "messages": req.messages, **req.options}
    if req.stream:
        params.update(stream=True, stream_options={"include_usage": True})
    return params


def _open_once(params: dict[str, Any], timeout: openai.Timeout, headers: dict[str, str]) -> Upstream:
    """One streaming attempt: open it and read until a chunk carries content, a tool call or a finish reason."""
    stream = client().chat.completions.create(**params, timeout=timeout, extra_headers=headers)

    def begun(chunk: Any) -> bool:
        try:
            choice = chunk.choices[0] if chunk.choices else None
            delta = choice.delta if choice is not None else None
            return choice is not None and bool(
                choice.finish_reason or (delta is not None and (delta.content or delta.tool_calls or delta.refusal))
            )
        except SHAPE_ERRORS as exc:
            raise UnreadableAnswer("a stream chunk of the wrong shape") from exc

    return read_to_first(stream, begun)


def relay(
    routed: Routed[Upstream], include_usage: bool, keepalive: float, deadline: float, gates: Cooldowns, meter: Meter
) -> Iterator[bytes]:
    """Re-emit a committed stream as `chat.completion.chunk` events, then usage (if asked) and [DONE]; or an error."""
    upstream, model = routed.value, routed.model
    finish_reason = usage = None
    stream_id = "chatcmpl-proxy"  # replaced by the upstream's id
    outcome = "aborted"  # unless the stream reaches its end: the client went away
    pieces: list[str] = []  # kept only to estimate tokens when the usage chunk never comes
    try:
        for chunk in with_keepalive(upstream.chunks(), keepalive):
            if time.monotonic() > deadline:
                log.warning("stream from %s cut at CHATPROXY_TOTAL_TIMEOUT", model)
                outcome = "upstream_timeout"
                yield error_event(
                    ApiError(504, "upstream_timeout", "The answer took too long and was cut short. Try again."),
                    meter.request_id,
                )
                return
            if chunk is PING:
                yield PING
                continue
            if chunk.usage is not None:
                usage = usage_dict(chunk.usage)
            if not chunk.choices:  # the usage chunk (sent below, if asked) or Azure's prompt-filter results
                continue
            choice = chunk.choices[0]
            stream_id = chunk.id or stream_id
            finish_reason = choice.finish_reason or finish_reason
            pieces.append(_delta_text(choice.delta))
            yield sse(chunk_body(chunk, choice, model, include_usage))
        if finish_reason is None:
            log.warning("upstream stream from %s ended without a finish reason", model)
            gates.failure(model, counted=True)
            outcome = "upstream_truncated"
            yield error_event(
                ApiError(502, "upstream_truncated", "The model provider cut the answer short. Try again."),
                meter.request_id,
            )
            return
        outcome = "content_filtered" if finish_reason == "content_filter" else "ok"
        if include_usage:
            yield sse(
                {
                    "id": stream_id,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        yield DONE
    except (openai.APIError, UnreadableAnswer, *SHAPE_ERRORS) as exc:
        error = (
            upstream_error(exc)
            if isinstance(exc, openai.APIError)
            else ApiError(502, "upstream_bad_response", "The model provider sent an answer we could not read.")
        )
        if error.code != "content_filtered":
            gates.failure(model, counted=True)  # the attempt was counted as answered at its first delta
        outcome = error.code
        yield error_event(error, meter.request_id)
    finally:
        upstream.close()
        meter.finish(model, usage, "".join(pieces), outcome, meter.ttft)


def completion_body(completion: Any, model: str) -> dict[str, Any]:
    """A `chat.completion` object from the upstream's, naming the model alias that answered."""
    choice = completion.choices[0]
    message: dict[str, Any] = {
        "role": "assistant",
        "content": choice.message.content,
        "refusal": choice.message.refusal,
    }
    if choice.message.tool_calls:
        message["tool_calls"] = [call.to_dict() for call in choice.message.tool_calls]
    return {
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": choice.finish_reason}],
        "usage": completion.usage.to_dict() if completion.usage is not None else None,
    }


def chunk_body(chunk: Any, choice: Any, model: str, include_usage: bool) -> dict[str, Any]:
    """One `chat.completion.chunk` with the delta's role, content, refusal and tool calls."""
    delta: dict[str, Any] = {}
    if choice.delta is not None:
        delta = {
            name: value
            for name in ("role", "content", "refusal")
            if (value := getattr(choice.delta, name, None)) is not None
        }
        if choice.delta.tool_calls:
            delta["tool_calls"] = [call.to_dict() for call in choice.delta.tool_calls]
    body = {
        "id": chunk.id,
        "object": "chat.completion.chunk",
        "created": chunk.created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": choice.finish_reason}],
    }
    if include_usage:
        body["usage"] = None  # as OpenAI sends it: only the last chunk carries usage
    return body


def error_event(error: ApiError, request_id: str) -> bytes:
    """The final event of a stream that could not finish: the SDKs raise APIError on it."""
    body = {
        "code": error.code,
        "message": error.message,
        "type": error_type(error.status, error.code),
        "param": None,
        "request_id": request_id,
    }
    return b"data: " + json.dumps({"error": body}, separators=(",", ":")).encode() + b"\n\n"


def _answer_text(completion: Any) -> str:
    """The answer's text (content and tool call arguments), for token estimates."""
    message = completion.choices[0].message
    calls = message.tool_calls or []
    return (message.content or "") + "".join(
        call.function.name + call.function.arguments for call in calls if getattr(call, "function", None) is not None
    )


def _delta_text(delta: Any) -> str:
    if delta is None:
        return ""
    calls = delta.tool_calls or []
    return (delta.content or "") + "".join((call.function.arguments or "") if call.function else "" for call in calls)


def _count_fallback(asked: str, answered: str) -> None:
    if asked != answered:
        metrics.record_fallback(asked, answered)
