"""The /v1/responses request as a typed model (pydantic, unknown fields refused), held to the /v1 chat policy.

The model checks shapes; `parse_responses_request` adds what depends on the settings and the model table
(allowlist, caps, hosted tools, images, reasoning, store) and builds the body sent upstream. Faults that
/v1/chat/completions also has get the same sentences (schemas/compat.py). `OpenAIBody` is the base of the
OpenAI-shaped bodies whose errors are worded from their path (this one and /v1/embeddings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag
from pydantic_core import ErrorDetails

from .. import images
from ..callers import default_model
from ..config import Settings
from ..errors import invalid
from ..models import ModelTable
from ..usage import estimate_prompt
from .base import (
    EFFORTS,
    MAX_SCHEMA_DEPTH,
    MAX_TEMPERATURE,
    NAME_PATTERN,
    Body,
    Policy,
    check_total,
    documented,
    too_deep,
)
from .compat import MAX_SAFETY_IDENTIFIER, MAX_TOOL_DESCRIPTION, MAX_TOOLS, MAX_USER
from .formats import JSON_NOTE

MIN_OUTPUT_TOKENS = 16  # the Responses API refuses a smaller max_output_tokens
MAX_ID = 256
MAX_METADATA = 16
MAX_METADATA_CHARS = 512
MAX_ANNOTATIONS = 256  # an earlier answer's citations (hosted web search), sent back with it
HOSTED_TOOL_CHARS = 8_192  # a hosted tool's settings (JSON), e.g. an MCP server's allowed tools


class OpenAIBody(Body):
    """An OpenAI-shaped body: its most specific error is named, worded from its path (`prefix`: where it sits)."""

    @classmethod
    def pick(cls, errors: list[ErrorDetails]) -> ErrorDetails:
        """A union (input: a string or a list) reports each branch; the deepest error is about the one meant."""
        return max(errors, key=lambda error: len(error["loc"]))

    @classmethod
    def wording(cls, error: ErrorDetails, data: dict[str, Any], prefix: str = "", **hints: Any) -> str:
        """The error as one sentence, in the /v1 chat wording where the fault is the same."""
        path = _path(error["loc"], prefix)
        kind = error["type"]
        if kind == "extra_forbidden":
            if not prefix and len(error["loc"]) == 1:
                supported = ", ".join(cls.model_fields)
                return f"Unknown or unsupported field: {str(error['loc'][0])[:64]!r}. Supported: {supported}."
            return f"{path} is not a supported field."
        if path in SENTENCES:
            return SENTENCES[path]
        if kind == "union_tag_invalid":
            tags = str((error.get("ctx") or {}).get("expected_tags") or ", ".join(ITEM_TYPES)).replace("'", "")
            return f"{path}.type must be one of: {tags}."
        if kind == "missing":
            return f"{path} is required."
        if kind in ("bool_type", "bool_parsing"):
            return f"{path} must be true or false."
        message = str(error["msg"]).removeprefix("Value error, ")
        return f"{path}: {message[0].lower()}{message[1:]}." if message else f"{path} is not valid."


class InputText(OpenAIBody):
    type: Literal["input_text"]
    text: str


class InputImage(OpenAIBody):
    type: Literal["input_image"]
    image_url: str = Field(
        description="A base64 data URL (data:image/png;base64,...) of a PNG, JPEG, WebP or GIF image, within the "
        "image caps of /v1/chat/completions; remote URLs are refused."
    )
    detail: Literal[images.DETAILS] = "auto"  # type: ignore[valid-type]


class OutputText(OpenAIBody):
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_ANNOTATIONS)
    logprobs: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_ANNOTATIONS)


class Refusal(OpenAIBody):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[InputText | InputImage | OutputText | Refusal, Field(discriminator="type")]


class InputMessage(OpenAIBody):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[Part], Field(min_length=1)]
    id: str | None = Field(default=None, max_length=MAX_ID)
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: str | None = Field(default=None, max_length=64)


class FunctionCallItem(OpenAIBody):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=MAX_ID)
    name: str = Field(pattern=NAME_PATTERN)
    arguments: str
    id: str | None = Field(default=None, max_length=MAX_ID)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutput(OpenAIBody):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=MAX_ID)
    output: str
    id: str | None = Field(default=None, max_length=MAX_ID)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class SummaryText(OpenAIBody):
    type: Literal["summary_text"]
    text: str


class ReasoningItem(OpenAIBody):
    type: Literal["reasoning"]
    id: str = Field(max_length=MAX_ID)
    summary: list[SummaryText] = Field(default_factory=list)
    encrypted_content: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


TOOL_CHOICE = (
    "'tool_choice' must be 'none', 'auto', 'required', "
    '{"type": "function", "name": <one of the tools>} or {"type": <one of the hosted tools offered>}.'
)
# Fields sent upstream as the client gave them (once checked).
PASSED_ON = (
    "parallel_tool_calls",
    "previous_response_id",
    "metadata",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "truncation",
)
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


def _item_type(value: Any) -> str | None:
    """An input item's type; a message may leave it out (the SDK's EasyInputMessage)."""
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", None)


Item = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutput, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class Reasoning(OpenAIBody):
    effort: Literal[EFFORTS] | None = None  # type: ignore[valid-type]
    summary: Literal["auto", "concise", "detailed"] | None = None


class TextJsonSchema(OpenAIBody):
    type: Literal["json_schema"]
    name: str = Field(pattern=NAME_PATTERN)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextPlainFormat(OpenAIBody):
    type: Literal["text", "json_object"]


class TextOptions(OpenAIBody):
    format: Annotated[TextJsonSchema | TextPlainFormat, Field(discriminator="type")] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class FunctionTool(OpenAIBody):
    type: Literal["function"]
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(default=None, max_length=MAX_TOOL_DESCRIPTION)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(OpenAIBody):
    type: Literal["function"]
    name: str


class ToolChoiceHosted(OpenAIBody):
    type: str = Field(max_length=64)


MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=MAX_METADATA_CHARS)]


class ResponsesBody(OpenAIBody):
    """POST /v1/responses: the fields this proxy takes (a subset of OpenAI's; any other is a 400)."""

    model: str | None = None
    input: str | list[Item]
    instructions: str | None = None
    max_output_tokens: Annotated[int, documented(minimum=MIN_OUTPUT_TOKENS)] | None = None
    temperature: float | None = Field(default=None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, ge=0, le=1)
    reasoning: Reasoning | None = None
    text: TextOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | ToolChoiceHosted | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID)
    store: bool | None = None
    stream: bool | None = None
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=MAX_METADATA)
    user: str | None = Field(default=None, max_length=MAX_USER)
    safety_identifier: str | None = Field(default=None, max_length=MAX_SAFETY_IDENTIFIER)
    prompt_cache_key: str | None = Field(default=None, max_length=MAX_USER)
    truncation: Literal["auto", "disabled"] | None = None


def responses_model(policy: Policy) -> type[ResponsesBody]:
    """The /v1/responses body with this app's allowlist and caps in its schema (`parse_responses_request` checks
    them, in the /v1 chat wording)."""

    class ResponsesRequestBody(ResponsesBody):
        __doc__ = ResponsesBody.__doc__
        model: Annotated[
            str | None, documented(enum=[*policy.models, None], description=f"Default: {policy.default_model}.")
        ] = None
        input: (
            Annotated[str, documented(maxLength=policy.max_message_chars)]
            | Annotated[list[Item], documented(minItems=1, maxItems=policy.max_messages)]
        )

    return ResponsesRequestBody


@dataclass(frozen=True)
class ResponsesRequest:
    """A validated /v1/responses request, ready to send upstream for any model of its chain."""

    model: str
    stream: bool
    store: bool
    body: dict[str, Any]  # input (our instructions first), tools, text format...: the same for every model
    max_output: int
    sampling: dict[str, float]
    effort: str | None
    summary: str | None
    images: tuple[images.Picture, ...]
    prompt_estimate: int  # the text's, without what a previous response adds (the adapter adds it once it is known)
    previous_response_id: str | None
    client_instructions: str | None  # what the client sees as the response's `instructions` (ours stay private)
    end_user: str | None  # safety_identifier or user as sent (the ledger's end_user)


def parse_responses_request(raw: dict[str, Any], settings: Settings, table: ModelTable) -> ResponsesRequest:
    """Validate a Responses body against the allowlist, the caps, the system-prompt policy and the settings."""
    from . import request_models  # the package imports this module

    req = request_models(settings).responses.parse(raw)
    model = req.model if req.model is not None else default_model(settings)
    if model not in settings.models:
        raise invalid(f"Unknown model. Allowed models: {', '.join(settings.models)}.")
    spec = table.spec(model)
    if req.store and not settings.responses_store:
        raise invalid("'store' must be false: this proxy does not keep responses upstream.")
    max_output = req.max_output_tokens if req.max_output_tokens is not None else settings.max_tokens
    if max_output < MIN_OUTPUT_TOKENS:
        raise invalid(f"'max_output_tokens' must be an integer of at least {MIN_OUTPUT_TOKENS}.")
    reasoning = req.reasoning or Reasoning()
    if (reasoning.effort is not None or reasoning.summary is not None) and not spec.reasons:
        raise invalid(f"{model} does not reason: 'reasoning' is not accepted for it.")
    if reasoning.effort is not None and not spec.takes_effort(reasoning.effort):
        raise invalid(f"'reasoning.effort' for {model} must be one of: {', '.join(spec.reasoning_efforts)}.")
    items, chars, pictures = _input(req, settings)
    tools, tool_chars = _tools(req.tools, settings)
    body: dict[str, Any] = {"input": items}
    if tools:
        body["tools"] = tools
    elif req.tool_choice is not None or req.parallel_tool_calls is not None:
        raise invalid("'tool_choice' and 'parallel_tool_calls' need 'tools'.")
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice, tools)
    text = req.text.model_dump(by_alias=True, exclude_none=True) if req.text is not None else None
    format_ = (text or {}).get("format")
    if format_ and format_["type"] == "json_schema" and too_deep(format_["schema"]):
        raise invalid(f"'text.format.schema' must be a JSON Schema object nested at most {MAX_SCHEMA_DEPTH} deep.")
    format_chars = len(json.dumps(format_, ensure_ascii=False)) if format_ else 0
    check_total(chars, tool_chars + format_chars, settings)
    if text:
        body["text"] = text
    instructions = settings.system_prompt
    asks_json = "json" in (instructions + json.dumps(_as_text(items))).lower()  # not in an image's base64
    if format_ and format_["type"] == "json_object" and not asks_json:
        instructions = f"{instructions}\n\n{JSON_NOTE}"  # OpenAI refuses JSON mode unless the input asks for JSON
    body["instructions"] = instructions
    body["store"] = bool(req.store)
    body.update(req.model_dump(include=set(PASSED_ON), exclude_none=True))
    estimate = estimate_prompt(
        [{"role": "system", "content": instructions}, *_as_text(items), *_tools_text(tools)], format_
    )
    return ResponsesRequest(
        model=model,
        stream=bool(req.stream),
        store=bool(req.store),
        body=body,
        max_output=min(max_output, settings.max_tokens),
        sampling={name: getattr(req, name) for name in ("temperature", "top_p") if getattr(req, name) is not None},
        effort=reasoning.effort,
        summary=reasoning.summary,
        images=pictures,
        prompt_estimate=estimate,
        previous_response_id=req.previous_response_id,
        client_instructions=req.instructions,
        end_user=req.safety_identifier or req.user,
    )


def _input(req: ResponsesBody, settings: Settings) -> tuple[list[dict[str, Any]], int, tuple[images.Picture, ...]]:
    """The input items to send (the client's instructions first in 'prepend' mode), their characters, their images
    (checked as /v1 chat's image parts are, within the same caps)."""
    given: list[Any] = [InputMessage(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    if not given:
        raise invalid("'input' must be a non-empty string or a non-empty list of input items.")
    if len(given) > settings.max_messages:
        raise invalid(f"Too many input items: at most {settings.max_messages} per request.")
    replace = settings.compat_system_prompt == "replace"
    items: list[dict[str, Any]] = []
    if req.instructions is not None and not replace:
        _check_length(len(req.instructions), "'instructions'", settings)
        items.append({"type": "message", "role": "system", "content": req.instructions})
    total = len(req.instructions or "") if not replace else 0
    seen: list[dict[str, Any]] = []  # the image parts sent, as chat image parts
    for index, item in enumerate(given):
        where = f"input[{index}]"
        chars = len(_text_of(item))
        _check_length(chars, where, settings)
        if isinstance(item, InputMessage) and item.role in ("system", "developer") and replace:
            continue  # the server's instructions replace the client's
        dumped = item.model_dump(exclude_none=True)
        parts = _images(item, dumped, where, settings)
        if isinstance(item, InputMessage) and item.role == "user" and not _text_of(item).strip() and not parts:
            raise invalid(f"{where}.content must not be empty.")
        total += chars
        seen += parts
        items.append(dumped)
    if len(seen) > settings.max_images:
        raise invalid(f"Too many images: at most {settings.max_images} per request.")
    last = given[-1]
    if not (isinstance(last, InputMessage) and last.role == "user") and not isinstance(last, FunctionCallOutput):
        raise invalid("The last input item must be a user message or a function_call_output.")
    return items, total, images.pictures([{"content": seen}])


def _images(item: Any, dumped: dict[str, Any], where: str, settings: Settings) -> list[dict[str, Any]]:
    """A message's input images, checked by images.py (their data URLs as sent written into `dumped`), as chat
    image parts; only a user's message may carry them, at most CHATPROXY_MAX_IMAGES_PER_MESSAGE."""
    if not isinstance(item, InputMessage) or isinstance(item.content, str):
        return []
    found = [(index, part) for index, part in enumerate(item.content) if isinstance(part, InputImage)]
    if found and item.role != "user":
        raise invalid(f"{where}: only user messages may carry images.")
    if len(found) > settings.max_images_per_message:
        raise invalid(f"{where}.content has too many images: at most {settings.max_images_per_message} per message.")
    parts = []
    for index, part in found:
        url = images.check(part.image_url, f"{where}.content[{index}].image_url", settings)
        dumped["content"][index]["image_url"] = url
        parts.append({"type": "image_url", "image_url": {"url": url, "detail": part.detail}})
    return parts


def _text_of(item: Any) -> str:
    """An input item's text, for size checks and token estimates."""
    if isinstance(item, InputMessage):
        if isinstance(item.content, str):
            return item.content
        return "".join(getattr(part, "text", None) or getattr(part, "refusal", "") for part in item.content)
    if isinstance(item, FunctionCallItem):
        return item.name + item.arguments
    if isinstance(item, FunctionCallOutput):
        return item.output
    return "".join(part.text for part in item.summary) + (item.encrypted_content or "")


def _as_text(items: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Input items as plain-text messages, for the prompt estimate."""
    out = []
    for item in items:
        content = item.get("content")
        if isinstance(content, list):
            content = "".join(str(part.get("text") or part.get("refusal") or "") for part in content)
        text = content if isinstance(content, str) else json.dumps(item, ensure_ascii=False)
        out.append({"role": str(item.get("role", "tool")), "content": text})
    return out


def _tools(raw: list[dict[str, Any]] | None, settings: Settings) -> tuple[list[dict[str, Any]], int]:
    """Function tools (checked) and allowlisted hosted tools (passed on), and the characters they add."""
    if raw is None:
        return [], 0
    if not 1 <= len(raw) <= MAX_TOOLS:
        raise invalid(f"'tools' must be a list of 1 to {MAX_TOOLS} tools.")
    tools, names = [], set()
    for index, tool in enumerate(raw):
        kind = tool.get("type")
        if kind == "function":
            checked = FunctionTool.parse(tool, prefix=f"tools[{index}]")
            if checked.name in names:
                raise invalid(f"tools[{index}].name must be 1-64 letters, digits, '_' or '-', and unique.")
            if checked.parameters is not None and too_deep(checked.parameters):
                raise invalid(
                    f"tools[{index}].parameters must be a JSON Schema object nested at most {MAX_SCHEMA_DEPTH} deep."
                )
            names.add(checked.name)
            tools.append(checked.model_dump(exclude_none=True))
        elif isinstance(kind, str) and kind in settings.responses_hosted_tools:
            if too_deep(tool) or len(json.dumps(tool, ensure_ascii=False)) > HOSTED_TOOL_CHARS:
                raise invalid(f"tools[{index}] is too large: at most {HOSTED_TOOL_CHARS} characters of JSON.")
            tools.append(tool)
        elif isinstance(kind, str) and kind:
            allowed = ", ".join(settings.responses_hosted_tools) or "none"
            raise invalid(
                f"tools[{index}]: the hosted tool {kind[:64]!r} is not allowed on this proxy "
                f"(allowed hosted tools: {allowed}). Function tools are."
            )
        else:
            raise invalid(f'tools[{index}] must be {{"type": "function", "name": ..., "parameters": {{...}}}}.')
    return tools, (len(json.dumps(tools, ensure_ascii=False)) if tools else 0)


def _tool_choice(choice: str | ToolChoiceFunction | ToolChoiceHosted, tools: list[dict[str, Any]]) -> Any:
    """`tool_choice` as sent: a mode, or one of the tools offered (by name for functions, by type if hosted)."""
    if isinstance(choice, str):
        return choice
    if isinstance(choice, ToolChoiceFunction):
        offered = {tool.get("name") for tool in tools}
        named = choice.name
    else:
        offered = {tool["type"] for tool in tools if tool["type"] != "function"}
        named = choice.type
    if named not in offered:
        raise invalid(TOOL_CHOICE)
    return choice.model_dump()


def _tools_text(tools: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Tool definitions count as prompt tokens too."""
    return [{"role": "system", "content": json.dumps(tools)}] if tools else []


def _check_length(chars: int, where: str, settings: Settings) -> None:
    if chars > settings.max_message_chars:
        raise invalid(f"{where} is too long: at most {settings.max_message_chars} characters.")


SENTENCES = {
    "'input'": "'input' must be a non-empty string or a non-empty list of input items.",
    "'max_output_tokens'": f"'max_output_tokens' must be an integer of at least {MIN_OUTPUT_TOKENS}.",
    "'temperature'": f"'temperature' must be a number from 0 to {MAX_TEMPERATURE:g}.",
    "'top_p'": "'top_p' must be a number from 0 to 1.",
    "'tools'": f"'tools' must be a list of 1 to {MAX_TOOLS} tools.",
}
TAGS = frozenset({*ITEM_TYPES, "input_text", "input_image", "output_text", "refusal", "json_schema", "json_object"})


def _path(loc: tuple[Any, ...], prefix: str) -> str:
    """A location like input[2].content[0].text, without pydantic's names of union branches."""
    text, previous = prefix, None
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif (
            part in TAGS
            or "[" in part
            or part[:1].isupper()
            or part == "str"
            or (part == "text" and previous == "format")
        ):
            pass
        else:
            text += f".{part[:64]}" if text else part[:64]  # a client's unknown key may be of any length
        previous = part
    return text if "." in text or "[" in text else f"'{text}'"
