"""Retries, fallback, cooldowns and upstream errors: faults from the loopback fake, through the real SDK.

Every test checks what the client sees and how many upstream attempts were made, on which models.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from chatproxy import SettingsError, create_app
from chatproxy.config import raw_settings
from chatproxy.cooldowns import Gate, Limits, MemoryCooldowns, RedisCooldowns
from chatproxy.demo.upstream import Blackhole, Reply
from chatproxy.state import state
from chatproxy.upstream import mask_key as redact
from chatproxy.upstream import retry_after
from tests.helpers import REDIS_URL, TEST_KEY
from tests.sse import parse_sse, post_stream

FAST = {"CHATPROXY_MAX_RETRIES": 2, "CHATPROXY_RETRY_MAX_WAIT": 0.05, "CHATPROXY_COOLDOWN_MIN_CALLS": 1000}


@pytest.fixture
def make_app(settings_for):
    """An app with quick backoff (at most 50 ms) and cooldowns out of the way unless a test sets them."""

    def make(**overrides: object):
        return create_app(settings_for(**{**FAST, **overrides}))

    return make


def ask(app, model: str = "gpt-4o", **body: object):
    """POST /api/chat; fails the test on a 500 or a stack trace."""
    response = app.test_client().post("/api/chat", json={"message": "hi", "model": model, **body})
    assert response.status_code != 500
    assert "Traceback" not in response.get_data(as_text=True)
    assert TEST_KEY not in response.get_data(as_text=True)
    return response


def ask_stream(app, model: str = "gpt-4o"):
    """POST a streaming request; returns the response and its parsed events."""
    response = ask(app, model, stream=True)
    events, _ = parse_sse(response.get_data()) if response.mimetype == "text/event-stream" else ([], [])
    return response, events


def called(fake) -> list[str]:
    """The models the upstream was asked for, in order."""
    return [call.model for call in fake.chat_calls()]


def answered_by(response, model: str, degraded: bool) -> None:
    """A 200 JSON answer from `model`, flagged as degraded or not, in the body and the header."""
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["model"], body["degraded"]) == (model, degraded)
    assert body["content"] == "Echo: hi"
    assert response.headers["X-Chatproxy-Model"] == model


def unavailable(response) -> None:
    """The contract's 503 for an exhausted chain."""
    assert response.status_code == 503
    assert response.is_json
    assert response.get_json()["error"]["code"] == "upstream_unavailable"
    assert int(response.headers["Retry-After"]) >= 1


# --- retries on the same model ------------------------------------------------------------------


def test_429_with_retry_after_ms_is_retried_on_the_same_model_after_that_wait(make_app, fake):
    app = make_app(CHATPROXY_RETRY_MAX_WAIT=1)
    fake.script(Reply(status=429, headers={"retry-after-ms": "300"}))

    answered_by(ask(app), "gpt-4o", degraded=False)

    assert called(fake) == ["gpt-4o", "gpt-4o"]
    first, second = fake.chat_calls()
    assert 0.29 <= second.received_at - first.received_at < 0.9


def test_429_with_retry_after_1_second_is_waited_for(make_app, fake):
    app = make_app(CHATPROXY_RETRY_MAX_WAIT=2)
    fake.script(Reply(status=429, headers={"Retry-After": "1"}))

    answered_by(ask(app), "gpt-4o", degraded=False)

    first, second = fake.chat_calls()
    assert [first.model, second.model] == ["gpt-4o", "gpt-4o"]
    assert 0.99 <= second.received_at - first.received_at < 1.6


def test_429_with_retry_after_300_falls_back_at_once_instead_of_waiting(make_app, fake):
    app = make_app()
    fake.for_model("gpt-4o", Reply(status=429, headers={"Retry-After": "300"}))

    started = time.monotonic()
    answered_by(ask(app), "gpt-4o-mini", degraded=True)

    assert time.monotonic() - started < 1
    assert called(fake) == ["gpt-4o", "gpt-4o-mini"]


@pytest.mark.parametrize("status", [500, 502, 503, 408, 409])
def test_a_passing_server_error_is_retried_on_the_same_model(make_app, fake, status):
    app = make_app()
    fake.script(Reply(status=status, error={"message": "internal detail: shard 7"}))

    answered_by(ask(app), "gpt-4o", degraded=False)

    assert called(fake) == ["gpt-4o", "gpt-4o"]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_lasting_server_error_falls_back_after_the_retries(make_app, fake, status):
    app = make_app()
    fake.for_model("gpt-4o", Reply(status=status, error={"message": "internal detail: shard 7"}))

    response = ask(app)

    answered_by(response, "gpt-4o-mini", degraded=True)
    assert called(fake) == ["gpt-4o"] * 3 + ["gpt-4o-mini"]
    assert "shard 7" not in response.get_data(as_text=True)


def test_retries_per_model_follow_the_setting_and_the_sdk_does_none(make_app, fake):
    app = make_app(CHATPROXY_MAX_RETRIES=4)
    fake.for_model("gpt-4o", Reply(status=503))

    answered_by(ask(app), "gpt-4o-mini", degraded=True)

    assert state(app).client.max_retries == 0
    assert called(fake) == ["gpt-4o"] * 5 + ["gpt-4o-mini"]


def test_x_should_retry_false_skips_the_retries_but_not_the_fallback(make_app, fake):
    app = make_app()
    fake.for_model("gpt-4o", Reply(status=503, headers={"x-should-retry": "false"}))

    answered_by(ask(app), "gpt-4o-mini", degraded=True)

    assert called(fake) == ["gpt-4o", "gpt-4o-mini"]


def test_connection_reset_is_retried(make_app, fake):
    app = make_app()
    fake.script(Reply(reset=True))

    answered_by(ask(app), "gpt-4o", degraded=False)

    assert called(fake) == ["gpt-4o", "gpt-4o"]


def test_read_timeout_is_retried_then_falls_back(make_app, fake):
    app = make_app(CHATPROXY_READ_TIMEOUT=0.2, CHATPROXY_MAX_RETRIES=1)
    fake.for_model("gpt-4o", Reply(delay=1.0))

    started = time.monotonic()
    answered_by(ask(app), "gpt-4o-mini", degraded=True)

    assert time.monotonic() - started < 1.0
    assert called(fake) == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]


def test_connect_timeout_tries_the_chain_within_the_connect_timeout(make_app, caplog):
    attempts = re.compile(r"upstream attempt \d+/\d+ on (\S+) failed: timed out")
    with Blackhole() as hole:
        app = make_app(OPENAI_BASE_URL=hole.base_url, CHATPROXY_CONNECT_TIMEOUT=0.2, CHATPROXY_MAX_RETRIES=1)

        started = time.monotonic()
        response = ask(app)
        elapsed = time.monotonic() - started

    unavailable(response)
    tried = [m.group(1) for r in caplog.records if (m := attempts.match(r.getMessage()))]
    assert tried == ["gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]
    assert 0.8 <= elapsed < 2.0  # four connect timeouts of 0.2 s, not the 5 s read timeout


# --- the request's deadline ---------------------------------------------------------------------


def test_the_total_timeout_bounds_retries_and_fallbacks(make_app, fake):
    app = make_app(CHATPROXY_TOTAL_TIMEOUT=1, CHATPROXY_READ_TIMEOUT=5)
    fake.for_model("gpt-4o", Reply(delay=3.0))

    started = time.monotonic()
    response = ask(app)

    assert time.monotonic() - started < 1.5
    assert response.status_code == 504
    assert response.get_json()["error"]["code"] == "upstream_timeout"
    assert called(fake) == ["gpt-4o"]


def test_the_total_timeout_ends_a_long_stream_with_an_error_event(make_app, fake):
    app = make_app(CHATPROXY_TOTAL_TIMEOUT=1, CHATPROXY_KEEPALIVE_SECONDS=0.2)
    fake.script(Reply(chunks=[f"w{i} " for i in range(20)], pace=0.2))

    started = time.monotonic()
    _, events = ask_stream(app)

    assert time.monotonic() - started < 1.5
    assert events[0]["type"] == "start" and events[-1]["type"] == "error"
    assert events[-1]["code"] == "upstream_timeout"
    assert 2 <= len([e for e in events if e["type"] == "delta"]) < 20
    assert called(fake) == ["gpt-4o"]


# --- streams: fallback only before the first delta ----------------------------------------------


def test_stream_stall_before_the_first_delta_falls_back(make_app, fake, serve):
    app = make_app(CHATPROXY_READ_TIMEOUT=0.3, CHATPROXY_MAX_RETRIES=0)
    fake.for_model("gpt-4o", Reply(first_chunk_delay=2.0))

    received, _ = post_stream(serve(app), {"message": "hi", "model": "gpt-4o", "stream": True})

    assert received.status == 200
    assert received.headers["x-chatproxy-model"] == "gpt-4o-mini"
    assert received.events[0] == {"type": "start", "model": "gpt-4o-mini", "degraded": True}
    assert received.text() == "Echo: hi"
    done = received.events[-1]
    assert (done["type"], done["model"], done["degraded"]) == ("done", "gpt-4o-mini", True)
    assert called(fake) == ["gpt-4o", "gpt-4o-mini"]


def test_stream_read_stall_after_the_first_delta_ends_with_an_error_event(make_app, fake):
    app = make_app(CHATPROXY_READ_TIMEOUT=0.3, CHATPROXY_KEEPALIVE_SECONDS=0)
    fake.script(Reply(chunks=["one ", "two"], stall_after=1, stall=1.0))

    response, events = ask_stream(app)

    assert response.headers["X-Chatproxy-Model"] == "gpt-4o"
    assert events[0] == {"type": "start", "model": "gpt-4o", "degraded": False}
    assert [e["type"] for e in events] == ["start", "delta", "error"]
    assert events[-1]["code"] == "upstream_timeout"
    assert called(fake) == ["gpt-4o"]


def test_stream_truncated_without_done_ends_with_an_error_event(make_app, fake):
    app = make_app()
    fake.script(Reply(chunks=["one ", "two ", "three"], drop_after=2))

    _, events = ask_stream(app)

    assert [e["type"] for e in events] == ["start", "delta", "delta", "error"]
    assert events[-1]["code"] == "upstream_truncated"
    assert called(fake) == ["gpt-4o"]


def test_stream_cut_before_the_first_delta_is_retried(make_app, fake):
    app = make_app()
    fake.script(Reply(drop_after=0))

    _, events = ask_stream(app)

    assert [e["type"] for e in events][-1] == "done"
    assert events[0] == {"type": "start", "model": "gpt-4o", "degraded": False}
    assert "".join(e["content"] for e in events if e["type"] == "delta") == "Echo: hi"
    assert called(fake) == ["gpt-4o", "gpt-4o"]


MALFORMED = [
    b"{not json",
    b"[]",
    b'"text"',
    b'{"choices": "x"}',
    b'{"choices": [1]}',
    b'{"choices": [{"delta": {"content": 7}}]}',
    b'{"choices": [{"delta": []}]}',
    b'{"usage": 5}',
    b'{"usage": {"prompt_tokens": "many"}}',
]


@pytest.mark.parametrize("malformed", MALFORMED)
def test_malformed_chunk_mid_stream_ends_with_an_error_event(make_app, fake, malformed):
    app = make_app()
    fake.script(Reply(chunks=["one ", "two"], malformed_after=1, malformed=malformed))

    _, events = ask_stream(app)

    assert [e["type"] for e in events] == ["start", "delta", "error"]
    assert events[-1]["code"] == "upstream_bad_response"
    assert called(fake) == ["gpt-4o"]


@pytest.mark.parametrize("malformed", MALFORMED)
def test_malformed_chunk_before_the_first_delta_falls_back(make_app, fake, malformed):
    app = make_app(CHATPROXY_MAX_RETRIES=0)
    fake.for_model("gpt-4o", Reply(malformed_after=0, malformed=malformed))

    response, events = ask_stream(app)

    assert response.headers["X-Chatproxy-Model"] == "gpt-4o-mini"
    assert events[0]["degraded"] is True and events[-1]["type"] == "done"
    assert called(fake) == ["gpt-4o", "gpt-4o-mini"]


def test_error_event_before_the_first_delta_falls_back(make_app, fake):
    app = make_app(CHATPROXY_MAX_RETRIES=0)
    fake.for_model("gpt-4o", Reply(error_after=0, error={"message": "overloaded", "type": "server_error"}))

    response, events = ask_stream(app)

    assert response.headers["X-Chatproxy-Model"] == "gpt-4o-mini"
    assert events[-1]["type"] == "done"
    assert "overloaded" not in response.get_data(as_text=True)
    assert called(fake) == ["gpt-4o", "gpt-4o-mini"]


def test_refused_stream_falls_back_before_any_byte(make_app, fake):
    app = make_app(CHATPROXY_MAX_RETRIES=0)
    fake.for_model("gpt-4o", Reply(status=503))

    response, events = ask_stream(app)

    assert response.headers["X-Chatproxy-Model"] == "gpt-4o-mini"
    assert [e["type"] for e in events][0 :: len(events) - 1] == ["start", "done"]
    assert events[0]["degraded"] is True
    assert called(fake) == ["gpt-4o", "gpt-4o-mini"]


# --- the whole chain down -----------------------------------------------------------------------


def test_whole_chain_down_is_a_503_with_retry_after(make_app, fake):
    app = make_app(CHATPROXY_MAX_RETRIES=1)
    fake.for_model("gpt-4o", Reply(status=503))
    fake.for_model("gpt-4o-mini", Reply(status=500))

    unavailable(ask(app))

    assert called(fake) == ["gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]


def test_whole_chain_down_for_a_stream_is_a_json_503(make_app, fake):
    app = make_app(CHATPROXY_MAX_RETRIES=0)
    fake.for_model("gpt-4o", Reply(reset=True))
    fake.for_model("gpt-4o-mini", Reply(status=429, headers={"Retry-After": "300"}))

    response, _ = ask_stream(app)

    unavailable(response)
    assert called(fake) == ["gpt-4o", "gpt-4o-mini"]


def test_retry_after_of_a_503_is_the_soonest_any_model_may_be_back(make_app, fake):
    app = make_app(CHATPROXY_MAX_RETRIES=0)
    fake.for_model("gpt-4o", Reply(status=429, headers={"Retry-After": "300"}))
    fake.for_model("gpt-4o-mini", Reply(status=429, headers={"retry-after-ms": "42000"}))

    response = ask(app)

    unavailable(response)
    assert response.headers["Retry-After"] == "42"
    assert called(fake) == ["gpt-4o", "gpt-4o-mini"]


def test_a_model_outside_the_chain_has_no_fallback(make_app, fake):
    app = make_app(CHATPROXY_FALLBACK_CHAIN="gpt-4o", CHATPROXY_MAX_RETRIES=0)
    fake.for_model("gpt-4o", Reply(status=503))

    unavailable(ask(app))

    assert called(fake) == ["gpt-4o"]


def test_the_last_model_of_the_chain_has_no_fallback(make_app, fake):
    app = make_app(CHATPROXY_MAX_RETRIES=1)
    fake.for_model("gpt-4o-mini", Reply(status=503))

    unavailable(ask(app, "gpt-4o-mini"))

    assert called(fake) == ["gpt-4o-mini", "gpt-4o-mini"]


# --- upstream 4xx: clear errors, no retry, no fallback ------------------------------------------


def test_context_too_long_is_a_400_without_retry_or_fallback(make_app, fake):
    app = make_app()
    fake.script(
        Reply(
            status=400,
            error={
                "message": "This model's maximum context length is 128000 tokens.",
                "type": "invalid_request_error",
                "code": "context_length_exceeded",
            },
        )
    )

    response = ask(app)

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "context_length_exceeded"
    assert "128000" not in response.get_data(as_text=True)
    assert called(fake) == ["gpt-4o"]


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_auth_failure_is_a_502_logged_loudly_without_the_key(make_app, fake, caplog, status):
    app = make_app()
    fake.for_model(
        "gpt-4o",
        Reply(status=status, error={"message": f"Incorrect API key provided: {TEST_KEY}", "code": "invalid_api_key"}),
    )

    response = ask(app)

    assert response.status_code == 502
    assert response.get_json()["error"]["code"] == "upstream_auth_failed"
    assert called(fake) == ["gpt-4o"]
    [loud] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert redact(TEST_KEY) in loud.getMessage() and "OPENAI_API_KEY" in loud.getMessage()
    assert all(TEST_KEY not in r.getMessage() for r in caplog.records)


def test_content_filter_error_is_a_400(make_app, fake):
    app = make_app()
    fake.script(
        Reply(status=400, error={"message": "flagged", "type": "invalid_request_error", "code": "content_filter"})
    )

    response = ask(app)

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "content_filtered"
    assert called(fake) == ["gpt-4o"]


def test_content_filtered_answer_is_a_400(make_app, fake):
    app = make_app()
    fake.script(Reply(finish_reason="content_filter"))

    response = ask(app)

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "content_filtered"
    assert called(fake) == ["gpt-4o"]
    (row,) = state(app).ledger.rows()  # the upstream billed it: its tokens are on record
    call = fake.chat_calls()[0]
    assert (row["outcome"], row["tokens_exact"]) == ("content_filtered", True)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (call.prompt_tokens, call.completion_tokens)
    assert row["cost_micros"] > 0


def test_content_filtered_stream_before_any_delta_is_a_json_400(make_app, fake):
    app = make_app()
    fake.script(Reply(chunks=[], finish_reason="content_filter"))

    response, _ = ask_stream(app)

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "content_filtered"
    assert called(fake) == ["gpt-4o"]
    (row,) = state(app).ledger.rows()  # the stream was cut before its usage: prompt estimated
    assert (row["outcome"], row["tokens_exact"], row["completion_tokens"]) == ("content_filtered", False, 0)
    assert row["prompt_tokens"] > 0 and row["cost_micros"] > 0


def test_content_filtered_stream_after_deltas_ends_with_an_error_event(make_app, fake):
    app = make_app()
    fake.script(Reply(chunks=["one ", "two"], finish_reason="content_filter"))

    _, events = ask_stream(app)

    assert [e["type"] for e in events] == ["start", "delta", "delta", "error"]
    assert events[-1]["code"] == "content_filtered"
    assert called(fake) == ["gpt-4o"]


# --- cooldowns ----------------------------------------------------------------------------------


def test_model_down_for_good_is_skipped_once_cooled_down(make_app, fake):
    app = make_app(CHATPROXY_MAX_RETRIES=1, CHATPROXY_COOLDOWN_MIN_CALLS=2, CHATPROXY_COOLDOWN_SECONDS=60)
    fake.for_model("gpt-4o", Reply(status=503))

    answered_by(ask(app), "gpt-4o-mini", degraded=True)
    assert called(fake) == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]

    for _ in range(3):
        answered_by(ask(app), "gpt-4o-mini", degraded=True)
    response, events = ask_stream(app)

    assert response.headers["X-Chatproxy-Model"] == "gpt-4o-mini"
    assert events[-1] == {**events[-1], "type": "done", "model": "gpt-4o-mini", "degraded": True}
    assert called(fake) == ["gpt-4o", "gpt-4o"] + ["gpt-4o-mini"] * 5


def test_model_is_used_again_after_its_cooldown_once_the_probe_succeeds(make_app, fake):
    app = make_app(CHATPROXY_MAX_RETRIES=0, CHATPROXY_COOLDOWN_MIN_CALLS=1, CHATPROXY_COOLDOWN_SECONDS=1)
    fake.for_model("gpt-4o", Reply(status=503))
    answered_by(ask(app), "gpt-4o-mini", degraded=True)
    answered_by(ask(app), "gpt-4o-mini", degraded=True)
    fake.for_model("gpt-4o", None)  # back up, but still cooling down

    time.sleep(1.05)
    answered_by(ask(app), "gpt-4o", degraded=False)  # the probe
    answered_by(ask(app), "gpt-4o", degraded=False)

    assert called(fake) == ["gpt-4o", "gpt-4o-mini", "gpt-4o-mini", "gpt-4o", "gpt-4o"]


def test_a_failed_probe_is_one_attempt_and_cools_the_model_down_again(make_app, fake):
    app = make_app(CHATPROXY_MAX_RETRIES=2, CHATPROXY_COOLDOWN_MIN_CALLS=1, CHATPROXY_COOLDOWN_SECONDS=1)
    fake.for_model("gpt-4o", Reply(status=503))
    answered_by(ask(app), "gpt-4o-mini", degraded=True)

    time.sleep(1.05)
    answered_by(ask(app), "gpt-4o-mini", degraded=True)  # the probe fails: no retries on it
    answered_by(ask(app), "gpt-4o-mini", degraded=True)

    assert called(fake) == ["gpt-4o", "gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]


def test_exactly_one_request_probes_a_model_after_its_cooldown(make_app, fake):
    app = make_app(CHATPROXY_MAX_RETRIES=0, CHATPROXY_COOLDOWN_MIN_CALLS=1, CHATPROXY_COOLDOWN_SECONDS=1)
    fake.for_model("gpt-4o", Reply(status=503))
    answered_by(ask(app), "gpt-4o-mini", degraded=True)
    fake.for_model("gpt-4o", Reply(delay=0.5))  # back, but slow: the probe is still running when the others ask
    time.sleep(1.05)

    results: list[str] = []
    barrier = threading.Barrier(6)

    def request() -> None:
        barrier.wait()
        results.append(ask(app).get_json()["model"])

    threads = [threading.Thread(target=request) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(results) == ["gpt-4o"] + ["gpt-4o-mini"] * 5
    assert called(fake).count("gpt-4o") == 2  # the failure that tripped it, then the one probe


def test_whole_chain_cooling_down_is_a_503_without_calling_upstream(make_app, fake):
    app = make_app(CHATPROXY_MAX_RETRIES=0, CHATPROXY_COOLDOWN_MIN_CALLS=1, CHATPROXY_COOLDOWN_SECONDS=30)
    fake.for_model("gpt-4o", Reply(status=503))
    fake.for_model("gpt-4o-mini", Reply(status=503))
    unavailable(ask(app))
    assert called(fake) == ["gpt-4o", "gpt-4o-mini"]

    response = ask(app)

    unavailable(response)
    assert 29 <= int(response.headers["Retry-After"]) <= 30
    assert called(fake) == ["gpt-4o", "gpt-4o-mini"]
    # The row the second call's reservation opened for its first attempt went with the released reservation.
    assert [row["outcome"] for row in state(app).ledger.rows()] == ["upstream_http_503", "upstream_http_503"]
    assert state(app).budget.totals()["reserved_micros"] == 0


def test_cooldown_lasts_at_least_the_upstream_retry_after(make_app, fake):
    app = make_app(CHATPROXY_MAX_RETRIES=0, CHATPROXY_COOLDOWN_MIN_CALLS=1, CHATPROXY_COOLDOWN_SECONDS=1)
    fake.for_model("gpt-4o", Reply(status=429, headers={"Retry-After": "120"}))
    ask(app)

    assert 119 <= state(app).cooldowns.remaining("gpt-4o") <= 120


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_few_upstream_errors_in_a_mixed_run_cause_no_503(settings_for, fake, request, store):
    """Issue 14: 4 scripted errors among 90 requests (each retried and answered) put the default model, which has no
    fallback, in cooldown for 30 s under the old count (3 failures in 60 s): 75 of the 90 were 503."""
    config = {"CHATPROXY_MAX_RETRIES": 2, "CHATPROXY_RETRY_MAX_WAIT": 0.01}  # the cooldown settings' defaults
    if store == "redis":
        config.update(CHATPROXY_REDIS_URL=REDIS_URL, CHATPROXY_REDIS_PREFIX=request.getfixturevalue("key_prefix"))
    app = create_app(settings_for(**config))
    if store == "redis":
        assert isinstance(state(app).cooldowns, RedisCooldowns)
    client = app.test_client()
    statuses = []

    for number in range(90):
        if number in (2, 3, 30, 60):
            fake.script(Reply(status=500))
        stream = number % 3 == 0
        response = client.post("/api/chat", json={"message": f"request {number}", "stream": stream})
        statuses.append(response.status_code)
        if stream and response.status_code == 200:
            assert parse_sse(response.get_data())[0][-1]["type"] == "done"

    assert statuses == [200] * 90
    assert called(fake) == ["gpt-4o-mini"] * 94  # each error was retried once, on the same model
    assert state(app).cooldowns.acquire("gpt-4o-mini") is Gate.OPEN


def test_a_model_failing_half_its_calls_cools_down_with_the_default_settings(settings_for, fake):
    app = create_app(settings_for(CHATPROXY_MAX_RETRIES=0, CHATPROXY_COOLDOWN_SECONDS=60))
    for number in range(12):  # every other call to gpt-4o fails: a fallback answers those
        fake.for_model("gpt-4o", Reply(status=503) if number % 2 else None)
        assert ask(app).status_code == 200

    fake.for_model("gpt-4o", None)  # healthy again, but cooling down: skipped until a probe finds it back
    answered_by(ask(app), "gpt-4o-mini", degraded=True)
    assert 59 <= state(app).cooldowns.remaining("gpt-4o") <= 60
    assert called(fake).count("gpt-4o") == 10  # tripped at the 10th call (5 of 10 failed): the minimum calls


@pytest.mark.parametrize("body", [b"not json {", b'{"id": "x", "choices": "many"}', b"<html>busy</html>"])
def test_a_json_answer_we_cannot_read_is_retried_and_recorded_as_a_bad_response(make_app, fake, body):
    """Reading the answer failed (not the request's encoding): an upstream failure, retried like any other."""
    content_type = "text/html" if body.startswith(b"<") else "application/json"

    def unreadable(handler, match, raw) -> None:
        handler.send_response(200)
        handler.send_header("content-type", content_type)
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    route = ("POST", re.compile(r".*/chat/completions"), unreadable)
    fake.routes.insert(0, route)
    try:
        app = make_app(CHATPROXY_MAX_RETRIES=1)
        response = ask(app, "gpt-4o-mini")
    finally:
        fake.routes.remove(route)

    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "upstream_unavailable"
    assert len(fake.calls) == 2
    rows = state(app).ledger.rows()
    assert [row["outcome"] for row in rows] == ["upstream_bad_response"] * 2


@pytest.mark.parametrize("where", ["test config", ".env", "environment"])
def test_the_retired_failure_count_stops_start_up_naming_its_replacements(settings_for, tmp_path, where):
    if where == "test config":
        config = settings_for(CHATPROXY_COOLDOWN_FAILURES=3)
    else:
        env_file = tmp_path / ".env"
        env_file.write_text("CHATPROXY_COOLDOWN_FAILURES=3\n" if where == ".env" else "", encoding="utf-8")
        environ = {"CHATPROXY_COOLDOWN_FAILURES": "3"} if where == "environment" else {}
        config = {**raw_settings(env_file, environ=environ), **settings_for()}

    with pytest.raises(SettingsError) as raised:
        create_app(config)

    message = str(raised.value)
    assert "CHATPROXY_COOLDOWN_FAILURES is no longer used" in message
    assert "CHATPROXY_COOLDOWN_FAILURE_RATE and CHATPROXY_COOLDOWN_MIN_CALLS" in message


# --- the cooldown backends: one contract, in-process and Redis ----------------------------------


@pytest.fixture(params=["memory", "redis"])
def backend(request):
    """Build a cooldown backend of either kind with small test durations."""

    def make(**limits: float):
        limits = Limits(**{"rate": 0.5, "min_calls": 2, "window": 10.0, "seconds": 0.3, "lease": 5.0, **limits})
        if request.param == "memory":
            return MemoryCooldowns(limits)
        client = request.getfixturevalue("redis_client")
        return RedisCooldowns(client, limits, key_prefix=request.getfixturevalue("key_prefix"))

    return make


def test_backend_trips_after_the_threshold_within_the_window(backend):
    gates = backend(min_calls=3)

    assert [gates.failure("m") for _ in range(3)] == [False, False, True]
    assert gates.acquire("m") is Gate.CLOSED
    assert gates.acquire("other") is Gate.OPEN
    assert 0.2 < gates.remaining("m") <= 0.3


def test_backend_forgets_failures_older_than_the_window(backend):
    gates = backend(window=0.2)

    gates.failure("m")
    time.sleep(0.25)

    assert gates.failure("m") is False
    assert gates.acquire("m") is Gate.OPEN


def test_backend_lets_exactly_one_probe_through_after_the_cooldown(backend):
    gates = backend(min_calls=1)
    gates.failure("m")
    time.sleep(0.35)
    barrier = threading.Barrier(8)
    gates_seen: list[Gate] = []

    def contend() -> None:
        barrier.wait()
        gates_seen.append(gates.acquire("m"))

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(g.value for g in gates_seen) == [Gate.PROBE.value] + [Gate.CLOSED.value] * 7


def test_backend_probe_success_reopens_and_probe_failure_trips_again(backend):
    gates = backend(min_calls=1)
    gates.failure("m")
    time.sleep(0.35)
    assert gates.acquire("m") is Gate.PROBE
    assert gates.failure("m") is True
    assert gates.acquire("m") is Gate.CLOSED

    time.sleep(0.35)
    assert gates.acquire("m") is Gate.PROBE
    gates.success("m")  # a straggler's answer from before the trip: not the probe's, the model stays tripped
    assert gates.acquire("m") is Gate.CLOSED
    gates.success("m", probe=True)

    assert gates.acquire("m") is Gate.OPEN
    assert gates.remaining("m") == 0


def test_backend_successes_dilute_the_failure_rate(backend):
    gates = backend(min_calls=4, rate=0.5)
    for _ in range(3):
        gates.success("m")

    assert [gates.failure("m") for _ in range(3)] == [False, False, True]  # 1/4, 2/5, then 3/6 failed
    assert gates.acquire("m") is Gate.CLOSED


def test_backend_needs_the_minimum_calls_before_the_rate_counts(backend):
    gates = backend(min_calls=5, rate=0.5)

    assert [gates.failure("m") for _ in range(5)] == [False, False, False, False, True]


def test_backend_rate_threshold_is_exact(backend):
    gates = backend(min_calls=10, rate=0.3)
    for _ in range(7):
        gates.success("m")

    assert [gates.failure("m") for _ in range(3)] == [False, False, True]  # 3 of 10 is 30%: no float rounding


def test_backend_successes_leave_the_window_too(backend):
    gates = backend(min_calls=3, rate=0.5, window=0.3)
    for _ in range(4):
        gates.success("m")
    time.sleep(0.35)

    assert [gates.failure("m") for _ in range(3)] == [False, False, True]


def test_backend_a_stream_failure_after_its_answer_adds_no_call(backend):
    gates = backend(min_calls=2, rate=0.5)
    gates.success("m")  # the stream's first delta

    assert gates.failure("m", counted=True) is False  # it broke later: 1 call, 1 failure, under the minimum
    assert gates.failure("m") is True  # 2 calls, 2 failures


def test_backend_gives_the_probe_to_someone_else_when_its_lease_ends(backend):
    gates = backend(min_calls=1, lease=0.2)
    gates.failure("m")
    time.sleep(0.35)
    assert gates.acquire("m") is Gate.PROBE
    assert gates.acquire("m") is Gate.CLOSED

    time.sleep(0.25)

    assert gates.acquire("m") is Gate.PROBE


def test_backend_cooldown_is_at_least_the_retry_after(backend):
    gates = backend(min_calls=1)

    gates.failure("m", retry_after=30)

    assert 29 < gates.remaining("m") <= 30


# --- shared through Redis -----------------------------------------------------------------------


def test_cooldown_is_shared_by_apps_using_the_same_redis(make_app, fake, key_prefix, redis_client):
    settings = {
        "CHATPROXY_REDIS_URL": REDIS_URL,
        "CHATPROXY_MAX_RETRIES": 0,
        "CHATPROXY_COOLDOWN_MIN_CALLS": 1,
        "CHATPROXY_COOLDOWN_SECONDS": 1,
        "CHATPROXY_REDIS_PREFIX": key_prefix,
    }
    worker_a, worker_b = make_app(**settings), make_app(**settings)
    for app in (worker_a, worker_b):
        assert isinstance(state(app).cooldowns, RedisCooldowns)
    fake.for_model("gpt-4o", Reply(status=503))

    answered_by(ask(worker_a), "gpt-4o-mini", degraded=True)
    answered_by(ask(worker_b), "gpt-4o-mini", degraded=True)  # skips gpt-4o: worker A saw it fail
    assert called(fake) == ["gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]
    assert list(redis_client.scan_iter(match=key_prefix + "*"))

    fake.for_model("gpt-4o", None)
    time.sleep(1.05)
    answered_by(ask(worker_b), "gpt-4o", degraded=False)  # worker B's probe reopens it for both
    answered_by(ask(worker_a), "gpt-4o", degraded=False)

    assert called(fake)[3:] == ["gpt-4o", "gpt-4o"]


def test_redis_outage_does_not_stop_the_proxy(make_app, fake, caplog):
    app = make_app(CHATPROXY_REDIS_URL="redis://127.0.0.1:1/0", CHATPROXY_MAX_RETRIES=0)
    fake.for_model("gpt-4o", Reply(status=503))

    answered_by(ask(app), "gpt-4o-mini", degraded=True)

    assert called(fake) == ["gpt-4o", "gpt-4o-mini"]
    assert any("cooldown store unavailable" in r.getMessage() for r in caplog.records)


# --- helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "soon"}, None),
        ({}, None),
        ({"retry-after": "-3"}, 0.0),
    ],
)
def test_retry_after_header_parsing(headers, seconds):
    assert retry_after(headers) == seconds


def test_retry_after_http_date():
    from email.utils import formatdate

    assert 58 <= retry_after({"retry-after": formatdate(time.time() + 60, usegmt=True)}) <= 60
