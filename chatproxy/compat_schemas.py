"""The /v1/chat/completions request: OpenAI's wire format, held to the same policy as /api/chat."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from . import images
from .callers import default_model
from .config import Settings
from .errors import invalid
from .schemas import (
    MAX_SCHEMA_DEPTH,
    MAX_TEMPERATURE,
    ChatRequest,
    check_total,
    format_chars,
    reasoning_effort,
    response_format,
    too_deep,
)

FIELDS = frozenset(
    {
        "messages",
        "model",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "reasoning_effort",
        "n",
        "stream",
        "stream_options",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "user",
        "safety_identifier",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
    }
)
MESSAGE_FIELDS = {
    "system": frozenset({"role", "content", "name"}),
    "user": frozenset({"role", "content", "name"}),
    "assistant": frozenset({"role", "content", "name", "tool_calls", "refusal"}),
    "tool": frozenset({"role", "content", "tool_call_id"}),
}
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 64
MAX_TOOL_DESCRIPTION = 4096
MAX_ID = 256  # tool call ids
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_USER = 256
MAX_SAFETY_IDENTIFIER = 64  # OpenAI's limit
JSON_NOTE = "Reply with a JSON object."


@dataclass(frozen=True)
class CompatRequest:
    """A validated OpenAI-style request, ready to send upstream for any model of its fallback chain."""

    messages: list[dict[str, Any]]  # our system prompt first, then the client's turns per the policy
    model: str  # the allowlisted alias
    stream: bool
    include_usage: bool  # the client asked for the usage chunk (upstream is always asked for it)
    options: dict[str, Any]  # max tokens, sampling, tools, response_format: passed through as validated
    metered: ChatRequest  # what the budget reservation and the ledger see


def parse_compat_request(body: dict[str, Any], settings: Settings) -> CompatRequest:
    """Validate a Chat Completions body against the allowlist, the caps and the system-prompt policy."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise invalid(f"Unknown or unsupported field: {unknown[0][:64]!r}. Supported: {', '.join(sorted(FIELDS))}.")
    stream = _flag(body.get("stream"), "stream")
    include_usage = _stream_options(body.get("stream_options"), stream)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise invalid("'n' must be 1: this proxy returns one choice.")
    model = body.get("model", default_model(settings))
    if not isinstance(model, str) or model not in settings.models:
        raise invalid(f"Unknown model. Allowed models: {', '.join(settings.models)}.")
    client_messages, chars = _messages(body.get("messages"), settings)
    images.count(client_messages, settings)
    options = {**_max_tokens(body, settings), **_sampling(body)}
    effort = reasoning_effort(body.get("reasoning_effort"))
    if effort is not None:
        options["reasoning_effort"] = effort
    tools = _tools(body.get("tools"))
    options.update(_tool_options(body, tools))
    format_ = response_format(body.get("response_format"))
    if format_ is not None:
        options["response_format"] = format_
    check_total(chars, (len(json.dumps(tools, ensure_ascii=False)) if tools else 0) + format_chars(format_), settings)
    system = settings.system_prompt
    if (
        format_ is not None
        and format_["type"] == "json_object"
        and "json" not in (system + json.dumps(client_messages)).lower()
    ):
        system = f"{system}\n\n{JSON_NOTE}"  # OpenAI refuses JSON mode unless a message asks for JSON
    metered = ChatRequest(
        messages=[_flat(m) for m in client_messages] + _tools_as_text(tools),
        model=model,
        max_tokens=options.get("max_tokens") or options["max_completion_tokens"],
        temperature=options.get("temperature"),
        stream=stream,
        response_format=format_,
        system_prompt=system,
    )
    return CompatRequest(
        messages=[{"role": "system", "content": system}, *client_messages],
        model=model,
        stream=stream,
        include_usage=include_usage,
        options=options,
        metered=metered,
    )


def _messages(raw: Any, settings: Settings) -> tuple[list[dict[str, Any]], int]:
    """The client's turns, checked and rebuilt field by field (client system messages dropped in 'replace' mode),
    and their characters."""
    if not isinstance(raw, list) or not raw:
        raise invalid("'messages' must be a non-empty list of message objects.")
    if len(raw) > settings.max_messages:
        raise invalid(f"Too many messages: at most {settings.max_messages} per request.")
    messages, total = [], 0
    for index, item in enumerate(raw):
        where = f"messages[{index}]"
        role = item.get("role") if isinstance(item, dict) else None
        if not isinstance(role, str) or role not in MESSAGE_FIELDS:
            raise invalid(f"{where}.role must be one of: {', '.join(MESSAGE_FIELDS)}.")
        extra = sorted(set(item) - MESSAGE_FIELDS[role])
        if extra:
            raise invalid(f"{where} has an unsupported field for role {role!r}: {extra[0][:64]!r}.")
        message, chars = _message(item, role, where, settings)
        if chars > settings.max_message_chars:
            raise invalid(f"{where} is too long: at most {settings.max_message_chars} characters.")
        if role == "system" and settings.compat_system_prompt == "replace":
            continue  # the server's system prompt replaces the client's
        total += chars
        messages.append(message)
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise invalid("The last message must come from the user or a tool.")
    return messages, total


def _message(item: dict[str, Any], role: str, where: str, settings: Settings) -> tuple[dict[str, Any], int]:
    """One message rebuilt from its checked fields, and its size in characters."""
    message: dict[str, Any] = {"role": role}
    calls = _tool_calls(item["tool_calls"], where) if item.get("tool_calls") is not None else []
    if role == "assistant" and item.get("content") is None and calls:
        message["content"] = None
        chars = 0
    elif role == "user" and isinstance(item.get("content"), list) and item["content"]:  # text and image parts
        message["content"], text = images.parts(item["content"], f"{where}.content", settings)
        chars = len(text)
    else:
        message["content"], chars = _content(item.get("content"), f"{where}.content", blank_ok=role != "user")
    if "name" in item:
        if not isinstance(item["name"], str) or not NAME.match(item["name"]):
            raise invalid(f"{where}.name must be 1-64 letters, digits, '_' or '-'.")
        message["name"] = item["name"]
    if calls:
        message["tool_calls"] = calls
        chars += sum(len(call["function"]["arguments"]) for call in calls)
    if isinstance(item.get("refusal"), str):
        message["refusal"] = item["refusal"]
        chars += len(item["refusal"])
    elif item.get("refusal") is not None:
        raise invalid(f"{where}.refusal must be a string or null.")
    if role == "tool":
        message["tool_call_id"] = _text(item.get("tool_call_id"), f"{where}.tool_call_id", MAX_ID)
    return message, chars


def _content(value: Any, where: str, *, blank_ok: bool) -> tuple[str | list[dict[str, str]], int]:
    """A string, or a list of text parts (a user's may have images: images.parts); returns it and its length."""
    if isinstance(value, str):
        parts, texts = value, [value]
    elif isinstance(value, list) and value:
        for part in value:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or set(part) != {"type", "text"}
                or not isinstance(part["text"], str)
            ):
                raise invalid(
                    f'{where} parts must be {{"type": "text", "text": "..."}}; '
                    "images only in user messages; audio and files are not accepted."
                )
        parts, texts = [{"type": "text", "text": part["text"]} for part in value], [part["text"] for part in value]
    else:
        raise invalid(f"{where} must be a string or a non-empty list of text parts.")
    if not blank_ok and not "".join(texts).strip():
        raise invalid(f"{where} must not be empty.")
    return parts, sum(map(len, texts))


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant turn's earlier tool calls, so the tool results that follow make sense upstream."""
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise invalid(f"{where}.tool_calls must be a list of at most {MAX_TOOLS} tool calls.")
    calls = []
    for number, call in enumerate(value):
        at = f"{where}.tool_calls[{number}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not set(call) <= {"id", "type", "function"}
            or call.get("type", "function") != "function"
            or not set(function) <= {"name", "arguments"}
        ):
            raise invalid(f'{at} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}.')
        if not isinstance(function.get("name"), str) or not NAME.match(function["name"]):
            raise invalid(f"{at}.function.name must be 1-64 letters, digits, '_' or '-'.")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise invalid(f"{at}.function.arguments must be a string (JSON text).")
        calls.append(
            {
                "id": _text(call.get("id"), f"{at}.id", MAX_ID),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return calls


def _tools(value: Any) -> list[dict[str, Any]]:
    """Function tools, bounded in number and schema depth (their size counts in CHATPROXY_MAX_TOTAL_CHARS)."""
    if value is None:
        return []
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TOOLS:
        raise invalid(f"'tools' must be a list of 1 to {MAX_TOOLS} function tools.")
    tools, names = [], set()
    for index, tool in enumerate(value):
        at = f"tools[{index}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or set(tool) != {"type", "function"} or tool["type"] != "function":
            raise invalid(f'{at} must be {{"type": "function", "function": {{...}}}}.')
        if not set(function) <= {"name", "description", "parameters", "strict"}:
            raise invalid(f"{at}.function may only have name, description, parameters and strict.")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name) or name in names:
            raise invalid(f"{at}.function.name must be 1-64 letters, digits, '_' or '-', and unique.")
        names.add(name)
        checked: dict[str, Any] = {"name": name}
        if "description" in function:
            checked["description"] = _text(
                function["description"], f"{at}.function.description", MAX_TOOL_DESCRIPTION, blank_ok=True
            )
        if "parameters" in function:
            if not isinstance(function["parameters"], dict) or too_deep(function["parameters"]):
                raise invalid(
                    f"{at}.function.parameters must be a JSON Schema object nested at most {MAX_SCHEMA_DEPTH} deep."
                )
            checked["parameters"] = function["parameters"]
        if "strict" in function:
            checked["strict"] = _flag(function["strict"], f"{at}.function.strict")
        tools.append({"type": "function", "function": checked})
    return tools


def _tool_options(body: dict[str, Any], tools: list[dict[str, Any]]) -> dict[str, Any]:
    """`tools`, `tool_choice` and `parallel_tool_calls`, consistent with each other."""
    if not tools:
        if "tool_choice" in body or "parallel_tool_calls" in body:
            raise invalid("'tool_choice' and 'parallel_tool_calls' need 'tools'.")
        return {}
    options: dict[str, Any] = {"tools": tools}
    choice = body.get("tool_choice")
    if choice is not None:
        names = {tool["function"]["name"] for tool in tools}
        named = choice.get("function") if isinstance(choice, dict) else None
        if choice in ("none", "auto", "required"):
            options["tool_choice"] = choice
        elif (
            isinstance(named, dict)
            and set(choice) == {"type", "function"}
            and choice["type"] == "function"
            and set(named) == {"name"}
            and named["name"] in names
        ):
            options["tool_choice"] = {"type": "function", "function": {"name": named["name"]}}
        else:
            raise invalid(
                "'tool_choice' must be 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": <one of the tools>}}.'
            )
    if "parallel_tool_calls" in body:
        options["parallel_tool_calls"] = _flag(body["parallel_tool_calls"], "parallel_tool_calls")
    return options


def _max_tokens(body: dict[str, Any], settings: Settings) -> dict[str, int]:
    """The completion cap under the name the client used (max_tokens by default), clamped to the server's."""
    given = [name for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None]
    if len(given) > 1:
        raise invalid("Send 'max_tokens' or 'max_completion_tokens', not both.")
    name = given[0] if given else "max_tokens"
    value = body.get(name, settings.max_tokens)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(f"'{name}' must be an integer of at least 1.")
    return {name: min(value, settings.max_tokens)}


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """Temperature, top_p, penalties, seed, stop and user, range-checked."""
    options: dict[str, Any] = {}
    for name, low, high in (
        ("temperature", 0.0, MAX_TEMPERATURE),
        ("top_p", 0.0, 1.0),
        ("presence_penalty", -2.0, 2.0),
        ("frequency_penalty", -2.0, 2.0),
    ):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise invalid(f"'{name}' must be a number from {low:g} to {high:g}.")
        options[name] = value
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
            raise invalid("'seed' must be a 64-bit integer.")
        options["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or not 1 <= len(stops) <= MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
        ):
            raise invalid(f"'stop' must be a string or a list of 1 to {MAX_STOP} strings.")
        options["stop"] = stop
    if body.get("user") is not None:
        options["user"] = _text(body["user"], "'user'", MAX_USER)
    if body.get("safety_identifier") is not None:
        options["safety_identifier"] = _text(body["safety_identifier"], "'safety_identifier'", MAX_SAFETY_IDENTIFIER)
    return options


def _stream_options(value: Any, stream: bool) -> bool:
    """Whether the client wants the final usage chunk."""
    if value is None:
        return False
    if not stream:
        raise invalid("'stream_options' is only allowed with 'stream': true.")
    if not isinstance(value, dict) or not set(value) <= {"include_usage"}:
        raise invalid("'stream_options' may only have 'include_usage'.")
    return _flag(value.get("include_usage"), "stream_options.include_usage")


def _text(value: Any, where: str, limit: int, *, blank_ok: bool = False) -> str:
    if not isinstance(value, str) or len(value) > limit or (not blank_ok and not value.strip()):
        raise invalid(f"{where} must be a {'' if blank_ok else 'non-empty '}string of at most {limit} characters.")
    return value


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false.")
    return value


def _flat(message: dict[str, Any]) -> dict[str, str]:
    """A message as plain text, for token estimates."""
    content = message.get("content") or ""
    text = images.text_of(content)
    text += "".join(call["function"]["name"] + call["function"]["arguments"] for call in message.get("tool_calls", []))
    return {"role": message["role"], "content": text}


def _tools_as_text(tools: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Tool definitions count as prompt tokens too."""
    return [{"role": "system", "content": json.dumps(tools)}] if tools else []
