"""Structured outputs on /api/chat (json_object, json_schema) and the /api/classify worked example."""

from __future__ import annotations

import threading
import time

import pytest

from chatproxy import create_app
from chatproxy.demo.upstream import Reply
from chatproxy.state import state
from tests.helpers import CITY_FORMAT, described


def test_json_schema_reply_carries_parsed(client, fake):
    response = client.post("/api/chat", json={"message": "Name a big city.", "response_format": CITY_FORMAT})

    assert response.status_code == 200
    body = response.get_json()
    assert set(body["parsed"]) == {"name", "population"}
    assert isinstance(body["parsed"]["population"], int)
    assert fake.chat_calls()[0].body["response_format"] == CITY_FORMAT


def test_json_object_mode_asks_for_json_when_nobody_did(client, fake):
    response = client.post("/api/chat", json={"message": "hi", "response_format": {"type": "json_object"}})

    assert response.get_json()["parsed"] == {"answer": "hi"}
    sent = fake.chat_calls()[0].body
    assert sent["response_format"] == {"type": "json_object"}
    assert "JSON" in sent["messages"][0]["content"]


def test_plain_text_has_no_parsed(client, fake):
    body = client.post("/api/chat", json={"message": "hi", "response_format": {"type": "text"}}).get_json()

    assert "parsed" not in body
    assert "response_format" not in fake.chat_calls()[0].body


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (Reply(content="not json {"), 502, "invalid_model_output"),
        (Reply(content='{"name": "Par', finish_reason="length"), 502, "invalid_model_output"),
        (Reply(refusal="I can't help with that."), 422, "model_refused"),
    ],
)
def test_bad_structured_answers_are_clear_errors(client, fake, reply, status, code):
    fake.script(reply)

    response = client.post("/api/chat", json={"message": "hi", "response_format": CITY_FORMAT})

    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code
    assert client.post("/api/chat", json={"message": "still fine"}).status_code == 200


@pytest.mark.parametrize(
    "response_format",
    [
        "json",
        {"type": "xml"},
        {"type": "json_object", "extra": 1},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "nope"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "api_key": "k"}},
    ],
)
def test_bad_response_format_is_refused_before_any_call(client, fake, response_format):
    response = client.post("/api/chat", json={"message": "hi", "response_format": response_format})

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_request"
    assert fake.calls == []


def test_deeply_nested_schema_is_refused(client, fake):
    schema: dict = {"type": "object"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"x": schema}}
    fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}

    assert client.post("/api/chat", json={"message": "hi", "response_format": fmt}).status_code == 400
    assert fake.calls == []


# --- /api/classify --------------------------------------------------------------------------------


def test_classify_returns_label_confidence_rationale(client, fake):
    response = client.post("/api/classify", json={"text": "My billing statement charged me twice."})

    assert response.status_code == 200
    body = response.get_json()
    assert body["label"] == "billing"
    assert 0 <= body["confidence"] <= 1
    assert body["rationale"]
    sent = fake.chat_calls()[0].body
    assert sent["messages"][0]["role"] == "system" and "classifier" in sent["messages"][0]["content"]
    assert sent["messages"][1] == {"role": "user", "content": "My billing statement charged me twice."}
    assert sent["response_format"]["json_schema"]["strict"] is True
    enum = sent["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"]
    assert enum == ["billing", "technical", "sales", "account", "other"]
    assert sent["temperature"] == 0


def test_classify_labels_from_the_request_within_the_allowlist(client, fake):
    response = client.post(
        "/api/classify", json={"text": "The app crashes (technical).", "labels": ["technical", "other"]}
    )

    assert response.get_json()["label"] == "technical"
    enum = fake.chat_calls()[0].body["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"]
    assert enum == ["technical", "other"]


def test_classify_labels_come_from_settings(fake, settings_for):
    app = create_app(settings_for(CHATPROXY_CLASSIFY_LABELS="spam,ham"))

    body = app.test_client().post("/api/classify", json={"text": "Win a free prize! spam"}).get_json()

    assert body["label"] == "spam"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"text": ""},
        {"text": 5},
        {"text": "x", "labels": ["billing"]},
        {"text": "x", "labels": ["evil", "other"]},
        {"text": "x", "labels": ["other", "other"]},
        {"text": "x", "labels": "billing"},
        {"text": "x", "model": "gpt-4o"},
        {"text": "x" * 9000},
    ],
)
def test_classify_bad_input(client, fake, body):
    response = client.post("/api/classify", json=body)

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_request"
    assert fake.calls == []


def test_classify_answer_outside_the_schema_is_an_error(client, fake):
    fake.script(Reply(content='{"label": "not-a-label", "confidence": 2, "rationale": 1}'))

    response = client.post("/api/classify", json={"text": "hello"})

    assert response.status_code == 502
    assert response.get_json()["error"]["code"] == "invalid_model_output"


def test_classify_is_metered(app, client, fake):
    client.post("/api/classify", json={"text": "hello"})

    [row] = state(app).ledger.rows()
    assert row["outcome"] == "ok" and row["tokens_exact"] and row["cost_micros"] > 0


# --- response_format counts as prompt: in the character cap and in the budget's worst case (issue 14, finding 7) --


@pytest.mark.parametrize(
    ("message", "description"),
    [
        pytest.param("hi", 61_200, id="schema-alone"),  # the red team's: twice CHATPROXY_MAX_TOTAL_CHARS (32,000)
        pytest.param("x" * 7_900, 25_000, id="schema-and-message"),  # each under the cap, together over it
    ],
)
def test_a_schema_over_the_character_cap_is_a_400_with_nothing_upstream(app, client, fake, message, description):
    response = client.post("/api/chat", json={"message": message, "response_format": described(description)})

    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert "at most 32000 in all" in error["message"] and "response_format" in error["message"]
    assert fake.calls == []
    assert state(app).ledger.rows() == []


def test_a_schema_within_the_cap_is_sent_whole(client, fake):
    response = client.post("/api/chat", json={"message": "hi", "response_format": described(30_000)})

    assert response.status_code == 200
    assert fake.chat_calls()[0].body["response_format"] == described(30_000)


def reserved_while_answering(app, fake, body: dict) -> int:
    """The tokens the budget holds for `body` while the upstream (slowed down) answers it."""
    client, budget, seen = app.test_client(), state(app).budget, []
    fake.script(Reply(delay=0.3))
    worker = threading.Thread(target=lambda: seen.append(client.post("/api/chat", json=body).status_code))
    worker.start()
    deadline = time.monotonic() + 5
    while not (held := budget.totals()["reserved_tokens"]) and time.monotonic() < deadline:
        time.sleep(0.005)
    worker.join()
    assert seen == [200] and budget.totals()["reserved_tokens"] == 0
    return held


def test_the_budget_reserves_for_the_schema_too(app, fake):
    small = reserved_while_answering(app, fake, {"message": "hi", "response_format": described(10)})
    large = reserved_while_answering(app, fake, {"message": "hi", "response_format": described(20_010)})

    assert large - small >= 20_000 // 4  # at least a token per 4 characters of schema


def test_a_schema_that_does_not_fit_the_token_budget_is_refused_before_any_call(fake, settings_for):
    app = create_app(settings_for(CHATPROXY_IDENTITY_DAILY_TOKEN_BUDGET=3_000, CHATPROXY_MAX_TOKENS=1_000))
    client = app.test_client()

    response = client.post("/api/chat", json={"message": "hi", "response_format": described(20_000)})

    assert response.status_code == 429
    assert response.get_json()["error"]["code"] == "budget_exceeded"
    assert fake.calls == []
    assert client.post("/api/chat", json={"message": "hi", "response_format": described(10)}).status_code == 200
