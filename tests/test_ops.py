"""Operations in one process: /readyz, /metrics (who may read it, what it counts) and JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import urllib.request

import pytest
from flask import Response

from chatproxy import SettingsError, create_app, metrics
from chatproxy.callers import hash_token
from chatproxy.demo.upstream import Reply
from chatproxy.logs import JsonFormatter
from tests.helpers import REDIS_URL, free_port
from tests.sse import post_stream

ADMIN, USER = "cpx_admin-token-0123456789", "cpx_user-token-0123456789"
TOKENS = f"ops={hash_token(ADMIN)},app={hash_token(USER)}"


def _sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


# --- /readyz --------------------------------------------------------------------------------------


def test_ready_when_database_and_redis_answer(settings_for, fake):
    response = create_app(settings_for(CHATPROXY_REDIS_URL=REDIS_URL)).test_client().get("/readyz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}
    assert fake.calls == []  # never calls the upstream


def test_redis_down_is_reported_as_degraded_but_still_ready(settings_for, fake):
    app = create_app(settings_for(CHATPROXY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))

    response = app.test_client().get("/readyz")

    # Everything kept in Redis degrades to per-process counting: the host still serves, so it stays in rotation.
    assert response.status_code == 200
    assert response.get_json() == {"status": "degraded", "checks": {"database": "ok", "redis": "unreachable"}}
    assert fake.calls == []


def test_not_ready_names_redis_when_it_is_down_and_required(settings_for, fake):
    app = create_app(
        settings_for(CHATPROXY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", CHATPROXY_READY_REQUIRES_REDIS=True)
    )

    response = app.test_client().get("/readyz")

    assert response.status_code == 503
    error = response.get_json()["error"]
    assert error["code"] == "not_ready"
    assert "redis" in error["message"] and "database" not in error["message"]
    assert response.headers["Retry-After"]
    assert fake.calls == []


class HungRedis:
    """A TCP server that accepts connections and reads what clients send, but never answers: a hung Redis."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        self.commands = 0  # writes received that start a RESP command
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._open.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                if data.startswith(b"*"):
                    with self._lock:
                        self.commands += 1
        except OSError:
            pass

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self._listener.close()
        for conn in self._open:
            conn.close()


def test_a_hung_redis_is_waited_for_once_not_on_every_request(settings_for, fake):
    hung = HungRedis()
    try:
        client = create_app(settings_for(CHATPROXY_REDIS_URL=hung.url)).test_client()
        fake.script(*[Reply(content="ok")] * 6)

        answers = [client.post("/api/chat", json={"message": "hi", "stream": stream}) for stream in [False, True] * 3]
        ready = client.get("/readyz")
    finally:
        hung.close()

    assert [a.status_code for a in answers] == [200] * 6
    assert [json.loads(a.get_data().split(b"\n\n")[-2].removeprefix(b"data: "))["type"] for a in answers[1::2]] == [
        "done"
    ] * 3
    assert len(fake.chat_calls()) == 6
    # Rate limits, stream slots, cooldowns and /readyz each talk to Redis several times per request. Each wait
    # lasts at most the timeout (0.25 s), and after the first one the pool stops trying for a few seconds:
    # six requests (and a readiness check) sent Redis one command, two if it was tried again meanwhile.
    assert 1 <= hung.commands <= 2
    assert ready.status_code == 200 and ready.get_json()["checks"]["redis"] == "unreachable"


def test_not_ready_names_the_database_when_it_is_down(settings_for):
    app = create_app(settings_for(CHATPROXY_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:1/none"))

    response = app.test_client().get("/readyz")

    assert response.status_code == 503
    assert "database" in response.get_json()["error"]["message"]


def test_health_and_readiness_are_not_guarded(settings_for):
    client = create_app(settings_for(CHATPROXY_ALLOW_ANONYMOUS=False)).test_client()

    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


# --- /metrics: who may read it ----------------------------------------------------------------------


@pytest.fixture
def guarded(settings_for):
    """An app whose metrics network is 10.0.0.0/8 (the test client calls from 127.0.0.1)."""
    return create_app(
        settings_for(CHATPROXY_METRICS_NETWORKS="10.0.0.0/8", CHATPROXY_API_TOKENS=TOKENS, CHATPROXY_ADMIN_TOKENS="ops")
    )


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": f"Bearer {USER}"}, {"Authorization": "Bearer nope"}, {"X-Forwarded-For": "10.0.0.7"}],
)
def test_metrics_are_refused_outside_the_network_without_an_admin_token(guarded, headers):
    response = guarded.test_client().get("/metrics", headers=headers)

    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "forbidden"
    assert "chatproxy_requests_total" not in response.get_data(as_text=True)


def test_metrics_are_served_to_an_admin_token(guarded):
    response = guarded.test_client().get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"})

    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    assert "# TYPE chatproxy_requests_total counter" in response.get_data(as_text=True)


def test_metrics_are_served_inside_the_network(guarded):
    response = guarded.test_client().get("/metrics", environ_base={"REMOTE_ADDR": "10.20.30.40"})

    assert response.status_code == 200


def test_metrics_network_uses_the_forwarded_ip_behind_a_trusted_proxy(settings_for):
    app = create_app(settings_for(CHATPROXY_METRICS_NETWORKS="10.0.0.0/8", CHATPROXY_TRUSTED_PROXIES=1))
    client = app.test_client()

    assert client.get("/metrics", headers={"X-Forwarded-For": "10.0.0.7"}).status_code == 200
    assert client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 403


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CHATPROXY_METRICS_NETWORKS", "10.0.0.0/33"),
        ("CHATPROXY_METRICS_NETWORKS", "10.0.0.1/8"),
        ("CHATPROXY_BIND", "localhost"),
        ("CHATPROXY_WORKERS", "0"),
        ("CHATPROXY_GRACEFUL_TIMEOUT", "soon"),
    ],
)
def test_bad_deployment_settings_stop_start_up(settings_for, name, value):
    with pytest.raises(SettingsError, match=name):
        create_app(settings_for(**{name: value}))


# --- /metrics: what it counts -------------------------------------------------------------------------


def test_requests_are_counted_by_route_pattern_and_status(client):
    labels = {"route": "(unmatched)", "method": "GET", "status": "404"}
    before = _sample("chatproxy_requests_total", **labels)
    models = _sample("chatproxy_requests_total", route="/api/models", method="GET", status="200")

    for path in ("/nope/1", "/nope/2", "/api/models"):
        client.get(path, buffered=True)  # buffered: the test client then closes the response, like a server

    assert _sample("chatproxy_requests_total", **labels) - before == 2  # raw paths never become labels
    assert _sample("chatproxy_requests_total", route="/api/models", method="GET", status="200") - models == 1
    text = client.get("/metrics").get_data(as_text=True)
    assert "/nope/1" not in text


def test_a_stream_is_timed_to_its_last_byte(app, fake, serve):
    url = serve(app)
    fake.script(Reply(chunks=["a ", "b ", "c"], pace=0.2))
    count = _sample("chatproxy_request_duration_seconds_count", route="/api/chat")
    total = _sample("chatproxy_request_duration_seconds_sum", route="/api/chat")

    received, _ = post_stream(url, {"message": "hi", "stream": True})

    assert received.events[-1]["type"] == "done"
    assert fake.wait_for(lambda: _sample("chatproxy_request_duration_seconds_count", route="/api/chat") == count + 1)
    assert _sample("chatproxy_request_duration_seconds_sum", route="/api/chat") - total >= 0.4


def test_recording_functions_for_the_request_path():
    model = "metrics-test-model"
    before = {kind: _sample("chatproxy_tokens_total", model=model, kind=kind) for kind in ("prompt", "completion")}

    metrics.record_upstream(model, 12, 30, 4500, 0.35)
    metrics.record_upstream(model, 3, 0, 20, None)
    metrics.record_upstream_error("upstream_timeout")
    metrics.record_fallback(model, "gpt-4o-mini")
    metrics.set_cooldown(model, True)

    assert _sample("chatproxy_tokens_total", model=model, kind="prompt") - before["prompt"] == 15
    assert _sample("chatproxy_tokens_total", model=model, kind="completion") - before["completion"] == 30
    assert _sample("chatproxy_cost_microdollars_total", model=model) >= 4520
    assert _sample("chatproxy_time_to_first_token_seconds_count", model=model) >= 1
    assert _sample("chatproxy_upstream_errors_total", code="upstream_timeout") >= 1
    assert _sample("chatproxy_fallbacks_total", from_model=model, to_model="gpt-4o-mini") >= 1
    assert _sample("chatproxy_model_cooldown", model=model) == 1
    metrics.set_cooldown(model, False)
    assert _sample("chatproxy_model_cooldown", model=model) == 0


# --- JSON logs ---------------------------------------------------------------------------------------------


@pytest.fixture
def json_log():
    """Every record, formatted by chatproxy's JSON formatter, as parsed dicts."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)


def test_log_lines_are_json_with_the_request_id(app, json_log):
    @app.get("/_log")
    def _log() -> str:
        logging.getLogger("chatproxy.test").info("inside %s", "sk-proj-SECRET0123456789abcdef")
        return "ok"

    # buffered: the test client then closes the response, as servers do
    response = app.test_client().get("/_log", headers={"X-Request-ID": "req-123"}, buffered=True)
    try:
        raise ValueError("boom sk-proj-SECRET0123456789abcdef")
    except ValueError:
        logging.getLogger("chatproxy.test").exception("outside")

    inside, outside = [line for line in json_log() if line["logger"] == "chatproxy.test"]
    ours = response.headers["X-Request-ID"]
    assert len(ours) == 32 and ours != "req-123"  # ours, not the client's
    assert {"time", "level", "logger", "pid", "message", "request_id"} <= inside.keys()
    assert inside["level"] == "INFO" and inside["request_id"] == ours
    assert inside["message"] == "inside [REDACTED]"
    assert outside["request_id"] is None
    assert "ValueError" in outside["exception"] and "SECRET" not in outside["exception"]


def test_lines_logged_while_streaming_keep_the_request_id(app, serve, json_log):
    def body():
        yield b"data: {}\n\n"
        logging.getLogger("chatproxy.test").warning("from the stream")  # no request context here
        yield b"data: {}\n\n"

    app.add_url_rule("/_stream", "_stream", lambda: Response(body(), mimetype="text/event-stream"))
    url = serve(app)

    with urllib.request.urlopen(urllib.request.Request(f"{url}/_stream", headers={"X-Request-ID": "stream-7"})) as r:
        r.read()
    lines = [line for line in json_log() if line["message"] == "from the stream"]

    assert lines and lines[0]["request_id"] == r.headers["X-Request-ID"]


def test_metrics_show_fallbacks_and_the_cooldown_state(settings_for, fake):
    app = create_app(settings_for(CHATPROXY_COOLDOWN_MIN_CALLS=1, CHATPROXY_COOLDOWN_SECONDS=60))
    client = app.test_client()
    fake.for_model("gpt-4o", Reply(status=503))

    assert client.post("/api/chat", json={"message": "hi", "model": "gpt-4o"}).get_json()["degraded"] is True
    scrape = client.get("/metrics").get_data(as_text=True)

    assert 'chatproxy_model_cooldown{model="gpt-4o"} 1.0' in scrape
    assert 'chatproxy_fallbacks_total{from_model="gpt-4o",to_model="gpt-4o-mini"}' in scrape
    fake.for_model("gpt-4o", None)
