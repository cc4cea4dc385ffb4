"""What the fake upstream says: answer text, tool calls and Chat Completion bodies, shared by its endpoints."""

from __future__ import annotations

import json
import re
import time
from functools import cache
from typing import Any

from .. import images
from ..models import ModelTable, load_table

DEMO_TEXT = (
    "This answer comes from the offline demo upstream, not from OpenAI. "
    "Set OPENAI_API_KEY to talk to a real model. You said: "
)


def count_tokens(text: str) -> int:
    """A deterministic stand-in for a tokenizer: one token per 4 characters."""
    return max(1, (len(text) + 3) // 4) if text else 0


def prompt_tokens(body: dict) -> int:
    """The prompt tokens of a request body: its messages' text, counted by `count_tokens`, and its images, counted
    as OpenAI counts them for the model (the shipped model table's rule)."""
    messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
    text = sum(count_tokens(str(_text(m.get("content")))) for m in messages)
    pictures = images.pictures(messages)
    return text + (_table().image_tokens(str(body.get("model") or ""), pictures) if pictures else 0)


@cache
def _table() -> ModelTable:
    """The shipped model table: OpenAI's own rules, whatever the proxy's settings override."""
    return load_table()


def _text(content: Any) -> Any:
    """A message's text: a string as it is, the text of a list of parts."""
    return images.text_of(content) if isinstance(content, list) else content or ""


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """The `usage` object of a completion, with its details as OpenAI sends them (reasoning is part of completion)."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion + reasoning,
        "total_tokens": prompt + completion + reasoning,
        "prompt_tokens_details": {"cached_tokens": min(cached, prompt), "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


# The model families that reason (the o-series, gpt-5 and later) and take their parameters as OpenAI's do:
# max_completion_tokens only, the default temperature only (gpt-5.1 and later: any, with reasoning_effort none).
REASONING = re.compile(r"^(o\d|gpt-5|gpt-6)")
SAMPLING_WITH_EFFORT_NONE = re.compile(r"^gpt-(5\.[1-9]|6)")
SAMPLING = {"temperature": 1, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0}
REASONING_TOKENS = 12  # what a reasoning model of the fake "thinks" before each answer
TEXT_ONLY = re.compile(r"^(o3-mini|o1-mini|o1-preview|gpt-3\.5)")  # the models that refuse image input


def parameter_error(body: dict) -> dict[str, Any] | None:
    """The 400 error body the real API answers for a parameter the model refuses, or None."""
    model = str(body.get("model") or "")
    refused = image_error(body, model)
    if refused is not None:
        return refused
    if not REASONING.match(model):
        if body.get("reasoning_effort") is not None:
            return _unsupported(
                "reasoning_effort",
                "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
                "unsupported_parameter",
            )
        return None
    if "max_tokens" in body:
        return _unsupported(
            "max_tokens",
            "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' "
            "instead.",
            "unsupported_parameter",
        )
    if body.get("reasoning_effort") == "none" and SAMPLING_WITH_EFFORT_NONE.match(model):
        return None
    for name, default in SAMPLING.items():
        value = body.get(name)
        if value is not None and value != default:
            return _unsupported(
                name,
                f"Unsupported value: '{name}' does not support {value} with this model. Only the default "
                f"({default}) value is supported.",
                "unsupported_value",
            )
    return None


def image_error(body: dict, model: str) -> dict[str, Any] | None:
    """The real API's 400 for an image part a text-only model is sent, or one it cannot read (the fake fetches no
    URL: only data URLs are images to it)."""
    for number, message in enumerate(body.get("messages") or []):
        content = message.get("content") if isinstance(message, dict) else None
        for index, part in enumerate(content if isinstance(content, list) else []):
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            if TEXT_ONLY.match(model):
                return {
                    "message": "Invalid content type. image_url is only supported by certain models.",
                    "type": "invalid_request_error",
                    "param": f"messages.[{number}].content.[{index}].type",
                    "code": None,
                }
            image_url = part.get("image_url")
            if images.header_of(image_url.get("url") if isinstance(image_url, dict) else None) is None:
                return {
                    "message": "You uploaded an unsupported image. Please make sure your image has of one the "
                    "following formats: ['png', 'jpeg', 'gif', 'webp'].",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_image_format",
                }
    return None


def _unsupported(param: str, message: str, code: str) -> dict[str, Any]:
    return {"message": message, "type": "invalid_request_error", "param": param, "code": code}


def reasoning_tokens(body: dict) -> int:
    """Hidden reasoning tokens the fake bills for an answer (0 for models that do not reason)."""
    return REASONING_TOKENS if REASONING.match(str(body.get("model") or "")) else 0


def answer_for(body: dict, demo: bool) -> str:
    """The answer text: an example of the requested JSON shape, else an echo of the last user message."""
    messages = body.get("messages") or []
    last = next((m.get("content") for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), "")
    if isinstance(last, list):
        seen = len(images.image_parts([{"content": last}]))
        last = images.text_of(last) + (f" [{seen} image{'s' if seen > 1 else ''}]" if seen else "")
    elif not isinstance(last, str):
        last = json.dumps(last)
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        return json.dumps(example_of(response_format.get("json_schema", {}).get("schema", {}), last))
    if response_format.get("type") == "json_object":
        return json.dumps({"answer": last})
    if demo:
        return DEMO_TEXT + last
    return f"Echo: {last}"


def example_of(schema: dict, text: str) -> Any:
    """A value that satisfies a simple JSON schema; an enum prefers the option named in `text`."""
    if "enum" in schema:
        options = schema["enum"]
        return next((o for o in options if isinstance(o, str) and o.lower() in text.lower()), options[0])
    kind = schema.get("type")
    if kind == "object":
        return {name: example_of(sub, text) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        return [example_of(schema.get("items", {}), text)]
    if kind in ("number", "integer"):
        low, high = schema.get("minimum", 0), schema.get("maximum", 1)
        return high if kind == "integer" else round(low + (high - low) * 0.9, 2)
    if kind == "boolean":
        return True
    return f"Demo answer about: {text[:60]}"


def tool_calls_for(body: dict) -> list[dict[str, Any]] | None:
    """A call of the offered tool (the one `tool_choice` names, else the first), unless a tool result just came back."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)] or [{}]
    choice = body.get("tool_choice")
    if not tools or choice == "none" or messages[-1].get("role") == "tool":
        return None
    wanted = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    function = next((t["function"] for t in tools if t["function"].get("name") == wanted), tools[0]["function"])
    last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
    arguments = example_of(function.get("parameters") or {"type": "object"}, str(last))
    return [
        {
            "id": "call_fake_0",
            "type": "function",
            "function": {"name": function.get("name"), "arguments": json.dumps(arguments)},
        }
    ]


def completion(
    body: dict,
    text: str,
    counts: dict[str, int],
    *,
    model: str | None = None,
    refusal: str | None = None,
    finish_reason: str = "stop",
    tools: list[dict[str, Any]] | None = None,
) -> dict:
    """A Chat Completion answering `body` with `text` (or a refusal, or tool calls); `counts` is its usage."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if refusal or tools else text,
        "refusal": refusal,
    }
    if tools:
        message["tool_calls"] = tools
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model or body.get("model"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": counts,
    }
