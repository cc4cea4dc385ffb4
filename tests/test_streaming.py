"""POST /api/chat with "stream": true: SSE events, no buffering, keep-alives, disconnects and failures.

The tests at the end run through real gunicorn (gunicorn.conf.py), in the worker class the run asks for:
`make test` runs this file once per class (CHATPROXY_WORKER_CLASS=gevent, then gthread).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from chatproxy import create_app
from chatproxy import sse as sse_module
from chatproxy.config import SETTINGS
from chatproxy.demo.upstream import FakeOpenAI, Reply
from chatproxy.sse import data as sse
from tests.browser import answer_text, answers, ask, open_chat, wait_state
from tests.helpers import Server, start_gunicorn
from tests.sse import parse_sse, post_stream


def test_stream_sends_start_deltas_done_with_usage(live_url, fake):
    received, _ = post_stream(live_url, {"message": "tell me a story", "stream": True})

    assert received.status == 200
    assert received.headers["content-type"].startswith("text/event-stream")
    assert received.headers["cache-control"] == "no-cache"
    assert received.headers["x-accel-buffering"] == "no"
    types = [e["type"] for e in received.events]
    assert types[0] == "start" and types[-1] == "done"
    assert set(types[1:-1]) == {"delta"}
    assert received.events[0]["model"] == "gpt-4o-mini"
    assert received.text() == "Echo: tell me a story"
    done = received.events[-1]
    assert done["finish_reason"] == "stop"
    assert done["model"] == "gpt-4o-mini"
    [call] = fake.chat_calls()
    assert done["usage"] == {
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens,
        "total_tokens": call.prompt_tokens + call.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert call.body["stream"] is True
    assert call.body["stream_options"] == {"include_usage": True}


def test_every_line_on_the_wire_is_json_never_raw_text(client, fake):
    fake.script(Reply(chunks=["plain", " words"]))

    raw = client.post("/api/chat", json={"message": "hi", "stream": True}).get_data()

    for block in raw.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: {") and block.endswith(b"}")


def test_deltas_arrive_as_the_upstream_writes_them(live_url, fake):
    fake.script(Reply(chunks=[f"w{i} " for i in range(6)], pace=0.2))

    received, _ = post_stream(live_url, {"message": "hi", "stream": True})

    call = fake.chat_calls()[0]
    delta_times = [t for e, t in zip(received.events, received.times) if e["type"] == "delta"]
    assert len(delta_times) == 6
    # The first delta reached the client about when it was sent, a second before the last one was written.
    assert delta_times[0] < call.chunk_times[-1] - 0.8
    assert delta_times[0] - call.chunk_times[0] < 0.15


def test_client_disconnect_closes_the_upstream_within_a_second(live_url, fake):
    fake.script(Reply(chunks=[f"t{i} " for i in range(60)], pace=0.1))

    _received, hung_up_at = post_stream(live_url, {"message": "hi", "stream": True}, stop_after_deltas=3)

    call = fake.chat_calls()[0]
    assert fake.wait_for(lambda: call.disconnected_at is not None, timeout=3)
    assert call.disconnected_at - hung_up_at < 1.0
    assert len([t for t in call.chunk_times if t > hung_up_at]) <= 2
    assert not call.finished


def test_model_text_cannot_inject_sse_framing(client, fake):
    evil = 'a\n\ndata: {"type":"done","finish_reason":"stop"}\r\n\r\nb\rc'
    fake.script(Reply(chunks=[evil]))

    raw = client.post("/api/chat", json={"message": "hi", "stream": True}).get_data()
    events, _ = parse_sse(raw)

    deltas = [e for e in events if e["type"] == "delta"]
    assert deltas == [{"type": "delta", "content": evil}]
    assert [e["type"] for e in events] == ["start", "delta", "done"]


def test_any_text_round_trips_through_the_encoder():
    for text in ["", "plain", "line\nbreak", "\r\n\r\n", "data: x\n\n", "\u2028\u2029", "emoji 😀", "\x00\x1b[31m"]:
        events, _ = parse_sse(sse({"type": "delta", "content": text}))
        assert events == [{"type": "delta", "content": text}]


def test_failure_after_the_first_delta_ends_with_an_error_event(client, fake):
    fake.script(Reply(chunks=["one ", "two ", "three"], drop_after=2))

    events, _ = parse_sse(client.post("/api/chat", json={"message": "hi", "stream": True}).get_data())

    assert [e["type"] for e in events] == ["start", "delta", "delta", "error"]
    assert events[-1]["code"] == "upstream_truncated"
    assert not [e for e in events if e["type"] == "done"]


def test_malformed_upstream_chunk_ends_with_an_error_event(client, fake):
    fake.script(Reply(chunks=["one ", "two"], malformed_after=1))

    events, _ = parse_sse(client.post("/api/chat", json={"message": "hi", "stream": True}).get_data())

    assert [e["type"] for e in events] == ["start", "delta", "error"]
    assert events[-1]["code"] == "upstream_bad_response"
    assert "Traceback" not in events[-1]["message"]


def test_read_stall_mid_stream_ends_with_a_timeout_error(fake, settings_for, serve):
    app = create_app(settings_for(CHATPROXY_READ_TIMEOUT=0.5, CHATPROXY_KEEPALIVE_SECONDS=0.2))
    fake.script(Reply(chunks=["one ", "two"], stall_after=1, stall=2.0))

    received, _ = post_stream(serve(app), {"message": "hi", "stream": True})

    assert [e["type"] for e in received.events] == ["start", "delta", "error"]
    assert received.events[-1]["code"] == "upstream_timeout"


def test_silent_upstream_gets_keepalive_pings(fake, settings_for, serve):
    app = create_app(settings_for(CHATPROXY_KEEPALIVE_SECONDS=0.1))
    fake.script(Reply(chunks=["slow ", "answer"], stall_after=1, stall=0.6))

    received, _ = post_stream(serve(app), {"message": "hi", "stream": True})

    assert len(received.comments) >= 3
    assert set(received.comments) == {": ping"}
    assert received.text() == "slow answer"
    assert received.events[-1]["type"] == "done"


def test_a_served_stream_pings_from_its_own_thread_without_a_pump(fake, settings_for, serve, mocker):
    pump = mocker.spy(sse_module, "_threaded_keepalive")
    app = create_app(settings_for(CHATPROXY_KEEPALIVE_SECONDS=0.1))
    fake.script(Reply(chunks=["slow ", "answer"], stall_after=1, stall=0.6))

    received, _ = post_stream(serve(app), {"message": "hi", "stream": True})

    assert len(received.comments) >= 3 and set(received.comments) == {": ping"}
    assert received.text() == "slow answer"
    assert pump.call_count == 0  # the handler thread wrote the pings while it waited on the upstream


def test_an_upstream_silent_past_the_deadline_ends_with_a_timeout_event_while_pinging(fake, settings_for, serve):
    app = create_app(settings_for(CHATPROXY_TOTAL_TIMEOUT=1, CHATPROXY_READ_TIMEOUT=5, CHATPROXY_KEEPALIVE_SECONDS=0.2))
    fake.script(Reply(chunks=["one ", "two"], stall_after=1, stall=2.5))

    started = time.monotonic()
    received, _ = post_stream(serve(app), {"message": "hi", "stream": True})

    assert time.monotonic() - started < 2.0  # at the first ping past the deadline, not at the read timeout
    assert [e["type"] for e in received.events] == ["start", "delta", "error"]
    assert received.events[-1]["code"] == "upstream_timeout"
    assert set(received.comments) == {": ping"}
    call = fake.chat_calls()[0]
    assert fake.wait_for(lambda: call.disconnected_at is not None, timeout=1)  # closed, not left to time out
    assert not call.finished


def test_refused_stream_is_a_json_error_not_an_event_stream(client, fake):
    fake.script(Reply(status=429, headers={"retry-after-ms": "2000"}))

    response = client.post("/api/chat", json={"message": "hi", "stream": True})

    assert response.status_code == 503
    assert response.is_json
    assert response.get_json()["error"]["code"] == "upstream_unavailable"
    assert response.headers["Retry-After"] == "2"


def test_bad_stream_request_is_refused_before_the_first_byte(client, fake):
    response = client.post("/api/chat", json={"message": "", "stream": True})

    assert response.status_code == 400
    assert response.is_json
    assert fake.calls == []


# --- through gunicorn, in the run's worker class ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gunicorn(_fake_server: FakeOpenAI, tmp_path_factory) -> Iterator[Server]:
    """gunicorn -c gunicorn.conf.py (2 workers, pings every 0.2 s, 1.5 s read timeout, SQLite) in front of the fake."""
    ledger = tmp_path_factory.mktemp("streaming") / "ledger.db"
    server = start_gunicorn(
        {
            "OPENAI_API_KEY": "sk-test-streaming",
            "OPENAI_BASE_URL": _fake_server.base_url,
            "CHATPROXY_SECRET_KEY": "streaming-test",
            "CHATPROXY_MAX_RETRIES": "0",
            "CHATPROXY_WORKERS": "2",
            "CHATPROXY_ALLOW_ANONYMOUS": "true",
            "CHATPROXY_RATE_LIMIT_ANONYMOUS": "100000/minute",
            "CHATPROXY_DATABASE_URL": f"sqlite:///{ledger}",
            "CHATPROXY_KEEPALIVE_SECONDS": "0.2",
            "CHATPROXY_READ_TIMEOUT": "1.5",
        }
    )
    yield server
    server.stop()


def test_gunicorn_runs_the_worker_class_asked_for(gunicorn):
    shipped = next(setting.default for setting in SETTINGS if setting.name == "CHATPROXY_WORKER_CLASS")
    asked = os.environ.get("CHATPROXY_WORKER_CLASS", shipped)
    named = {"gevent": "Using worker: gevent", "gthread": "Using worker: GracefulThreadWorker"}

    assert any(named[asked] in line for line in gunicorn.output), gunicorn.output[:5]


def test_a_stream_through_gunicorn_arrives_whole_and_exact(gunicorn, fake):
    text = 'Grüße 🌍 "quoted" \\ back\nslash\u2028 and \u0000 nul'
    fake.script(Reply(chunks=[text[:9], text[9:20], text[20:]]))

    received, _ = post_stream(gunicorn.url, {"message": "hi", "stream": True})

    assert received.status == 200
    assert [e["type"] for e in received.events] == ["start", "delta", "delta", "delta", "done"]
    assert received.text() == text
    [call] = fake.chat_calls()
    assert received.events[-1]["usage"]["completion_tokens"] == call.completion_tokens == 3


def test_a_silent_upstream_gets_pings_through_gunicorn(gunicorn, fake):
    fake.script(Reply(chunks=["slow ", "answer"], stall_after=1, stall=1.0))

    received, _ = post_stream(gunicorn.url, {"message": "hi", "stream": True})

    assert len(received.comments) >= 2 and set(received.comments) == {": ping"}
    assert received.text() == "slow answer"
    assert received.events[-1]["type"] == "done"


def test_an_upstream_stalled_past_the_read_timeout_ends_with_an_error_event_through_gunicorn(gunicorn, fake):
    fake.script(Reply(chunks=["one ", "two"], stall_after=1, stall=3.0))

    received, _ = post_stream(gunicorn.url, {"message": "hi", "stream": True})

    assert [e["type"] for e in received.events] == ["start", "delta", "error"]
    assert received.events[-1]["code"] == "upstream_timeout"
    assert set(received.comments) == {": ping"}  # pinged while it waited


def test_a_hang_up_costs_at_most_one_more_upstream_chunk(gunicorn, fake):
    fake.script(Reply(chunks=[f"t{i} " for i in range(60)], pace=0.1))

    _received, hung_up_at = post_stream(gunicorn.url, {"message": "hi", "stream": True}, stop_after_deltas=3)

    call = fake.chat_calls()[0]
    assert fake.wait_for(lambda: call.disconnected_at is not None, timeout=5)
    # gunicorn's client socket reads as closed at the next upstream chunk: the stream stops there, instead of
    # at the second write after the hang-up (the first one still succeeds).
    assert len([t for t in call.chunk_times if t > hung_up_at]) <= 1
    assert not call.finished


def test_a_hang_up_while_the_upstream_is_silent_closes_it_at_the_next_pings(gunicorn, fake):
    fake.script(Reply(chunks=["first ", "late"], stall_after=1, stall=1.3))

    _received, hung_up_at = post_stream(gunicorn.url, {"message": "hi", "stream": True}, stop_after_deltas=1)

    call = fake.chat_calls()[0]
    assert fake.wait_for(lambda: call.disconnected_at is not None, timeout=5)
    assert call.disconnected_at - hung_up_at < 0.9  # pings every 0.2 s: the second write after a hang-up fails
    assert not call.finished


@pytest.mark.browser
def test_the_page_streams_and_stops_an_answer_through_gunicorn(page, gunicorn, fake):
    expect = pytest.importorskip("playwright.sync_api").expect
    fake.script(
        Reply(chunks=["Streamed ", "through ", "gunicorn."], pace=0.05),
        Reply(chunks=[f"w{i} " for i in range(80)], pace=0.1),
    )
    open_chat(page, gunicorn.url)

    ask(page, "Stream")
    wait_state(page, "done")
    assert answer_text(page) == "Streamed through gunicorn."

    ask(page, "Count slowly")
    expect(answers(page).last.locator(".answer")).to_contain_text("w3")
    page.locator("#stop").click()
    wait_state(page, "stopped")
    call = fake.chat_calls()[-1]
    assert fake.wait_for(lambda: call.disconnected_at is not None, timeout=5), "the upstream never saw the close"
    assert not call.finished
