"""The endpoints: each module is one wire format (its routes, request to Call, answer to its bytes)."""

from __future__ import annotations

from flask import Flask

from . import admin, admin_page, batches, chat, classify, compat, embeddings, limits, responses, usage


def init_app(app: Flask) -> None:
    """Register every endpoint's blueprint."""
    for module in (chat, compat, responses, embeddings, classify, batches, usage, admin, limits, admin_page):
        app.register_blueprint(module.bp)
