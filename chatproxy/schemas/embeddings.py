"""The /v1/embeddings request: text inputs only (token arrays are not taken); the caps are checked by the adapter."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import NOT_BLANK, Policy, documented
from .compat import MAX_USER
from .responses import OpenAIBody

MAX_DIMENSIONS = 3072


class EmbeddingsBody(OpenAIBody):
    """POST /v1/embeddings: text inputs only (token arrays are not taken)."""

    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, le=MAX_DIMENSIONS)
    user: str | None = Field(default=None, max_length=MAX_USER)


def embeddings_model(policy: Policy) -> type[EmbeddingsBody]:
    """The /v1/embeddings body with this app's embedding allowlist and input caps in its schema (the adapter checks
    them, in its words)."""
    text = Annotated[str, documented(minLength=1, maxLength=policy.max_message_chars, pattern=NOT_BLANK)]

    class EmbeddingsRequestBody(EmbeddingsBody):
        __doc__ = EmbeddingsBody.__doc__
        model: Annotated[str | None, documented(enum=[*policy.embedding_models, None])] = None
        input: text | Annotated[list[text], documented(minItems=1, maxItems=policy.embedding_max_inputs)]

    return EmbeddingsRequestBody
