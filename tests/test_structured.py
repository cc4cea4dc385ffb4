"""Structured outputs on /api/chat (json_object, json_schema) and the /api/classify worked example."""

from __future__ import annotations

import pytest

from chatproxy import create_app
from tests.fake_openai import Reply

SCHEMA = {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["name", "population"], "additionalProperties": False}}}


def test_json_schema_reply_carries_parsed(client, fake):
    response = client.post("/api/chat", json={"message": "Name a big city.", "response_format": SCHEMA})

    assert response.status_code == 200
    body = response.get_json()
    assert set(body["parsed"]) == {"name", "population"}
    assert isinstance(body["parsed"]["population"], int)
    assert fake.chat_calls()[0].body["response_format"] == SCHEMA


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


@pytest.mark.parametrize(("reply", "status", "code"), [
    (Reply(content="not json {"), 502, "invalid_model_output"),
    (Reply(content='{"name": "Par', finish_reason="length"), 502, "invalid_model_output"),
    (Reply(refusal="I can't help with that."), 422, "model_refused"),
])
def test_bad_structured_answers_are_clear_errors(client, fake, reply, status, code):
    fake.script(reply)

    response = client.post("/api/chat", json={"message": "hi", "response_format": SCHEMA})

    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code
    assert client.post("/api/chat", json={"message": "still fine"}).status_code == 200


@pytest.mark.parametrize("response_format", [
    "json", {"type": "xml"}, {"type": "json_object", "extra": 1}, {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": "nope"}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "api_key": "k"}},
])
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
    response = client.post("/api/classify", json={"text": "The app crashes (technical).",
                                                  "labels": ["technical", "other"]})

    assert response.get_json()["label"] == "technical"
    enum = fake.chat_calls()[0].body["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"]
    assert enum == ["technical", "other"]


def test_classify_labels_come_from_settings(fake, settings_for):
    app = create_app(settings_for(CHATPROXY_CLASSIFY_LABELS="spam,ham"))

    body = app.test_client().post("/api/classify", json={"text": "Win a free prize! spam"}).get_json()

    assert body["label"] == "spam"


@pytest.mark.parametrize("body", [
    {}, {"text": ""}, {"text": 5}, {"text": "x", "labels": ["billing"]}, {"text": "x", "labels": ["evil", "other"]},
    {"text": "x", "labels": ["other", "other"]}, {"text": "x", "labels": "billing"}, {"text": "x", "model": "gpt-4o"},
    {"text": "x" * 9000},
])
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

    [row] = app.extensions["chatproxy.ledger"].rows()
    assert row["outcome"] == "ok" and row["tokens_exact"] and row["cost_micros"] > 0
