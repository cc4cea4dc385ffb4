"""Access control and abuse protection: each test is an attack a reader can recognise."""

from __future__ import annotations

import hashlib
import http.client
import re
import subprocess
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest
import redis

from chatproxy import create_app
from chatproxy.callers import hash_token
from chatproxy.demo.upstream import Reply
from chatproxy.errors import ApiError
from chatproxy.limits import Claim, RedisSlots
from chatproxy.state import state
from tests.helpers import REDIS_URL, free_port, page_session, start_gunicorn
from tests.sse import post_stream

ALLOWED = "https://app.example.com"
TOKEN = "cpx_test-token-for-alice-0123456789"
CHAT = {"message": "hi"}


@pytest.fixture
def locked(settings_for):
    """Build an app with access control as shipped: no anonymous access."""

    def make(**overrides: object):
        config = {
            "CHATPROXY_ALLOW_ANONYMOUS": False,
            "CHATPROXY_ALLOWED_ORIGINS": ALLOWED,
            "CHATPROXY_API_TOKENS": f"alice={hash_token(TOKEN)}",
        }
        config.update(overrides)
        return create_app(settings_for(**config))

    return make


def test_curl_without_origin_or_token_is_refused(locked, fake):
    response = locked().test_client().post("/api/chat", json=CHAT)

    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert fake.calls == []


def test_forged_origin_is_refused_and_gets_no_cors_headers(locked, fake):
    response = locked().test_client().post("/api/chat", json=CHAT, headers={"Origin": "https://evil.example"})

    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "forbidden_origin"
    assert "Access-Control-Allow-Origin" not in response.headers
    assert fake.calls == []


def test_forged_origin_is_refused_even_with_a_valid_token(locked, fake):
    response = (
        locked()
        .test_client()
        .post("/api/chat", json=CHAT, headers={"Origin": "https://evil.example", "Authorization": f"Bearer {TOKEN}"})
    )

    assert response.status_code == 403
    assert fake.calls == []


def test_allowed_origin_gets_its_own_origin_back(locked, fake):
    response = locked().test_client().post("/api/chat", json=CHAT, headers={"Origin": ALLOWED})

    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert len(fake.chat_calls()) == 1


def test_preflight_is_answered_for_allowed_origins_only(locked):
    client = locked().test_client()
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}

    allowed = client.options("/api/chat", headers={"Origin": ALLOWED, **preflight})
    refused = client.options("/api/chat", headers={"Origin": "https://evil.example", **preflight})

    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    assert "content-type" in allowed.headers["Access-Control-Allow-Headers"].lower()
    assert "Access-Control-Allow-Origin" not in refused.headers


def _preflight(url: str, path: str, method: str, headers: str) -> dict[str, str]:
    """A browser's CORS preflight from the allowed origin, over a real connection; the answer's headers."""
    split = urlsplit(url)
    conn = http.client.HTTPConnection(split.hostname, split.port, timeout=10)
    conn.request(
        "OPTIONS",
        path,
        headers={"Origin": ALLOWED, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers},
    )
    response = conn.getresponse()
    response.read()
    conn.close()
    return {k.lower(): v for k, v in response.getheaders()}


@pytest.mark.parametrize("path", ["/api/chat", "/api/models", "/v1/chat/completions"])
def test_preflight_allows_exactly_the_methods_and_headers_the_routes_take(locked, serve, path):
    url = serve(locked())

    asked = _preflight(url, path, "POST", "content-type,authorization,x-request-id")
    other_methods = [_preflight(url, path, method, "content-type") for method in ("DELETE", "PATCH", "PUT")]

    assert asked["access-control-allow-origin"] == ALLOWED
    assert sorted(asked["access-control-allow-headers"].lower().split(", ")) == [
        "authorization",
        "content-type",
        "x-request-id",
    ]
    assert asked["access-control-allow-methods"] == "GET, POST"
    assert [headers.get("access-control-allow-methods") for headers in other_methods] == [None] * 3


def test_no_origin_is_allowed_by_default(settings_for):
    app = create_app(settings_for(CHATPROXY_ALLOW_ANONYMOUS=False))

    response = app.test_client().post("/api/chat", json=CHAT, headers={"Origin": "https://app.example.com"})

    assert response.status_code == 403


@pytest.mark.parametrize("origins", ["*", "https://ok.example,*", "app.example.com", "https://x.example/path"])
def test_wildcard_or_malformed_origins_stop_start_up(settings_for, origins):
    from chatproxy import SettingsError

    with pytest.raises(SettingsError, match="CHATPROXY_ALLOWED_ORIGINS"):
        create_app(settings_for(CHATPROXY_ALLOWED_ORIGINS=origins))


def test_page_session_with_csrf_token_may_chat(locked, fake):
    client = locked().test_client()
    token = page_session(client)

    response = client.post("/api/chat", json=CHAT, headers={"X-CSRF-Token": token})

    assert response.status_code == 200
    assert len(fake.chat_calls()) == 1


@pytest.mark.parametrize("sent", [None, "", "wrong-token"])
def test_page_session_without_the_right_csrf_token_is_refused(locked, fake, sent):
    client = locked().test_client()
    page_session(client)
    headers = {} if sent is None else {"X-CSRF-Token": sent}

    response = client.post("/api/chat", json=CHAT, headers=headers)

    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "csrf_failed"
    assert fake.calls == []


def test_session_cookie_is_httponly_strict_and_secure_on_https(locked):
    app = locked(CHATPROXY_TRUSTED_PROXIES=1)
    plain = app.test_client().get("/").headers["Set-Cookie"]
    https = app.test_client().get("/", headers={"X-Forwarded-Proto": "https"}).headers["Set-Cookie"]

    assert "HttpOnly" in plain and "SameSite=Strict" in plain and "Secure" not in plain
    assert "Secure" in https


def test_token_holder_may_chat(locked, fake):
    response = locked().test_client().post("/api/chat", json=CHAT, headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 200


@pytest.mark.parametrize(
    "header", [f"Bearer {TOKEN}x", "Bearer ", "Bearer", f"Bearer {TOKEN[:-4]}", f"Basic {TOKEN}", "", f"Token {TOKEN}"]
)
def test_wrong_empty_and_truncated_tokens_are_refused(locked, fake, header):
    response = locked().test_client().post("/api/chat", json=CHAT, headers={"Authorization": header})

    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert fake.calls == []


def test_malformed_token_setting_stops_start_up(settings_for):
    from chatproxy import SettingsError

    with pytest.raises(SettingsError, match="CHATPROXY_API_TOKENS"):
        create_app(settings_for(CHATPROXY_API_TOKENS="alice=plaintext-token"))


def test_new_token_command_prints_a_token_that_works(app, settings_for, fake):
    output = app.test_cli_runner().invoke(args=["new-token", "billing"]).output
    token = re.search(r"token \(give it to the client, shown once\): (\S+)", output).group(1)
    entry = re.search(r"setting entry: (billing=sha256:[0-9a-f]{64})", output).group(1)

    assert entry == f"billing=sha256:{hashlib.sha256(token.encode()).hexdigest()}"
    locked = create_app(settings_for(CHATPROXY_ALLOW_ANONYMOUS=False, CHATPROXY_API_TOKENS=entry))
    response = locked.test_client().post("/api/chat", json=CHAT, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


def test_rate_limit_lets_exactly_l_requests_through(locked, fake):
    client = locked(CHATPROXY_RATE_LIMIT_TOKEN="5/minute").test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}

    statuses = [client.post("/api/chat", json=CHAT, headers=auth).status_code for _ in range(10)]

    assert statuses == [200] * 5 + [429] * 5
    refused = client.post("/api/chat", json=CHAT, headers=auth)
    assert refused.get_json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 61
    assert len(fake.chat_calls()) == 5


def test_limits_are_per_identity(locked, fake):
    app = locked(CHATPROXY_RATE_LIMIT_TOKEN="2/minute", CHATPROXY_RATE_LIMIT_ORIGIN="3/minute")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}

    tokens = [client.post("/api/chat", json=CHAT, headers=auth).status_code for _ in range(3)]
    origins = [client.post("/api/chat", json=CHAT, headers={"Origin": ALLOWED}).status_code for _ in range(4)]

    assert tokens == [200, 200, 429]
    assert origins == [200, 200, 200, 429]


def test_client_ip_comes_from_x_forwarded_for_only_behind_trusted_proxies(locked, fake):
    for trusted, expected in ((0, [200, 429, 429]), (1, [200, 200, 200])):
        client = locked(
            CHATPROXY_ALLOW_ANONYMOUS=True, CHATPROXY_RATE_LIMIT_ANONYMOUS="1/minute", CHATPROXY_TRUSTED_PROXIES=trusted
        ).test_client()
        statuses = [
            client.post("/api/chat", json=CHAT, headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code
            for i in range(3)
        ]
        assert statuses == expected, trusted


def test_too_many_parallel_streams_are_refused(locked, fake, serve):
    url = serve(locked(CHATPROXY_MAX_STREAMS=2))
    fake.script(*[Reply(chunks=["slow "] * 20, pace=0.05)] * 3)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    results = []

    def stream() -> None:
        results.append(post_stream(url, {"message": "hi", "stream": True}, headers=auth)[0])

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for thread in threads:
        thread.start()
    assert fake.wait_for(lambda: len(fake.chat_calls()) == 2)
    third, _ = post_stream(url, {"message": "hi", "stream": True}, headers=auth)
    for thread in threads:
        thread.join()
    after, _ = post_stream(url, {"message": "hi", "stream": True}, headers=auth)

    assert third.status == 429
    assert b'"rate_limited"' in third.raw
    assert [r.events[-1]["type"] for r in results] == ["done", "done"]
    assert after.status == 200


def test_stream_slots_of_an_allowed_origin_are_per_client_ip(locked, fake):
    """Anyone can send an allowed Origin: one client holding streams must not lock out the frontend's other users."""
    client = locked(CHATPROXY_MAX_STREAMS=1).test_client()
    fake.script(*[Reply(chunks=["a ", "b"])] * 3)

    def stream(ip: str):
        return client.post(
            "/api/chat",
            json={"message": "hi", "stream": True},
            headers={"Origin": ALLOWED},
            environ_base={"REMOTE_ADDR": ip},
            buffered=False,
        )

    held = stream("198.51.100.1")  # its slot stays taken until the response is closed
    same_ip, other_ip = stream("198.51.100.1"), stream("198.51.100.2")
    statuses = [held.status_code, same_ip.status_code, other_ip.status_code]
    for response in (held, same_ip, other_ip):
        response.close()

    assert statuses == [200, 429, 200]
    assert same_ip.get_json()["error"]["code"] == "rate_limited"


def test_security_headers_on_every_response(locked):
    client = locked().test_client()
    for response in (
        client.get("/"),
        client.post("/api/chat", json=CHAT),
        client.get("/nope"),
        client.get("/static/chat.js"),
    ):
        csp = response.headers["Content-Security-Policy"]
        assert "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert "script-src 'self'" in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "Strict-Transport-Security" not in response.headers


def test_hsts_only_over_https(locked):
    response = locked(CHATPROXY_TRUSTED_PROXIES=1).test_client().get("/", headers={"X-Forwarded-Proto": "https"})

    assert response.headers["Strict-Transport-Security"].startswith("max-age=")


def test_health_is_not_rate_limited_or_guarded(locked):
    client = locked(CHATPROXY_RATE_LIMIT_PAGE="1/minute").test_client()

    assert [client.get("/healthz").status_code for _ in range(5)] == [200] * 5


def test_reading_does_not_use_up_the_pages_messages(locked, fake):
    """The page's own GET /api/models must not cost it a message; reads have a bucket of their own, also limited."""
    client = locked(CHATPROXY_RATE_LIMIT_PAGE="3/minute").test_client()
    csrf = {"X-CSRF-Token": page_session(client)}

    first_read = client.get("/api/models").status_code
    messages = [client.post("/api/chat", json=CHAT, headers=csrf).status_code for _ in range(4)]
    reads = [client.get("/api/models").status_code for _ in range(3)]

    assert first_read == 200
    assert messages == [200, 200, 200, 429]
    assert reads == [200, 200, 429]
    assert len(fake.chat_calls()) == 3


def test_new_page_sessions_are_limited_per_client_ip(locked):
    app = locked(CHATPROXY_RATE_LIMIT_SESSIONS="3/hour")

    def load(ip: str, client=None):
        return (client or app.test_client()).get("/", environ_base={"REMOTE_ADDR": ip})

    returning = app.test_client()
    fresh = [load("198.51.100.7", returning).status_code] + [load("198.51.100.7").status_code for _ in range(3)]
    reload_ = load("198.51.100.7", returning)  # a session that exists is not a new one
    elsewhere = load("198.51.100.8")

    assert fresh == [200, 200, 200, 429]
    assert reload_.status_code == 200 and elsewhere.status_code == 200
    refused = load("198.51.100.7")
    assert refused.get_json()["error"]["code"] == "rate_limited"
    assert "new chat sessions" in refused.get_json()["error"]["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 3600
    assert "Set-Cookie" not in refused.headers


def test_finished_requests_give_their_slots_back(locked, fake, serve):
    """A cap of one still serves one request after another: JSON replies and closed streams release their slot."""
    url = serve(locked(CHATPROXY_MAX_CONCURRENT=1))
    auth = {"Authorization": f"Bearer {TOKEN}"}

    statuses = []
    for body in (CHAT, {"message": "hi", "stream": True}, CHAT, {"message": "hi", "stream": True}, CHAT):
        received, _ = post_stream(url, body, headers=auth)
        statuses.append(received.status)

    assert statuses == [200] * 5


def test_a_stream_gives_its_slots_back_with_its_last_event(locked, fake):
    """A client that asks again the moment it has `done` finds its slot free and the answer recorded, although
    the server has not yet closed the first response."""
    app = locked(CHATPROXY_MAX_CONCURRENT=1, CHATPROXY_MAX_STREAMS=1)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    first = client.post("/api/chat", json={"message": "hi", "stream": True}, headers=auth, buffered=False)
    body = iter(first.response)
    received = b""
    while b'"done"' not in received:
        received += next(body)

    recorded = [row["outcome"] for row in state(app).ledger.rows()]
    again = client.post("/api/chat", json={"message": "hi", "stream": True}, headers=auth)
    answered = again.status_code, b'"done"' in again.data
    first.close()

    assert recorded == ["ok"]  # the first answer's row, closed before its last event
    assert answered == (200, True)


def test_a_stream_holds_its_callers_slot_until_it_ends(locked, fake, serve):
    url = serve(locked(CHATPROXY_MAX_CONCURRENT=1))
    fake.script(Reply(chunks=["slow "] * 10, pace=0.1))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    streamed = []
    thread = threading.Thread(
        target=lambda: streamed.append(post_stream(url, {"message": "hi", "stream": True}, headers=auth)[0])
    )
    thread.start()
    assert fake.wait_for(lambda: len(fake.chat_calls()) == 1)

    during, _ = post_stream(url, CHAT, headers=auth)
    thread.join()
    after, _ = post_stream(url, CHAT, headers=auth)

    assert during.status == 429 and b"Too many requests at once" in during.raw
    assert streamed[0].events[-1]["type"] == "done"
    assert after.status == 200


# --- Redis: one limit across workers; what happens when Redis is down ----------------------------


@pytest.fixture
def redis_url() -> str:
    """The test Redis (TEST_REDIS_URL); the test fails, not skips, when it is missing."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    client.ping()
    return REDIS_URL


def test_redis_limit_is_exact_across_four_gunicorn_workers(fake, redis_url, tmp_path):
    import http.client

    name = f"load-{uuid.uuid4().hex[:8]}"
    token = f"cpx_{uuid.uuid4().hex}"
    server = start_gunicorn(
        {
            "OPENAI_API_KEY": "sk-test-gunicorn",
            "OPENAI_BASE_URL": fake.base_url,
            "CHATPROXY_SECRET_KEY": "x",
            "CHATPROXY_API_TOKENS": f"{name}={hash_token(token)}",
            # per hour: a fixed window is far less likely to roll over during the 15 calls
            "CHATPROXY_RATE_LIMIT_TOKEN": "10/hour",
            "CHATPROXY_REDIS_URL": redis_url,
            "CHATPROXY_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
            "CHATPROXY_MAX_RETRIES": "0",
        },
        *("--workers", "4", "--threads", "4"),
    )
    try:
        statuses, pids = [], set()
        for _ in range(15):  # a new connection each time, so the kernel spreads them over the workers
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request(
                "POST",
                "/api/chat",
                body=b'{"message": "hi"}',
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
            )
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            conn.close()
        workers = subprocess.run(
            ["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
    finally:
        server.stop()

    assert len(workers) == 4
    assert statuses.count(200) == 10
    assert statuses.count(429) == 5
    assert len(fake.chat_calls()) == 10
    del pids


def test_in_flight_caps_are_shared_by_workers_through_redis(locked, fake, serve, redis_url):
    name, token = f"shared-{uuid.uuid4().hex[:8]}", f"cpx_{uuid.uuid4().hex}"
    config = {
        "CHATPROXY_REDIS_URL": redis_url,
        "CHATPROXY_API_TOKENS": f"{name}={hash_token(token)}",
        "CHATPROXY_MAX_CONCURRENT": 1,
    }
    one, two = serve(locked(**config)), serve(locked(**config))  # two processes' worth of app state
    fake.for_model("gpt-4o", Reply(delay=1.5))
    auth = {"Authorization": f"Bearer {token}"}
    held = []
    thread = threading.Thread(
        target=lambda: held.append(post_stream(one, {"message": "hi", "model": "gpt-4o"}, headers=auth)[0])
    )
    thread.start()
    assert fake.wait_for(lambda: len(fake.chat_calls()) == 1)

    other_worker, _ = post_stream(two, CHAT, headers=auth)
    thread.join()
    after, _ = post_stream(two, CHAT, headers=auth)

    assert other_worker.status == 429 and b"Too many requests at once" in other_worker.raw
    assert held[0].status == 200 and after.status == 200


def test_unreachable_redis_falls_back_to_in_process_limits(locked, fake):
    app = locked(CHATPROXY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", CHATPROXY_RATE_LIMIT_TOKEN="3/minute")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}

    statuses = [client.post("/api/chat", json=CHAT, headers=auth).status_code for _ in range(5)]

    # The proxy keeps serving, and still limits (per process) while Redis is down.
    assert statuses == [200, 200, 200, 429, 429]


def test_unreachable_redis_still_limits_new_sessions_per_process(locked):
    app = locked(CHATPROXY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", CHATPROXY_RATE_LIMIT_SESSIONS="2/hour")

    assert [app.test_client().get("/").status_code for _ in range(3)] == [200, 200, 429]


def _claims(*pairs: tuple[str, int]) -> list[Claim]:
    return [Claim(key, limit, ApiError(429, "rate_limited", key)) for key, limit in pairs]


def test_redis_slots_are_shared_and_a_lost_slot_lapses_with_its_lease(redis_url):
    key = f"test-{uuid.uuid4().hex}"
    one, two = (
        RedisSlots(redis_url, lease_seconds=0.5, prefix="chatproxy:"),
        RedisSlots(redis_url, lease_seconds=0.5, prefix="chatproxy:"),
    )
    held = [one.acquire("a", _claims((key, 2))), two.acquire("b", _claims((key, 2)))]  # two workers, one count
    refused = [one.acquire(f"r{i}", _claims((key, 2))) for i in range(5)]  # must not keep the lost slots alive
    time.sleep(0.6)  # both holders "died" without releasing: their leases end
    again = two.acquire("c", _claims((key, 2)))
    two.release("c", [key])
    after_release = [one.acquire("d", _claims((key, 1))), one.acquire("e", _claims((key, 1)))]

    assert held == [None, None] and [claim.key for claim in refused] == [key] * 5
    assert again is None
    assert after_release[0] is None and after_release[1].key == key


def test_redis_slots_take_every_key_or_none(redis_url):
    caller, ip = f"caller-{uuid.uuid4().hex}", f"ip-{uuid.uuid4().hex}"
    slots = RedisSlots(redis_url, lease_seconds=60, prefix="chatproxy:")
    assert slots.acquire("a", _claims((ip, 1))) is None  # another caller from the same IP holds the IP's one slot

    refused = slots.acquire("b", _claims((caller, 5), (ip, 1)))
    slots.release("a", [ip])

    assert refused.key == ip
    assert slots.acquire("c", _claims((caller, 1))) is None  # the refused request took nothing under `caller`


def test_slots_fall_back_to_the_process_when_redis_is_down():
    slots = RedisSlots(f"redis://127.0.0.1:{free_port()}/0", lease_seconds=60, prefix="chatproxy:")
    assert slots.acquire("a", _claims(("k", 1))) is None
    assert slots.acquire("b", _claims(("k", 1))).key == "k"
    slots.release("a", ["k"])
    assert slots.acquire("c", _claims(("k", 1))) is None
