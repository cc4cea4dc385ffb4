"""The /api/chat request: parsed from raw bytes, validated against the caps, unknown fields rejected."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from . import images
from .callers import default_model
from .config import Settings
from .errors import ApiError, invalid

CHAT_FIELDS = frozenset(
    {
        "message",
        "messages",
        "model",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "reasoning_effort",
        "response_format",
        "stream",
    }
)
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")  # every value OpenAI documents
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_SCHEMA_DEPTH = 32
CLIENT_ROLES = ("user", "assistant")
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request, ready to send upstream."""

    messages: list[dict[str, Any]]  # the client's turns (a user's content may be parts: images.py); no system turn
    model: str
    max_tokens: int
    temperature: float | None
    stream: bool
    response_format: dict[str, Any] | None = None  # json_object or json_schema; the reply then carries `parsed`
    system_prompt: str | None = None  # set by server-side features (the classifier); None: the configured one
    reasoning_effort: str | None = None  # checked against the model's efforts by the pipeline


def parse_json_body(data: bytes, content_type: str | None) -> dict[str, Any]:
    """Decode a JSON object body or raise the contract's 4xx error."""
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", "Send the body as application/json.")
    try:
        body = json.loads(data)
    except RecursionError:
        raise invalid("The JSON body is nested too deeply.") from None
    except UnicodeDecodeError:
        raise invalid("The body is not valid UTF-8.") from None
    except ValueError:
        raise invalid("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise invalid("The body must be a JSON object.")
    check_strict(body)
    return body


def check_strict(value: Any, prefix: str = "") -> None:
    """Refuse what OpenAI's JSON cannot carry (NaN, Infinity, 1e400, lone surrogates), naming where it is.

    Python's json module reads all of them, and the SDK's encoder (allow_nan=False, then UTF-8) then fails
    while building the upstream request. The same encoding here is exact and runs at C speed; only a body
    that fails it is walked to find the place.
    """
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except RecursionError:
        raise invalid(f"{prefix}The JSON body is nested too deeply.") from None
    except ValueError:  # a non-finite number, or UnicodeEncodeError
        raise invalid(prefix + (json_problem(value) or "The body is not valid JSON.")) from None


def json_problem(value: Any) -> str | None:
    """A sentence naming the first value (or key) strict JSON cannot carry, or None if there is none."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:  # iterative: the body may be nested as deeply as json.loads allows
        item, path = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return (
                f"{path or 'The body'} is not a finite number: NaN, Infinity and numbers too large for a "
                f"double (such as 1e400) are not JSON."
            )
        if isinstance(item, str) and not _utf8(item):
            return f"{path or 'The body'} contains characters that are not valid Unicode (a lone surrogate)."
        if isinstance(item, dict):
            for key, child in reversed(item.items()):
                if not _utf8(key):
                    return (
                        f"{path or 'The body'} has a key that contains characters that are not valid "
                        f"Unicode (a lone surrogate)."
                    )
                stack.append((child, f"{path}.{_shown(key)}" if path else _shown(key)))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{index}]") for index, child in reversed(list(enumerate(item))))
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(key: str) -> str:
    return key if len(key) <= 64 else key[:61] + "..."


def parse_chat_request(body: dict[str, Any], settings: Settings) -> ChatRequest:
    """Validate a chat body against the settings' allowlist and caps."""
    unknown = sorted(set(body) - CHAT_FIELDS)
    if unknown:
        raise invalid(f"Unknown field: {unknown[0][:64]!r}. Allowed fields: {', '.join(sorted(CHAT_FIELDS))}.")
    if ("message" in body) == ("messages" in body):
        raise invalid("Send either 'message' (a string) or 'messages' (a list), not both or neither.")
    messages = _messages(body, settings)
    format_ = response_format(body.get("response_format"))
    check_total(sum(len(images.text_of(m["content"])) for m in messages), format_chars(format_), settings)
    images.count(messages, settings)
    return ChatRequest(
        messages=messages,
        model=_model(body.get("model"), settings),
        max_tokens=_max_tokens(body, settings),
        temperature=_temperature(body.get("temperature")),
        stream=_flag(body.get("stream"), "stream"),
        response_format=format_,
        reasoning_effort=reasoning_effort(body.get("reasoning_effort")),
    )


def reasoning_effort(value: Any) -> str | None:
    """One of the efforts OpenAI documents (which ones a model takes, the pipeline checks), or None."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in EFFORTS:
        raise invalid(f"'reasoning_effort' must be one of: {', '.join(EFFORTS)}.")
    return value


def format_chars(format_: dict[str, Any] | None) -> int:
    """The characters a json_schema response_format adds to the prompt: the JSON text of its name, description
    and schema (OpenAI reads the schema as prompt)."""
    if format_ is None or format_["type"] != "json_schema":
        return 0
    return len(json.dumps(format_["json_schema"], ensure_ascii=False))


def check_total(message_chars: int, other_chars: int, settings: Settings) -> None:
    """CHATPROXY_MAX_TOTAL_CHARS holds for everything that becomes prompt: messages, tools and schemas."""
    if message_chars > settings.max_total_chars:
        raise invalid(f"The conversation is too long: at most {settings.max_total_chars} characters in all.")
    if message_chars + other_chars > settings.max_total_chars:
        raise invalid(
            f"The request is too long: its messages, tools and response_format (counted as JSON text) "
            f"come to {message_chars + other_chars} characters; at most {settings.max_total_chars} "
            f"in all."
        )


def _messages(body: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    if "message" in body:
        raw: Any = [{"role": "user", "content": body["message"]}]
    else:
        raw = body["messages"]
        if not isinstance(raw, list) or not raw:
            raise invalid("'messages' must be a non-empty list of {role, content} objects.")
    if len(raw) > settings.max_messages:
        raise invalid(f"Too many messages: at most {settings.max_messages} per request.")
    messages = []
    for index, item in enumerate(raw):
        where = "'message'" if "message" in body else f"messages[{index}]"
        if not isinstance(item, dict) or set(item) != {"role", "content"}:
            raise invalid(f"{where} must be an object with exactly 'role' and 'content'.")
        role, content = item["role"], item["content"]
        if role not in CLIENT_ROLES:
            raise invalid(f"{where}: role must be 'user' or 'assistant'; the server sets the system prompt.")
        at = where if where == "'message'" else f"{where}.content"
        if isinstance(content, list) and content and role == "user":  # text and image parts, as OpenAI's
            content, text = images.parts(content, at, settings)
        elif isinstance(content, str) and content.strip():
            text = content
        else:
            raise invalid(f"{at} must be a non-empty string (or, from the user, a list of text and image parts).")
        if len(text) > settings.max_message_chars:
            raise invalid(f"{where} is too long: at most {settings.max_message_chars} characters.")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise invalid("The last message must come from the user.")
    return messages


def _model(value: Any, settings: Settings) -> str:
    if value is None:
        return default_model(settings)
    if not isinstance(value, str) or value not in settings.models:
        raise invalid(f"Unknown model. Allowed models: {', '.join(settings.models)}.")
    return value


def _max_tokens(body: dict[str, Any], settings: Settings) -> int:
    """The output cap the client asked for under either name (one of them), clamped to the server's."""
    given = [name for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None]
    if len(given) > 1:
        raise invalid("Send 'max_tokens' or 'max_completion_tokens', not both.")
    if not given:
        return settings.max_tokens
    name, value = given[0], body[given[0]]
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer.")
    if value < 1:
        raise invalid(f"'{name}' must be at least 1.")
    return min(value, settings.max_tokens)


def _temperature(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid("'temperature' must be a number.")
    if not 0.0 <= value <= MAX_TEMPERATURE:
        raise invalid(f"'temperature' must be between 0 and {MAX_TEMPERATURE:g}.")
    return float(value)


def response_format(value: Any) -> dict[str, Any] | None:
    """Validate `response_format`: {"type": "text" | "json_object"} or a named `json_schema` with `strict`."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid('\'response_format\' must be {"type": "json_object"} or {"type": "json_schema", ...}.')
    kind = value["type"]
    if kind == "text":
        if set(value) != {"type"}:
            raise invalid("'response_format' of type 'text' takes no other field.")
        return None
    if kind == "json_object":
        if set(value) != {"type"}:
            raise invalid("'response_format' of type 'json_object' takes no other field.")
        return {"type": "json_object"}
    spec = value.get("json_schema")
    if set(value) != {"type", "json_schema"} or not isinstance(spec, dict):
        raise invalid("'response_format' of type 'json_schema' needs a 'json_schema' object.")
    if not set(spec) <= {"name", "schema", "strict", "description"}:
        raise invalid("'json_schema' may only have name, schema, strict and description.")
    if not isinstance(spec.get("name"), str) or not SCHEMA_NAME.match(spec["name"]):
        raise invalid("'json_schema.name' must be 1-64 letters, digits, '_' or '-'.")
    if not isinstance(spec.get("schema"), dict) or too_deep(spec["schema"]):
        raise invalid(f"'json_schema.schema' must be a JSON Schema object nested at most {MAX_SCHEMA_DEPTH} deep.")
    if "strict" in spec and not isinstance(spec["strict"], bool):
        raise invalid("'json_schema.strict' must be true or false.")
    if "description" in spec and not isinstance(spec["description"], str):
        raise invalid("'json_schema.description' must be a string.")
    return {"type": "json_schema", "json_schema": dict(spec)}


def too_deep(schema: Any) -> bool:
    """Whether a JSON Schema is nested more than MAX_SCHEMA_DEPTH deep."""
    return _depth(schema) > MAX_SCHEMA_DEPTH


def _depth(value: Any, level: int = 1) -> int:
    if level > MAX_SCHEMA_DEPTH:
        return level
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max((_depth(child, level + 1) for child in children), default=level)


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false.")
    return value
