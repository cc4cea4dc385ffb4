"""The deployment, for real: nginx (from deploy/nginx.conf) -> gunicorn (gunicorn.conf.py) -> the fake upstream."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from chatproxy.callers import hash_token
from chatproxy.demo.upstream import FakeOpenAI, Reply
from tests.helpers import (
    GUNICORN,
    REDIS_URL,
    ROOT,
    Server,
    environment,
    free_port,
    need_nginx,
    postgres_schema_url,
    start_gunicorn,
    start_nginx,
)
from tests.sse import post_stream

TOKEN_NAME = f"deploy-{uuid.uuid4().hex[:8]}"  # fresh per run: the Redis rate-limit counters are shared
TOKEN = f"cpx_{uuid.uuid4().hex}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def gunicorn_settings(env: dict[str, str], port: int) -> dict[str, str]:
    """Working settings for a test gunicorn on `port`, overridden by `env`."""
    return {
        "CHATPROXY_BIND": f"127.0.0.1:{port}",
        "CHATPROXY_SECRET_KEY": "deploy-test",
        "OPENAI_API_KEY": "sk-test-deploy",
        "CHATPROXY_MAX_RETRIES": "0",
        "CHATPROXY_API_TOKENS": f"{TOKEN_NAME}={hash_token(TOKEN)}",
        **env,
    }


def deploy_gunicorn(env: dict[str, str], *args: str, cwd: Path = ROOT) -> Server:
    """gunicorn with working deploy-test settings (gunicorn_settings) overridden by `env`, on a free port."""
    return start_gunicorn(gunicorn_settings(env, free_port()), *args, cwd=cwd)


@pytest.fixture(scope="module")
def stack(_fake_server: FakeOpenAI, tmp_path_factory) -> Iterator[tuple[Server, Server]]:
    """nginx -> gunicorn (4 workers, Redis, a 2 s worker timeout) -> the fake upstream; yields (nginx, gunicorn)."""
    need_nginx()
    redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()  # fails, not skips, without Redis
    tmp = tmp_path_factory.mktemp("deploy")
    gunicorn = deploy_gunicorn(
        {
            "OPENAI_BASE_URL": _fake_server.base_url,
            "CHATPROXY_WORKERS": "4",
            "CHATPROXY_THREADS": "8",
            "CHATPROXY_REDIS_URL": REDIS_URL,
            "CHATPROXY_DATABASE_URL": f"sqlite:///{tmp}/ledger.db",
            "CHATPROXY_TRUSTED_PROXIES": "1",
            "CHATPROXY_ALLOW_ANONYMOUS": "true",
            "CHATPROXY_RATE_LIMIT_ANONYMOUS": "1/minute",
            "CHATPROXY_KEEPALIVE_SECONDS": "0",
        },
        "--timeout",
        "2",
    )
    try:
        nginx = start_nginx(tmp, gunicorn.port)
    except BaseException:
        gunicorn.stop()
        raise
    yield nginx, gunicorn
    nginx.stop()
    gunicorn.stop()


def paced(n: int, pace: float) -> Reply:
    """A stream of `n` deltas, one every `pace` seconds."""
    return Reply(chunks=[f"w{i} " for i in range(n)], pace=pace)


def test_deltas_arrive_through_nginx_as_the_upstream_sends_them(stack, fake):
    nginx, _ = stack
    fake.script(paced(20, 0.1))

    received, _ = post_stream(nginx.url, {"message": "hi", "stream": True}, headers=AUTH)

    sent = fake.chat_calls()[-1].chunk_times
    arrived = [t for t, e in zip(received.times, received.events, strict=True) if e["type"] == "delta"]
    assert received.events[-1]["type"] == "done"
    assert len(arrived) == len(sent) == 20
    assert arrived[0] < sent[-1] - 1.5  # the first delta was read long before the last one was sent
    lags = [a - s for a, s in zip(arrived, sent, strict=True)]
    assert max(lags) < 0.3, lags  # each delta arrives right after it was sent: no burst at the end
    assert arrived[-1] - arrived[0] > 0.8 * (sent[-1] - sent[0])


def test_a_stream_longer_than_the_worker_timeout_completes(stack, fake):
    nginx, gunicorn = stack
    fake.script(paced(20, 0.2))  # about 4 s; gunicorn runs with --timeout 2

    received, _ = post_stream(nginx.url, {"message": "hi", "stream": True}, headers=AUTH)

    assert received.events[-1]["type"] == "done"
    assert len(received.of_type("delta")) == 20
    assert not [line for line in gunicorn.output if "WORKER TIMEOUT" in line]


def _post_from(address: str, port: int, headers: dict[str, str] | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(address, 0))
    conn.request(
        "POST", "/api/chat", body=b'{"message": "hi"}', headers={"Content-Type": "application/json", **(headers or {})}
    )
    status = conn.getresponse().status
    conn.close()
    return status


def test_rate_limits_see_the_client_ip_that_nginx_forwards(stack, fake):
    nginx, _ = stack
    # Random loopback addresses: the counters live in Redis and must be fresh on every run.
    first, second = (f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{n}" for n in (2, 3))

    statuses = [
        _post_from(first, nginx.port),
        _post_from(second, nginx.port),
        _post_from(first, nginx.port),
        _post_from(second, nginx.port, {"X-Forwarded-For": "203.0.113.9"}),
    ]

    # 1/minute per client IP: each address gets one answer; a forged X-Forwarded-For does not help.
    assert statuses == [200, 200, 429, 429]


def _scrape(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    assert response.status == 200
    body = response.read().decode()
    conn.close()
    return body


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_add_up_the_requests_of_every_worker(stack):
    _, gunicorn = stack
    route = {"route": "/api/models", "method": "GET", "status": "200"}
    before = _sample(_scrape(gunicorn.port), "chatproxy_requests_total", **route)

    for _ in range(24):  # a new connection each time, so the kernel spreads them over the 4 workers
        conn = http.client.HTTPConnection("127.0.0.1", gunicorn.port, timeout=10)
        conn.request("GET", "/api/models", headers=AUTH)
        assert conn.getresponse().status == 200
        conn.close()
    # A request is counted when the server closes it, just after the client read the last byte; its duration
    # is observed a moment after its count, so a scrape may fall between the two.
    deadline = time.monotonic() + 5
    while True:
        scraped = _scrape(gunicorn.port)
        counted = _sample(scraped, "chatproxy_requests_total", **route) - before
        timed = _sample(scraped, "chatproxy_request_duration_seconds_count", route="/api/models")
        if (counted >= 24 and timed >= 24) or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    assert counted == 24
    assert timed >= 24
    time.sleep(0.2)  # the access lines of the last requests
    pids = {line["pid"] for line in gunicorn.json_lines() if line.get("path") == "/api/models"}
    assert len(pids) > 1, "all requests went to one worker: the test would prove nothing"


def test_readyz_through_nginx_checks_redis_and_the_ledger(stack):
    nginx, _ = stack
    conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10)
    conn.request("GET", "/readyz")
    response = conn.getresponse()

    assert response.status == 200
    assert json.loads(response.read()) == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}


def test_logs_are_json_lines_with_request_ids(stack):
    _, gunicorn = stack
    lines = gunicorn.json_lines()  # every line gunicorn and the app printed parses as JSON

    access = [line for line in lines if line["logger"] == "gunicorn.access"]
    assert access and all(line["request_id"] and line["status"] for line in access)
    assert any(line["logger"] == "gunicorn.error" and "Booting worker" in line["message"] for line in lines)
    assert not [line for line in lines if line["level"] in {"ERROR", "CRITICAL"}]


def test_sigterm_lets_streams_finish_and_refuses_new_connections(fake, tmp_path):
    gunicorn = deploy_gunicorn(
        {
            "OPENAI_BASE_URL": fake.base_url,
            "CHATPROXY_WORKERS": "2",
            "CHATPROXY_GRACEFUL_TIMEOUT": "10",
            "CHATPROXY_KEEPALIVE_SECONDS": "0",
            "CHATPROXY_DATABASE_URL": f"sqlite:///{tmp_path}/ledger.db",
        }
    )
    try:
        fake.script(*[paced(15, 0.15)] * 3)  # about 2 s each
        results: list = []
        streams = [
            threading.Thread(
                target=lambda: results.append(
                    post_stream(gunicorn.url, {"message": "hi", "stream": True}, headers=AUTH)[0]
                )
            )
            for _ in range(3)
        ]
        for thread in streams:
            thread.start()
        assert fake.wait_for(lambda: len(fake.chat_calls()) == 3 and all(c.chunk_times for c in fake.chat_calls()))

        signalled = time.monotonic()
        gunicorn.process.send_signal(signal.SIGTERM)
        refused_after = seconds_until_refused(gunicorn.port, within=1.5)
        still_streaming = [thread.is_alive() for thread in streams]
        for thread in streams:
            thread.join(timeout=15)
        gunicorn.process.wait(timeout=15)
        stopped = time.monotonic() - signalled
    finally:
        gunicorn.stop()  # only if an assertion above failed: it has stopped by now

    # A gthread worker notices SIGTERM at its next poll (up to a second): refused while the answers still run.
    assert refused_after is not None and still_streaming == [True] * 3
    assert [r.events[-1]["type"] for r in results] == ["done"] * 3
    assert all(len(r.of_type("delta")) == 15 for r in results)
    assert gunicorn.process.returncode == 0
    assert stopped < 10  # within CHATPROXY_GRACEFUL_TIMEOUT: nobody was killed
    time.sleep(0.1)
    lines = gunicorn.json_lines()
    assert not [line for line in lines if line["level"] in {"ERROR", "CRITICAL"}]
    assert sum(line["message"].startswith("Worker exiting") for line in lines) == 2
    ledger = sa.create_engine(f"sqlite:///{tmp_path}/ledger.db")
    with ledger.connect() as conn:
        rows = conn.execute(sa.text("SELECT outcome, tokens_exact FROM ledger")).all()
    ledger.dispose()
    assert sorted(rows) == [("ok", True)] * 3  # no ledger row lost or left interrupted by the shutdown


def seconds_until_refused(port: int, within: float) -> float | None:
    """How long until new connections to the port are refused, or None if they still connect after `within`."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except ConnectionRefusedError:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def test_a_bad_deployment_setting_stops_gunicorn_naming_it():
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--check-config"],
        cwd=ROOT,
        env={**os.environ, "CHATPROXY_THREADS": "lots"},
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode != 0
    assert "CHATPROXY_THREADS must be an integer from 1 to 1000; got 'lots'" in result.stderr


def copy_app(tmp_path: Path) -> Path:
    """A copy of the code gunicorn runs, to change under a running server."""
    copy = tmp_path / "app"
    shutil.copytree(ROOT / "chatproxy", copy / "chatproxy", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("templates", "static"):
        shutil.copytree(ROOT / name, copy / name)
    for name in ("wsgi.py", "gunicorn.conf.py"):
        shutil.copy(ROOT / name, copy / name)
    return copy


def test_reload_starts_workers_with_the_new_code(tmp_path):
    """HUP (systemctl reload) after an upgrade: the master never imported chatproxy; new workers load the new code."""
    copy = copy_app(tmp_path)
    server = deploy_gunicorn(
        {"CHATPROXY_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}", "CHATPROXY_WORKERS": "2"}, cwd=copy
    )
    try:
        before = _get_json(server, "/healthz")
        old_workers = _workers(server)
        ops = copy / "chatproxy" / "ops.py"
        ops.write_text(ops.read_text().replace('jsonify({"status": "ok"})', 'jsonify({"status": "ok", "v": 2})'))
        server.process.send_signal(signal.SIGHUP)
        new_workers = _replaced(server, old_workers)
        answers = [_get_json(server, "/healthz") for _ in range(6)]  # new connections: both new workers answer
    finally:
        server.stop()

    assert before == {"status": "ok"}
    assert len(new_workers) == 2 and not set(new_workers) & set(old_workers)
    assert answers == [{"status": "ok", "v": 2}] * 6


def _get_json(server: Server, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _workers(server: Server) -> list[str]:
    return subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()


def _replaced(server: Server, old_workers: list[str], count: int = 2) -> list[str]:
    """The worker pids once none of `old_workers` is left and `count` new ones run (or after 20 s)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (set(_workers(server)) & set(old_workers) or len(_workers(server)) < count):
        time.sleep(0.1)
    return _workers(server)


def _request(
    server: Server, method: str, path: str, body: dict | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict, http.client.HTTPMessage]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    try:
        conn.request(
            method,
            path,
            body=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null"), response.headers
    finally:
        conn.close()


def _port_frees(port: int, timeout: float) -> bool:
    """Whether the port is free now or within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not _port_is_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- a bad setting stops gunicorn at once (issue 14, #2 and #8) --------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("OPENAI_API_KEY", "", "OPENAI_API_KEY is not set"),
        ("CHATPROXY_MAX_TOKENS", "abc", "CHATPROXY_MAX_TOKENS must be an integer from 1 to 128000; got 'abc'"),
        ("CHATPROXY_API_TOKENS", "foo", "CHATPROXY_API_TOKENS must be a comma-separated list of name=sha256:HEX"),
        ("CHATPROXY_PRICES", "{bad", "CHATPROXY_PRICES must be a JSON object of models to prices"),
        # Two workers (the default) and no shared key: each would sign page sessions with its own.
        ("CHATPROXY_SECRET_KEY", "", "CHATPROXY_SECRET_KEY is not set"),
    ],
)
def test_a_bad_setting_stops_gunicorn_before_any_worker_starts(tmp_path, setting, value, says):
    port = free_port()
    settings = gunicorn_settings({"CHATPROXY_DATABASE_URL": f"sqlite:///{tmp_path}/ledger.db", setting: value}, port)

    # A crash loop never ends: the timeout would fail the test.
    result = subprocess.run(GUNICORN, cwd=ROOT, env=environment(settings), capture_output=True, text=True, timeout=30)

    assert result.returncode == 1
    assert result.stderr.splitlines() == [result.stderr.strip()]  # one line, naming the setting
    assert result.stderr.startswith("chatproxy: ") and says in result.stderr
    assert "Booting worker" not in result.stdout + result.stderr
    assert _port_is_free(port)


def test_the_secret_key_message_says_how_to_make_one():
    result = subprocess.run(
        [*GUNICORN, "--check-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=environment(gunicorn_settings({"CHATPROXY_SECRET_KEY": "", "CHATPROXY_WORKERS": "3"}, free_port())),
    )

    assert result.returncode == 1
    assert "each of the 3 workers" in result.stderr
    assert "python3 -c 'import secrets; print(secrets.token_hex(32))'" in result.stderr


def test_workers_from_the_command_line_need_the_secret_key_too(tmp_path):
    port = free_port()
    settings = gunicorn_settings(
        {
            "CHATPROXY_SECRET_KEY": "",
            "CHATPROXY_WORKERS": "1",
            "CHATPROXY_DATABASE_URL": f"sqlite:///{tmp_path}/ledger.db",
        },
        port,
    )

    result = subprocess.run(
        [*GUNICORN, "--workers", "2"], cwd=ROOT, env=environment(settings), capture_output=True, text=True, timeout=30
    )

    assert result.returncode == 1
    assert "chatproxy: CHATPROXY_SECRET_KEY is not set, so each of the 2 workers" in result.stderr
    assert "Booting worker" not in result.stdout + result.stderr
    assert _port_is_free(port)


def test_one_worker_needs_no_secret_key(tmp_path):
    server = deploy_gunicorn(
        {
            "CHATPROXY_SECRET_KEY": "",
            "CHATPROXY_WORKERS": "1",
            "CHATPROXY_DATABASE_URL": f"sqlite:///{tmp_path}/ledger.db",
        }
    )
    try:
        assert _request(server, "GET", "/healthz")[0] == 200
    finally:
        server.stop()


def _write_env(folder: Path, **values: str) -> None:
    (folder / ".env").write_text("".join(f"{name}={value}\n" for name, value in values.items()), encoding="utf-8")


def test_a_reload_with_a_bad_env_file_keeps_serving_with_the_previous_settings(tmp_path):
    """`kill -HUP` after a bad edit of .env: gunicorn logs the setting and keeps the last good settings."""
    copy = copy_app(tmp_path)
    good = {
        "OPENAI_API_KEY": "sk-test-deploy",
        "CHATPROXY_SECRET_KEY": "deploy-test",
        "CHATPROXY_WORKERS": "2",
        "CHATPROXY_API_TOKENS": f"{TOKEN_NAME}={hash_token(TOKEN)}",
        "CHATPROXY_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
    }
    _write_env(copy, **good, CHATPROXY_MODELS="gpt-4o-mini,gpt-4o")
    server = start_gunicorn({}, cwd=copy)  # every other setting: .env
    try:
        before = _request(server, "GET", "/api/models", headers=AUTH)[1]["models"]
        first = _workers(server)

        _write_env(copy, **good, CHATPROXY_MODELS="gpt-4o-mini", CHATPROXY_MAX_TOKENS="abc")
        server.process.send_signal(signal.SIGHUP)
        second = _replaced(server, first)  # new workers (new code), with the settings gunicorn had
        refused = [_request(server, "GET", "/api/models", headers=AUTH)[1]["models"] for _ in range(4)]
        time.sleep(2)  # a crash loop would boot a worker every fraction of a second
        booted = sum("Booting worker" in line for line in server.output)
        alive = server.process.poll() is None

        _write_env(copy, **good, CHATPROXY_MODELS="gpt-4o-mini")
        server.process.send_signal(signal.SIGHUP)
        _replaced(server, second)
        accepted = [_request(server, "GET", "/api/models", headers=AUTH)[1]["models"] for _ in range(4)]
    finally:
        server.stop()

    assert before == ["gpt-4o-mini", "gpt-4o"]
    assert alive and booted == 4 and len(second) == 2 and not set(second) & set(first)
    assert refused == [["gpt-4o-mini", "gpt-4o"]] * 4
    errors = [line for line in server.json_lines() if line["level"] == "ERROR"]
    assert [line["message"] for line in errors] == [
        (
            "chatproxy: reload refused, still serving with the previous "
            "settings: CHATPROXY_MAX_TOKENS must be an integer from 1 to "
            "128000; got 'abc'."
        )
    ]
    assert accepted == [["gpt-4o-mini"]] * 4  # a good .env is taken on the next reload


def test_workers_that_cannot_start_stop_gunicorn_instead_of_restarting_forever(tmp_path):
    """New code that refuses the settings (an upgrade, then `systemctl reload`): gunicorn stops, with the reason."""
    copy = copy_app(tmp_path)
    server = deploy_gunicorn({"CHATPROXY_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}"}, cwd=copy)
    try:
        assert _request(server, "GET", "/healthz")[0] == 200
        config = copy / "chatproxy" / "config.py"
        config.write_text(
            config.read_text().replace(
                "    parsed: dict[str, Any] = {}\n",
                "    raise SettingsError('CHATPROXY_FUTURE must be set: this version needs it.')\n",
                1,
            )
        )
        server.process.send_signal(signal.SIGHUP)
        returncode = server.process.wait(timeout=30)  # a crash loop never ends: the timeout fails the test
    finally:
        server.stop()

    # 3: gunicorn's "worker failed to boot" (1 when the second new worker's exit is reaped while it stops).
    assert returncode in (1, 3)
    text = "\n".join(server.output)
    assert "chatproxy: CHATPROXY_FUTURE must be set: this version needs it." in text
    assert sum("Booting worker" in line for line in server.output) <= 4  # 2 at start, at most 2 after the reload
    # A worker the master stopped while it failed may take a moment to exit; then nothing holds the port.
    assert _port_frees(server.port, timeout=10)


# --- a database outage does not stop workers from starting (issue 14, #3) ------------------------------------


class Relay:
    """A TCP relay on a fixed loopback port to `target`: the database 'comes back' when it starts."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port))
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop relaying."""
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def test_workers_start_during_a_database_outage_and_create_the_schema_when_it_is_back(fake):
    with postgres_schema_url() as real_url:
        port = free_port()  # nothing listens there until the relay starts
        url = sa.make_url(real_url).set(port=port).render_as_string(hide_password=False)
        server = deploy_gunicorn({"OPENAI_BASE_URL": fake.base_url, "CHATPROXY_DATABASE_URL": url})
        relay = None
        try:
            health = _request(server, "GET", "/healthz")
            ready = _request(server, "GET", "/readyz")
            refused = [_request(server, "POST", "/api/chat", {"message": "hi"}, AUTH) for _ in range(4)]
            calls_during_outage = len(fake.chat_calls())

            relay = Relay(port, ("127.0.0.1", sa.make_url(real_url).port or 5432))
            answered = _request(server, "POST", "/api/chat", {"message": "hi"}, AUTH)
            ready_after = _request(server, "GET", "/readyz")
        finally:
            server.stop()
            if relay is not None:
                relay.close()
        engine = sa.create_engine(real_url)
        tables = set(sa.inspect(engine).get_table_names())
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT outcome FROM ledger")).all()
        engine.dispose()

    assert health[0] == 200
    assert ready[0] == 503 and "database" in ready[1]["error"]["message"]
    assert {status for status, _, _ in refused} == {503}
    assert {body["error"]["code"] for _, body, _ in refused} <= {"budget_unavailable", "ledger_unavailable"}
    assert all(headers["Retry-After"] for _, _, headers in refused)
    assert calls_during_outage == 0  # nothing unrecorded went upstream
    assert answered[0] == 200 and answered[1]["content"]
    assert ready_after[0] == 200
    assert {"ledger", "budget_counters", "batches"} <= tables
    assert rows == [("ok",)]
    assert "Worker failed to boot" not in "\n".join(server.output)


# --- behind nginx, the client cannot choose the forwarded headers (issue 14, #9) ------------------------------


def test_nginx_replaces_the_forwarded_headers_a_client_sends(stack):
    nginx, gunicorn = stack
    client = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.4"
    theirs = f"client-{uuid.uuid4().hex[:12]}"
    forged = {
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Port": "1",
        "X-Request-ID": theirs,
        "Origin": f"http://127.0.0.1:{nginx.port}",
    }  # the page's own origin, as nginx serves it

    conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10, source_address=(client, 0))
    conn.request("POST", "/api/chat", body=b'{"message": "hi"}', headers={"Content-Type": "application/json", **forged})
    response = conn.getresponse()
    response.read()
    conn.close()
    again = _post_from(client, nginx.port, {"X-Forwarded-For": "203.0.113.10"})  # 1/minute per client IP

    # A forged port would make the app see itself at :1 and refuse its own origin (403).
    assert response.status == 200
    assert again == 429  # the forged address did not get a fresh limit
    ours = response.getheader("X-Request-ID")
    assert ours != theirs and len(ours) == 32
    deadline = time.monotonic() + 5
    while not (lines := [line for line in gunicorn.json_lines() if line.get("client_request_id") == theirs]):
        assert time.monotonic() < deadline, "no access line for the request"
        time.sleep(0.05)
    assert (lines[0]["remote_addr"], lines[0]["forwarded_for"], lines[0]["request_id"]) == (client, client, ours)
    ledger = sa.create_engine(gunicorn.settings["CHATPROXY_DATABASE_URL"])
    with ledger.connect() as db:
        rows = db.execute(
            sa.text("SELECT request_id FROM ledger WHERE client_request_id = :theirs"), {"theirs": theirs}
        ).all()
    ledger.dispose()
    assert rows == [(ours,)]
