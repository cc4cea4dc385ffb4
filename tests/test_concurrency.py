"""One client cannot hold every worker thread: concurrency caps per caller, per client IP and per worker, under
real gunicorn (gunicorn.conf.py, gthread) with slow upstream calls from the fake."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest

from chatproxy.callers import hash_token
from chatproxy.demo.upstream import Reply
from tests.helpers import Server, need_nginx, start_gunicorn, start_nginx

SLOW_MODEL = "gpt-4o"  # the fake answers it after SLOW seconds; everyone else's calls use gpt-4o-mini, at once
SLOW = 6.0


@pytest.fixture
def gunicorn(fake, tmp_path):
    """Start `gunicorn -c gunicorn.conf.py` with one worker and these settings; returns its port."""
    servers: list[Server] = []

    def start(**settings: str) -> int:
        server = start_gunicorn(
            {
                "CHATPROXY_WORKERS": "1",
                "OPENAI_API_KEY": "sk-test-c",
                "OPENAI_BASE_URL": fake.base_url,
                "CHATPROXY_SECRET_KEY": "concurrency-test",
                "CHATPROXY_MAX_RETRIES": "0",
                "CHATPROXY_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
                "CHATPROXY_REDIS_URL": "",
                "CHATPROXY_RATE_LIMIT_PAGE": "1000/minute",
                "CHATPROXY_GRACEFUL_TIMEOUT": "1",
                **settings,
            }
        )
        servers.append(server)
        return server.port

    yield start
    for server in servers:
        server.stop()


def request(
    port: int,
    method: str,
    path: str,
    body: dict | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection: status, headers (lower-case names), body; (0, {}, b"") if it failed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    except OSError:
        return 0, {}, b""
    finally:
        conn.close()


@dataclass
class Flood:
    """Requests sent at once from threads; each one's answer as it arrives."""

    answers: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def send(self, port: int, path: str, body: dict, headers: dict[str, str]) -> None:
        """Start one more request."""
        thread = threading.Thread(target=lambda: self.answers.append(request(port, "POST", path, body, headers)))
        thread.start()
        self.threads.append(thread)

    def statuses(self) -> list[int]:
        """The statuses answered so far, in arrival order."""
        return [status for status, _, _ in list(self.answers)]

    def join(self) -> list[int]:
        """Wait for every answer; their statuses, sorted."""
        for thread in self.threads:
            thread.join(timeout=60)
        return sorted(self.statuses())


def settle(flood: Flood, fake, upstream: int, refused: int, status: int) -> None:
    """Wait until `upstream` flood calls run at the fake and `refused` were answered `status` at once."""
    deadline = time.monotonic() + 10
    while not (len(fake.chat_calls()) == upstream and flood.statuses().count(status) == refused):
        assert time.monotonic() < deadline, (
            f"expected {upstream} calls upstream and {refused} x {status}; got "
            f"{len(fake.chat_calls())} calls and {flood.statuses()}"
        )
        time.sleep(0.02)


def tokens(*names: str) -> tuple[str, dict[str, dict[str, str]]]:
    """A CHATPROXY_API_TOKENS value for fresh tokens, and each name's Authorization header."""
    made = {name: f"cpx_{uuid.uuid4().hex}" for name in names}
    setting = ",".join(f"{name}={hash_token(token)}" for name, token in made.items())
    return setting, {name: {"Authorization": f"Bearer {token}"} for name, token in made.items()}


def page_session(port: int) -> dict[str, str]:
    """Load the page like a new browser: the headers that make its requests (session cookie and CSRF token)."""
    status, headers, body = request(port, "GET", "/")
    assert status == 200, body
    cookie = headers["set-cookie"].split(";", 1)[0]
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', body.decode()).group(1)
    return {"Cookie": cookie, "X-CSRF-Token": csrf}


def error(answer: tuple[int, dict[str, str], bytes]) -> dict:
    """The error object of a refusal."""
    return json.loads(answer[2])["error"]


def test_one_token_flooding_json_calls_gets_429_past_its_cap_and_others_still_answer(gunicorn, fake):
    setting, auth = tokens("flood", "other")
    port = gunicorn(CHATPROXY_API_TOKENS=setting, CHATPROXY_THREADS="8", CHATPROXY_MAX_CONCURRENT="3")
    fake.for_model(SLOW_MODEL, Reply(delay=SLOW))
    flood = Flood()

    for _ in range(10):  # more than the worker's 8 threads
        flood.send(port, "/api/chat", {"message": "hi", "model": SLOW_MODEL}, auth["flood"])
    settle(flood, fake, upstream=3, refused=7, status=429)
    other = request(port, "POST", "/api/chat", {"message": "hi"}, auth["other"])
    health = request(port, "GET", "/healthz")
    finished_meanwhile = flood.statuses().count(200)

    assert (other[0], health[0]) == (200, 200)
    assert finished_meanwhile == 0  # the flood's calls were still running when both answered
    assert flood.join() == [200] * 3 + [429] * 7
    refusal = next(answer for answer in flood.answers if answer[0] == 429)
    assert error(refusal)["code"] == "rate_limited"
    assert error(refusal)["message"].startswith("Too many requests at once")
    assert refusal[1]["retry-after"] == "1"
    assert len([c for c in fake.chat_calls() if c.model == SLOW_MODEL]) == 3


def test_many_page_sessions_from_one_ip_share_its_cap(gunicorn, fake):
    setting, auth = tokens("backend")
    port = gunicorn(CHATPROXY_API_TOKENS=setting, CHATPROXY_THREADS="8", CHATPROXY_MAX_CONCURRENT_PER_IP="4")
    fake.for_model(SLOW_MODEL, Reply(delay=SLOW))
    sessions = [page_session(port) for _ in range(6)]
    flood = Flood()

    for headers in sessions * 2:  # 12 streams, 2 per session: each session is within its own caps
        flood.send(port, "/api/chat", {"message": "hi", "model": SLOW_MODEL, "stream": True}, headers)
    settle(flood, fake, upstream=4, refused=8, status=429)
    backend = request(port, "POST", "/api/chat", {"message": "hi"}, auth["backend"])
    health = request(port, "GET", "/healthz")
    finished_meanwhile = flood.statuses().count(200)

    assert (backend[0], health[0]) == (200, 200)
    assert finished_meanwhile == 0
    assert flood.join() == [200] * 4 + [429] * 8
    refusal = next(answer for answer in flood.answers if answer[0] == 429)
    assert error(refusal)["message"].startswith("Too many requests at once from your network")


def test_a_full_worker_answers_503_at_once_and_keeps_threads_for_health_checks(gunicorn, fake):
    setting, auth = tokens(*(f"caller{i}" for i in range(10)))
    port = gunicorn(CHATPROXY_API_TOKENS=setting, CHATPROXY_THREADS="6")
    fake.for_model(SLOW_MODEL, Reply(delay=SLOW))
    flood = Flood()

    for i in range(10):  # ten callers, each well within its own cap
        flood.send(port, "/api/chat", {"message": "hi", "model": SLOW_MODEL}, auth[f"caller{i}"])
    settle(flood, fake, upstream=4, refused=6, status=503)
    checks = [request(port, "GET", path)[0] for path in ("/healthz", "/readyz", "/metrics")]
    finished_meanwhile = flood.statuses().count(200)

    assert checks == [200, 200, 200]
    assert finished_meanwhile == 0
    assert flood.join() == [200] * 4 + [503] * 6
    busy = next(answer for answer in flood.answers if answer[0] == 503)
    assert error(busy)["code"] == "server_busy"
    assert busy[1]["retry-after"] == "1"


def test_nginx_in_front_absorbs_slow_headers_and_slow_bodies(gunicorn, fake, tmp_path):
    """What the app cannot fix (README, "Why nginx must be in front"): connections that trickle their headers or
    body hold a gunicorn thread each. nginx reads whole requests first, so gunicorn never sees them."""
    need_nginx()
    setting, auth = tokens("client")
    port = gunicorn(CHATPROXY_API_TOKENS=setting, CHATPROXY_THREADS="4", CHATPROXY_TRUSTED_PROXIES="1")
    nginx = start_nginx(tmp_path / "nginx", port)
    front = nginx.port
    slow: list[socket.socket] = []
    try:
        for i in range(60):  # 15 times gunicorn's threads: half stop inside the headers, half inside the body
            sock = socket.create_connection(("127.0.0.1", front))
            head = f"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth['client']['Authorization']}\r\n"
            sock.sendall(
                head.encode()
                if i % 2
                else (head + 'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"message": ').encode()
            )
            slow.append(sock)
        health = request(front, "GET", "/healthz", timeout=5)
        chat = request(front, "POST", "/api/chat", {"message": "hi"}, auth["client"], timeout=5)
    finally:
        for sock in slow:
            sock.close()
        nginx.stop()

    assert (health[0], chat[0]) == (200, 200)
