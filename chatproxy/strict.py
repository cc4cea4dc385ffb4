"""Strict JSON at the edge: a body is a JSON object OpenAI's encoder can carry (finite numbers, valid Unicode)."""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import ApiError, invalid


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
