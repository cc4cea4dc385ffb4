"""The batch request: {"requests": [...]}, each a /api/chat body without `stream` plus a unique custom_id."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import Field, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from .base import Body, Policy, unknown_field
from .chat import CUSTOM_ID, ChatBody

Where = Callable[[int], str]


def items(index: int) -> str:
    """How the HTTP API names a line of the batch."""
    return f"requests[{index}]"


class BatchBody(Body):
    """The validated batch: its lines, in order."""

    line: ClassVar[type[ChatBody]]
    if TYPE_CHECKING:  # the field, declared with this app's caps in batch_model()
        requests: list[ChatBody]

    @model_validator(mode="after")
    def _unique(self) -> BatchBody:
        seen: set[str] = set()
        for index, line in enumerate(self.requests):
            if line.custom_id in seen:
                raise PydanticCustomError("duplicate_id", "used twice", {"index": index})
            seen.add(line.custom_id)
        return self

    @classmethod
    def describe(cls, error: ErrorDetails, data: dict[str, Any], where: Where = items, **hints: Any) -> str:
        """Our sentence for each error; a line's own errors as /api/chat words them, after the line's name."""
        loc, kind = error["loc"], error["type"]
        if (name := unknown_field(error)) is not None:
            return f'Unknown field: {name!r}. The body is {{"requests": [...]}}.'
        if kind == "duplicate_id":
            index = error["ctx"]["index"]
            custom_id = data["requests"][index]["custom_id"]
            return f"{where(index)}: custom_id {custom_id!r} is used twice; each must be unique."
        match loc:
            case ("requests",) if kind == "too_long":
                return f"Too many requests: at most {error['ctx']['max_length']} in one batch."
            case ("requests",) if kind != "missing":
                return "'requests' must be a non-empty list of {custom_id, message or messages, ...} objects."
            case ("requests", int(index)) if kind == "model_type":
                return f"{where(index)} must be an object."
            case ("requests", int(index), *rest):
                item = data["requests"][index]
                custom_id = item.get("custom_id")
                if not isinstance(custom_id, str) or not re.search(
                    CUSTOM_ID, custom_id
                ):  # named first, as a line's name
                    return f"{where(index)}: 'custom_id' must be a string of 1 to 64 printable characters."
                if rest == ["stream"] and kind == "extra_forbidden":
                    return f"{where(index)} ({item['custom_id']}): 'stream' is not allowed in a batch."
                inner = ErrorDetails(**{**error, "loc": tuple(rest)})  # type: ignore[typeddict-item]
                return f"{where(index)} ({item['custom_id']}): {cls.line.describe(inner, item)}"
        return 'The body must be {"requests": [...]}.'


def batch_model(policy: Policy, batch_line: type[ChatBody]) -> type[BatchBody]:
    """The batch request with this app's caps (CHATPROXY_BATCH_MAX_REQUESTS)."""

    class BatchRequest(BatchBody):
        """POST /api/batches: chat bodies (without `stream`) with unique custom ids, all for one model."""

        line: ClassVar[type[ChatBody]] = batch_line
        requests: Annotated[list[batch_line], Field(min_length=1, max_length=policy.batch_max_requests)] = Field(  # type: ignore[valid-type]
            description="All lines must ask for the same model."
        )

    return BatchRequest
