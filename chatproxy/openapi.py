"""The OpenAPI 3.1 description of the HTTP API, built from the app's settings: GET /api/openapi.json.

Each route is one entry of OPERATIONS: its summary, request body, success responses and the error codes
it can answer with, by status. A request body is the JSON Schema of the route's request model
(chatproxy/schemas/, the same model that validates it), with the app's caps and allowlists; the models it
is made of are in components/schemas. The spec lists an entry only when the app has that route, so a
blueprint that is not registered is not described. tests/test_openapi.py fails when a route has no entry
(or an entry no route).

Adding a route: add an `Operation` to OPERATIONS under its (Flask rule, method), naming its request model
if it takes a JSON body, then run `python -m chatproxy.openapi` to rewrite docs/openapi.json.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify

from .config import Settings
from .schemas.base import Untitled
from .state import state

bp = Blueprint("openapi", __name__)

Schema = dict[str, Any]
ERROR = "#/components/schemas/Error"
OPENAI_ERROR = "#/components/schemas/OpenAIError"
REF = "#/components/schemas/{model}"

# Errors every route of a kind can answer with, before its view runs (guards.py, errors.py, Flask-Limiter).
INTERNAL = {500: ("internal_error",)}
GUARDED = {
    401: (
        "unauthorized",
        "key_revoked",
        "key_expired",
        "key_disabled",
        "token_invalid",
        "token_expired",
        "token_not_yet_valid",
        "token_wrong_audience",
        "token_invalid_signature",
    ),
    403: ("forbidden_origin", "csrf_failed"),
    429: ("rate_limited",),
    503: ("server_busy", "keys_unavailable"),
}
JSON_BODY = {400: ("invalid_request",), 413: ("payload_too_large",), 415: ("unsupported_media_type",)}
# A call to the model: the budget and the ledger first (no call without them), then the router.
UPSTREAM = {
    400: ("invalid_request", "context_length_exceeded", "content_filtered"),
    403: ("model_not_allowed",),  # an API key's list of models
    429: ("rate_limited", "budget_exceeded"),
    502: ("upstream_auth_failed", "upstream_rejected"),
    503: ("upstream_unavailable", "ledger_unavailable", "budget_unavailable"),
    504: ("upstream_timeout",),
}
STRUCTURED = {422: ("model_refused",), 502: ("invalid_model_output",)}
# The `code` of a stream's final `error` event (the HTTP status is already 200 by then).
STREAM_ERRORS = (
    "upstream_timeout",
    "upstream_truncated",
    "upstream_unreachable",
    "upstream_bad_response",
    "upstream_error",
    "content_filtered",
)
RETRY_AFTER_STATUSES = (409, 429, 503)  # every error with these statuses carries Retry-After


def merge(*tables: dict[int, tuple[str, ...]]) -> dict[int, tuple[str, ...]]:
    """Union of {status: codes} tables, codes in first-seen order."""
    merged: dict[int, list[str]] = {}
    for table in tables:
        for status, codes in table.items():
            merged.setdefault(status, [])
            merged[status] += [code for code in codes if code not in merged[status]]
    return {status: tuple(codes) for status, codes in sorted(merged.items())}


@dataclass(frozen=True)
class Operation:
    """One route and method: what it takes, what it answers and which error codes it may answer with."""

    summary: str
    responses: Callable[[Flask, Settings], dict[str, Any]]  # success responses: {"200": {...}}
    errors: dict[int, tuple[str, ...]]
    # The application/json request body: its model, named as in schemas.RequestModels; the admin API's key fields
    # (validated by keys.parse_fields, shared with the CLI) give their schema by a function.
    body: str | Callable[[Flask, Settings], Schema] | None = None
    parameters: tuple[Schema, ...] = ()
    security: str = "guarded"  # guarded: any caller the guards let in; token: bearer tokens only; public
    openai_errors: bool = False  # /v1: error bodies also carry OpenAI's `type` and `param`


# --- success responses ---------------------------------------------------------------------------------------

USAGE: Schema = {
    "type": ["object", "null"],
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        name: {"type": "integer", "minimum": 0} for name in ("prompt_tokens", "completion_tokens", "total_tokens")
    },
}


def sse_event(data: Schema, also: tuple[Schema, ...] = ()) -> Schema:
    """One server-sent event whose `data:` line is JSON matching `data` (or one of `also`)."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [json_data, *also]} if also else json_data},
    }


_OPENAI_STREAM_ERROR: Schema = {
    "type": "string",
    "contentMediaType": "application/json",
    "contentSchema": {"$ref": "#/components/schemas/OpenAIError"},
}


def _ok(schema: Schema, description: str, media: str = "application/json", status: str = "200") -> dict[str, Any]:
    return {status: {"description": description, "content": {media: {"schema": schema}}}}


def chat_responses(_app: Flask, settings: Settings) -> dict[str, Any]:
    """A JSON reply, or an SSE stream of StreamEvent objects."""
    reply = {
        "type": "object",
        "required": ["role", "content", "model", "degraded", "finish_reason", "usage"],
        "properties": {
            "role": {"const": "assistant"},
            "content": {"type": "string"},
            "model": {"enum": list(settings.models)},
            "degraded": {"type": "boolean"},
            "finish_reason": {"type": ["string", "null"]},
            "usage": USAGE,
            "parsed": {"description": "The decoded JSON answer (with response_format)."},
        },
    }
    return {
        "200": {
            "description": "The answer; with `stream: true`, `data:` lines each holding one StreamEvent.",
            "headers": {"X-Chatproxy-Model": {"schema": {"type": "string"}}},
            "content": {
                "application/json": {"schema": reply},
                "text/event-stream": {"schema": sse_event({"$ref": "#/components/schemas/StreamEvent"})},
            },
        }
    }


def classify_responses(_app: Flask, settings: Settings) -> dict[str, Any]:
    """The chosen label, checked against the schema before it is returned."""
    return _ok(
        {
            "type": "object",
            "required": ["label", "confidence", "rationale", "model", "degraded", "usage"],
            "properties": {
                "label": {"enum": list(settings.classify_labels)},
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "rationale": {"type": "string"},
                "model": {"enum": list(settings.models)},
                "degraded": {"type": "boolean"},
                "usage": USAGE,
            },
        },
        "The classification.",
    )


def models_responses(_app: Flask, settings: Settings) -> dict[str, Any]:
    """The allowlist and the default."""
    return _ok(
        {
            "type": "object",
            "required": ["models", "default", "details"],
            "additionalProperties": False,
            "properties": {
                "models": {"type": "array", "items": {"enum": list(settings.models)}},
                "default": {"enum": list(settings.models)},
                "details": {
                    "type": "object",
                    "description": "What the model table says of each model: whether it reasons, takes images, and "
                    "when OpenAI shuts it down (YYYY-MM-DD or null).",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["reasoning", "images", "shutdown"],
                        "properties": {
                            "reasoning": {"type": "boolean"},
                            "images": {"type": "boolean"},
                            "shutdown": {"type": ["string", "null"]},
                        },
                    },
                },
            },
        },
        "Models a client may ask for.",
    )


def _totals() -> Schema:
    return {
        "type": "object",
        "required": ["requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_micros", "cost_usd"],
        "properties": {
            **{
                name: {"type": "integer", "minimum": 0}
                for name in ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_micros")
            },
            "cost_usd": {"type": "string", "pattern": r"^\d+\.\d{6}$"},
        },
    }


def usage_responses(_app: Flask, _settings: Settings) -> dict[str, Any]:
    """The ledger's report."""
    rows = {"type": "array", "items": _totals()}
    return _ok(
        {
            "type": "object",
            "required": [
                "since",
                "until",
                "currency",
                "totals",
                "outcomes",
                "by_day",
                "by_model",
                "by_identity",
                "by_key",
                "by_end_user",
                "groups",
            ],
            "properties": {
                "since": {"type": "string", "format": "date"},
                "until": {"type": "string", "format": "date"},
                "currency": {"const": "USD"},
                "totals": _totals(),
                "outcomes": {"type": "object", "additionalProperties": {"type": "integer"}},
                "by_day": rows,
                "by_model": rows,
                "by_identity": rows,
                "by_key": rows,
                "by_end_user": rows,
                "groups": rows,
            },
        },
        "Requests, tokens and spend per day, model and identity.",
    )


BATCH: Schema = {
    "type": "object",
    "required": ["id", "status", "model", "request_counts", "created_at"],
    "properties": {
        "id": {"type": "string"},
        "status": {"type": "string"},
        "model": {"type": "string"},
        "created_at": {"type": "string"},
        "request_counts": {
            "type": "object",
            "required": ["total", "completed", "failed"],
            "properties": {k: {"type": "integer", "minimum": 0} for k in ("total", "completed", "failed")},
        },
    },
}


def batch_created(_app: Flask, _settings: Settings) -> dict[str, Any]:
    """202 with the batch's id and status; Location points at it."""
    response = _ok(BATCH, "Submitted.", status="202")
    response["202"]["headers"] = {"Location": {"required": True, "schema": {"type": "string"}}}
    return response


def batch_results(_app: Flask, _settings: Settings) -> dict[str, Any]:
    """One result per custom_id, in submitted order."""
    result = {
        "type": "object",
        "required": ["custom_id"],
        "properties": {
            "custom_id": {"type": "string"},
            "content": {"type": "string"},
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    }
    return _ok(
        {
            "type": "object",
            "required": ["id", "status", "results"],
            "properties": {
                "id": {"type": "string"},
                "status": {"type": "string"},
                "results": {"type": "array", "items": result},
            },
        },
        "The finished batch's answers.",
    )


def _const(
    schema: Schema, description: str, media: str = "application/json", status: str = "200"
) -> Callable[..., dict[str, Any]]:
    return lambda _app, _settings: _ok(schema, description, media, status)


# --- /v1: OpenAI's wire format (api/compat.py) ---------------------------------------------------------------


def compat_responses(_app: Flask, settings: Settings) -> dict[str, Any]:
    """A `chat.completion`, or `chat.completion.chunk` events ending with `data: [DONE]`."""
    completion = {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "object": {"const": "chat.completion"},
            "model": {"enum": list(settings.models)},
            "choices": {"type": "array", "minItems": 1, "maxItems": 1},
        },
    }
    return {
        "200": {
            "description": "The completion; with `stream: true`, chunk events and `data: [DONE]`.",
            "headers": {"X-Chatproxy-Model": {"schema": {"type": "string"}}},
            "content": {
                "application/json": {"schema": completion},
                "text/event-stream": {
                    "schema": sse_event(
                        {
                            "type": "object",
                            "required": ["object", "choices"],
                            "properties": {"object": {"const": "chat.completion.chunk"}},
                        },
                        also=({"const": "[DONE]"}, _OPENAI_STREAM_ERROR),
                    )
                },
            },
        }
    }


def compat_models(_app: Flask, settings: Settings) -> dict[str, Any]:
    """The allowlist as OpenAI lists models."""
    item = {
        "type": "object",
        "required": ["id", "object"],
        "properties": {"id": {"enum": list(settings.every_model)}, "object": {"const": "model"}},
    }
    return _ok(
        {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": item}},
        },
        "Models.",
    )


def models_by_id(_app: Flask, settings: Settings) -> dict[str, Any]:
    """One allowlisted model."""
    item = {"type": "object", "required": ["id", "object"], "properties": {"id": {"enum": list(settings.every_model)}}}
    return _ok(item, "The model.")


# --- /v1/responses and /v1/embeddings (api/responses.py, api/embeddings.py) ---------------------------------


def responses_responses(_app: Flask, settings: Settings) -> dict[str, Any]:
    """A `response` object, or its semantic events (each with an `event:` line), ending in a terminal event."""
    response = {
        "type": "object",
        "required": ["id", "object", "status", "output"],
        "properties": {
            "object": {"const": "response"},
            "output": {"type": "array"},
            "usage": {"type": ["object", "null"]},
        },
    }
    event = {
        "type": "object",
        "required": ["type", "sequence_number"],
        "properties": {"type": {"type": "string"}, "sequence_number": {"type": "integer", "minimum": 0}},
        "description": "response.created … response.output_text.delta … response.completed | incomplete | failed, or "
        f"a last `error` event with code one of: {', '.join(STREAM_ERRORS)}.",
    }
    return {
        "200": {
            "description": "The response; with `stream: true`, its events (no [DONE]).",
            "headers": {"X-Chatproxy-Model": {"schema": {"type": "string"}}},
            "content": {"application/json": {"schema": response}, "text/event-stream": {"schema": sse_event(event)}},
        }
    }


def stored_response(_app: Flask, _settings: Settings) -> dict[str, Any]:
    """One of the caller's stored responses."""
    return _ok({"type": "object", "required": ["id", "object"], "properties": {"object": {"const": "response"}}}, "It.")


def deleted_response(_app: Flask, _settings: Settings) -> dict[str, Any]:
    """The deletion's confirmation."""
    schema = {"type": "object", "required": ["id", "deleted"], "properties": {"deleted": {"const": True}}}
    return _ok(schema, "Deleted.")


def embeddings_responses(_app: Flask, _settings: Settings) -> dict[str, Any]:
    """The vectors."""
    schema = {"type": "object", "required": ["object", "data", "model"], "properties": {"object": {"const": "list"}}}
    return _ok(schema, "One embedding per input, in order.")


STORED = {404: ("not_found",), 502: ("upstream_error", "upstream_bad_response"), 503: ("ledger_unavailable",)}
RESPONSE_ID = ({"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}},)
BATCH_ID = ({"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}},)
DAY_PARAMETERS = tuple(
    {
        "name": name,
        "in": "query",
        "required": False,
        "description": "A UTC day, YYYY-MM-DD; empty: the default.",
        "schema": {"anyOf": [{"type": "string", "format": "date"}, {"const": ""}]},
    }
    for name in ("since", "until")
)

# --- per-caller control: /api/limits (api/limits.py) and API keys in the database (api/admin.py) -----------

USD_OR_NULL: Schema = {"type": ["string", "null"], "pattern": r"^\d+\.\d{6}$"}
COUNT_OR_NULL: Schema = {"type": ["integer", "null"], "minimum": 1}
TIME_OR_NULL: Schema = {"type": ["string", "null"], "format": "date-time"}
API_KEY: Schema = {
    "type": "object",
    "required": ["name", "status", "token_hint", "models", "daily_budget_usd", "monthly_budget_usd", "disabled"],
    "properties": {
        "name": {"type": "string"},
        "status": {"enum": ["active", "disabled", "expired", "revoked"]},
        "token_hint": {"type": "string"},
        "owner": {"type": "string"},
        "models": {"type": ["array", "null"], "items": {"type": "string"}},
        "rate_limit": {"type": ["string", "null"]},
        "max_streams": COUNT_OR_NULL,
        "daily_budget_usd": USD_OR_NULL,
        "monthly_budget_usd": USD_OR_NULL,
        "daily_tokens": COUNT_OR_NULL,
        "monthly_tokens": COUNT_OR_NULL,
        "end_user_daily_budget_usd": USD_OR_NULL,
        "expires_at": TIME_OR_NULL,
        "disabled": {"type": "boolean"},
        "revoked_at": TIME_OR_NULL,
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "last_used_at": TIME_OR_NULL,
        "end_user_tokens": {"enum": ["HS256", "EdDSA", "ES256", None]},
    },
}
WITH_TOKEN: Schema = {
    "type": "object",
    "required": ["key", "token"],
    "properties": {"key": API_KEY, "token": {"type": "string", "description": "Shown this once."}},
}
KEY_NAME = ({"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},)
# Every admin route runs its store action through one helper, which answers any of these.
ADMIN = {400: ("invalid_request",), 403: ("forbidden",), 404: ("not_found",), 503: ("keys_unavailable",)}


def key_fields(_app: Flask, settings: Settings, required: tuple[str, ...] = ()) -> Schema:
    """A key's settable fields (null clears a limit)."""
    money = {"anyOf": [{"type": "string"}, {"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]}
    fields: Schema = {
        "owner": {"type": ["string", "null"], "maxLength": 200},
        "models": {"type": ["array", "null"], "minItems": 1, "items": {"enum": list(settings.every_model)}},
        "rate_limit": {"type": ["string", "null"], "description": "e.g. 60/minute"},
        "max_streams": {"type": ["integer", "null"], "minimum": 1, "maximum": 10_000},
        "daily_budget_usd": money,
        "monthly_budget_usd": money,
        "end_user_daily_budget_usd": money,
        "daily_tokens": COUNT_OR_NULL,
        "monthly_tokens": COUNT_OR_NULL,
        "expires_at": TIME_OR_NULL,
        "disabled": {"type": "boolean"},
        "end_user_key": {
            "type": ["string", "null"],
            "description": "'hs256', or a PEM public key (Ed25519: EdDSA, P-256: ES256); null: no end-user tokens.",
        },
    }
    if required:
        fields = {"name": {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,64}$"}, **fields}
    return {"type": "object", "additionalProperties": False, "required": list(required), "properties": fields}


LEFT: Schema = {
    "type": "object",
    "required": ["cap", "period", "limit_usd", "remaining_usd", "limit_tokens", "remaining_tokens", "resets_at"],
    "properties": {
        "cap": {"enum": ["public_ip", "identity", "key_daily", "key_monthly", "end_user"]},
        "period": {"enum": ["day", "month"]},
        "limit_usd": USD_OR_NULL,
        "remaining_usd": USD_OR_NULL,
        "limit_tokens": COUNT_OR_NULL,
        "remaining_tokens": {"type": ["integer", "null"], "minimum": 0},
        "resets_at": {"type": "string", "format": "date-time"},
    },
}
WINDOW: Schema = {
    "type": ["object", "null"],
    "required": ["limit", "remaining", "reset"],
    "properties": {k: {"type": "integer", "minimum": 0} for k in ("limit", "remaining", "reset")},
}
CALLER_LIMITS: Schema = {
    "type": "object",
    "required": ["identity", "budgets", "rate_limit"],
    "properties": {
        "identity": {"type": "string"},
        "budgets": {"type": "array", "items": LEFT},
        "rate_limit": WINDOW,
    },
}

OVERVIEW: Schema = {
    "type": "object",
    "required": ["today", "month", "caps", "keys", "top_end_users", "errors"],
    "properties": {
        "today": {"type": "string"},
        "month": {"type": "string"},
        "daily_cap_usd": USD_OR_NULL,
        "caps": {"type": "array", "items": {"type": "object"}},
        "keys": {"type": "array", "items": {"type": "object"}},
        "top_end_users": {"type": "array", "items": {"type": "object"}},
        "errors": {"type": "object", "additionalProperties": {"type": "integer"}},
        "since": {"type": "string", "format": "date"},
    },
}
ADMIN_FORM = {403: ("forbidden",), 404: ("not_found",)}  # the operator's page answers HTML, and errors as JSON

PER_CALLER: dict[tuple[str, str], Operation] = {
    ("/admin", "get"): Operation(
        "The operator's page (HTML): the sign-in form, or the dashboard for a signed-in admin session.",
        _const({"type": "string"}, "The page.", "text/html"),
        INTERNAL,
        security="public",
    ),
    ("/admin/sign-in", "post"): Operation(
        "Sign in to the operator's page with an admin token (form fields token and csrf); 303 to /admin.",
        lambda _app, _settings: {"303": {"description": "To /admin: signed in, or the form saying why not."}},
        merge(INTERNAL, {429: ("rate_limited",)}),
        security="public",
    ),
    ("/admin/sign-out", "post"): Operation(
        "End the admin session (form field csrf); 303 to /admin.",
        lambda _app, _settings: {"303": {"description": "To /admin."}},
        INTERNAL,
        security="public",
    ),
    ("/admin/chart.svg", "get"): Operation(
        "Spend per day over the last 30 days, by model or by key (?by=key), for an admin session.",
        _const({"type": "string"}, "An SVG chart.", "image/svg+xml"),
        merge(INTERNAL, ADMIN_FORM),
        parameters=({"name": "by", "in": "query", "required": False, "schema": {"enum": ["model", "key"]}},),
        security="public",
    ),
    ("/api/admin/overview", "get"): Operation(
        "Spend today and this month against the service's caps, per key, top end users, errors by code (admins).",
        _const(OVERVIEW, "The overview."),
        merge(INTERNAL, GUARDED, {403: ("forbidden",), 503: ("ledger_unavailable",)}),
    ),
    ("/api/limits", "get"): Operation(
        "The caller's own budgets (what is left today and this month, and when each resets) and its rate limit.",
        _const(CALLER_LIMITS, "The caller's limits."),
        merge(INTERNAL, GUARDED, {503: ("budget_unavailable",)}),
    ),
    ("/api/admin/keys", "get"): Operation(
        "Every API key in the database (admin tokens only).",
        _const(
            {"type": "object", "required": ["data"], "properties": {"data": {"type": "array", "items": API_KEY}}},
            "Keys.",
        ),
        merge(INTERNAL, GUARDED, ADMIN),
        security="token",
    ),
    ("/api/admin/keys", "post"): Operation(
        "Make an API key; its token is in this answer only (admin tokens only).",
        _const(WITH_TOKEN, "The key and its token.", status="201"),
        merge(INTERNAL, GUARDED, JSON_BODY, ADMIN),
        body=lambda app, settings: key_fields(app, settings, ("name",)),
        security="token",
    ),
    ("/api/admin/keys/<name>", "get"): Operation(
        "One API key (admin tokens only).",
        _const(API_KEY, "The key."),
        merge(INTERNAL, GUARDED, ADMIN),
        parameters=KEY_NAME,
        security="token",
    ),
    ("/api/admin/keys/<name>", "patch"): Operation(
        "Change an API key's limits; null clears one (admin tokens only).",
        _const(API_KEY, "The key as changed."),
        merge(INTERNAL, GUARDED, JSON_BODY, ADMIN),
        body=key_fields,
        parameters=KEY_NAME,
        security="token",
    ),
    ("/api/admin/keys/<name>/revoke", "post"): Operation(
        "Revoke an API key for good (admin tokens only).",
        _const(API_KEY, "The revoked key."),
        merge(INTERNAL, GUARDED, ADMIN),
        parameters=KEY_NAME,
        security="token",
    ),
    ("/api/admin/keys/<name>/rotate", "post"): Operation(
        "A new token for an API key; the old one stops working (admin tokens only).",
        _const(WITH_TOKEN, "The key and its new token."),
        merge(INTERNAL, GUARDED, ADMIN),
        parameters=KEY_NAME,
        security="token",
    ),
}

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("/", "get"): Operation(
        "The chat page (HTML); starts a page session and gives it a CSRF token.",
        _const({"type": "string"}, "The page.", "text/html"),
        merge(INTERNAL, {429: ("rate_limited",)}),
        security="public",
    ),
    ("/static/<path:filename>", "get"): Operation(
        "The page's scripts, styles and icons.",
        _const({"type": "string"}, "The file.", "*/*"),
        merge(INTERNAL, {404: ("not_found",)}),
        parameters=({"name": "filename", "in": "path", "required": True, "schema": {"type": "string"}},),
        security="public",
    ),
    ("/api/chat", "post"): Operation(
        "Answer a conversation as one JSON reply, or as an SSE stream with `stream: true`.",
        chat_responses,
        merge(INTERNAL, GUARDED, JSON_BODY, UPSTREAM, STRUCTURED),
        body="chat",
    ),
    ("/api/classify", "post"): Operation(
        "Classify a text into one of the configured labels (structured outputs).",
        classify_responses,
        merge(INTERNAL, GUARDED, JSON_BODY, UPSTREAM, STRUCTURED),
        body="classify",
    ),
    ("/api/models", "get"): Operation("The models a client may ask for.", models_responses, merge(INTERNAL, GUARDED)),
    ("/api/usage", "get"): Operation(
        "Usage report for admin tokens (default: the last 30 days).",
        usage_responses,
        merge(INTERNAL, GUARDED, {400: ("invalid_request",), 403: ("forbidden",)}),
        parameters=DAY_PARAMETERS,
        security="token",
    ),
    ("/api/batches", "post"): Operation(
        "Submit a batch of chat requests at batch prices (bearer tokens only).",
        batch_created,
        merge(
            INTERNAL,
            GUARDED,
            JSON_BODY,
            {
                400: ("context_length_exceeded", "content_filtered"),
                403: ("forbidden", "model_not_allowed"),
                404: ("not_found",),
                429: ("budget_exceeded",),
                502: ("upstream_auth_failed", "upstream_rejected"),
                503: ("upstream_unavailable", "ledger_unavailable", "budget_unavailable"),
                504: ("upstream_timeout",),
            },
        ),
        body="batch",
        security="token",
    ),
    ("/api/batches/<batch_id>", "get"): Operation(
        "A batch's status and request counts.",
        _const(BATCH, "The batch."),
        merge(
            INTERNAL,
            GUARDED,
            {
                400: ("context_length_exceeded", "content_filtered"),
                403: ("forbidden",),
                404: ("not_found",),
                502: ("upstream_auth_failed", "upstream_rejected"),
                503: ("upstream_unavailable", "ledger_unavailable"),
                504: ("upstream_timeout",),
            },
        ),
        parameters=BATCH_ID,
        security="token",
    ),
    ("/api/batches/<batch_id>/results", "get"): Operation(
        "A finished batch's answers; 409 batch_not_ready while it runs.",
        batch_results,
        merge(
            INTERNAL,
            GUARDED,
            {
                400: ("context_length_exceeded", "content_filtered"),
                403: ("forbidden",),
                404: ("not_found",),
                409: ("batch_not_ready",),
                502: ("upstream_auth_failed", "upstream_rejected"),
                503: ("upstream_unavailable", "ledger_unavailable"),
                504: ("upstream_timeout",),
            },
        ),
        parameters=BATCH_ID,
        security="token",
    ),
    ("/api/openapi.json", "get"): Operation(
        "This description of the API.", _const({"type": "object"}, "OpenAPI 3.1."), merge(INTERNAL, GUARDED)
    ),
    ("/healthz", "get"): Operation(
        "Liveness: the process serves. Never calls the upstream.",
        _const({"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}, "Alive."),
        INTERNAL,
        security="public",
    ),
    ("/readyz", "get"): Operation(
        "Readiness: the ledger database answers; Redis (if configured) is reported, and fails readiness only "
        "with CHATPROXY_READY_REQUIRES_REDIS.",
        _const(
            {
                "type": "object",
                "required": ["status", "checks"],
                "properties": {
                    "status": {"enum": ["ready", "degraded"]},
                    "checks": {"type": "object", "additionalProperties": {"enum": ["ok", "unreachable"]}},
                },
            },
            "Ready; `degraded` while Redis is unreachable.",
        ),
        merge(INTERNAL, {503: ("not_ready",)}),
        security="public",
    ),
    ("/metrics", "get"): Operation(
        "Prometheus metrics of all workers, for CHATPROXY_METRICS_NETWORKS or an admin token.",
        _const({"type": "string"}, "Prometheus text format.", "text/plain"),
        merge(INTERNAL, {403: ("forbidden",)}),
        security="public",
    ),
    ("/v1/chat/completions", "post"): Operation(
        "OpenAI-compatible chat completions (JSON or SSE) for bearer tokens: base_url=<proxy>/v1.",
        compat_responses,
        merge(INTERNAL, GUARDED, JSON_BODY, UPSTREAM),
        body="compat",
        security="token",
        openai_errors=True,
    ),
    ("/v1/models", "get"): Operation(
        "The allowlisted models, as OpenAI lists them.",
        compat_models,
        merge(INTERNAL, GUARDED),
        security="token",
        openai_errors=True,
    ),
    ("/v1/models/<path:model>", "get"): Operation(
        "One allowlisted model (any other name: 404).",
        models_by_id,
        merge(INTERNAL, GUARDED, {404: ("not_found",)}),
        parameters=({"name": "model", "in": "path", "required": True, "schema": {"type": "string"}},),
        security="token",
        openai_errors=True,
    ),
    ("/v1/responses", "post"): Operation(
        "OpenAI's Responses API (JSON or semantic SSE events) for bearer tokens: base_url=<proxy>/v1.",
        responses_responses,
        merge(INTERNAL, GUARDED, JSON_BODY, UPSTREAM, {400: ("unsupported_in_azure_mode",), 404: ("not_found",)}),
        body="responses",
        security="token",
        openai_errors=True,
    ),
    ("/v1/responses/<response_id>", "get"): Operation(
        "One of the caller's stored responses (another caller's id: 404, as for an unknown one).",
        stored_response,
        merge(INTERNAL, GUARDED, STORED),
        parameters=RESPONSE_ID,
        security="token",
        openai_errors=True,
    ),
    ("/v1/responses/<response_id>", "delete"): Operation(
        "Delete one of the caller's stored responses upstream (another caller's id: 404).",
        deleted_response,
        merge(INTERNAL, GUARDED, STORED),
        parameters=RESPONSE_ID,
        security="token",
        openai_errors=True,
    ),
    ("/v1/embeddings", "post"): Operation(
        "Embeddings of one text or a list of texts, for bearer tokens.",
        embeddings_responses,
        merge(INTERNAL, GUARDED, JSON_BODY, UPSTREAM, {400: ("unsupported_in_azure_mode",)}),
        body="embeddings",
        security="token",
        openai_errors=True,
    ),
    **PER_CALLER,
}


# --- the document --------------------------------------------------------------------------------------------


def openapi_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: /api/batches/<batch_id> -> /api/batches/{batch_id}."""
    return re.sub(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>", r"{\1}", rule)


def app_operations(app: Flask) -> set[tuple[str, str]]:
    """(rule, method) of every route the app serves; HEAD and OPTIONS are implied by Flask."""
    return {
        (rule.rule, method.lower())
        for rule in app.url_map.iter_rules()
        for method in (rule.methods or ())
        if method not in ("HEAD", "OPTIONS")
    }


def error_schema(codes: Iterable[str], openai_fields: bool = False) -> Schema:
    """The error contract with `code` narrowed to `codes`."""
    return {
        "allOf": [{"$ref": OPENAI_ERROR if openai_fields else ERROR}],
        "properties": {"error": {"properties": {"code": {"enum": list(codes)}}}},
    }


def _error_responses(errors: dict[int, tuple[str, ...]], openai_fields: bool) -> dict[str, Any]:
    responses = {}
    for status, codes in errors.items():
        headers = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
        if status in RETRY_AFTER_STATUSES:
            headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
        responses[str(status)] = {
            "description": ", ".join(codes),
            "headers": headers,
            "content": {"application/json": {"schema": error_schema(codes, openai_fields)}},
        }
    return responses


def _security(kind: str, settings: Settings) -> list[dict[str, list[str]]]:
    if kind == "public":
        return [{}]
    if kind == "token":
        return [{"bearerToken": []}]
    anyone = [{}] if settings.allow_anonymous else []
    return [*anyone, {"bearerToken": []}, {"pageSession": [], "csrfToken": []}]


def operation_object(
    rule: str, method: str, operation: Operation, app: Flask, settings: Settings, shared: Schema
) -> Schema:
    """One OpenAPI operation object."""
    responses = operation.responses(app, settings)
    for response in responses.values():
        response.setdefault("headers", {})["X-Request-ID"] = {"$ref": "#/components/headers/X-Request-ID"}
    responses.update(_error_responses(operation.errors, operation.openai_errors))
    found: Schema = {
        "operationId": f"{method}_{openapi_path(rule).strip('/').replace('/', '_') or 'page'}",
        "summary": operation.summary,
        "security": _security(operation.security, settings),
        "responses": responses,
    }
    found["operationId"] = re.sub(r"[^A-Za-z0-9_]", "_", found["operationId"])
    if operation.parameters:
        found["parameters"] = [dict(parameter) for parameter in operation.parameters]
    if operation.body is not None:
        if isinstance(operation.body, str):
            schema = request_schema(getattr(state(app).requests, operation.body), shared)
        else:
            schema = operation.body(app, settings)
        found["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    return found


def request_schema(model: type, shared: Schema) -> Schema:
    """A request model's JSON Schema; the models it is made of go to `shared` (the document's components)."""
    schema = model.model_json_schema(ref_template=REF, schema_generator=Untitled)
    for name, definition in schema.pop("$defs", {}).items():
        if shared.setdefault(name, definition) != definition:
            raise ValueError(f"two request models named {name} differ")  # rename one of them
    return schema


def components(settings: Settings) -> Schema:
    """Shared schemas, headers and security schemes."""
    event = {
        "type": "object",
        "required": ["type"],
        "oneOf": [
            {
                "properties": {
                    "type": {"const": "start"},
                    "model": {"type": "string"},
                    "degraded": {"type": "boolean"},
                },
                "required": ["type", "model", "degraded"],
            },
            {
                "properties": {"type": {"const": "delta"}, "content": {"type": "string"}},
                "required": ["type", "content"],
            },
            {
                "properties": {
                    "type": {"const": "done"},
                    "finish_reason": {"type": "string"},
                    "usage": USAGE,
                    "model": {"type": "string"},
                    "degraded": {"type": "boolean"},
                },
                "required": ["type", "finish_reason", "usage", "model", "degraded"],
            },
            {
                "properties": {
                    "type": {"const": "error"},
                    "code": {"enum": list(STREAM_ERRORS)},
                    "message": {"type": "string", "minLength": 1},
                },
                "required": ["type", "code", "message"],
            },
        ],
    }
    return {
        "schemas": {
            "Error": {
                "type": "object",
                "additionalProperties": False,
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
                            "message": {"type": "string", "minLength": 1},
                            "request_id": {"type": "string"},
                        },
                    }
                },
            },
            "OpenAIError": {
                "type": "object",
                "additionalProperties": False,
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
                            "message": {"type": "string", "minLength": 1},
                            "request_id": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                        },
                    }
                },
                "description": "The error contract plus OpenAI's `type` and `param`, which the SDKs read.",
            },
            "StreamEvent": event,
        },
        "headers": {
            "X-Request-ID": {
                "required": True,
                "description": "Our id for this request, new each time (an "
                "X-Request-ID you send is kept beside it, in the ledger and the access log).",
                "schema": {"type": "string", "pattern": r"^[0-9a-f]{32}$"},
            },
            "Retry-After": {
                "required": True,
                "description": "Seconds to wait before trying again.",
                "schema": {"type": "string", "pattern": r"^\d+$"},
            },
        },
        "securitySchemes": {
            "bearerToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "A token from `flask --app chatproxy new-token NAME` or `keys create NAME` (an API key "
                "in the database), or a signed end-user token (a JWT) an app's backend minted for its user.",
            },
            "pageSession": {
                "type": "apiKey",
                "in": "cookie",
                "name": "chatproxy_session",
                "description": "The chat page's session cookie.",
            },
            "csrfToken": {
                "type": "apiKey",
                "in": "header",
                "name": "X-CSRF-Token",
                "description": "The page's CSRF token, on every POST of a page session.",
            },
        },
    }


def build_spec(app: Flask) -> Schema:
    """The OpenAPI 3.1 document of the routes `app` serves, with its settings' caps and allowlists."""
    settings = state(app).settings
    served = app_operations(app)
    paths: dict[str, dict[str, Schema]] = {}
    shared: Schema = {}  # the models request bodies are made of
    for (rule, method), operation in OPERATIONS.items():
        if (rule, method) in served:
            found = operation_object(rule, method, operation, app, settings, shared)
            paths.setdefault(openapi_path(rule), {})[method] = found
    document = components(settings)
    document["schemas"].update(sorted(shared.items()))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chatproxy",
            "version": "1",
            "description": "A proxy between web apps and the OpenAI API. Every error outside a started "
            'stream is {"error": {"code", "message", "request_id"}}; 404 not_found and '
            "405 method_not_allowed (with Allow) answer unknown paths and methods.",
        },
        "paths": dict(sorted(paths.items())),
        "components": document,
    }


def docs_spec() -> Schema:
    """The spec of an app with every setting at its default (docs/openapi.json)."""
    from . import create_app
    from .config import SETTINGS

    config: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    config.update(
        OPENAI_API_KEY="sk-docs-placeholder-key",
        CHATPROXY_DATABASE_URL="sqlite://",
        CHATPROXY_SECRET_KEY="docs",  # noqa: S106 - the spec is built from an app that serves nothing
    )
    return build_spec(create_app(config))


def dumps(spec: Schema) -> str:
    """The spec as the text of docs/openapi.json."""
    return json.dumps(spec, indent=2, ensure_ascii=False) + "\n"


@bp.get("/api/openapi.json")
def openapi_json() -> Response:
    """This app's OpenAPI document."""
    return jsonify(build_spec(current_app))


def init_app(app: Flask) -> None:
    """Register GET /api/openapi.json."""
    app.register_blueprint(bp)


if __name__ == "__main__":  # python -m chatproxy.openapi: rewrite docs/openapi.json
    from pathlib import Path

    target = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
    target.write_text(dumps(docs_spec()), encoding="utf-8")
    print(f"wrote {target}")
