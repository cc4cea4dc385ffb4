"""The base of every request model: unknown fields refused, strict types, and pydantic's errors in our words.

A wire format is a `Body` subclass built from the app's Policy (the caps are constraints of the model,
so they are in its JSON Schema too). `Body.parse` validates a decoded body and raises the contract's 400
with one sentence: the first problem, in the order a reader would fix them (unknown fields, then the fields
in their order, an item's shape before its values; a model may `pick` otherwise, as the OpenAI-shaped
/v1/responses and /v1/embeddings name the deepest), worded by the model's `wording`.

A new wire format: a module with a Body subclass whose `wording` names its fields' errors (`problem()` for
a rule a validator checks, already worded), a function that builds it from a Policy (caps as Field and
StringConstraints arguments; `documented()` for a cap a later check words itself), and a field of
schemas.RequestModels; its route calls `.parse(body)`, and its
Operation in openapi.py names it as `body`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import ErrorDetails, PydanticCustomError

from ..config import Settings
from ..errors import invalid

NOT_BLANK = r"\S"  # with Python's re: the same whitespace str.strip() removes
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_SCHEMA_DEPTH = 32
MAX_TEMPERATURE = 2.0
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")  # every value OpenAI documents
SHAPE = frozenset({"extra_forbidden", "missing", "model_type", "model_attributes_type"})  # an object's own shape
PROBLEM = "problem"  # a rule a validator checks (the error's message is already our sentence)

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Effort = Literal[EFFORTS]  # type: ignore[valid-type]


@dataclass(frozen=True)
class Policy:
    """What the request models read of the settings: the allowlist, the caps (images' too) and the system prompt."""

    models: tuple[str, ...]
    default_model: str
    system_prompt: str
    compat_system_prompt: str
    max_tokens: int
    max_messages: int
    max_message_chars: int
    max_total_chars: int
    classify_labels: tuple[str, ...]
    batch_max_requests: int
    max_image_bytes: int
    max_image_side: int
    max_images_per_message: int
    max_images: int
    embedding_models: tuple[str, ...]
    embedding_max_inputs: int

    @classmethod
    def of(cls, settings: Settings) -> Policy:
        """The policy of `settings`."""
        return cls(**{field.name: getattr(settings, field.name) for field in fields(cls)})


@dataclass(frozen=True)
class Documented:
    """JSON Schema keywords for the document only: a rule another check enforces in its own words."""

    keywords: tuple[tuple[str, Any], ...]

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        """The schema with the keywords added."""
        return {**handler(core_schema), **dict(self.keywords)}


def documented(**keywords: Any) -> Documented:
    """An annotation adding `keywords` to a field's JSON Schema, not to its validation."""
    return Documented(tuple(keywords.items()))


def problem(message: str) -> PydanticCustomError:
    """A validator's refusal, worded for the client."""
    return PydanticCustomError(PROBLEM, message)


def too_deep(schema: Any) -> bool:
    """Whether a JSON Schema is nested more than MAX_SCHEMA_DEPTH deep."""
    return _depth(schema) > MAX_SCHEMA_DEPTH


def _nested_at_most(schema: dict[str, Any]) -> dict[str, Any]:
    if too_deep(schema):
        raise PydanticCustomError("too_deep", "nested too deeply")
    return schema


def _depth(value: Any, level: int = 1) -> int:
    if level > MAX_SCHEMA_DEPTH:
        return level
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max((_depth(child, level + 1) for child in children), default=level)


SchemaObject = Annotated[
    dict[str, Any],
    AfterValidator(_nested_at_most),
    Field(description=f"A JSON Schema, nested at most {MAX_SCHEMA_DEPTH} deep."),
]


class Body(BaseModel):
    """A request model: unknown fields refused, no coercion ("1" is not 1, 1 is not true)."""

    model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re", frozen=True)
    first: ClassVar[tuple[str, ...]] = ()  # fields whose problems are named before the others'

    @classmethod
    def parse(cls, data: dict[str, Any], **hints: Any) -> Self:
        """The validated body, or the contract's 400 naming its first problem."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise invalid(cls.describe(cls.pick(exc.errors(include_url=False)), data, **hints)) from None

    @classmethod
    def pick(cls, errors: list[ErrorDetails]) -> ErrorDetails:
        """The error to name (see first_error)."""
        return first_error(cls, errors)

    @classmethod
    def describe(cls, error: ErrorDetails, data: dict[str, Any], **hints: Any) -> str:
        """The sentence for one error of `data`: a validator's problem is worded already, the rest by `wording`."""
        return error["msg"] if error["type"] == PROBLEM else cls.wording(error, data, **hints)

    @classmethod
    def wording(cls, error: ErrorDetails, data: dict[str, Any], **hints: Any) -> str:
        """The sentence for an error of a field's type or constraints (a subclass words its own fields)."""
        return error["msg"]


def first_error(model: type[Body], errors: list[ErrorDetails]) -> ErrorDetails:
    """The problem to name: unknown fields (the first by name), then by field, item index, shape before value."""
    fields = [*model.first, *(name for name in model.model_fields if name not in model.first)]

    def key(error: ErrorDetails) -> tuple[int, tuple[int, ...], int, str]:
        loc = error["loc"]
        top = loc[0] if loc else ""
        unknown = len(loc) == 1 and error["type"] == "extra_forbidden"
        rank = -1 if unknown else fields.index(top) if top in fields else len(fields)
        indexes = tuple(part for part in loc if isinstance(part, int))
        extra = error["type"] == "extra_forbidden"  # unknown fields first, the first by name
        return rank, indexes, 0 if extra else 1 if error["type"] in SHAPE else 2, str(loc[-1]) if extra else ""

    return min(errors, key=key)  # min is stable: pydantic's own order (the fields') breaks ties


def unknown_field(error: ErrorDetails) -> str | None:
    """The name of a top-level field the model does not have, or None."""
    loc = error["loc"]
    return str(loc[0])[:64] if len(loc) == 1 and error["type"] == "extra_forbidden" else None


def flag(name: str) -> str:
    """The sentence for a true/false field."""
    return f"'{name}' must be true or false."


def check_total(message_chars: int, other_chars: int, policy: Policy) -> None:
    """CHATPROXY_MAX_TOTAL_CHARS holds for everything that becomes prompt: messages, tools and schemas."""
    if message_chars > policy.max_total_chars:
        raise problem(f"The conversation is too long: at most {policy.max_total_chars} characters in all.")
    if message_chars + other_chars > policy.max_total_chars:
        raise problem(
            f"The request is too long: its messages, tools and response_format (counted as JSON text) "
            f"come to {message_chars + other_chars} characters; at most {policy.max_total_chars} "
            f"in all."
        )


def json_chars(value: Any) -> int:
    """Characters of `value` as JSON text (what tools and schemas add to the prompt)."""
    return len(json.dumps(value, ensure_ascii=False))


class TokenCapped(Body):
    """A chat body: the output cap comes as `max_tokens` or `max_completion_tokens`, never both."""

    @field_validator("max_completion_tokens", check_fields=False)
    @classmethod
    def _one_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("max_tokens") is not None:
            raise problem("Send 'max_tokens' or 'max_completion_tokens', not both.")
        return value


class Untitled(GenerateJsonSchema):
    """JSON Schema without what pydantic derives and a reader does not need: titles from field names, and
    `"default": null` (an absent field means nothing else)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        """Never: a property's name is its title."""
        return False

    def default_schema(self, schema: Any) -> dict[str, Any]:
        """A field's schema with its default, unless that is null."""
        found = super().default_schema(schema)
        if "default" in found and found["default"] is None:
            del found["default"]
        return found
