"""The canary sweep: a known key goes in; it must come out of no response, header, SSE event or log line."""

from __future__ import annotations

import logging

import pytest

from chatproxy import create_app
from chatproxy.demo.upstream import Reply
from tests.sse import post_stream

CANARY = "sk-proj-CANARY0123456789abcdefghijklmnopqrstuv"
STREAM = {"message": "hi", "stream": True}


@pytest.fixture
def canary_app(settings_for):
    """An app whose OpenAI key is the canary."""
    return create_app(settings_for(OPENAI_API_KEY=CANARY))


def echo_key(status: int) -> Reply:
    """An upstream error that echoes our key back, as OpenAI's 401 does."""
    return Reply(
        status=status,
        error={"message": f"Incorrect API key provided: {CANARY}.", "code": "invalid_api_key"},
        headers={"x-echo": CANARY},
    )


def test_the_key_leaks_nowhere(canary_app, fake, serve, caplog):
    caplog.set_level(logging.DEBUG)
    client = canary_app.test_client()
    url = serve(canary_app)
    seen: list[str] = []

    def keep(response) -> None:
        seen.append(response.get_data(as_text=True))
        seen.append(str(response.headers))

    for path in ("/", "/api/models", "/healthz", "/nope", "/static/chat.js"):
        keep(client.get(path))
    keep(client.post("/api/chat", json={"message": "hi"}))
    keep(client.post("/api/chat", json={"message": "hi", "api_key": CANARY}))
    keep(client.post("/api/chat", data=b"{bad", content_type="application/json"))
    for status in (400, 401, 403, 429, 500, 503):
        fake.script(echo_key(status))
        keep(client.post("/api/chat", json={"message": "hi"}))
        fake.script(echo_key(status))
        keep(client.post("/api/chat", json=STREAM))
    fake.script(Reply(reset=True))
    keep(client.post("/api/chat", json={"message": "hi"}))
    for reply in (Reply(chunks=["a ", "b"], drop_after=1), Reply(chunks=["a ", "b"], malformed_after=1), Reply()):
        fake.script(reply)
        received, _ = post_stream(url, STREAM)
        seen.append(received.raw.decode())
        seen.append(str(received.headers))
    logged = [record.getMessage() for record in caplog.records] + [caplog.text]

    assert fake.chat_calls()
    assert all(call.headers["authorization"] == f"Bearer {CANARY}" for call in fake.chat_calls())
    assert not [text for text in seen if CANARY in text]
    assert not [line for line in logged if CANARY in line]
    assert not [line for line in logged if CANARY[:20] in line]


def test_log_lines_with_keys_or_authorization_are_redacted(app, caplog):
    caplog.set_level(logging.INFO)
    log = logging.getLogger("chatproxy.test")

    log.info("calling with %s", CANARY)
    log.info("headers: {'Authorization': 'Bearer cpx_secret-token-value-123'}")
    try:
        raise RuntimeError(f"boom {CANARY}")
    except RuntimeError:
        log.exception("failed")

    assert CANARY not in caplog.text
    assert "cpx_secret-token-value-123" not in caplog.text
    assert "[REDACTED]" in caplog.text
