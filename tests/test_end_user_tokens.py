"""Signed end-user tokens: an app's backend mints a JWT per signed-in user; each user gets their own identity,
limits and budget under the app's API key; every forged, stale or misdirected token is a 401 that reaches nothing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flask import Flask

from chatproxy import create_app
from chatproxy.callers import hash_token
from chatproxy.demo.upstream import Reply
from chatproxy.state import state
from chatproxy.usage import estimate_prompt_tokens
from tests.helpers import REDIS_URL, postgres_schema_url, start_gunicorn

ONE_MICRO_PER_TOKEN = json.dumps({m: {"input": 1, "cached_input": 1, "output": 1} for m in ("gpt-4o", "gpt-4o-mini")})
ADMIN = "cpx_admin-token-for-end-user-tests-01"
ASK = {"message": "hi", "max_tokens": 100}
TOKEN_LINE = re.compile(r"token \(give it to the client, shown once\): (cpx_\S+)")


@pytest.fixture
def app(settings_for, fake, database_url) -> Flask:
    fake.for_model("gpt-4o-mini", Reply(content="x" * 400))  # 100 completion tokens: ~108 µ$ a call
    return create_app(
        settings_for(
            CHATPROXY_DATABASE_URL=database_url,
            CHATPROXY_ALLOW_ANONYMOUS=False,
            CHATPROXY_API_TOKENS=f"ops={hash_token(ADMIN)}",
            CHATPROXY_ADMIN_TOKENS="ops",
            CHATPROXY_KEY_CACHE_SECONDS=0,
            CHATPROXY_PRICES=ONE_MICRO_PER_TOKEN,
        )
    )


def cli(app: Flask, *args: str) -> str:
    result = app.test_cli_runner().invoke(args=["keys", *args])
    assert result.exit_code == 0, result.output
    return result.output


def hs256_key(app: Flask, name: str, *options: str) -> str:
    """Make key `name` taking HS256 end-user tokens; the secret its app's backend signs them with."""
    cli(app, "create", name, "--end-user-key", "hs256", *options)
    return cli(app, "end-user-secret", name).strip()


def mint(secret: object, kid: str, sub: str = "alice", algorithm: str = "HS256", **claims: object) -> str:
    """What the app's backend does for its signed-in user."""
    now = int(time.time())
    payload = {"sub": sub, "aud": "chatproxy", "iat": now, "exp": now + 600, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm, headers={"kid": kid})


def hs256_with(secret: bytes, kid: str) -> str:
    """An HS256 token signed by hand (PyJWT refuses to use a public key as an HMAC secret; an attacker need not)."""

    def part(value: dict | bytes) -> str:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    now = int(time.time())
    claims = {"sub": "eve", "aud": "chatproxy", "exp": now + 600}
    signing = f"{part({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{part(claims)}"
    return f"{signing}.{part(hmac.new(secret, signing.encode(), hashlib.sha256).digest())}"


def ask(app: Flask, token: str, body: dict | None = None):
    return app.test_client().post("/api/chat", json=body or ASK, headers={"Authorization": f"Bearer {token}"})


def error(response) -> tuple[int, str]:
    return response.status_code, response.get_json()["error"]["code"]


def test_a_signed_in_user_is_their_own_caller_under_the_apps_key(app, fake) -> None:
    secret = hs256_key(app, "spa")

    assert ask(app, mint(secret, "spa", "alice")).status_code == 200
    assert ask(app, mint(secret, "spa", "bob@example.com")).status_code == 200
    rows = state(app).ledger.rows()
    assert [row["identity"] for row in rows] == ["token:spa/alice", "token:spa/bob@example.com"]
    assert [row["end_user"] for row in rows] == ["token:spa/alice", "token:spa/bob@example.com"]
    told = [call.body["safety_identifier"] for call in fake.chat_calls()]  # OpenAI's abuse signal, as a hash
    assert len(set(told)) == 2 and all(re.fullmatch(r"[0-9a-f]{64}", value) for value in told)
    assert "alice" not in json.dumps([call.body for call in fake.chat_calls()])
    report = app.test_client().get("/api/usage", headers={"Authorization": f"Bearer {ADMIN}"}).get_json()
    assert [(entry["key"], entry["requests"]) for entry in report["by_key"]] == [("spa", 2)]
    assert [entry["identity"] for entry in report["by_end_user"]] == ["token:spa/alice", "token:spa/bob@example.com"]


def forged(secret: str, other: str) -> dict[str, str]:
    """Every way a token may be wrong, each made from a good one."""
    good = mint(secret, "spa")
    header, payload, signature = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered = base64.urlsafe_b64encode(json.dumps({**claims, "sub": "mallory"}).encode()).rstrip(b"=").decode()
    unsigned = jwt.encode({**claims}, None, "none", headers={"kid": "spa"})
    return {
        "expired": mint(secret, "spa", exp=int(time.time()) - 120),
        "not yet valid": mint(secret, "spa", nbf=int(time.time()) + 300),
        "wrong audience": mint(secret, "spa", aud="another-proxy"),
        "no audience": mint(secret, "spa", aud=None),
        "alg none": unsigned,
        "another key's secret": mint(other, "spa"),
        "tampered": f"{header}.{tampered}.{signature}",
        "longer than an hour": mint(secret, "spa", exp=int(time.time()) + 7200),
        "no sub": mint(secret, "spa", sub=None),
        "a sub with a slash": mint(secret, "spa", sub="a/b"),
        "no such key": mint(secret, "nobody"),
        "a key without end-user tokens": mint(other, "plain"),
        "not a JWT at all": "eyJhbGciOi.broken.x",
        "limits it may not set": mint(secret, "spa", limits={"rate_limit": "1000/second"}),
        "a budget of 0 in its limits": mint(secret, "spa", limits={"daily_usd": "0"}),
    }


EXPECTED = {
    "expired": "token_expired",
    "not yet valid": "token_not_yet_valid",
    "wrong audience": "token_wrong_audience",
    "no audience": "token_invalid",
    "alg none": "token_invalid",
    "another key's secret": "token_invalid_signature",
    "tampered": "token_invalid_signature",
    "longer than an hour": "token_invalid",
    "no sub": "token_invalid",
    "a sub with a slash": "token_invalid",
    "no such key": "token_invalid",
    "a key without end-user tokens": "token_invalid",
    "not a JWT at all": "token_invalid",
    "limits it may not set": "token_invalid",
    "a budget of 0 in its limits": "token_invalid",
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_a_forged_stale_or_misdirected_token_is_a_401_and_reaches_nothing(app, fake, case: str) -> None:
    secret = hs256_key(app, "spa")
    other = hs256_key(app, "other")
    cli(app, "create", "plain")

    response = ask(app, forged(secret, other)[case])
    assert error(response) == (401, EXPECTED[case])
    assert "Traceback" not in response.get_data(as_text=True)
    assert fake.chat_calls() == [] and state(app).ledger.rows() == []


def test_a_token_replayed_after_its_key_was_revoked_or_rotated_is_refused(app, fake) -> None:
    secret = hs256_key(app, "spa")
    token = mint(secret, "spa")
    assert ask(app, token).status_code == 200

    cli(app, "rotate", "spa")  # a new key token, so a new end-user secret
    assert error(ask(app, token)) == (401, "token_invalid_signature")
    fresh = mint(cli(app, "end-user-secret", "spa").strip(), "spa")
    assert ask(app, fresh).status_code == 200
    cli(app, "revoke", "spa")
    assert error(ask(app, fresh)) == (401, "key_revoked")
    assert error(ask(app, mint("a guess at the secret, as long as a real one", "spa"))) == (
        401,
        "token_invalid_signature",
    )  # its state is not told
    assert len(fake.chat_calls()) == 2


@pytest.mark.parametrize("curve", ["EdDSA", "ES256"])
def test_a_key_with_a_public_key_takes_only_tokens_its_private_key_signed(app, tmp_path, curve: str) -> None:
    private = ed25519.Ed25519PrivateKey.generate() if curve == "EdDSA" else ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "app.pub").write_bytes(pem)
    cli(app, "create", "spa", "--end-user-key", str(tmp_path / "app.pub"))

    assert ask(app, mint(private, "spa", algorithm=curve)).status_code == 200
    shown = app.test_client().get("/api/admin/keys/spa", headers={"Authorization": f"Bearer {ADMIN}"})
    assert shown.get_json()["end_user_tokens"] == curve
    assert error(ask(app, hs256_with(pem, "spa"))) == (401, "token_invalid")  # the public key as an HMAC secret
    stranger = ed25519.Ed25519PrivateKey.generate() if curve == "EdDSA" else ec.generate_private_key(ec.SECP256R1())
    assert error(ask(app, mint(stranger, "spa", algorithm=curve))) == (401, "token_invalid_signature")


def test_each_end_user_has_a_daily_budget_and_a_rate_limit_of_their_own(app) -> None:
    secret = hs256_key(app, "spa", "--end-user-daily-usd", "0.0003", "--rate-limit", "5/hour")  # 300 µ$: two calls

    alice = mint(secret, "spa", "alice")
    answers = [ask(app, alice) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert answers[2].get_json()["error"] == {
        "code": "budget_exceeded",
        "message": "You have reached your daily budget in this app. It resets at midnight UTC.",
        "request_id": answers[2].headers["X-Request-ID"],
    }
    assert ask(app, mint(secret, "spa", "bob")).status_code == 200  # another user of the same app
    assert [ask(app, alice).status_code for _ in range(3)] == [429, 429, 429]
    assert error(ask(app, alice)) == (429, "rate_limited")  # the sixth request of the hour
    assert state(app).budget.totals("end-user:token:spa/alice")["reserved_micros"] == 0


def test_an_app_may_give_a_user_a_tighter_budget_in_the_token_never_a_looser_one(app) -> None:
    secret = hs256_key(app, "spa", "--end-user-daily-usd", "0.0003")  # two calls a user

    tight = [ask(app, mint(secret, "spa", "trial", limits={"daily_usd": "0.0002"})).status_code for _ in range(2)]
    loose = [ask(app, mint(secret, "spa", "pro", limits={"daily_usd": 5})).status_code for _ in range(3)]
    assert (tight, loose) == ([200, 429], [200, 200, 429])


def test_end_user_tokens_are_for_the_page_api_not_the_server_routes(app) -> None:
    token = mint(hs256_key(app, "spa"), "spa")
    auth = {"Authorization": f"Bearer {token}"}
    client = app.test_client()
    assert error(client.get("/v1/models", headers=auth))[0] == 401
    assert error(client.post("/api/batches", json={"requests": []}, headers=auth))[0] == 403
    assert error(client.get("/api/admin/keys", headers=auth)) == (403, "forbidden")


# --- exact under concurrency: real gunicorn, 4 workers, real Redis and PostgreSQL ------------------------------------


def test_one_end_users_concurrent_requests_against_a_budget_for_k_calls_get_exactly_k(
    settings_for, fake, key_prefix
) -> None:
    k, sent = 4, 12
    worst = (
        estimate_prompt_tokens(
            [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hi"}]
        )
        + ASK["max_tokens"]
    )  # micro-dollars at one per token: what each call reserves
    # Room for k reservations and half of one more; what k calls leave unspent (their answers cost at most their
    # reservation) never adds up to a whole one, however the calls interleave.
    cap_micros = k * worst + worst // 2
    fake.for_model("gpt-4o-mini", Reply(content="x" * 400, delay=1.0))  # exactly max_tokens: 100 tokens
    with postgres_schema_url() as database_url:
        shared = {
            "CHATPROXY_DATABASE_URL": database_url,
            "CHATPROXY_SECRET_KEY": "end-user-concurrency",
            "CHATPROXY_PRICES": ONE_MICRO_PER_TOKEN,
            "CHATPROXY_REDIS_URL": REDIS_URL,
            "CHATPROXY_REDIS_PREFIX": key_prefix,
            "CHATPROXY_KEY_CACHE_SECONDS": "0",  # the revocation below reaches the workers at once
        }
        operator = create_app(settings_for(**shared))
        secret = hs256_key(operator, "spa", "--end-user-daily-usd", f"{cap_micros / 1_000_000:.6f}")
        server = start_gunicorn(
            {
                **shared,
                "OPENAI_API_KEY": "sk-test-end-users",
                "OPENAI_BASE_URL": fake.base_url,
                "CHATPROXY_WORKERS": "4",
                "CHATPROXY_THREADS": str(sent + 4),  # no worker sheds one of them (503 server_busy)
                "CHATPROXY_MAX_RETRIES": "0",
                "CHATPROXY_MAX_CONCURRENT": "100",
            }
        )
        try:
            token = mint(secret, "spa", "alice")
            with ThreadPoolExecutor(max_workers=sent) as pool:
                statuses = list(pool.map(lambda _: post(server.port, token), range(sent)))
            other = post(server.port, mint(secret, "spa", "bob"))
            cli(operator, "revoke", "spa")  # at runtime, on the shared database: every worker refuses it now
            with ThreadPoolExecutor(max_workers=8) as pool:
                after = list(pool.map(lambda _: post(server.port, mint(secret, "spa", "bob")), range(16)))
        finally:
            server.stop()
        rows = state(operator).ledger.rows(identity="token:spa/alice")
        totals = state(operator).budget.totals("end-user:token:spa/alice")

    assert sorted(statuses) == [200] * k + [429] * (sent - k)
    assert other == 200  # another user of the same app is not affected
    assert after == [401] * 16  # whichever worker answered
    assert len(rows) == k and totals["reserved_micros"] == 0
    assert totals["spent_micros"] == sum(row["cost_micros"] for row in rows) <= cap_micros


def post(port: int, token: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST",
            "/api/chat",
            body=json.dumps(ASK),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        return conn.getresponse().status
    finally:
        conn.close()


# --- a single-page app on another origin, in Chromium -----------------------------------------------------------------

SPA_CALL = """async ([api, user]) => {
  const minted = await (await fetch("/chat-token?user=" + user, {method: "POST"})).json();
  const answer = await fetch(api + "/api/chat", {
    method: "POST",
    headers: {"Content-Type": "application/json", Authorization: "Bearer " + minted.token},
    body: JSON.stringify({message: "hi", max_tokens: 100}),
  });
  return {status: answer.status, body: await answer.json()};
}"""


@pytest.fixture
def spa_backend():
    """An app's own server on another origin (localhost, not 127.0.0.1): its page, and a route minting tokens."""
    minting: dict[str, str] = {}

    class Backend(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._send(b"<!doctype html><title>an app</title>", "text/html")

        def do_POST(self) -> None:  # the app's login would decide the user; the test names it
            user = parse_qs(urlsplit(self.path).query)["user"][0]
            self._send(json.dumps({"token": mint(minting["secret"], "spa", user)}).encode(), "application/json")

        def _send(self, body: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_port}", minting
    server.shutdown()
    server.server_close()


@pytest.mark.browser
def test_a_single_page_app_on_another_origin_gets_a_budget_per_signed_in_user(
    browser, spa_backend, settings_for, serve, fake
) -> None:
    origin, minting = spa_backend
    fake.for_model("gpt-4o-mini", Reply(content="x" * 400))
    app = create_app(
        settings_for(
            CHATPROXY_ALLOW_ANONYMOUS=False,
            CHATPROXY_ALLOWED_ORIGINS=origin,
            CHATPROXY_KEY_CACHE_SECONDS=0,
            CHATPROXY_PRICES=ONE_MICRO_PER_TOKEN,
        )
    )
    minting["secret"] = hs256_key(app, "spa", "--end-user-daily-usd", "0.0003")  # two calls a user
    api = serve(app)
    page = browser.new_page()
    page.goto(origin + "/")

    alice = [page.evaluate(SPA_CALL, [api, "alice"]) for _ in range(3)]
    bob = page.evaluate(SPA_CALL, [api, "bob"])
    page.close()

    assert [answer["status"] for answer in alice] == [200, 200, 429]
    assert alice[0]["body"]["content"] == "x" * 400
    assert (
        alice[2]["body"]["error"]["message"]
        == "You have reached your daily budget in this app. It resets at midnight UTC."
    )
    assert bob["status"] == 200
    assert [row["identity"] for row in state(app).ledger.rows()] == ["token:spa/alice"] * 2 + ["token:spa/bob"]
