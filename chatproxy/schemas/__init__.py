"""The request models, one per wire format: the single source of validation and of the OpenAPI request bodies.

They are built per app from its settings (the allowlist and caps are constraints of the models, hence in the
OpenAPI document too) by `request_models`, once in create_app, and kept in the app's state.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Settings
from .base import Body
from .batch import BatchBody, batch_model
from .chat import ChatBody, chat_models
from .classify import ClassifyBody, classify_model
from .compat import CompatBody, compat_model

__all__ = ["Body", "RequestModels", "request_models"]


@dataclass(frozen=True)
class RequestModels:
    """An app's request models."""

    chat: type[ChatBody]  # POST /api/chat
    batch_line: type[ChatBody]  # one request of a batch
    batch: type[BatchBody]  # POST /api/batches
    compat: type[CompatBody]  # POST /v1/chat/completions
    classify: type[ClassifyBody]  # POST /api/classify


def request_models(settings: Settings) -> RequestModels:
    """The request models of an app with `settings`."""
    chat, line = chat_models(settings)
    return RequestModels(
        chat=chat,
        batch_line=line,
        batch=batch_model(settings, line),
        compat=compat_model(settings),
        classify=classify_model(settings),
    )
