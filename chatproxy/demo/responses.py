"""What the fake upstream says on /responses and /embeddings: response objects, stream events, vectors.

The Responses wire format as OpenAI sends it (openai-python's types/responses): a `response` object whose
`output` holds `message` items (`output_text` parts) and `function_call` items; a stream of typed events,
each with an `event:` line and a `sequence_number`, ending in `response.completed` (or `.incomplete`,
`.failed`) with the usage, and no [DONE]. A request is read as the Chat Completion it amounts to, so the
answers (echoes, JSON examples, tool calls) are the ones answers.py gives chat.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from typing import Any

from ..images import text_of
from .answers import _unsupported, parameter_error

MIN_OUTPUT_TOKENS = 16
EMBEDDING_DIMENSIONS = 16  # short vectors: the SDK does not care, and tests stay light


def new_id(prefix: str) -> str:
    """An id in OpenAI's style: resp_…, msg_…, fc_…"""
    return f"{prefix}_{uuid.uuid4().hex}"


def as_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The Chat Completions request a Responses request amounts to (for the answer, token counts and tool calls)."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    given = body.get("input")
    items = [{"role": "user", "content": given}] if isinstance(given, str) else given or []
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):  # text, and input images as chat image parts (for their tokens)
                parts = [p for p in content if isinstance(p, dict)]
                text = "".join(str(p.get("text") or "") for p in parts)
                seen = [
                    {"type": "image_url", "image_url": {"url": p.get("image_url"), "detail": p.get("detail", "auto")}}
                    for p in parts
                    if p.get("type") == "input_image"
                ]
                content = [{"type": "text", "text": text}, *seen] if seen else text
            messages.append({"role": item.get("role"), "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function", "function": {"name": item.get("name")}}
            call["function"]["arguments"] = item.get("arguments")
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")})
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    format_ = (body.get("text") or {}).get("format") or {}
    if format_.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": format_.get("name"), **format_}}
    elif format_.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    if tools:
        chat["tools"] = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        chat["tool_choice"] = choice
    return chat


def request_error(body: dict[str, Any]) -> dict[str, Any] | None:
    """The 400 error body the real API answers for a Responses request it refuses, or None."""
    cap = body.get("max_output_tokens")
    if isinstance(cap, int) and cap < MIN_OUTPUT_TOKENS:
        return _unsupported(
            "max_output_tokens",
            f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= {MIN_OUTPUT_TOKENS}, "
            f"but got {cap} instead.",
            "integer_below_min_value",
        )
    reasoning = body.get("reasoning") or {}
    chat = {name: body.get(name) for name in ("model", "temperature", "top_p")}
    chat["reasoning_effort"] = reasoning.get("effort")
    refused = parameter_error(chat)
    if refused is not None and refused["param"] == "reasoning_effort":
        refused = {
            **refused,
            "param": "reasoning.effort",
            "message": refused["message"].replace("'reasoning_effort'", "'reasoning.effort'"),
        }
    return refused


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """A response's `usage`: reasoning tokens are part of the output, cached ones part of the input."""
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": min(cached, prompt)},
        "output_tokens": completion + reasoning,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion + reasoning,
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    """An assistant `message` output item with one `output_text` part."""
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def function_call_item(item_id: str, call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """A `function_call` output item for one chat-style tool call."""
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
    }


def response_object(
    response_id: str,
    body: dict[str, Any],
    output: list[dict[str, Any]],
    *,
    status: str = "completed",
    counts: dict[str, Any] | None = None,
    model: str | None = None,
    created_at: int | None = None,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    """The `response` object, echoing the request's settings as OpenAI does."""
    reason = "content_filter" if finish_reason == "content_filter" else "max_output_tokens"
    incomplete = {"reason": reason} if status == "incomplete" else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at or int(time.time()),
        "status": status,
        "error": {"code": "server_error", "message": "The model failed."} if status == "failed" else None,
        "incomplete_details": incomplete,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model or body.get("model"),
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": counts,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def embeddings(body: dict[str, Any], counts: int) -> dict[str, Any]:
    """An embeddings answer: one short vector per input, as floats or base64 (the SDK asks for base64)."""
    inputs = body.get("input")
    inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
    size = body.get("dimensions") or EMBEDDING_DIMENSIONS
    data = []
    for index, text in enumerate(inputs):
        vector = [((len(str(text)) + i) % 7) / 7 for i in range(size)]
        encoded: Any = vector
        if body.get("encoding_format") == "base64":
            encoded = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": body.get("model"),
        "usage": {"prompt_tokens": counts, "total_tokens": counts},
    }


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """One stream event's payload (the sequence number is set when it is written)."""
    return {"type": kind, **fields}


def encoded(payload: dict[str, Any]) -> bytes:
    """A Responses stream event on the wire: its `event:` line, then its `data:` line."""
    return b"event: " + payload["type"].encode() + b"\ndata: " + json.dumps(payload).encode() + b"\n\n"


def status_for(finish_reason: str) -> str:
    """A response's status for a scripted finish reason: cut short (length, content filter) is `incomplete`."""
    return {"length": "incomplete", "content_filter": "incomplete", "failed": "failed"}.get(finish_reason, "completed")


def summary_for(body: dict[str, Any], chat: dict[str, Any], reasoning: int) -> str | None:
    """The reasoning summary a reasoning model gives when the request asks for one (`reasoning.summary`)."""
    if not reasoning or not (body.get("reasoning") or {}).get("summary"):
        return None
    last = next((m.get("content") for m in reversed(chat["messages"]) if m.get("role") == "user"), "")
    return f"Thinking about: {text_of(last)}"


def reasoning_item(item_id: str, summary: str) -> dict[str, Any]:
    """A `reasoning` output item with its summary."""
    return {"id": item_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": summary}]}
