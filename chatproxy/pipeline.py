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

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import openai
from flask import Response

from . import metrics, sse
from .config import Settings
from .dialects import Answer, Dialect
from .limits import take_stream_slot
from .metering import Meter
from .relay import StreamWriter, Upstream, read_to_first, relay
from .router import Routed, route
from .state import AppState, state
from .upstream import UnreadableAnswer, encode, send, upstream_model

MODEL_HEADER = "X-Chatproxy-Model"


@dataclass(frozen=True)
class Call:
    """A validated request: what to send upstream for any model of its chain, and what it may cost."""

    dialect: Dialect
    model: str  # the allowlisted model asked for; fallbacks follow CHATPROXY_FALLBACK_CHAIN
    body: dict[str, Any]  # sent as is to every model: messages (our system prompt first), tools, formats, sampling
    max_output: int  # the output-token cap, already clamped to the server's
    stream: bool
    prompt_estimate: int  # tokens of everything the upstream reads as prompt, for the worst-case reservation
    token_param: str = "max_tokens"  # noqa: S105 - the name the cap is sent under, not a secret


class Adapter(StreamWriter, Protocol):
    """An endpoint's wire format: the whole answer as a response, and a stream's bytes (StreamWriter)."""

    def reply(self, answer: Answer, routed: Routed[Answer]) -> Response:
        """The response for a whole answer; may raise the contract's error instead (e.g. content filtered)."""


def params_for(call: Call, model: str, settings: Settings) -> dict[str, Any]:
    """The request body for one model of the chain."""
    params = {"model": upstream_model(model, settings), **call.body, call.token_param: call.max_output}
    if call.stream:
        params.update(call.dialect.stream_params)
    return params


def serve(call: Call, adapter: Adapter) -> Response:
    """Answer `call`: a JSON reply or a stream, written by `adapter`."""
    app_state = state()
    deadline = time.monotonic() + app_state.settings.total_timeout
    return _stream(call, adapter, app_state, deadline) if call.stream else _reply(call, adapter, app_state, deadline)


def _reply(call: Call, adapter: Adapter, app_state: AppState, deadline: float) -> Response:
    """The whole answer (with retries and fallback), metered, then shaped by the adapter."""
    settings = app_state.settings
    meter = Meter(call, settings)
    try:
        once = meter.attempt(_builder(call, settings), _sender(call, app_state, _read_answer(call.dialect)))
        routed = route(once, call.model, settings, app_state.cooldowns, deadline)
        answer = routed.value
        outcome = "content_filtered" if answer.finish_reason == "content_filter" else "ok"
        meter.finish(routed.model, answer.usage, answer.text, outcome)  # billed by the upstream, filtered or not
    finally:
        meter.settle()
    response = adapter.reply(answer, routed)
    _count_fallback(call.model, routed.model)
    response.headers[MODEL_HEADER] = routed.model
    return response


def _stream(call: Call, adapter: Adapter, app_state: AppState, deadline: float) -> Response:
    """The stream, opened up to its first output before the first byte, then relayed."""
    settings = app_state.settings
    release_slot = take_stream_slot()
    try:
        meter = Meter(call, settings)
    except BaseException:
        release_slot()
        raise
    try:
        # Opened before the first byte: a refused call still gets a JSON error, and the router can still fall back.
        opened = _open_stream(call.dialect, adapter.opened)
        once = meter.attempt(_builder(call, settings), _sender(call, app_state, opened))
        routed = route(once, call.model, settings, app_state.cooldowns, deadline)
    except BaseException:
        meter.settle()
        release_slot()
        raise
    _count_fallback(call.model, routed.model)
    events = relay(routed, call.dialect, adapter, meter, app_state.cooldowns, settings.keepalive_seconds, deadline)
    response = Response(events, mimetype="text/event-stream", headers={**sse.HEADERS, MODEL_HEADER: routed.model})
    response.call_on_close(routed.value.close)  # also when the generator never started
    response.call_on_close(meter.abandon)  # records the attempt if the generator never ran; else a no-op
    response.call_on_close(release_slot)
    return response


def _builder(call: Call, settings: Settings) -> Callable[[str], bytes]:
    """The encoded body for one model (a body we cannot encode is our bug: 500, nothing sent)."""
    return lambda model: encode(params_for(call, model, settings))


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
