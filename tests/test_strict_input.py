"""Strict JSON at the edge, and a request we fail to build is never an upstream failure (issue 14, finding 1).

Python's json module reads NaN, Infinity, 1e400 and lone surrogates; the SDK's encoder refuses them while
building the upstream request. Each poisoned value must be a 400 naming where it is, with no upstream call,
no ledger row and no cooldown, on every route that sends client values upstream.
"""

from __future__ import annotations

import json

import pytest
import redis

from chatproxy import create_app, strict
from chatproxy.callers import hash_token
from chatproxy.cooldowns import Gate, RedisCooldowns
from chatproxy.state import state
from tests.helpers import REDIS_URL

TOKEN = "cpx_strict-input-token-0123456789ab"
AS_TOKEN = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
# Trip on the first counted failure, retry twice: a poisoned request counted as an upstream failure shows at once.
STRICT = {
    "CHATPROXY_API_TOKENS": f"alice={hash_token(TOKEN)}",
    "CHATPROXY_COOLDOWN_MIN_CALLS": 1,
    "CHATPROXY_MAX_RETRIES": 2,
    "CHATPROXY_RETRY_MAX_WAIT": 0.01,
    "CHATPROXY_RATE_LIMIT_TOKEN": "100000/minute",
}

# JSON text Python reads but strict JSON (and the SDK) cannot carry, and what the 400 says about it.
POISONS = {
    "nan": ("NaN", "is not a finite number"),
    "infinity": ("Infinity", "is not a finite number"),
    "-infinity": ("-Infinity", "is not a finite number"),
    "1e400": ("1e400", "is not a finite number"),
    "surrogate": ('"caf\\u00e9 \\ud800"', "not valid Unicode"),
    "surrogate-key": ('{"ok": 1, "\\udfff": 2}', "has a key that contains characters that are not valid Unicode"),
}
POISON = "<poison>"
NUMBER = {"type": "object", "properties": {"n": {"type": "number", "maximum": POISON}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "n", "schema": NUMBER}}
AT_MAXIMUM = "response_format.json_schema.schema.properties.n.maximum"
HI = [{"role": "user", "content": "hi"}]


def template(body: dict) -> str:
    """`body` as JSON text with %s where POISON was, for the poison's own JSON text."""
    return json.dumps(body).replace(json.dumps(POISON), "%s")


# (route, body with %s where the poison goes, the path the 400 names)
PLACES = {
    "chat-schema": ("/api/chat", template({"message": "hi", "model": "gpt-4o", "response_format": FORMAT}), AT_MAXIMUM),
    "chat-description": (
        "/api/chat",
        template(
            {
                "message": "hi",
                "model": "gpt-4o",
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "description": POISON, "schema": {}},
                },
            }
        ),
        "response_format.json_schema.description",
    ),
    "chat-stream": (
        "/api/chat",
        template({"message": "hi", "model": "gpt-4o", "stream": True, "response_format": FORMAT}),
        AT_MAXIMUM,
    ),
    "v1-tool-parameters": (
        "/v1/chat/completions",
        template(
            {
                "model": "gpt-4o",
                "messages": HI,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": NUMBER}}],
            }
        ),
        "tools[0].function.parameters.properties.n.maximum",
    ),
    "v1-stop": (
        "/v1/chat/completions",
        template({"model": "gpt-4o", "messages": HI, "stop": ["END", POISON]}),
        "stop[1]",
    ),
    "v1-stream-schema": (
        "/v1/chat/completions",
        template({"model": "gpt-4o", "stream": True, "messages": HI, "response_format": FORMAT}),
        AT_MAXIMUM,
    ),
    "v1-responses-tool": (
        "/v1/responses",
        template(
            {"model": "gpt-4o", "input": "hi", "tools": [{"type": "function", "name": "f", "parameters": NUMBER}]}
        ),
        "tools[0].parameters.properties.n.maximum",
    ),
    "v1-responses-stream-schema": (
        "/v1/responses",
        template(
            {
                "model": "gpt-4o",
                "input": "hi",
                "stream": True,
                "text": {"format": {"type": "json_schema", "name": "n", "schema": NUMBER}},
            }
        ),
        "text.format.schema.properties.n.maximum",
    ),
    "v1-embeddings": ("/v1/embeddings", template({"input": ["ok", POISON]}), "input[1]"),
    "classify": ("/api/classify", template({"text": POISON}), "text"),
}


@pytest.fixture
def make_app(settings_for):
    """An app with one token (alice), cooldowns that trip on one failure, and two quick retries."""

    def make(**overrides: object):
        return create_app(settings_for(**{**STRICT, **overrides}))

    return make


def refused(response, where: str, says: str) -> None:
    """The contract's 400 naming the place and the problem, with no trace of the value's bytes."""
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert where in error["message"] and says in error["message"]
    response.get_data().decode("utf-8")  # the answer itself is valid UTF-8


def untouched(app, fake) -> None:
    """No upstream call, no ledger row, and the model still open."""
    assert fake.calls == []
    assert state(app).ledger.rows() == []
    gates = state(app).cooldowns
    assert gates.remaining("gpt-4o") == 0
    assert gates.acquire("gpt-4o") is Gate.OPEN


def answered_by_gpt_4o(app) -> None:
    """A normal request for the same model, answered by that model (not by its fallback)."""
    response = app.test_client().post("/api/chat", json={"message": "still there?", "model": "gpt-4o"})
    assert response.status_code == 200
    assert (response.get_json()["model"], response.get_json()["degraded"]) == ("gpt-4o", False)


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("place", PLACES)
def test_a_poisoned_value_is_a_400_with_no_call_no_row_and_no_cooldown(make_app, fake, place, poison):
    app = make_app()
    route, template, where = PLACES[place]
    text, says = POISONS[poison]

    response = app.test_client().post(route, data=(template % text).encode(), headers=AS_TOKEN)

    refused(response, where, says)
    untouched(app, fake)
    answered_by_gpt_4o(app)


@pytest.mark.parametrize("poison", POISONS)
def test_a_poisoned_batch_is_a_400_with_nothing_uploaded_or_reserved(make_app, fake, poison):
    app = make_app()
    text, says = POISONS[poison]
    body = (
        template(
            {
                "requests": [
                    {"custom_id": "ok", "message": "hi"},
                    {"custom_id": "bad", "message": "hi", "response_format": FORMAT},
                ]
            }
        )
        % text
    )

    response = app.test_client().post("/api/batches", data=body.encode(), headers=AS_TOKEN)

    refused(response, f"requests[1].{AT_MAXIMUM}", says)
    untouched(app, fake)
    assert state(app).budget.totals("token:alice")["reserved_micros"] == 0


@pytest.mark.parametrize("poison", POISONS)
def test_a_poisoned_batch_file_is_refused_by_the_cli_naming_its_line(make_app, fake, tmp_path, poison):
    app = make_app()
    text, says = POISONS[poison]
    source = tmp_path / "prompts.jsonl"
    bad = template({"custom_id": "bad", "message": "hi", "temperature": 0, "response_format": FORMAT}) % text
    source.write_text(f'{{"custom_id": "ok", "message": "hi"}}\n\n{bad}\n', encoding="utf-8")

    result = app.test_cli_runner().invoke(args=["batch", "submit", str(source)])

    assert result.exit_code == 1
    assert f"prompts.jsonl line 3: {AT_MAXIMUM}" in result.output
    assert says in result.output and "Traceback" not in result.output
    untouched(app, fake)


def test_valid_unicode_escapes_and_large_integers_still_go_upstream(make_app, fake):
    app = make_app()
    body = (
        '{"message": "smile \\ud83d\\ude00", "model": "gpt-4o", "response_format": {"type": "json_schema", '
        '"json_schema": {"name": "n", "description": "caf\\u00e9 \\ud83d\\ude00", '
        '"schema": {"type": "integer", "maximum": 123456789012345678901234567890, "minimum": -0.0}}}}'
    )

    response = app.test_client().post("/api/chat", data=body.encode(), headers=AS_TOKEN)

    assert response.status_code == 200
    sent = fake.chat_calls()[0].body
    assert sent["messages"][-1]["content"] == "smile \U0001f600"
    assert sent["response_format"]["json_schema"]["description"] == "café \U0001f600"
    assert sent["response_format"]["json_schema"]["schema"]["maximum"] == 123456789012345678901234567890


# --- shared Redis cooldowns: a poisoned request on one worker cannot take the model away from another ---------


@pytest.mark.parametrize("place", ["chat-schema", "chat-stream", "v1-stop", "v1-stream-schema"])
def test_poison_on_one_worker_leaves_the_shared_redis_cooldowns_alone(make_app, fake, key_prefix, place):
    shared = {"CHATPROXY_REDIS_URL": REDIS_URL, "CHATPROXY_REDIS_PREFIX": key_prefix}
    worker_a, worker_b = make_app(**shared), make_app(**shared)
    for app in (worker_a, worker_b):
        assert isinstance(state(app).cooldowns, RedisCooldowns)
    route, template, where = PLACES[place]

    for _ in range(3):
        for text, says in POISONS.values():
            refused(worker_a.test_client().post(route, data=(template % text).encode(), headers=AS_TOKEN), where, says)

    untouched(worker_b, fake)
    assert redis.Redis.from_url(REDIS_URL).exists(*state(worker_b).cooldowns.keys("gpt-4o")) == 0
    answered_by_gpt_4o(worker_b)
    answered_by_gpt_4o(worker_a)


# --- defence in depth: a request the proxy itself cannot encode is our 500, never an upstream failure --------


@pytest.fixture
def edge_off(monkeypatch):
    """Simulate an edge that misses a case (a bug): parse_json_body lets every value through."""
    monkeypatch.setattr(strict, "check_strict", lambda value, prefix="": None, raising=False)


def upstream_errors(client) -> float:
    """chatproxy_upstream_errors_total summed over its codes, from /metrics (the registry is per process)."""
    scrape = client.get("/metrics").get_data(as_text=True)
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in scrape.splitlines()
        if line.startswith("chatproxy_upstream_errors_total{")
    )


@pytest.mark.parametrize("poison", ["nan", "-infinity", "1e400"])
@pytest.mark.parametrize("place", ["chat-schema", "chat-stream", "v1-tool-parameters", "v1-stream-schema"])
def test_a_request_we_cannot_encode_is_a_500_without_retry_row_cooldown_or_fallback(
    make_app, fake, edge_off, caplog, place, poison
):
    app = make_app()
    client = app.test_client()
    route, template, where = PLACES[place]
    errors_before = upstream_errors(client)

    for _ in range(3):
        response = client.post(route, data=(template % POISONS[poison][0]).encode(), headers=AS_TOKEN)
        assert response.status_code == 500
        assert response.get_json()["error"]["code"] == "internal_error"

    untouched(app, fake)  # no fallback to gpt-4o-mini either
    assert upstream_errors(client) == errors_before
    assert any(
        "cannot encode the upstream request" in r.getMessage() and where in r.getMessage() for r in caplog.records
    )
    answered_by_gpt_4o(app)


def test_a_batch_we_cannot_encode_is_a_500_with_nothing_uploaded_or_reserved(make_app, fake, edge_off):
    app = make_app()
    body = template({"requests": [{"custom_id": "bad", "message": "hi", "response_format": FORMAT}]}) % "NaN"

    response = app.test_client().post("/api/batches", data=body.encode(), headers=AS_TOKEN)

    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "internal_error"
    untouched(app, fake)  # before: a 202, and an input file with NaN in it uploaded
    assert state(app).budget.totals("token:alice")["reserved_micros"] == 0


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/api/chat", {"message": "hi", "model": "gpt-4o"}),
        ("/api/chat", {"message": "hi", "model": "gpt-4o", "stream": True}),
        ("/v1/chat/completions", {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_an_unencodable_system_prompt_is_a_500_without_row_or_cooldown(make_app, fake, route, body):
    # Undecodable bytes in the environment reach Python as lone surrogates (os.environ uses surrogateescape).
    app = make_app(CHATPROXY_SYSTEM_PROMPT="Be brief. \udcff")
    client = app.test_client()

    for _ in range(3):
        response = client.post(route, json=body, headers=AS_TOKEN)
        assert response.status_code == 500
        assert response.get_json()["error"]["code"] == "internal_error"

    untouched(app, fake)
