"""Generated bad (and good) input against every operation of the OpenAPI description, in-process over WSGI.

Schemathesis reads chatproxy.openapi's spec and generates requests from it: valid ones and, on purpose,
invalid ones (wrong types, missing or unknown fields, out-of-range numbers, odd strings, bad dates). Every
answer must be no 5xx, documented (status, content type, headers, JSON body against its schema), and
every error body must be the contract's {"error": {"code", "message", "request_id"}}. The upstream is the
loopback fake, so the real router, metering and ledger run for each case.

The number of cases run is written to artifacts/schemathesis.json (tests/soak.py puts it in
docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from chatproxy import create_app
from chatproxy.callers import hash_token
from chatproxy.demo import answers
from chatproxy.openapi import STREAM_ERRORS, build_spec
from tests.helpers import TEST_KEY
from tests.sse import parse_sse

ROOT = Path(__file__).resolve().parent.parent
REPORT = Path(os.environ.get("CHATPROXY_SCHEMATHESIS_REPORT", ROOT / "artifacts" / "schemathesis.json"))
ADMIN_TOKEN = "cpx_schemathesis-admin-token-0123456789"
EXAMPLES_PER_OPERATION = int(os.environ.get("CHATPROXY_SCHEMATHESIS_EXAMPLES", "100"))
MIN_CASES = 1000  # across every operation; lower it only with a smaller CHATPROXY_SCHEMATHESIS_EXAMPLES


def rejected_negative_data(ctx, response, case) -> bool | None:
    """negative_data_rejection, where a case refused for its size (413, before anything reads it) is rejected too."""
    return None if response.status_code == 413 else negative_data_rejection(ctx, response, case)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    rejected_negative_data,
]
TOKEN_ONLY = {
    "/api/usage",
    "/api/batches",
    "/api/batches/{batch_id}",
    "/api/batches/{batch_id}/results",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/models/{model}",
    "/v1/responses",
    "/v1/responses/{response_id}",
    "/v1/embeddings",
    "/metrics",
    "/api/admin/keys",
    "/api/admin/keys/{name}",
    "/api/admin/keys/{name}/revoke",
    "/api/admin/keys/{name}/rotate",
}


def app_config(base_url: str, database_url: str) -> dict[str, object]:
    """Anonymous callers allowed (the page's and the API's defaults otherwise), one admin token, no limits that
    generated traffic could reach: a 429 here would hide what the case was meant to test."""
    return {
        "TESTING": True,
        "OPENAI_API_KEY": TEST_KEY,
        "OPENAI_BASE_URL": base_url,
        "CHATPROXY_SECRET_KEY": "st",
        "CHATPROXY_DATABASE_URL": database_url,
        "CHATPROXY_ALLOW_ANONYMOUS": True,
        "CHATPROXY_API_TOKENS": f"admin={hash_token(ADMIN_TOKEN)}",
        "CHATPROXY_ADMIN_TOKENS": "admin",
        "CHATPROXY_RATE_LIMIT_ANONYMOUS": "1000000/minute",
        "CHATPROXY_RATE_LIMIT_TOKEN": "1000000/minute",
        "CHATPROXY_RATE_LIMIT_PAGE": "1000000/minute",
        "CHATPROXY_MAX_STREAMS": 1000,
        "CHATPROXY_DAILY_BUDGET_USD": 0,
        "CHATPROXY_IDENTITY_DAILY_BUDGET_USD": 0,
        "CHATPROXY_MAX_RETRIES": 0,
        "CHATPROXY_READ_TIMEOUT": 5,
        "CHATPROXY_KEEPALIVE_SECONDS": 0,
    }


# The spec depends on the settings, not on where the upstream is: build it once, at collection.
SCHEMA = schemathesis.openapi.from_dict(build_spec(create_app(app_config("http://127.0.0.1:9/v1", "sqlite://"))))
SCHEMA.config.generation.update(modes=list(GenerationMode), max_examples=EXAMPLES_PER_OPERATION)
CASES: Counter[str] = Counter()
_lock = threading.Lock()


@pytest.fixture(scope="module")
def wsgi_app(_fake_server, tmp_path_factory):
    """The app under test, talking to the fake upstream, with its own SQLite ledger."""
    database = tmp_path_factory.mktemp("schemathesis") / "ledger.db"
    return create_app(app_config(_fake_server.base_url, f"sqlite:///{database}"))


@pytest.fixture(autouse=True)
def robust_fake(monkeypatch):
    """The fake answers a structured-output request with an example of the client's schema; generated schemas
    can be anything (an empty enum, a string as `properties`), which is the fake's problem, not the proxy's."""
    original = answers.example_of

    def example_of(schema, text):
        try:
            return original(schema, text)
        except Exception:  # noqa: BLE001 - any schema the fake cannot follow gets a plain object
            return {}

    monkeypatch.setattr(answers, "example_of", example_of)


def check_error_contract(response, path: str) -> None:
    """Every error is the contract's body, with a request id matching the X-Request-ID header."""
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    allowed = {"code", "message", "request_id"} | ({"type", "param"} if path.startswith("/v1/") else set())
    assert set(error) <= allowed and {"code", "message", "request_id"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    assert [error["request_id"]] == response.headers["x-request-id"], (error, response.headers)
    assert "Traceback" not in response.text and TEST_KEY not in response.text


def check_stream(response) -> None:
    """An SSE answer is JSON events: start, deltas, then done or a final error with a known code."""
    events, _comments = parse_sse(response.content)
    assert events and events[0]["type"] == "start", events
    assert events[-1]["type"] in ("done", "error"), events
    assert all(e["type"] == "delta" for e in events[1:-1]), events
    if events[-1]["type"] == "error":
        assert events[-1]["code"] in STREAM_ERRORS, events[-1]


@SCHEMA.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_generated_requests_get_documented_answers_and_never_a_5xx(case, wsgi_app):
    path = case.operation.path
    # Who calls is decided here, not generated: an admin token for token-only routes, anonymous otherwise.
    case.headers = {
        k: v
        for k, v in (case.headers or {}).items()
        if k.lower() not in ("authorization", "cookie", "x-csrf-token", "origin")
    }
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if path in TOKEN_ONLY else {}
    case.headers.update(headers)

    response = case.call(app=wsgi_app)
    if os.environ.get("CHATPROXY_SCHEMATHESIS_TRACE"):
        print(case.method, path, case.meta.phase.name if case.meta else None, response.status_code, response.text[:200])

    with _lock:
        CASES[f"{case.operation.method.upper()} {path}"] += 1
    case.validate_response(response, checks=CHECKS, headers=headers)
    if response.status_code >= 400:
        check_error_contract(response, path)
    elif response.headers.get("content-type", [""])[0].startswith("text/event-stream") and path.startswith("/api/"):
        check_stream(response)
    assert "Traceback (most recent call last)" not in response.text


def test_enough_cases_ran_for_every_operation():
    """Runs after the generated tests (same module, declared later): counts them and writes the report."""
    operations = {f"{method.upper()} {path}" for path, item in SCHEMA.raw_schema["paths"].items() for method in item}
    total = sum(CASES.values())
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(
        json.dumps(
            {
                "cases": total,
                "operations": len(operations),
                "by_operation": dict(sorted(CASES.items())),
                "examples_per_operation": EXAMPLES_PER_OPERATION,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )

    assert set(CASES) == operations, "every operation got generated cases"
    assert total >= MIN_CASES * min(1, EXAMPLES_PER_OPERATION / 100), CASES
