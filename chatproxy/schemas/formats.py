"""`response_format`, the same on /api/chat and /v1: plain text, JSON mode, or a named JSON Schema."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field
from pydantic_core import ErrorDetails

from .base import MAX_SCHEMA_DEPTH, Body, Name, SchemaObject, json_chars

JSON_NOTE = "Reply with a JSON object."  # OpenAI refuses JSON mode unless a message asks for JSON


class TextFormat(Body):
    """Plain text: the same as no response_format."""

    type: Literal["text"]


class JsonObjectFormat(Body):
    """JSON mode: any JSON object."""

    type: Literal["json_object"]


class JsonSchemaSpec(Body):
    """The schema the answer must follow."""

    name: Name
    schema_: SchemaObject = Field(alias="schema")
    strict: bool = None  # type: ignore[assignment]  # absent or a boolean, never null
    description: str = None  # type: ignore[assignment]


class JsonSchemaFormat(Body):
    """Structured output: the answer follows `json_schema.schema`."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat,
    Field(discriminator="type", description="Structured output: the JSON reply then carries `parsed`."),
]


def upstream_format(value: TextFormat | JsonObjectFormat | JsonSchemaFormat | None) -> dict[str, Any] | None:
    """What goes upstream: JSON mode or the schema as given (its fields as sent); nothing for plain text."""
    if value is None or isinstance(value, TextFormat):
        return None
    if isinstance(value, JsonObjectFormat):
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": value.json_schema.model_dump(by_alias=True, exclude_unset=True)}


def format_chars(format_: dict[str, Any] | None) -> int:
    """The characters a json_schema response_format adds to the prompt: the JSON text of its name, description
    and schema (OpenAI reads the schema as prompt)."""
    if format_ is None or format_["type"] != "json_schema":
        return 0
    return json_chars(format_["json_schema"])


def format_wording(loc: tuple[int | str, ...], kind: str) -> str:
    """The sentence for an error inside `response_format` (`loc` after it)."""
    match loc:
        case ("text", *_) | ("json_object", *_) if kind == "extra_forbidden":
            return f"'response_format' of type '{loc[0]}' takes no other field."
        case ("json_schema", "json_schema", "name"):
            return "'json_schema.name' must be 1-64 letters, digits, '_' or '-'."
        case ("json_schema", "json_schema", "schema", *_):
            return f"'json_schema.schema' must be a JSON Schema object nested at most {MAX_SCHEMA_DEPTH} deep."
        case ("json_schema", "json_schema", "strict"):
            return "'json_schema.strict' must be true or false."
        case ("json_schema", "json_schema", "description"):
            return "'json_schema.description' must be a string."
        case ("json_schema", "json_schema", _) if kind == "extra_forbidden":
            return "'json_schema' may only have name, schema, strict and description."
        case ("json_schema", *_):
            return "'response_format' of type 'json_schema' needs a 'json_schema' object."
    return '\'response_format\' must be {"type": "json_object"} or {"type": "json_schema", ...}.'


def wording_of(error: ErrorDetails) -> str | None:
    """`format_wording` for an error at response_format, else None."""
    loc = error["loc"]
    return format_wording(tuple(loc[1:]), error["type"]) if loc and loc[0] == "response_format" else None
