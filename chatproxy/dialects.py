"""How to read each upstream API's answers: its whole JSON answer, and its stream event by event.

A dialect knows one upstream endpoint (Chat Completions today): where it is, what a well-formed answer
looks like, where the text, the usage and the finish reason are, when a stream has begun (the first
output, before which the router may still fall back) and whether it ended complete. The wire adapters
(api/) decide what the client sees; the relay and the meter only ask the dialect.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import openai

from .errors import ApiError
from .models import ModelSpec
from .sse import Event
from .upstream import UnreadableAnswer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    """Tokens a call was billed for, as the upstream counted them; cached is part of prompt, reasoning of completion."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    def public(self) -> dict[str, Any]:
        """The usage object of our replies and `done` events, with OpenAI's details (cached and reasoning tokens)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }


@dataclass(frozen=True)
class Answer:
    """A whole (non-stream) answer: the upstream's JSON and what the meter and the adapters read from it."""

    body: dict[str, Any]
    text: str  # the answer's text (and tool call arguments), for token estimates
    usage: Usage | None
    finish_reason: str | None
    response_id: str | None = None  # a response the upstream keeps (Responses API, store): its owner is recorded


@dataclass
class Tally:
    """What a stream has said so far."""

    usage: Usage | None = None
    finish_reason: str | None = None
    pieces: list[str] = field(default_factory=list)  # the text, kept to estimate tokens when usage never comes
    response_id: str | None = None  # a response the upstream keeps (Responses API, store): its owner is recorded

    @property
    def text(self) -> str:
        """The text received."""
        return "".join(self.pieces)


class Dialect(Protocol):
    """One upstream API, as the relay, the meter and the pipeline read it."""

    path: str  # e.g. /chat/completions
    stream_params: dict[str, Any]  # what asks this endpoint for a stream that reports its usage

    def options(
        self, spec: ModelSpec, max_output: int, sampling: dict[str, float], effort: str | None
    ) -> dict[str, Any]:
        """The output cap, sampling and reasoning effort, under the names this endpoint and `spec` take."""

    def answer(self, body: Any) -> Answer:
        """A whole answer; one of the wrong shape raises UnreadableAnswer."""

    def begun(self, event: Event) -> bool:
        """Whether this event is the first output (after it the router may no longer fall back)."""

    def observe(self, event: Event, tally: Tally) -> str | None:
        """Check one stream event, add it to `tally`, and return its text ("" if none; None: not an output event)."""

    def truncated(self, tally: Tally) -> ApiError | None:
        """The error for a stream that ended before the upstream finished its answer, or None."""


class ChatCompletions:
    """POST /chat/completions: `choices[0].message` (JSON) or `choices[0].delta` chunks ending in [DONE]."""

    path = "/chat/completions"
    stream_params: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}  # noqa: RUF012

    def options(
        self, spec: ModelSpec, max_output: int, sampling: dict[str, float], effort: str | None
    ) -> dict[str, Any]:
        """max_tokens or max_completion_tokens (as the model takes it), the sampling, reasoning_effort."""
        options: dict[str, Any] = {spec.token_param or "max_completion_tokens": max_output, **sampling}
        if effort is not None:
            options["reasoning_effort"] = effort
        return options

    def answer(self, body: Any) -> Answer:
        """The first choice's message, finish reason and the usage."""
        try:
            choice = body["choices"][0]
            message = choice["message"]
            usage = _usage(body.get("usage"))
            calls = message.get("tool_calls") or []
            text = (message.get("content") or "") + "".join(
                (call.get("function") or {}).get("name", "") + (call.get("function") or {}).get("arguments", "")
                for call in calls
            )
            finish = choice.get("finish_reason")
            if not isinstance(message, dict) or not isinstance(finish, str | None):
                raise TypeError("message")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise UnreadableAnswer(f"an answer of the wrong shape ({type(exc).__name__})") from exc
        return Answer(body, text, usage, finish)

    def begun(self, event: Event) -> bool:
        """A chunk with content, a tool call, a refusal or a finish reason (checked as `observe` checks it)."""
        if self.observe(event, Tally()) is None:
            return False
        choice = event["choices"][0]
        delta = choice.get("delta") or {}
        return bool(
            choice.get("finish_reason") or delta.get("content") or delta.get("tool_calls") or delta.get("refusal")
        )

    def observe(self, event: Event, tally: Tally) -> str | None:
        """Usage, finish reason and text of one chunk (None for a chunk without choices); an `error` event raises
        openai.APIError, as the SDK does, and a chunk of the wrong shape UnreadableAnswer."""
        error = event.get("error")
        if error:
            raise _error_event(error)
        usage = event.get("usage")
        if usage is not None:
            tally.usage = _usage(usage)
        choices = event.get("choices")
        if not choices:
            if choices is not None and not isinstance(choices, list):
                raise UnreadableAnswer("a chunk whose choices are not a list")
            return None
        try:
            choice = choices[0]
            finish = choice.get("finish_reason")
            delta = choice.get("delta")
            if delta is None:
                delta = {}
            elif not isinstance(delta, dict):
                raise TypeError("delta")
            text = delta.get("content") or ""
            calls = delta.get("tool_calls")
            if calls:
                text += "".join((call.get("function") or {}).get("arguments") or "" for call in calls)
        except (AttributeError, TypeError, KeyError) as exc:
            raise UnreadableAnswer(f"a chunk of the wrong shape ({type(exc).__name__})") from exc
        if not isinstance(text, str) or not isinstance(finish, str | None):
            raise UnreadableAnswer("a chunk of the wrong shape")
        if finish:
            tally.finish_reason = finish
        if text:
            tally.pieces.append(text)
        return text

    def truncated(self, tally: Tally) -> ApiError | None:
        """A stream that ended without a finish reason was cut short."""
        if tally.finish_reason is None:
            return ApiError(502, "upstream_truncated", "The model provider cut the answer short. Try again.")
        return None


CHAT = ChatCompletions()


class Embeddings:
    """POST /embeddings: one JSON answer (`data`, and `usage` with prompt tokens only); never a stream."""

    path = "/embeddings"
    stream_params: dict[str, Any] = {}  # noqa: RUF012

    def options(
        self, spec: ModelSpec, max_output: int, sampling: dict[str, float], effort: str | None
    ) -> dict[str, Any]:
        """Nothing per model: embeddings have no output cap, sampling or reasoning."""
        return {}

    def answer(self, body: Any) -> Answer:
        """The vectors and the prompt tokens they were billed for."""
        try:
            if not isinstance(body["data"], list):
                raise TypeError("data")
            value = body.get("usage")
            prompt = value["prompt_tokens"] if value is not None else None
        except (KeyError, TypeError) as exc:
            raise UnreadableAnswer(f"an answer of the wrong shape ({type(exc).__name__})") from exc
        if prompt is not None and (not isinstance(prompt, int) or prompt < 0):
            raise UnreadableAnswer("a usage without token counts")
        return Answer(body, "", None if prompt is None else Usage(prompt, 0), "stop")

    def begun(self, event: Event) -> bool:
        """Never called: embeddings do not stream."""
        raise NotImplementedError

    def observe(self, event: Event, tally: Tally) -> str | None:
        """Never called: embeddings do not stream."""
        raise NotImplementedError

    def truncated(self, tally: Tally) -> ApiError | None:
        """Never called: embeddings do not stream."""
        raise NotImplementedError


EMBEDDINGS = Embeddings()


def _usage(value: Any) -> Usage | None:
    """Chat Completions usage, with its cached and reasoning details; None when the upstream sent none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UnreadableAnswer("a usage that is not an object")
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 0 or completion < 0:
        raise UnreadableAnswer("a usage without token counts")
    cached = (value.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (value.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return Usage(prompt, completion, _count(cached, prompt), _count(reasoning, completion))


def _count(value: Any, most: int) -> int:
    """A detail count, held within its total (an upstream that reports nonsense must not create money)."""
    return min(value, most) if isinstance(value, int) and value > 0 else 0


def _error_event(error: Any) -> openai.APIError:
    """The SDK's exception for an `error` event inside a stream."""
    message = error.get("message") if isinstance(error, dict) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return openai.APIError(message=message, request=None, body=error)  # type: ignore[arg-type]
