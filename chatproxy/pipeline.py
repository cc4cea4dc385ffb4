"""One request's way to the upstream and back, the same for every endpoint.

An endpoint validates its wire format into a Call (what to send for any model of the chain, how much
it may cost, stream or not) and hands it here with its adapter, which writes the answer in the
endpoint's format. The caller has been identified and limited by then (callers.py, limits.py: before
the view). Here, in order: a stream slot (streams only) → the budget reservation of the worst case
(metering.Meter) → the router (retries, fallback, cooldowns), each attempt with its own ledger row →
the JSON answer, or the stream opened up to its first output and then relayed (relay.py) → the
settlement of the budget and the ledger, in `finally` and when the response is closed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import openai
from flask import Response, g, request

from . import metrics, sse
from .callers import allowed_models
from .dialects import Answer, Dialect
from .errors import ApiError, invalid
from .images import Picture
from .limits import take_held_slots, take_stream_slot
from .metering import Meter
from .models import SAMPLING_DEFAULTS, ModelSpec
from .relay import StreamWriter, Upstream, read_to_first, relay
from .router import Routed, candidates, route
from .state import AppState, state
from .upstream import UnreadableAnswer, encode, send, upstream_model

MODEL_HEADER = "X-Chatproxy-Model"


@dataclass(frozen=True)
class Call:
    """A validated request: what to send upstream for any model of its chain, and what it may cost."""

    dialect: Dialect
    model: str  # the allowlisted model asked for; fallbacks follow CHATPROXY_FALLBACK_CHAIN
    body: dict[str, Any]  # sent as is to every model: messages (our system prompt first), tools, formats
    max_output: int  # the output-token cap (reasoning included), already clamped to the server's
    stream: bool
    prompt_estimate: int  # tokens of the prompt's text (images: below), for the worst-case reservation
    sampling: dict[str, float] = field(default_factory=dict)  # temperature, top_p, penalties: per model, below
    reasoning_effort: str | None = None  # for models that reason
    images: tuple[Picture, ...] = ()  # only models that see may answer; each model prices them its own way
    end_user: str | None = None  # the end user it is for (ledger column end_user): /v1's user, an end-user token's sub


class Adapter(StreamWriter, Protocol):
    """An endpoint's wire format: the whole answer as a response, and a stream's bytes (StreamWriter)."""

    def reply(self, answer: Answer, routed: Routed[Answer]) -> Response:
        """The response for a whole answer; may raise the contract's error instead (e.g. content filtered)."""


def plan(call: Call, app_state: AppState) -> list[str]:
    """The models to try, the one asked for first; a parameter that model refuses is our 400, sent nowhere.

    The requested model must take the call as it is (CHATPROXY_UNSUPPORTED_PARAMS=drop lets a sampling
    parameter it refuses be left out instead). A fallback model is tried only if it can answer the call at
    all (images need a model that sees); a sampling parameter or reasoning effort it does not take is left
    out for it (its answer is marked degraded anyway). An API key with a list of models gets none other,
    asked for or as a fallback.
    """
    table, settings = app_state.models, app_state.settings
    allowed = allowed_models(settings, embedding=True)
    if call.model not in allowed:
        raise ApiError(
            403, "model_not_allowed", f"This API key may not use {call.model}. It may use: {', '.join(allowed)}."
        )
    spec = table.spec(call.model)
    for name, value in call.sampling.items():
        if not spec.allows_sampling(name, value, call.reasoning_effort) and settings.unsupported_params == "refuse":
            raise invalid(_refused_sampling(call.model, spec, name, value))
    effort = call.reasoning_effort
    if effort is not None and not spec.takes_effort(effort):
        if not spec.reasons:
            raise invalid(f"{call.model} does not reason: 'reasoning_effort' is not accepted for it.")
        raise invalid(f"'reasoning_effort' for {call.model} must be one of: {', '.join(spec.reasoning_efforts)}.")
    if call.images and not spec.images:
        raise invalid(f"{call.model} does not accept images. Choose a model that does, or send text only.")
    fallbacks = candidates(call.model, settings)[1:]
    usable = [name for name in fallbacks if name in allowed and (not call.images or table.spec(name).images)]
    return [call.model, *usable]


def _refused_sampling(model: str, spec: ModelSpec, name: str, value: float) -> str:
    """The 400's sentence for a sampling value `model` does not accept."""
    if spec.sampling == "effort_none":
        return f"{model} accepts '{name}' only with 'reasoning_effort': 'none'; leave '{name}' out or set it."
    if spec.sampling == "fixed":
        return f"{model} does not accept '{name}' = {value:g}: only its default ({SAMPLING_DEFAULTS[name]:g})."
    return f"'{name}' = {value:g} is out of range for {model}."


def params_for(call: Call, model: str, app_state: AppState) -> dict[str, Any]:
    """The request body for one model of the chain, in the parameters that model takes (models.json)."""
    spec = app_state.models.spec(model)
    params = {"model": upstream_model(model, app_state.settings), **call.body}
    sampling = {
        name: value for name, value in call.sampling.items() if spec.allows_sampling(name, value, call.reasoning_effort)
    }
    effort = call.reasoning_effort if call.reasoning_effort and spec.takes_effort(call.reasoning_effort) else None
    params.update(call.dialect.options(spec, min(call.max_output, spec.max_output), sampling, effort))
    if call.stream:
        params.update(call.dialect.stream_params)
    if call.end_user and "user" not in params and "safety_identifier" not in params:
        params["safety_identifier"] = safety_identifier(call.end_user)  # OpenAI: a hash, never the user's name
    return params


def safety_identifier(end_user: str) -> str:
    """What OpenAI is told about an end user it has no identifier for: a hash (64 characters, its limit)."""
    return hashlib.sha256(f"chatproxy end user\0{end_user}".encode()).hexdigest()


def serve(call: Call, adapter: Adapter) -> Response:
    """Answer `call`: a JSON reply or a stream, written by `adapter`."""
    app_state = state()
    caller = g.get("caller")
    if caller is not None and caller.kind == "end_user" and call.end_user is None:
        call = replace(call, end_user=caller.identity)
    deadline = time.monotonic() + app_state.settings.total_timeout
    return _stream(call, adapter, app_state, deadline) if call.stream else _reply(call, adapter, app_state, deadline)


def _reply(call: Call, adapter: Adapter, app_state: AppState, deadline: float) -> Response:
    """The whole answer (with retries and fallback), metered, then shaped by the adapter."""
    settings = app_state.settings
    chain = plan(call, app_state)
    meter = Meter(call, chain, settings)
    try:
        once = meter.attempt(_builder(call, app_state), _sender(call, app_state, _read_answer(call.dialect)))
        routed = route(once, chain, settings, app_state.cooldowns, deadline)
        answer = routed.value
        outcome = "content_filtered" if answer.finish_reason == "content_filter" else "ok"
        # Billed by the upstream, filtered or not.
        meter.finish(routed.model, answer.usage, answer.text, outcome, response_id=answer.response_id)
    finally:
        meter.settle()
    response = adapter.reply(answer, routed)
    _count_fallback(call.model, routed.model)
    response.headers[MODEL_HEADER] = routed.model
    return response


def _stream(call: Call, adapter: Adapter, app_state: AppState, deadline: float) -> Response:
    """The stream, opened up to its first output before the first byte, then relayed."""
    settings = app_state.settings
    chain = plan(call, app_state)
    release_slot = take_stream_slot()
    try:
        meter = Meter(call, chain, settings)
    except BaseException:
        release_slot()
        raise
    try:
        # Opened before the first byte: a refused call still gets a JSON error, and the router can still fall back.
        opened = _open_stream(call.dialect, adapter.opened)
        once = meter.attempt(_builder(call, app_state), _sender(call, app_state, opened))
        routed = route(once, chain, settings, app_state.cooldowns, deadline)
    except BaseException:
        meter.settle()
        release_slot()
        raise
    _count_fallback(call.model, routed.model)
    gone = sse.hangup_probe(request.environ)
    release_held = take_held_slots()

    def release() -> None:
        release_slot()
        release_held()

    events = relay(
        routed,
        call.dialect,
        adapter,
        meter,
        app_state.cooldowns,
        settings.keepalive_seconds,
        deadline,
        gone,
        release,
        request.environ,
    )
    response = Response(events, mimetype="text/event-stream", headers={**sse.HEADERS, MODEL_HEADER: routed.model})
    response.call_on_close(routed.value.close)  # also when the generator never started
    response.call_on_close(meter.abandon)  # records the attempt if the generator never ran; else a no-op
    response.call_on_close(release)
    return response


def _builder(call: Call, app_state: AppState) -> Callable[[str], bytes]:
    """The encoded body for one model (a body we cannot encode is our bug: 500, nothing sent)."""
    return lambda model: encode(params_for(call, model, app_state))


def _sender(
    call: Call, app_state: AppState, read: Callable[[Any], Any]
) -> Callable[[bytes, str, openai.Timeout, dict[str, str]], Any]:
    """Send one attempt and read its answer with `read` (an unreadable answer raises UnreadableAnswer)."""
    client, deployments = app_state.client, dict(app_state.settings.azure_deployments)

    def send_once(body: bytes, model: str, timeout: openai.Timeout, headers: dict[str, str]) -> Any:
        response = send(
            client,
            call.dialect.path,
            body,
            deployment=deployments.get(model) if deployments else None,
            stream=call.stream,
            timeout=timeout,
            headers=headers,
        )
        return read(response)

    return send_once


def _read_answer(dialect: Dialect) -> Callable[[Any], Answer]:
    """Read a whole JSON answer (the SDK has read the body)."""

    def read(response: Any) -> Answer:
        try:
            body = json.loads(response.content)
        except ValueError as exc:
            raise UnreadableAnswer("an answer that is not JSON") from exc
        return dialect.answer(body)

    return read


def _open_stream(dialect: Dialect, check: Callable[[sse.Event], None]) -> Callable[[Any], Upstream]:
    """Open a stream and read it up to its first output, which `check` may refuse."""
    return lambda response: read_to_first(sse.EventStream(response), dialect, check)


def _count_fallback(asked: str, answered: str) -> None:
    if asked != answered:
        metrics.record_fallback(asked, answered)
