"""API keys in the database: `flask keys ...`, identification, models per key, budgets, limits, revocation."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import openai
import pytest
import sqlalchemy as sa
from flask import Flask

from chatproxy import create_app
from chatproxy.callers import hash_token
from chatproxy.demo.upstream import Reply
from chatproxy.keys import keys_table
from chatproxy.state import state

ONE_MICRO_PER_TOKEN = json.dumps({m: {"input": 1, "cached_input": 1, "output": 1} for m in ("gpt-4o", "gpt-4o-mini")})
ADMIN = "cpx_admin-token-for-key-tests-0123"
OLD = "cpx_env-token-moved-into-the-db-0123"
ASK = {"message": "hi", "max_tokens": 100}
TOKEN_LINE = re.compile(r"token \(give it to the client, shown once\): (cpx_\S+)")


@pytest.fixture
def make_app(settings_for, fake, database_url):
    """An app as shipped (no anonymous callers) on SQLite or PostgreSQL; keys are looked up on every request."""

    def make(**overrides: object) -> Flask:
        config = {
            "CHATPROXY_DATABASE_URL": database_url,
            "CHATPROXY_ALLOW_ANONYMOUS": False,
            "CHATPROXY_API_TOKENS": f"ops={hash_token(ADMIN)},old={hash_token(OLD)}",
            "CHATPROXY_ADMIN_TOKENS": "ops",
            "CHATPROXY_KEY_CACHE_SECONDS": 0,
            "CHATPROXY_PRICES": ONE_MICRO_PER_TOKEN,
            **overrides,
        }
        return create_app(settings_for(**config))

    fake.for_model("gpt-4o-mini", Reply(content="x" * 400))  # 100 completion tokens: ~108 µ$ a call
    return make


@pytest.fixture
def app(make_app) -> Flask:
    return make_app()


def keys(app: Flask, *args: str):
    """Run `flask keys ARGS` on `app`."""
    return app.test_cli_runner().invoke(args=["keys", *args])


def new_key(app: Flask, name: str, *options: str) -> str:
    """Create key `name` with the CLI; its token."""
    result = keys(app, "create", name, *options)
    assert result.exit_code == 0, result.output
    return TOKEN_LINE.search(result.output).group(1)


def ask(app: Flask, token: str, body: dict | None = None):
    return app.test_client().post("/api/chat", json=body or ASK, headers={"Authorization": f"Bearer {token}"})


def error(response) -> tuple[int, str, str]:
    body = response.get_json()["error"]
    return response.status_code, body["code"], body["message"]


# --- the CLI -----------------------------------------------------------------------------------------------------


def test_a_key_made_at_runtime_works_is_stored_hashed_and_is_never_shown_again(app, fake) -> None:
    token = new_key(app, "web", "--owner", "Web team", "--daily-usd", "2.50")

    response = ask(app, token)
    assert response.status_code == 200 and response.get_json()["content"] == "x" * 400
    assert [row["identity"] for row in state(app).ledger.rows()] == ["token:web"]
    with state(app).ledger.engine.connect() as conn:
        stored = conn.execute(sa.select(keys_table)).one()._mapping
    assert token not in json.dumps({k: str(v) for k, v in stored.items()})
    assert stored["token_hash"] == hash_token(token).removeprefix("sha256:")
    listed = keys(app, "list").output + keys(app, "show", "web").output + keys(app, "list", "--json").output
    assert token not in listed and f"cpx_…{token[-4:]}" in listed and "Web team" in listed
    shown = json.loads(keys(app, "show", "web", "--json").output)
    assert (shown["status"], shown["daily_budget_usd"], shown["last_used_at"] is not None) == (
        "active",
        "2.500000",
        True,
    )


@pytest.mark.parametrize("name", ["a,b", "a=b", "two words", "x" * 65, "naïve"])
def test_a_key_name_with_a_comma_or_equals_sign_is_refused(app, name: str) -> None:
    result = keys(app, "create", name)
    assert result.exit_code == 2 and "not a valid key name" in result.output and "cpx_" not in result.output


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--daily-usd", "0", "daily_budget_usd must be an amount in dollars from 0.000001"),
        ("--monthly-usd", "-1", "monthly_budget_usd must be an amount"),
        ("--end-user-daily-usd", "nan", "end_user_daily_budget_usd must be an amount"),
        ("--daily-tokens", "0", "daily_tokens must be a whole number from 1"),
        ("--monthly-tokens", "-5", "monthly_tokens must be a whole number from 1"),
        ("--max-streams", "0", "max_streams must be a whole number from 1"),
        ("--rate-limit", "lots", "rate_limit must be a rate such as '30/minute'"),
        ("--models", "gpt-4o,gpt-9", "not 'gpt-9'"),
        ("--expires", "2001-01-01T00:00:00Z", "expires_at must be in the future"),
        ("--expires", "soon", "expires_at must be a time such as"),
    ],
)
def test_a_budget_of_zero_or_less_and_other_bad_limits_are_refused(app, option: str, value: str, says: str) -> None:
    result = keys(app, "create", "web", option, value)
    assert result.exit_code == 2 and says in result.output
    assert keys(app, "list", "--json").output.strip() == "[]"  # nothing made


def test_a_name_already_in_the_environment_is_moved_with_import_and_keeps_its_token(make_app) -> None:
    app = make_app()
    refused = keys(app, "create", "old")
    assert refused.exit_code == 1 and "keys import old" in refused.output
    assert keys(app, "import", "ops").exit_code == 1  # admin tokens stay in the environment

    moved = keys(app, "import", "old", "--models", "gpt-4o-mini")
    assert moved.exit_code == 0 and "remove the old= entry from CHATPROXY_API_TOKENS" in moved.output
    after = make_app(CHATPROXY_API_TOKENS=f"ops={hash_token(ADMIN)}")  # the entry removed, the server restarted
    assert ask(after, OLD).status_code == 200  # the same token, now with the key's limits
    assert error(ask(after, OLD, {**ASK, "model": "gpt-4o"}))[1] == "model_not_allowed"
    assert {row["identity"] for row in state(after).ledger.rows()} == {"token:old"}  # the same identity


# --- revoked, expired, disabled, rotated ---------------------------------------------------------------------------


def test_revoke_disable_and_rotate_take_effect_on_another_worker_without_a_restart(make_app, fake) -> None:
    operator, worker = make_app(), make_app()  # two apps on one database: two workers (or hosts)
    token = new_key(operator, "web")
    assert ask(worker, token).status_code == 200

    keys(operator, "update", "web", "--disable")
    assert error(ask(worker, token)) == (401, "key_disabled", "This API key is disabled.")
    keys(operator, "update", "web", "--enable")
    assert ask(worker, token).status_code == 200

    rotated = keys(operator, "rotate", "web")
    new_token = TOKEN_LINE.search(rotated.output).group(1)
    assert error(ask(worker, token))[:2] == (401, "unauthorized")
    assert ask(worker, new_token).status_code == 200

    calls = len(fake.chat_calls())
    assert keys(operator, "revoke", "web").exit_code == 0
    assert error(ask(worker, new_token)) == (401, "key_revoked", "This API key has been revoked.")
    assert keys(operator, "update", "web", "--daily-usd", "1").exit_code == 1  # a revoked key stays revoked
    assert error(ask(worker, new_token))[1] == "key_revoked"
    assert len(fake.chat_calls()) == calls


def test_a_worker_trusts_a_key_for_the_cache_delay_only(make_app) -> None:
    operator, worker = make_app(), make_app(CHATPROXY_KEY_CACHE_SECONDS=60)
    token = new_key(operator, "web")
    assert ask(worker, token).status_code == 200
    keys(operator, "revoke", "web")

    assert ask(worker, token).status_code == 200  # within the documented delay the worker's cache answers
    assert error(ask(make_app(CHATPROXY_KEY_CACHE_SECONDS=60), token))[1] == "key_revoked"  # a fresh worker


def test_an_expired_key_is_refused_and_nothing_is_sent(app, fake) -> None:
    token = new_key(app, "web", "--expires", (datetime.now(UTC) + timedelta(days=1)).isoformat())
    with state(app).ledger.engine.begin() as conn:  # a day later
        conn.execute(keys_table.update().values(expires_at=datetime.now(UTC).replace(tzinfo=None)))

    assert error(ask(app, token)) == (401, "key_expired", "This API key has expired.")
    assert fake.chat_calls() == [] and state(app).ledger.rows() == []


def test_a_database_key_is_never_an_admin(app) -> None:
    token = new_key(app, "ops2")
    response = app.test_client().get("/api/usage", headers={"Authorization": f"Bearer {token}"})
    assert error(response)[:2] == (403, "forbidden")


# --- models per key ------------------------------------------------------------------------------------------------


def test_a_key_asking_for_a_model_outside_its_list_is_refused_before_anything_is_spent(app, fake) -> None:
    token = new_key(app, "web", "--models", "gpt-4o-mini")

    status, code, message = error(ask(app, token, {**ASK, "model": "gpt-4o"}))
    assert (status, code) == (403, "model_not_allowed")
    assert message == "This API key may not use gpt-4o. It may use: gpt-4o-mini."
    assert fake.chat_calls() == [] and state(app).ledger.rows() == []
    listed = app.test_client().get("/api/models", headers={"Authorization": f"Bearer {token}"}).get_json()
    assert (listed["models"], listed["default"]) == (["gpt-4o-mini"], "gpt-4o-mini")


def test_a_key_gets_its_own_default_model_and_the_sdk_sees_permission_denied(make_app, serve, fake) -> None:
    app = make_app(CHATPROXY_DEFAULT_MODEL="gpt-4o")
    token = new_key(app, "web", "--models", "gpt-4o-mini")
    listed = app.test_client().get("/api/models", headers={"Authorization": f"Bearer {token}"}).get_json()
    assert (listed["models"], listed["default"], list(listed["details"])) == (
        ["gpt-4o-mini"],
        "gpt-4o-mini",
        ["gpt-4o-mini"],
    )
    assert ask(app, token, {"message": "hi"}).get_json()["model"] == "gpt-4o-mini"

    client = openai.OpenAI(base_url=f"{serve(app)}/v1", api_key=token, max_retries=0)
    assert [model.id for model in client.models.list()] == ["gpt-4o-mini"]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "model_not_allowed"
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "x" * 400
    assert [call.body["model"] for call in fake.chat_calls()] == ["gpt-4o-mini", "gpt-4o-mini"]


def test_a_fallback_never_goes_to_a_model_outside_the_keys_list(make_app, fake) -> None:
    app = make_app(CHATPROXY_FALLBACK_CHAIN="gpt-4o,gpt-4o-mini", CHATPROXY_DEFAULT_MODEL="gpt-4o")
    token = new_key(app, "web", "--models", "gpt-4o")
    fake.for_model("gpt-4o", Reply(status=503))

    status, code, _ = error(ask(app, token, {**ASK, "model": "gpt-4o"}))
    assert (status, code) == (503, "upstream_unavailable")
    assert [call.body["model"] for call in fake.chat_calls()] == ["gpt-4o"]


def test_a_keys_models_hold_on_responses_and_embeddings_too(make_app, serve, fake) -> None:
    app = make_app(CHATPROXY_DEFAULT_MODEL="gpt-4o")
    chat_only = new_key(app, "web", "--models", "gpt-4o-mini")
    embedder = new_key(app, "search", "--models", "text-embedding-3-small")
    web = openai.OpenAI(base_url=f"{serve(app)}/v1", api_key=chat_only, max_retries=0)
    search = openai.OpenAI(base_url=f"{serve(app)}/v1", api_key=embedder, max_retries=0)

    with pytest.raises(openai.PermissionDeniedError) as refused:
        web.responses.create(model="gpt-4o", input="hi")
    assert refused.value.code == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError) as refused:
        web.embeddings.create(model="text-embedding-3-small", input="hi")
    assert refused.value.message.endswith("may not use text-embedding-3-small. It may use: gpt-4o-mini.")
    with pytest.raises(openai.NotFoundError):
        web.models.retrieve("text-embedding-3-small")
    assert [call.body["model"] for call in fake.calls] == []

    assert web.responses.create(input="hi").model == "gpt-4o-mini"  # the key's default, not the server's
    assert [model.id for model in search.models.list()] == ["text-embedding-3-small"]
    assert len(search.embeddings.create(model="text-embedding-3-small", input="hi").data) == 1
    no_model = {"messages": [{"role": "user", "content": "hi"}]}  # a key without chat models has no default one
    refused = app.test_client().post(
        "/v1/chat/completions", json=no_model, headers={"Authorization": f"Bearer {embedder}"}
    )
    assert error(refused)[:2] == (403, "model_not_allowed")
    assert [call.body["model"] for call in fake.calls] == ["gpt-4o-mini", "text-embedding-3-small"]


# --- budgets and limits per key --------------------------------------------------------------------------------------


def until_refused(call, limit: int = 12) -> list:
    responses = [call()]
    while responses[-1].status_code == 200 and len(responses) < limit:
        responses.append(call())
    return responses


def test_a_keys_daily_budget_stops_it_and_not_the_others(app) -> None:
    web, other = new_key(app, "web", "--daily-usd", "0.0004"), new_key(app, "other")  # 400 µ$: three calls

    *answered, refused = until_refused(lambda: ask(app, web))
    assert len(answered) == 3 and all(r.status_code == 200 for r in answered)
    assert error(refused) == (
        429,
        "budget_exceeded",
        "This API key has reached its daily budget. It resets at midnight UTC.",
    )
    assert 0 < int(refused.headers["Retry-After"]) <= 86_400
    assert ask(app, other).status_code == 200
    spent = state(app).budget.totals("key:web")
    assert spent["reserved_micros"] == 0 and spent["spent_micros"] == sum(
        row["cost_micros"] for row in state(app).ledger.rows(identity="token:web")
    )


def test_a_keys_monthly_budget_says_when_it_resets(app) -> None:
    web = new_key(app, "web", "--monthly-usd", "0.0003", "--daily-usd", "5")
    *_, refused = until_refused(lambda: ask(app, web))

    now = datetime.now(UTC)
    first = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    assert error(refused) == (
        429,
        "budget_exceeded",
        f"This API key has reached its monthly budget. It resets on {first:%Y-%m-%d} at 00:00 UTC.",
    )
    assert 0 < int(refused.headers["Retry-After"]) <= (first - now).total_seconds() + 1


def test_a_keys_token_budget_counts_tokens(app) -> None:
    web = new_key(app, "web", "--daily-tokens", "300")  # each call reserves ~111 tokens: two fit
    *answered, refused = until_refused(lambda: ask(app, web))
    assert len(answered) == 2 and error(refused)[1] == "budget_exceeded"


def test_a_keys_rate_limit_and_stream_slots_are_its_own(app) -> None:
    web = new_key(app, "web", "--rate-limit", "2/hour", "--max-streams", "1")
    other = new_key(app, "other")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {web}"}

    stream = client.post("/api/chat", json={**ASK, "stream": True}, headers=auth, buffered=False)
    assert stream.status_code == 200
    second = client.post("/api/chat", json={**ASK, "stream": True}, headers=auth)
    assert error(second) == (429, "rate_limited", "At most 1 answers can stream at once. Wait for one to finish.")
    stream.close()
    third = client.post("/api/chat", json=ASK, headers=auth)
    assert error(third)[:2] == (429, "rate_limited") and "Too many requests" in error(third)[2]
    assert ask(app, other).status_code == 200


# --- the admin API ---------------------------------------------------------------------------------------------------


def admin(app: Flask, method: str, path: str, body: dict | None = None, token: str = ADMIN):
    return app.test_client().open(
        f"/api/admin/keys{path}", method=method, json=body, headers={"Authorization": f"Bearer {token}"}
    )


def test_an_operator_manages_keys_over_the_admin_api(app, fake) -> None:
    made = admin(app, "POST", "", {"name": "web", "models": ["gpt-4o-mini"], "daily_budget_usd": "0.0004"})
    assert made.status_code == 201 and made.headers["Cache-Control"] == "no-store"
    token = made.get_json()["token"]
    assert made.get_json()["key"]["daily_budget_usd"] == "0.000400" and token.startswith("cpx_")
    assert ask(app, token).status_code == 200

    listed = admin(app, "GET", "")
    assert [key["name"] for key in listed.get_json()["data"]] == ["web"] and token not in listed.get_data(as_text=True)
    changed = admin(app, "PATCH", "/web", {"daily_budget_usd": None, "rate_limit": "1000/hour", "owner": "Web"})
    assert changed.status_code == 200
    assert (changed.get_json()["daily_budget_usd"], changed.get_json()["rate_limit"]) == (None, "1000/hour")
    assert admin(app, "GET", "/web").get_json()["owner"] == "Web"

    rotated = admin(app, "POST", "/web/rotate").get_json()["token"]
    assert error(ask(app, token))[:2] == (401, "unauthorized") and ask(app, rotated).status_code == 200
    assert admin(app, "POST", "/web/revoke").get_json()["status"] == "revoked"
    assert error(ask(app, rotated))[1] == "key_revoked"
    assert error(admin(app, "POST", "/web/rotate"))[:2] == (400, "invalid_request")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"name": "a,b"}, "'a,b' is not a valid key name"),
        ({"name": "a=b"}, "'a=b' is not a valid key name"),
        ({}, "is not a valid key name"),
        ({"name": "web", "daily_budget_usd": 0}, "daily_budget_usd must be an amount"),
        ({"name": "web", "monthly_budget_usd": "-3"}, "monthly_budget_usd must be an amount"),
        ({"name": "web", "daily_tokens": 1.5}, "daily_tokens must be a whole number"),
        ({"name": "web", "models": []}, "models must be a non-empty list"),
        ({"name": "web", "disabled": "yes"}, "disabled must be true or false"),
        ({"name": "web", "api_base": "http://evil"}, "Unknown field 'api_base'"),
        ({"name": "old"}, "CHATPROXY_API_TOKENS has a token named 'old'"),
    ],
)
def test_bad_key_fields_are_a_400_and_make_nothing(app, body: dict, says: str) -> None:
    status, code, message = error(admin(app, "POST", "", body))
    assert (status, code) == (400, "invalid_request") and says in message
    assert admin(app, "GET", "").get_json()["data"] == []


def test_the_admin_api_needs_an_admin_token(app) -> None:
    key = admin(app, "POST", "", {"name": "web"}).get_json()["token"]
    assert error(app.test_client().get("/api/admin/keys"))[:2] == (401, "unauthorized")
    for token in (OLD, key):  # a token from the settings that is not an admin's; a database key
        assert error(admin(app, "GET", "", token=token))[:2] == (403, "forbidden")
        assert error(admin(app, "POST", "", {"name": "mine"}, token=token))[:2] == (403, "forbidden")
        assert error(admin(app, "POST", "/web/revoke", token=token))[:2] == (403, "forbidden")
    assert error(admin(app, "GET", "/nobody")) == (404, "not_found", "There is no key named 'nobody'.")
    assert admin(app, "GET", "/web").get_json()["status"] == "active"


# --- what a caller can see, and who the upstream is told about -------------------------------------------------------


def test_a_key_sees_what_is_left_of_its_budgets_and_its_rate_limit(app) -> None:
    token = new_key(
        app, "web", "--daily-usd", "1", "--monthly-usd", "20", "--daily-tokens", "5000", "--rate-limit", "9/hour"
    )
    auth = {"Authorization": f"Bearer {token}"}
    answered = ask(app, token)
    spent = state(app).ledger.rows()[0]

    shown = app.test_client().get("/api/limits", headers=auth)
    body = shown.get_json()
    assert body["identity"] == "token:web" and shown.headers["Cache-Control"] == "no-store"
    by_cap = {entry["cap"]: entry for entry in body["budgets"]}
    assert set(by_cap) == {"identity", "key_daily", "key_monthly"}  # never the service-wide caps
    assert by_cap["key_daily"]["remaining_usd"] == f"{(1_000_000 - spent['cost_micros']) / 1e6:.6f}"
    used = spent["prompt_tokens"] + spent["completion_tokens"]
    assert (by_cap["key_daily"]["limit_tokens"], by_cap["key_daily"]["remaining_tokens"]) == (5000, 5000 - used)
    assert by_cap["key_monthly"]["period"] == "month" and by_cap["key_monthly"]["resets_at"].endswith("-01T00:00:00Z")
    assert (body["rate_limit"]["limit"], body["rate_limit"]["remaining"]) == (9, 8)  # the POST counted; the GET not
    assert (answered.headers["X-RateLimit-Limit"], answered.headers["X-RateLimit-Remaining"]) == ("9", "8")
    assert int(answered.headers["X-RateLimit-Reset"]) > 0


def test_the_user_and_safety_identifier_of_v1_are_recorded_and_sent_upstream(app, serve, fake) -> None:
    token = new_key(app, "web")
    client = openai.OpenAI(base_url=f"{serve(app)}/v1", api_key=token, max_retries=0)
    hi = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="gpt-4o-mini", messages=hi, user="user-123")
    client.chat.completions.create(model="gpt-4o-mini", messages=hi, extra_body={"safety_identifier": "hash-abc"})
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=hi, extra_body={"safety_identifier": "x" * 65})

    assert "'safety_identifier' must be a non-empty string of at most 64 characters" in str(refused.value)
    assert [row["end_user"] for row in state(app).ledger.rows()] == ["user-123", "hash-abc"]
    sent = [call.body for call in fake.chat_calls()]
    assert (sent[0]["user"], sent[1]["safety_identifier"]) == ("user-123", "hash-abc")
    assert "safety_identifier" not in sent[0] and len(sent) == 2


def test_the_user_and_safety_identifier_of_responses_and_embeddings_are_recorded(app, serve, fake) -> None:
    token = new_key(app, "web")
    client = openai.OpenAI(base_url=f"{serve(app)}/v1", api_key=token, max_retries=0)
    client.responses.create(model="gpt-4o-mini", input="hi", user="user-123")
    client.responses.create(model="gpt-4o-mini", input="hi", safety_identifier="hash-abc")
    client.embeddings.create(model="text-embedding-3-small", input="hi", user="user-456")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="gpt-4o-mini", input="hi", safety_identifier="x" * 65)

    assert "safety_identifier" in str(refused.value) and "64" in str(refused.value)
    assert [row["end_user"] for row in state(app).ledger.rows()] == ["user-123", "hash-abc", "user-456"]
    sent = [call.body for call in fake.responses_calls()]
    assert (sent[0]["user"], sent[1]["safety_identifier"]) == ("user-123", "hash-abc")
    assert "safety_identifier" not in sent[0] and len(sent) == 2


def test_a_keys_batches_count_against_its_own_budgets(app, fake) -> None:
    small, big = new_key(app, "small", "--daily-usd", "0.0002"), new_key(app, "big", "--monthly-usd", "1")
    batch = {"requests": [{"custom_id": str(n), "message": "hi", "max_tokens": 200} for n in range(3)]}

    refused = app.test_client().post("/api/batches", json=batch, headers={"Authorization": f"Bearer {small}"})
    assert error(refused) == (
        429,
        "budget_exceeded",
        "This request could cost more than a spending limit allows. Ask for fewer tokens (max_tokens).",
    )
    made = app.test_client().post("/api/batches", json=batch, headers={"Authorization": f"Bearer {big}"})
    assert made.status_code == 202
    assert state(app).budget.totals("month:key:big")["reserved_micros"] > 0  # held until its results are in
    assert len([call for call in fake.calls if call.path.endswith("/files")]) == 1  # the second only


def test_keys_that_cannot_be_looked_up_are_a_503_not_a_crash(settings_for, fake) -> None:
    app = create_app(settings_for(CHATPROXY_DATABASE_URL="postgresql+psycopg://chatproxy@127.0.0.1:1/none"))
    response = ask(app, "cpx_some-key-the-database-would-know")

    assert error(response) == (503, "keys_unavailable", "API keys cannot be checked right now. Try again shortly.")
    assert response.headers["Retry-After"] == "5" and fake.chat_calls() == []
