"""What the fake upstream says: answer text, tool calls and Chat Completion bodies, shared by its endpoints."""

from __future__ import annotations

import json
import time
from typing import Any

DEMO_TEXT = (
    "This answer comes from the offline demo upstream, not from OpenAI. "
    "Set OPENAI_API_KEY to talk to a real model. You said: "
)


def count_tokens(text: str) -> int:
    """A deterministic stand-in for a tokenizer: one token per 4 characters."""
    return max(1, (len(text) + 3) // 4) if text else 0


def prompt_tokens(body: dict) -> int:
    """The prompt tokens of a request body: its messages' contents, counted by `count_tokens`."""
    return sum(count_tokens(str(m.get("content", ""))) for m in body.get("messages", []) if isinstance(m, dict))


def usage(prompt: int, completion: int) -> dict[str, int]:
    """The `usage` object of a completion."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def answer_for(body: dict, demo: bool) -> str:
    """The answer text: an example of the requested JSON shape, else an echo of the last user message."""
    messages = body.get("messages") or []
    last = next((m.get("content") for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), "")
    if not isinstance(last, str):
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
