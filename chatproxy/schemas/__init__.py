"""The request models, one per wire format: the single source of validation and of the OpenAPI request bodies.

They are built from an app's settings (the allowlist and caps are constraints of the models, hence in the
OpenAPI document too) by `request_models`, once in create_app, and kept in the app's state. Building them
takes tens of milliseconds: apps with the same Policy (most of a test run's) share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..config import Settings
from .base import Body, Policy
from .batch import BatchBody, batch_model
from .chat import ChatBody, chat_models
from .classify import ClassifyBody, classify_model
from .compat import CompatBody, compat_model
from .embeddings import EmbeddingsBody, embeddings_model
from .responses import ResponsesBody, responses_model

__all__ = ["Body", "RequestModels", "request_models"]


@dataclass(frozen=True)
class RequestModels:
    """An app's request models."""

    chat: type[ChatBody]  # POST /api/chat
    batch_line: type[ChatBody]  # one request of a batch
    batch: type[BatchBody]  # POST /api/batches
    compat: type[CompatBody]  # POST /v1/chat/completions
    classify: type[ClassifyBody]  # POST /api/classify
    responses: type[ResponsesBody]  # POST /v1/responses
    embeddings: type[EmbeddingsBody]  # POST /v1/embeddings


def request_models(settings: Settings) -> RequestModels:
    """The request models of an app with `settings`."""
    return _built(Policy.of(settings))


@lru_cache(maxsize=16)
def _built(policy: Policy) -> RequestModels:
    chat, line = chat_models(policy)
    return RequestModels(
        chat=chat,
        batch_line=line,
        batch=batch_model(policy, line),
        compat=compat_model(policy),
        classify=classify_model(policy),
        responses=responses_model(policy),
        embeddings=embeddings_model(policy),
    )
