"""The Responses API as an upstream dialect: POST /responses, a response object or semantic SSE events.

A stream is a sequence of typed events (`response.created` … `response.output_text.delta` … and one
terminal event, `response.completed`, `response.incomplete` or `response.failed`), each with an `event:`
line and a `sequence_number`, and no [DONE]. Usage comes only with the terminal event's response:
`input_tokens` (of which `input_tokens_details.cached_tokens`), `output_tokens` (of which
`output_tokens_details.reasoning_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import openai

from .dialects import Answer, Tally, Usage, _count
from .errors import ApiError
from .models import ModelSpec
from .sse import Event
from .upstream import AttemptFailed, UnreadableAnswer

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Events before any output: the router may still fall back to another model after them.
PRELUDE = frozenset(
    {
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_summary_part.added",
    }
)
# Events whose `delta` is text the model produced (counted when no usage arrives).
DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_summary_text.delta",
    }
)
# incomplete_details.reason → a Chat Completions finish reason, which the meter and relay understand.
INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


@dataclass(frozen=True)
class Responses:
    """POST /responses for one call: `store` (whether the upstream keeps the response) and the reasoning summary
    asked for are the call's own, so each call gets an instance."""

    store: bool = False
    summary: str | None = None
    path: str = "/responses"

    @property
    def stream_params(self) -> dict[str, Any]:
        """A stream: usage always comes with the terminal event."""
        return {"stream": True}

    def options(
        self, spec: ModelSpec, max_output: int, sampling: dict[str, float], effort: str | None
    ) -> dict[str, Any]:
        """max_output_tokens, the sampling the model takes, and `reasoning` (effort, summary) for models that reason."""
        options: dict[str, Any] = {"max_output_tokens": max_output, **sampling}
        reasoning = {"effort": effort} if effort is not None else {}
        if self.summary is not None and spec.reasons:
            reasoning["summary"] = self.summary
        if reasoning:
            options["reasoning"] = reasoning
        return options

    def answer(self, body: Any) -> Answer:
        """The response object: its output text and tool calls, usage, and how it ended."""
        if not isinstance(body, dict) or not isinstance(body.get("output"), list):
            raise UnreadableAnswer("a response of the wrong shape")
        if body.get("status") == "failed":
            raise AttemptFailed("the upstream response failed")
        return Answer(body, output_text(body["output"]), usage(body.get("usage")), _finish(body), self._kept(body))

    def begun(self, event: Event) -> bool:
        """The first event after the prelude: output, or the end; an `error` event or a failed response raise, so
        the router may fall back."""
        kind = _kind(event)
        if kind == "error" and event.get("code") == "content_filter":
            raise _error_event(event)  # the router's answer to a filtered prompt: 400 content_filtered
        if kind == "error":
            raise AttemptFailed(f"error event in the stream (code {str(event.get('code'))[:64]})")
        if kind == "response.failed":
            raise AttemptFailed("the upstream response failed before its first output")
        return kind not in PRELUDE

    def observe(self, event: Event, tally: Tally) -> str | None:
        """Text of a delta event; usage, id and ending of the terminal event; an `error` event raises APIError."""
        kind = _kind(event)
        if kind == "error":
            raise _error_event(event)
        if kind in DELTAS:
            delta = event.get("delta")
            if not isinstance(delta, str):
                raise UnreadableAnswer("a delta event without text")
            tally.pieces.append(delta)
            return delta
        response = event.get("response")
        if kind == "response.created" and isinstance(response, dict):
            tally.response_id = self._kept(response)
        if kind in TERMINAL:
            if not isinstance(response, dict):
                raise UnreadableAnswer("a terminal event without its response")
            tally.usage = usage(response.get("usage"))
            tally.finish_reason = "failed" if kind == "response.failed" else _finish(response)
            tally.response_id = self._kept(response) or tally.response_id
        return ""

    def truncated(self, tally: Tally) -> ApiError | None:
        """A stream without a terminal event was cut short; one that ended `response.failed` failed upstream."""
        if tally.finish_reason is None:
            return ApiError(502, "upstream_truncated", "The model provider cut the answer short. Try again.")
        if tally.finish_reason == "failed":
            return ApiError(502, "upstream_error", "The model provider failed to answer. Try again.")
        return None

    def _kept(self, response: dict[str, Any]) -> str | None:
        """The response's id when this call asked the upstream to keep it."""
        response_id = response.get("id")
        return response_id if self.store and isinstance(response_id, str) and response_id else None


def usage(value: Any) -> Usage | None:
    """Responses usage, with its cached and reasoning details; None when the upstream sent none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UnreadableAnswer("a usage that is not an object")
    prompt, completion = value.get("input_tokens"), value.get("output_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 0 or completion < 0:
        raise UnreadableAnswer("a usage without token counts")
    cached = (value.get("input_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (value.get("output_tokens_details") or {}).get("reasoning_tokens") or 0
    return Usage(prompt, completion, _count(cached, prompt), _count(reasoning, completion))


def output_text(output: list[Any]) -> str:
    """The text of a response's output items (messages, refusals, function call names and arguments)."""
    pieces: list[str] = []
    for item in output:
        if not isinstance(item, dict):
            raise UnreadableAnswer("an output item that is not an object")
        if item.get("type") == "function_call":
            pieces += [str(item.get("name") or ""), str(item.get("arguments") or "")]
        for part in item.get("content") or []:
            if isinstance(part, dict):
                pieces.append(str(part.get("text") or part.get("refusal") or ""))
    return "".join(pieces)


def _finish(response: dict[str, Any]) -> str:
    """`stop`, or why an incomplete response stopped (`length`, `content_filter`)."""
    if response.get("status") != "incomplete":
        return "stop"
    reason = (response.get("incomplete_details") or {}).get("reason")
    return INCOMPLETE.get(reason, "length")


def _kind(event: Event) -> str:
    kind = event.get("type")
    if not isinstance(kind, str):
        raise UnreadableAnswer("a stream event without a type")
    return kind


def _error_event(event: Event) -> openai.APIError:
    """The SDK's exception for an `error` event: {"type": "error", "code", "message", "param"}."""
    message = event.get("message")
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return openai.APIError(message=message, request=None, body=dict(event))  # type: ignore[arg-type]
