"""The /api/classify request: a text and, optionally, two or more of the configured labels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, StringConstraints, model_validator
from pydantic_core import ErrorDetails

from .base import NOT_BLANK, Body, Policy, problem, unknown_field


class ClassifyBody(Body):
    """The validated request."""

    policy: ClassVar[Policy]
    if TYPE_CHECKING:  # the fields, declared with this app's labels in classify_model()
        text: str
        labels: list[str]

    @model_validator(mode="after")
    def _different(self) -> ClassifyBody:
        if len(set(self.labels)) != len(self.labels):
            raise problem(LABELS.format(", ".join(self.policy.classify_labels)))
        return self

    @classmethod
    def wording(cls, error: ErrorDetails, data: dict[str, Any], **hints: Any) -> str:
        """Our sentence for each field's errors."""
        policy, loc = cls.policy, error["loc"]
        if (name := unknown_field(error)) is not None:
            return f"Unknown field: {name!r}. Allowed fields: labels, text."
        if loc[:1] == ("labels",):
            return LABELS.format(", ".join(policy.classify_labels))
        if loc == ("text",) and error["type"] == "string_too_long":
            return f"'text' is too long: at most {policy.max_message_chars} characters."
        if loc == ("text",):
            return "'text' must be a non-empty string."
        return super().wording(error, data)


LABELS = "'labels' must be two or more different labels from: {}."


def classify_model(policy: Policy) -> type[ClassifyBody]:
    """The /api/classify request with this app's labels and caps."""
    app_policy = policy  # the class bodies below name their own `policy`
    allowed = tuple(policy.classify_labels)

    class ClassifyRequest(ClassifyBody):
        """POST /api/classify: a text and, optionally, two or more of the configured labels."""

        policy: ClassVar[Policy] = app_policy
        text: Annotated[str, StringConstraints(min_length=1, max_length=policy.max_message_chars, pattern=NOT_BLANK)]
        labels: Annotated[
            list[Literal[allowed]],  # type: ignore[valid-type]
            Field(min_length=2, max_length=len(allowed), json_schema_extra={"uniqueItems": True}),
        ] = Field(default_factory=lambda: list(allowed), description="Default: all of them.")

    return ClassifyRequest
