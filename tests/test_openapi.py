"""The OpenAPI description stays true: every route is in it, its request bodies are the request models' own schemas
(whatever a model accepts, the document accepts), and docs/openapi.json is up to date."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from flask import Flask

from chatproxy import create_app
from chatproxy.openapi import OPERATIONS, app_operations, build_spec, docs_spec, dumps, openapi_path
from chatproxy.state import state

ROOT = Path(__file__).resolve().parent.parent
USER = [{"role": "user", "content": "hi"}]
# Bodies the request models accept, from the simplest to every field: the document must accept them too.
ACCEPTED = {
    "/api/chat": [
        {"message": "hi"},
        {
            "messages": [*USER, {"role": "assistant", "content": "hello"}, *USER],
            "model": "gpt-4o",
            "max_completion_tokens": 5,
            "temperature": 0.5,
            "reasoning_effort": None,
            "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}, "strict": True}},
        },
    ],
    "/api/classify": [{"text": "my card was charged twice"}, {"text": "hi", "labels": ["billing", "other"]}],
    "/api/batches": [{"requests": [{"custom_id": "a", "message": "hi"}, {"custom_id": "b", "messages": USER}]}],
    "/v1/chat/completions": [
        {"messages": USER},
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "be brief", "name": "s"},
                {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}],
                },
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
            ],
            "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "w"}},
            "parallel_tool_calls": False,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 10,
            "top_p": 1,
            "stop": ["x"],
            "seed": 1,
            "user": "u1",
            "n": 1,
            "response_format": {"type": "json_object"},
        },
    ],
}


@pytest.fixture
def full_app(settings_for) -> Flask:
    """An app with every optional part on: tokens, admin tokens, Redis not needed."""
    return create_app(settings_for(CHATPROXY_API_TOKENS="admin=sha256:" + "0" * 64, CHATPROXY_ADMIN_TOKENS="admin"))


# --- the tests ---------------------------------------------------------------------------------------------------


def test_every_route_is_described_and_every_description_is_a_route(full_app):
    served = app_operations(full_app)
    described = set(OPERATIONS)

    assert served - described == set(), "routes missing from chatproxy/openapi.py OPERATIONS"
    spec = build_spec(full_app)  # lists exactly what the app serves: an unregistered blueprint is left out
    assert {(path, method) for path, item in spec["paths"].items() for method in item} == {
        (openapi_path(rule), method) for rule, method in served
    }


def test_every_status_the_router_raises_has_an_error_schema_with_request_id(full_app):
    spec = build_spec(full_app)
    error = spec["components"]["schemas"]["Error"]["properties"]["error"]
    assert error["required"] == ["code", "message"]
    assert set(error["properties"]) == {"code", "message", "request_id"}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                assert "X-Request-ID" in response["headers"], (path, method, status)
                if status in ("429", "503"):
                    assert "Retry-After" in response["headers"], (path, method, status)


def test_request_schemas_refuse_unknown_fields(full_app):
    spec = build_spec(full_app)
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if "requestBody" in operation:
                schema = operation["requestBody"]["content"]["application/json"]["schema"]
                assert schema["additionalProperties"] is False, (path, method)


def test_the_caps_in_the_spec_are_the_settings_in_force(settings_for):
    app = create_app(
        settings_for(
            CHATPROXY_MAX_MESSAGES=7,
            CHATPROXY_MAX_MESSAGE_CHARS=99,
            CHATPROXY_MODELS="a,b",
            CHATPROXY_DEFAULT_MODEL="a",
            CHATPROXY_FALLBACK_CHAIN="",
            CHATPROXY_MAX_IMAGES=5,
        )
    )
    spec = build_spec(app)
    body = spec["paths"]["/api/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    turn = resolved(spec, body["properties"]["messages"]["items"])

    assert body["properties"]["messages"]["maxItems"] == 7
    text, parts = body["properties"]["message"]["oneOf"]
    assert text["maxLength"] == 99
    assert "5 per request" in parts["description"]
    assert turn["properties"]["content"]["oneOf"][0]["maxLength"] == 99
    assert body["properties"]["model"]["enum"] == ["a", "b", None]


def resolved(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """`schema`, or what its $ref points at in the document."""
    if "$ref" not in schema:
        return schema
    return spec["components"]["schemas"][schema["$ref"].rpartition("/")[2]]


@pytest.mark.parametrize(("path", "body"), [(path, body) for path, bodies in ACCEPTED.items() for body in bodies])
def test_what_a_request_model_accepts_the_document_accepts(full_app, path, body):
    """The document is no stricter than the validation (schemathesis relies on it: what the document refuses, the
    route must refuse); both come from the same model."""
    model = {
        "/api/chat": "chat",
        "/api/classify": "classify",
        "/api/batches": "batch",
        "/v1/chat/completions": "compat",
    }[path]
    spec = build_spec(full_app)
    schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    getattr(state(full_app).requests, model).parse(body)  # raises the 400 if the model refused it

    jsonschema_rs.validate({**schema, "components": spec["components"]}, body)  # as schemathesis reads it


def test_the_spec_is_served_at_api_openapi_json(client, app):
    response = client.get("/api/openapi.json")

    assert response.status_code == 200
    assert response.get_json() == json.loads(json.dumps(build_spec(app)))
    assert response.headers["Cache-Control"] == "no-store"


def test_docs_openapi_json_is_up_to_date():
    """Run `python -m chatproxy.openapi` after changing routes, schemas or OPERATIONS."""
    assert (ROOT / "docs" / "openapi.json").read_text(encoding="utf-8") == dumps(docs_spec())
