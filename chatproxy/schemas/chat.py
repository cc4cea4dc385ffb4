"""The /api/chat request (and a batch line, the same without `stream`): `message` or `messages`, and options."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, StringConstraints, ValidationInfo, field_validator, model_validator
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
    SHAPE,
    Body,
    Effort,
    Policy,
    TokenCapped,
    check_total,
    flag,
    problem,
    unknown_field,
)
from .formats import JSON_NOTE, ResponseFormat, format_chars, upstream_format, wording_of
from .parts import content_text, count_images, image_count, part_wording, user_content, wire

CLIENT_ROLES = ("user", "assistant")
TOO_LONG = "turn_too_long"  # a turn's text parts together
NOT_TEXT = "{where} must be a non-empty string (or, from the user, a list of text and image parts)."
CUSTOM_ID = r"^(?=.*\S)[^\x00-\x1f\x7f]{1,64}(?!\n)$"  # printable, not blank; (?!\n): Python's $ allows one


class ChatBody(TokenCapped):
    """What /api/chat bodies and batch lines share: the conversation, checked against the caps, and the Call."""

    policy: ClassVar[Policy]
    if TYPE_CHECKING:  # the fields, declared with this app's caps in chat_models()
        message: str | list[Any] | None
        messages: list[Any] | None
        model: str | None
        max_tokens: int | None
        max_completion_tokens: int | None
        temperature: float | None
        reasoning_effort: str | None
        response_format: Any

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, data: Any) -> Any:
        unknown = isinstance(data, dict) and not set(data) <= set(cls.model_fields)  # named first, by extra=forbid
        if isinstance(data, dict) and not unknown and ("message" in data) == ("messages" in data):
            raise problem("Send either 'message' (a string) or 'messages' (a list), not both or neither.")
        return data

    @field_validator("messages", check_fields=False)
    @classmethod
    def _ends_with_the_user(cls, messages: list[Any]) -> list[Any]:
        if messages[-1].role != "user":
            raise problem("The last message must come from the user.")
        count_images([turn.content for turn in messages], cls.policy)
        return messages

    @field_validator("message", check_fields=False)
    @classmethod
    def _one_turn(cls, message: str | list[Any]) -> str | list[Any]:
        check_turn(message, cls.policy)
        count_images([message], cls.policy)
        return message

    @field_validator("response_format", check_fields=False)
    @classmethod
    def _within_total(cls, value: Any, info: ValidationInfo) -> Any:
        turns = (
            [info.data["message"]] if info.data.get("message") else [t.content for t in info.data.get("messages") or ()]
        )
        check_total(sum(len(content_text(turn)) for turn in turns), format_chars(upstream_format(value)), cls.policy)
        return value

    def turns(self) -> list[dict[str, Any]]:
        """The client's turns as Chat Completions messages."""
        if self.message is not None:
            return [{"role": "user", "content": wire(self.message)}]
        return [{"role": turn.role, "content": wire(turn.content)} for turn in self.messages]

    def call(self) -> Call:
        """The Chat Completions call: our system prompt first, then the client's turns."""
        policy = self.policy
        system = policy.system_prompt
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}, *self.turns()]
        body: dict[str, Any] = {"messages": messages}
        response_format = upstream_format(self.response_format)
        if response_format is not None:
            body["response_format"] = response_format
            asks_json = any("json" in images.text_of(m["content"]).lower() for m in messages)
            if response_format["type"] == "json_object" and not asks_json:
                # OpenAI refuses JSON mode unless a message asks for JSON; say it in our system message.
                messages[0] = {"role": "system", "content": f"{system}\n\n{JSON_NOTE}"}
        asked = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        return Call(
            dialect=CHAT,
            model=self.model or default_model(policy),
            body=body,
            max_output=policy.max_tokens if asked is None else min(asked, policy.max_tokens),
            stream=bool(getattr(self, "stream", False)),
            prompt_estimate=estimate_prompt(messages, response_format),
            sampling={} if self.temperature is None else {"temperature": float(self.temperature)},
            reasoning_effort=self.reasoning_effort,
            images=images.pictures(messages),
        )

    @classmethod
    def wording(cls, error: ErrorDetails, data: dict[str, Any], **hints: Any) -> str:
        """Our sentence for each field's errors."""
        policy, loc, kind = cls.policy, error["loc"], error["type"]
        if (name := unknown_field(error)) is not None:
            return f"Unknown field: {name!r}. Allowed fields: {', '.join(sorted(cls.model_fields))}."
        match loc:
            case ("message", "parts", *parts):
                return part_wording("message", parts, kind, error["msg"], policy) or NOT_TEXT.format(where="'message'")
            case ("message", *_):
                if kind in ("string_too_long", TOO_LONG):
                    return f"'message' is too long: at most {policy.max_message_chars} characters."
                return NOT_TEXT.format(where="'message'")
            case ("messages",):
                if kind == "too_long":
                    return f"Too many messages: at most {policy.max_messages} per request."
                return "'messages' must be a non-empty list of {role, content} objects."
            case ("messages", int(index), "content", "parts", *parts):
                where = f"messages[{index}].content"
                return part_wording(where, parts, kind, error["msg"], policy) or NOT_TEXT.format(where=where)
            case ("messages", int(index), *rest):
                where = f"messages[{index}]"
                if kind in SHAPE:
                    return f"{where} must be an object with exactly 'role' and 'content'."
                if rest == ["role"]:
                    return f"{where}: role must be 'user' or 'assistant'; the server sets the system prompt."
                if kind in ("string_too_long", TOO_LONG):
                    return f"{where} is too long: at most {policy.max_message_chars} characters."
                return NOT_TEXT.format(where=f"{where}.content")
            case ("model",):
                return f"Unknown model. Allowed models: {', '.join(policy.models)}."
            case ("max_tokens" | "max_completion_tokens" as name,):
                return (
                    f"'{name}' must be at least 1." if kind == "greater_than_equal" else f"'{name}' must be an integer."
                )
            case ("temperature",):
                if kind == "float_type":
                    return "'temperature' must be a number."
                return f"'temperature' must be between 0 and {MAX_TEMPERATURE:g}."
            case ("stream",):
                return flag("stream")
            case ("reasoning_effort",):
                return f"'reasoning_effort' must be one of: {', '.join(EFFORTS)}."
        return wording_of(error) or super().wording(error, data)


def check_turn(content: str | list[Any], policy: Policy) -> None:
    """A turn's parts hold some text or an image, and their text is within the message cap."""
    if isinstance(content, str):
        return
    text = content_text(content)
    if len(text) > policy.max_message_chars:
        raise PydanticCustomError(TOO_LONG, "too long")
    if not text.strip() and not image_count(content):
        raise PydanticCustomError("blank_parts", "no text or image")


def chat_models(policy: Policy) -> tuple[type[ChatBody], type[ChatBody]]:
    """The /api/chat request and the batch line, with this app's allowlist and caps."""
    app_policy = policy  # the class bodies below name their own `policy`
    Text = Annotated[str, StringConstraints(min_length=1, max_length=policy.max_message_chars, pattern=NOT_BLANK)]

    Content = user_content(Text, policy)

    class ChatTurn(Body):
        """One turn of the conversation: text, or from the user text and image parts."""

        role: Literal[CLIENT_ROLES]  # type: ignore[valid-type]
        content: Content  # type: ignore[valid-type]

        @model_validator(mode="after")
        def _a_turn(self) -> ChatTurn:
            if isinstance(self.content, list) and self.role != "user":
                raise PydanticCustomError("parts_not_from_user", "only the user's turns have parts")
            check_turn(self.content, app_policy)
            return self

    Tokens = Annotated[int | None, Field(ge=1, description=f"Clamped to the server cap, {policy.max_tokens}.")]

    class ChatFields(ChatBody):
        policy: ClassVar[Policy] = app_policy
        message: Content = Field(None, description="The simple form: one user message.")  # type: ignore[valid-type]
        messages: Annotated[list[ChatTurn], Field(min_length=1, max_length=policy.max_messages)] = Field(
            None,
            description=f"The conversation, ending with a user turn; at most {policy.max_total_chars} "
            "characters in all.",
        )
        response_format: ResponseFormat | None = Field(None, validate_default=True)  # the total is checked there
        model: Literal[(*policy.models, None)] = Field(  # type: ignore[valid-type]
            None, description=f"Default: {policy.default_model}."
        )
        max_tokens: Tokens = None
        max_completion_tokens: Tokens = None
        temperature: Annotated[float | None, Field(ge=0, le=MAX_TEMPERATURE)] = None
        reasoning_effort: Effort | None = None

    class ChatRequest(ChatFields):
        """POST /api/chat: `message` or `messages`, options; any other field is refused."""

        model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["message"]}, {"required": ["messages"]}]})
        stream: bool | None = Field(None, description="true: answer as text/event-stream.")

    class BatchLine(ChatFields):
        """One request of a batch: a chat body without `stream`, named by a custom id unique in the batch."""

        model_config = ChatRequest.model_config
        first: ClassVar[tuple[str, ...]] = ("custom_id",)
        custom_id: Annotated[str, StringConstraints(pattern=CUSTOM_ID)] = Field(
            description="Unique within the batch; names the line's result."
        )

    return ChatRequest, BatchLine
