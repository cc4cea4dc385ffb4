"""The /api/classify request: a text and, optionally, two or more of the configured labels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, StringConstraints, model_validator
from pydantic_core import ErrorDetails

from ..config import Settings
from .base import NOT_BLANK, Body, problem, unknown_field


class ClassifyBody(Body):
    """The validated request."""

    settings: ClassVar[Settings]
    if TYPE_CHECKING:  # the fields, declared with this app's labels in classify_model()
        text: str
        labels: list[str]

    @model_validator(mode="after")
    def _different(self) -> ClassifyBody:
        if len(set(self.labels)) != len(self.labels):
            raise problem(LABELS.format(", ".join(self.settings.classify_labels)))
        return self

    @classmethod
    def wording(cls, error: ErrorDetails, data: dict[str, Any], **hints: Any) -> str:
        """Our sentence for each field's errors."""
        settings, loc = cls.settings, error["loc"]
        if (name := unknown_field(error)) is not None:
            return f"Unknown field: {name!r}. Allowed fields: labels, text."
        if loc[:1] == ("labels",):
            return LABELS.format(", ".join(settings.classify_labels))
        if loc == ("text",) and error["type"] == "string_too_long":
            return f"'text' is too long: at most {settings.max_message_chars} characters."
        if loc == ("text",):
            return "'text' must be a non-empty string."
        return super().wording(error, data)


LABELS = "'labels' must be two or more different labels from: {}."


def classify_model(settings: Settings) -> type[ClassifyBody]:
    """The /api/classify request with this app's labels and caps."""
    app_settings = settings  # the class bodies below name their own `settings`
    allowed = tuple(settings.classify_labels)

    class ClassifyRequest(ClassifyBody):
        """POST /api/classify: a text and, optionally, two or more of the configured labels."""

        settings: ClassVar[Settings] = app_settings
        text: Annotated[str, StringConstraints(min_length=1, max_length=settings.max_message_chars, pattern=NOT_BLANK)]
        labels: Annotated[
            list[Literal[allowed]],  # type: ignore[valid-type]
            Field(min_length=2, max_length=len(allowed), json_schema_extra={"uniqueItems": True}),
        ] = Field(default_factory=lambda: list(allowed), description="Default: all of them.")

    return ClassifyRequest
