"""The /v1/chat/completions request: OpenAI's wire format, held to the same policy as /api/chat.

Messages are a union on `role`; their content parts (schemas/parts.py) a union on `type`: text, and images in
a user's turn.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, StringConstraints, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from .. import images
from ..callers import default_model
from ..dialects import CHAT
from ..pipeline import Call
from ..usage import estimate_prompt
from .base import (
    EFFORTS,
    MAX_TEMPERATURE,
    NOT_BLANK,
    Body,
    Effort,
    Name,
    Policy,
    SchemaObject,
    TokenCapped,
    check_total,
    flag,
    json_chars,
    problem,
    unknown_field,
)
from .formats import JSON_NOTE, ResponseFormat, format_chars, upstream_format, wording_of
from .parts import content_text, content_type, count_images, image_count, part_wording, user_content, wire

MAX_TOOLS = 64
MAX_TOOL_DESCRIPTION = 4096
MAX_ID = 256  # tool call ids
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_USER = 256
MAX_SAFETY_IDENTIFIER = 64  # OpenAI's limit
ROLES = ("system", "user", "assistant", "tool")
SAMPLING = {"temperature": (0.0, MAX_TEMPERATURE), "top_p": (0.0, 1.0)} | dict.fromkeys(
    ("presence_penalty", "frequency_penalty"), (-2.0, 2.0)
)
Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID, pattern=NOT_BLANK)]
StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class FunctionCall(Body):
    """The function an earlier assistant turn called."""

    name: Name
    arguments: str = Field(description="JSON text.")


class ToolCall(Body):
    """An assistant turn's earlier tool call, so the tool results that follow make sense upstream."""

    id: Id
    type: Literal["function"] = "function"
    function: FunctionCall

    def wire(self) -> dict[str, Any]:
        """The call as sent upstream."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.function.name, "arguments": self.function.arguments},
        }


class Turn(Body):
    """What every message has: a role and content, rebuilt field by field for upstream."""

    policy: ClassVar[Policy]
    if TYPE_CHECKING:  # the fields, declared per role in compat_model()
        role: str
        content: Any

    @model_validator(mode="after")
    def _within_caps(self) -> Turn:
        if self.chars > self.policy.max_message_chars:
            raise PydanticCustomError("message_too_long", "too long")
        return self

    def calls(self) -> list[ToolCall]:
        """Its earlier tool calls (assistant turns only)."""
        return []

    def refusal_of(self) -> str | None:
        """Its refusal (assistant turns only)."""
        return None

    def texts(self) -> list[str]:
        """The text of its content."""
        if self.content is None:
            return []
        return [content_text(self.content)]

    @cached_property
    def chars(self) -> int:
        """Its size in characters: content, tool call arguments and refusal."""
        arguments = sum(len(call.function.arguments) for call in self.calls())
        return sum(map(len, self.texts())) + arguments + len(self.refusal_of() or "")

    def wire(self) -> dict[str, Any]:
        """The message as sent upstream."""
        message: dict[str, Any] = {"role": self.role}
        message["content"] = wire(self.content)
        if "name" in self.model_fields_set:
            message["name"] = self.name
        if self.calls():
            message["tool_calls"] = [call.wire() for call in self.calls()]
        if self.refusal_of() is not None:
            message["refusal"] = self.refusal_of()
        if self.role == "tool":
            message["tool_call_id"] = self.tool_call_id
        return message

    def flat(self) -> dict[str, str]:
        """The message as plain text, for token estimates."""
        text = "".join(self.texts()) + "".join(call.function.name + call.function.arguments for call in self.calls())
        return {"role": self.role, "content": text}


class FunctionSpec(Body):
    """A function the model may call."""

    name: Name
    description: Annotated[str, StringConstraints(max_length=MAX_TOOL_DESCRIPTION)] = None  # type: ignore[assignment]
    parameters: SchemaObject = None  # type: ignore[assignment]
    strict: bool | None = None


class Tool(Body):
    """A function tool (its JSON counts in CHATPROXY_MAX_TOTAL_CHARS)."""

    type: Literal["function"]
    function: FunctionSpec

    def wire(self) -> dict[str, Any]:
        """The tool as sent upstream: its given fields (a null `strict` is false)."""
        spec = self.function.model_dump(include=self.function.model_fields_set, exclude={"strict"})
        if "strict" in self.function.model_fields_set:
            spec["strict"] = bool(self.function.strict)
        return {"type": "function", "function": spec}


class NamedFunction(Body):
    """The function a named tool choice forces."""

    name: str


class NamedToolChoice(Body):
    """Call this function."""

    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Body):
    """Streaming options."""

    include_usage: bool | None = None


class CompatBody(TokenCapped):
    """The validated request; `call()` is what the pipeline sends for any model of its chain."""

    policy: ClassVar[Policy]
    if TYPE_CHECKING:  # the fields, declared with this app's caps in compat_model()
        messages: list[Turn]
        model: str
        stream: bool | None
        stream_options: StreamOptions | None
        max_tokens: int | None
        max_completion_tokens: int | None
        seed: int | None
        stop: Any
        user: str | None
        safety_identifier: str | None
        tools: list[Tool] | None
        tool_choice: Any
        parallel_tool_calls: bool | None
        reasoning_effort: str | None
        response_format: Any

    @field_validator("stream_options", mode="before", check_fields=False)
    @classmethod
    def _only_streaming(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise problem("'stream_options' is only allowed with 'stream': true.")
        return value

    @field_validator("messages", check_fields=False)
    @classmethod
    def _ends_with_the_user(cls, messages: list[Turn]) -> list[Turn]:
        kept = cls.kept(messages)
        if not kept or kept[-1].role not in ("user", "tool"):
            raise problem("The last message must come from the user or a tool.")
        count_images([turn.content for turn in kept], cls.policy)
        return messages

    @field_validator("tools", check_fields=False)
    @classmethod
    def _unique(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in tools or ()]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise problem(f"tools[{index}].function.name must be 1-64 letters, digits, '_' or '-', and unique.")
        return tools

    @field_validator("tool_choice", "parallel_tool_calls", mode="before", check_fields=False)
    @classmethod
    def _with_tools(cls, value: Any, info: ValidationInfo) -> Any:
        if not info.data.get("tools"):
            raise problem("'tool_choice' and 'parallel_tool_calls' need 'tools'.")
        return value

    @field_validator("tool_choice", check_fields=False)
    @classmethod
    def _a_given_tool(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, NamedToolChoice) and value.function.name not in {
            tool.function.name for tool in info.data["tools"]
        }:
            raise problem(TOOL_CHOICE)
        return value

    @model_validator(mode="after")
    def _within_total(self) -> CompatBody:
        tools = self.upstream_tools
        other = (json_chars(tools) if tools else 0) + format_chars(upstream_format(self.response_format))
        check_total(sum(turn.chars for turn in self.turns()), other, self.policy)
        return self

    @classmethod
    def kept(cls, messages: list[Turn]) -> list[Turn]:
        """The client's turns that go upstream (its system messages are dropped in 'replace' mode)."""
        if cls.policy.compat_system_prompt != "replace":
            return list(messages)
        return [turn for turn in messages if turn.role != "system"]

    def turns(self) -> list[Turn]:
        """The client's turns that go upstream."""
        return self.kept(self.messages)

    @cached_property
    def upstream_tools(self) -> list[dict[str, Any]]:
        """The tools as sent upstream."""
        return [tool.wire() for tool in self.tools or ()]

    @property
    def include_usage(self) -> bool:
        """Whether the client asked for the final usage chunk (upstream is always asked for it)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def call(self) -> Call:
        """The Chat Completions call: our system prompt first; the cap, sampling and reasoning effort are sent per
        model, as each takes them; the other options as validated."""
        policy = self.policy
        messages = [turn.wire() for turn in self.turns()]
        options: dict[str, Any] = {}
        for name in ("seed", "stop", "user", "safety_identifier"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        tools = self.upstream_tools
        if tools:
            options["tools"] = tools
            if self.tool_choice is not None:
                choice = self.tool_choice
                options["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump()
            if "parallel_tool_calls" in self.model_fields_set:
                options["parallel_tool_calls"] = bool(self.parallel_tool_calls)
        response_format = upstream_format(self.response_format)
        if response_format is not None:
            options["response_format"] = response_format
        system = policy.system_prompt
        asks_json = "json" in (system + json.dumps([turn.flat() for turn in self.turns()])).lower()  # not base64
        if response_format == {"type": "json_object"} and not asks_json:
            system = f"{system}\n\n{JSON_NOTE}"  # OpenAI refuses JSON mode unless a message asks for JSON
        asked = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        estimate = [{"role": "system", "content": system}, *(turn.flat() for turn in self.turns())]
        if tools:  # tool definitions count as prompt tokens too
            estimate.append({"role": "system", "content": json.dumps(tools)})
        return Call(
            dialect=CHAT,
            model=self.model if "model" in self.model_fields_set else default_model(policy),
            body={"messages": [{"role": "system", "content": system}, *messages], **options},
            max_output=policy.max_tokens if asked is None else min(asked, policy.max_tokens),
            stream=bool(self.stream),
            prompt_estimate=estimate_prompt(estimate, response_format),
            sampling={name: getattr(self, name) for name in SAMPLING if getattr(self, name) is not None},
            reasoning_effort=self.reasoning_effort,
            images=images.pictures(messages),
            end_user=self.safety_identifier or self.user,
        )

    @classmethod
    def wording(cls, error: ErrorDetails, data: dict[str, Any], **hints: Any) -> str:
        """Our sentence for each field's errors."""
        policy, loc, kind = cls.policy, error["loc"], error["type"]
        if (name := unknown_field(error)) is not None:
            return f"Unknown or unsupported field: {name!r}. Supported: {', '.join(sorted(cls.model_fields))}."
        match loc:
            case ("messages",):
                if kind == "too_long":
                    return f"Too many messages: at most {policy.max_messages} per request."
                return "'messages' must be a non-empty list of message objects."
            case ("messages", int(index)):
                return f"messages[{index}].role must be one of: {', '.join(ROLES)}."
            case ("messages", int(index), str(role), *rest):
                return message_wording(f"messages[{index}]", role, rest, kind, error["msg"], policy)
            case ("model",):
                return f"Unknown model. Allowed models: {', '.join(policy.models)}."
            case ("max_tokens" | "max_completion_tokens" as name,):
                return f"'{name}' must be an integer of at least 1."
            case (str(name),) if name in SAMPLING:
                low, high = SAMPLING[name]
                return f"'{name}' must be a number from {low:g} to {high:g}."
            case ("n",):
                return "'n' must be 1: this proxy returns one choice."
            case ("seed",):
                return "'seed' must be a 64-bit integer."
            case ("stop", *_):
                return f"'stop' must be a string or a list of 1 to {MAX_STOP} strings."
            case ("user", *_):
                return f"'user' must be a non-empty string of at most {MAX_USER} characters."
            case ("safety_identifier", *_):
                return f"'safety_identifier' must be a non-empty string of at most {MAX_SAFETY_IDENTIFIER} characters."
            case ("stream",):
                return flag("stream")
            case ("stream_options", "include_usage"):
                return flag("stream_options.include_usage")
            case ("stream_options", *_):
                return "'stream_options' may only have 'include_usage'."
            case ("tools",):
                return f"'tools' must be a list of 1 to {MAX_TOOLS} function tools."
            case ("tools", int(index), "function", str(field), *_) if kind != "extra_forbidden":
                return tool_wording(f"tools[{index}]", field)
            case ("tools", int(index), "function", _) if kind == "extra_forbidden":
                return f"tools[{index}].function may only have name, description, parameters and strict."
            case ("tools", int(index), *_):
                return f'tools[{index}] must be {{"type": "function", "function": {{...}}}}.'
            case ("tool_choice", *_):
                return TOOL_CHOICE
            case ("parallel_tool_calls",):
                return flag("parallel_tool_calls")
            case ("reasoning_effort",):
                return f"'reasoning_effort' must be one of: {', '.join(EFFORTS)}."
        return wording_of(error) or super().wording(error, data)


TOOL_CHOICE = (
    "'tool_choice' must be 'none', 'auto', 'required' or "
    '{"type": "function", "function": {"name": <one of the tools>}}.'
)


def message_wording(where: str, role: str, rest: list[Any], kind: str, msg: str, policy: Policy) -> str:
    """The sentence for an error inside one message (`rest`: the path after its role)."""
    match rest:
        case [] if kind == "message_too_long":
            return f"{where} is too long: at most {policy.max_message_chars} characters."
        case [] if kind == "blank_content":
            return f"{where}.content must not be empty."
        case [] if kind == "no_content":
            return f"{where}.content must be a string or a non-empty list of text parts."
        case [field] if kind == "extra_forbidden":
            return f"{where} has an unsupported field for role {role!r}: {str(field)[:64]!r}."
        case ["content", "parts", *parts] if role == "user":
            return part_wording(f"{where}.content", parts, kind, msg, policy) or f"{where}.content is not valid."
        case ["content", "parts", int(), *_]:
            return (
                f'{where}.content parts must be {{"type": "text", "text": "..."}}; '
                "images only in user messages; audio and files are not accepted."
            )
        case ["content", "text"] if kind == "string_too_long":
            return f"{where} is too long: at most {policy.max_message_chars} characters."
        case ["content", "text"] if kind == "string_pattern_mismatch":
            return f"{where}.content must not be empty."
        case ["content", *_]:
            return f"{where}.content must be a string or a non-empty list of text parts."
        case ["name"]:
            return f"{where}.name must be 1-64 letters, digits, '_' or '-'."
        case ["tool_calls"]:
            return f"{where}.tool_calls must be a list of at most {MAX_TOOLS} tool calls."
        case ["tool_calls", int(number), *path]:
            at = f"{where}.tool_calls[{number}]"
            if path == ["function", "name"]:
                return f"{at}.function.name must be 1-64 letters, digits, '_' or '-'."
            if path == ["function", "arguments"]:
                return f"{at}.function.arguments must be a string (JSON text)."
            if path == ["id"]:
                return f"{at}.id must be a non-empty string of at most {MAX_ID} characters."
            return f'{at} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}.'
        case ["refusal"]:
            return f"{where}.refusal must be a string or null."
        case ["tool_call_id"]:
            return f"{where}.tool_call_id must be a non-empty string of at most {MAX_ID} characters."
    return f"{where} is not a valid {role} message."


def tool_wording(at: str, field: str) -> str:
    """The sentence for an error in one field of a tool's function."""
    if field == "description":
        return f"{at}.function.description must be a string of at most {MAX_TOOL_DESCRIPTION} characters."
    if field == "parameters":
        return f"{at}.function.parameters must be a JSON Schema object nested at most 32 deep."
    if field == "strict":
        return flag(f"{at}.function.strict")
    return f"{at}.function.name must be 1-64 letters, digits, '_' or '-', and unique."


def compat_model(policy: Policy) -> type[CompatBody]:
    """The /v1/chat/completions request with this app's allowlist and caps."""
    app_policy = policy  # the class bodies below name their own `policy`
    Text = Annotated[str, StringConstraints(max_length=policy.max_message_chars)]
    Content = content_type(Text)
    UserContent = user_content(
        Annotated[str, StringConstraints(max_length=policy.max_message_chars, pattern=NOT_BLANK)], policy
    )

    class Message(Turn):
        policy: ClassVar[Policy] = app_policy

    class SystemMessage(Message):
        """Kept or replaced by the server's, per CHATPROXY_COMPAT_SYSTEM_PROMPT."""

        role: Literal["system"]
        content: Content  # type: ignore[valid-type]
        name: Name = None  # type: ignore[assignment]

    class UserMessage(Message):
        """The user's turn."""

        role: Literal["user"]
        content: UserContent  # type: ignore[valid-type]
        name: Name = None  # type: ignore[assignment]

        @model_validator(mode="after")
        def _not_blank(self) -> UserMessage:
            if not "".join(self.texts()).strip() and not image_count(self.content):
                raise PydanticCustomError("blank_content", "empty")
            return self

    class AssistantMessage(Message):
        """An earlier answer: content, or tool calls, or both."""

        role: Literal["assistant"]
        content: Content | None = None  # type: ignore[valid-type]
        name: Name = None  # type: ignore[assignment]
        tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None
        refusal: str | None = None

        @model_validator(mode="after")
        def _says_something(self) -> AssistantMessage:
            if self.content is None and not self.tool_calls:
                raise PydanticCustomError("no_content", "no content")
            return self

        def calls(self) -> list[ToolCall]:
            """Its earlier tool calls."""
            return list(self.tool_calls or ())

        def refusal_of(self) -> str | None:
            """Its refusal."""
            return self.refusal

    class ToolMessage(Message):
        """A tool's result."""

        role: Literal["tool"]
        content: Content  # type: ignore[valid-type]
        tool_call_id: Id

    AnyMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]
    Tokens = Annotated[int | None, Field(ge=1, description=f"Clamped to the server cap, {policy.max_tokens}.")]

    def sampling(name: str) -> Any:
        low, high = SAMPLING[name]
        return Annotated[float | None, Field(ge=low, le=high)]

    class CompatRequest(CompatBody):
        """POST /v1/chat/completions: the Chat Completions body, held to the same caps and allowlist as /api/chat."""

        policy: ClassVar[Policy] = app_policy
        stream: bool | None = None
        stream_options: StreamOptions | None = Field(None, description="Only with `stream: true`.")
        n: Annotated[int | None, Field(ge=1, le=1)] = None
        model: Literal[tuple(policy.models)] = Field(  # type: ignore[valid-type]
            policy.default_model, description=f"Default: {policy.default_model}."
        )
        messages: Annotated[list[AnyMessage], Field(min_length=1, max_length=policy.max_messages)] = Field(
            description="The last message must come from the user or a tool."
        )
        max_tokens: Tokens = None
        max_completion_tokens: Tokens = None
        temperature: sampling("temperature") = None  # type: ignore[valid-type]
        top_p: sampling("top_p") = None  # type: ignore[valid-type]
        presence_penalty: sampling("presence_penalty") = None  # type: ignore[valid-type]
        frequency_penalty: sampling("frequency_penalty") = None  # type: ignore[valid-type]
        seed: Annotated[int | None, Field(ge=-(2**63), le=2**63 - 1)] = None
        stop: StopText | Annotated[list[StopText], Field(min_length=1, max_length=MAX_STOP)] | None = None
        user: Annotated[str, StringConstraints(min_length=1, max_length=MAX_USER, pattern=NOT_BLANK)] | None = None
        safety_identifier: (
            Annotated[str, StringConstraints(min_length=1, max_length=MAX_SAFETY_IDENTIFIER, pattern=NOT_BLANK)] | None
        ) = None
        reasoning_effort: Effort | None = None
        tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
        tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
            None, description="Only with `tools`."
        )
        parallel_tool_calls: bool | None = Field(None, description="Only with `tools`.")
        response_format: ResponseFormat | None = None

    return CompatRequest
