"""The Responses API for token holders: POST /v1/responses (JSON or semantic SSE events), and the caller's own
stored responses: GET and DELETE /v1/responses/{id}.

The same policy as /v1/chat/completions (allowlist, caps, our instructions, budgets, ledger, retries,
fallback before the first output, cooldowns), in OpenAI's Responses wire format: `client.responses.create`
and `client.responses.stream` of the official SDKs work with `base_url=<proxy>/v1`. A response is kept
upstream only when CHATPROXY_RESPONSES_STORE allows it and the client asks; its id is recorded with the
ledger row of the caller who created it, and any other caller gets the 404 of an id that does not exist,
without a call upstream.
"""

from __future__ import annotations

from typing import Any

import httpx2
import openai
from flask import Blueprint, Response, g, jsonify, request

from .. import sse
from ..callers import token_required
from ..dialects import Answer, Tally
from ..errors import ApiError
from ..pipeline import Call, serve
from ..relay import Upstream
from ..responses_dialect import TERMINAL, Responses
from ..router import Routed
from ..schemas.responses import parse_responses_request
from ..sse import Event
from ..state import state
from ..strict import parse_json_body
from ..usage import KeptResponse
from .compat import TOKENS_ONLY, openai_error_fields

bp = Blueprint("responses", __name__, url_prefix="/v1")
bp.after_request(openai_error_fields)
AZURE = (
    "The Responses API is not available through this proxy in Azure OpenAI mode; use /v1/chat/completions "
    "(README: 'The Responses API')."
)


@bp.post("/responses")
@token_required(TOKENS_ONLY)
def create() -> Response:
    """A response as one JSON object, or as its semantic events when `stream` is true."""
    app_state = state()
    if app_state.settings.azure_endpoint:
        raise ApiError(400, "unsupported_in_azure_mode", AZURE)
    body = parse_json_body(request.get_data(cache=False), request.content_type)
    req = parse_responses_request(body, app_state.settings, app_state.models)
    # A continuation reads the earlier conversation again, billed as input: it counts in the worst case.
    earlier = owned(req.previous_response_id).tokens if req.previous_response_id else 0
    call = Call(
        dialect=Responses(store=req.store, summary=req.summary),
        model=req.model,
        body=req.body,
        max_output=req.max_output,
        stream=req.stream,
        prompt_estimate=req.prompt_estimate + earlier,
        sampling=req.sampling,
        reasoning_effort=req.effort,
        images=req.images,
        end_user=req.end_user,
    )
    return serve(call, ResponsesEvents(req.client_instructions))


@bp.get("/responses/<response_id>")
@token_required(TOKENS_ONLY)
def read(response_id: str) -> Response:
    """One of the caller's stored responses, as the upstream keeps it (our instructions left out)."""
    owned(response_id)
    return jsonify(private(_upstream("get", response_id), None))


@bp.delete("/responses/<response_id>")
@token_required(TOKENS_ONLY)
def delete(response_id: str) -> Response:
    """Delete one of the caller's stored responses upstream."""
    owned(response_id)
    _upstream("delete", response_id)
    return jsonify({"id": response_id, "object": "response", "deleted": True})


def owned(response_id: str) -> KeptResponse:
    """The stored response `response_id` if this caller created it; otherwise the 404 of an unknown id."""
    kept = state().ledger.kept_response(response_id)
    if kept is None or kept.identity != g.identity:
        raise ApiError(404, "not_found", f"No response with id '{response_id[:64]}' was found.")
    return kept


def _upstream(method: str, response_id: str) -> dict[str, Any]:
    """GET or DELETE /responses/{id} upstream; its 404 is ours, any other failure a 502."""
    client = state().client
    try:
        answer = getattr(client, method)(f"/responses/{response_id}", cast_to=httpx2.Response)
        body = answer.json()
    except openai.NotFoundError:
        raise ApiError(404, "not_found", f"No response with id '{response_id[:64]}' was found.") from None
    except (openai.APIError, ValueError):
        raise ApiError(502, "upstream_error", "The model provider failed to answer. Try again.") from None
    if not isinstance(body, dict):
        raise ApiError(502, "upstream_bad_response", "The model provider sent an answer we could not read.")
    return body


def private(response: dict[str, Any], instructions: str | None) -> dict[str, Any]:
    """A response object as the client may see it: the instructions it gave, never the server's."""
    return {**response, "instructions": instructions}


class ResponsesEvents:
    """The Responses wire format: the response object, or the upstream's events as they came (event: lines,
    sequence numbers), the server's instructions left out; a failure after the first event ends the stream with
    an `error` event numbered after the last one."""

    def __init__(self, instructions: str | None) -> None:
        self.instructions = instructions
        self.sequence = -1
        self.ended = False  # a terminal event was relayed: nothing may follow it

    def reply(self, answer: Answer, routed: Routed[Answer]) -> Response:
        """The response object."""
        return jsonify(private(answer.body, self.instructions))

    def opened(self, first: Event) -> None:
        """Every first output is relayed as it is."""

    def start(self, routed: Routed[Upstream]) -> bytes:
        """Nothing before the first event."""
        return b""

    def event(self, event: Event, text: str, routed: Routed[Upstream]) -> bytes:
        """The event, unchanged but for the response's instructions."""
        kind = str(event["type"])
        number = event.get("sequence_number")
        if isinstance(number, int) and not isinstance(number, bool):
            self.sequence = max(self.sequence, number)
        self.ended = self.ended or kind in TERMINAL
        response = event.get("response")
        payload = {**event, "response": private(response, self.instructions)} if isinstance(response, dict) else event
        return sse.named(kind, payload)

    def done(self, tally: Tally, routed: Routed[Upstream]) -> bytes:
        """Nothing after the terminal event, which was relayed."""
        return b""

    def error(self, error: ApiError) -> bytes:
        """An `error` event (the SDK's ResponseErrorEvent), unless the upstream's own terminal event ended it."""
        if self.ended:
            return b""
        self.sequence += 1
        body = {"type": "error", "code": error.code, "message": error.message, "param": None}
        return sse.named("error", {**body, "sequence_number": self.sequence})
