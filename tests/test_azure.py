"""Azure OpenAI mode: the key scenarios against the fake upstream speaking Azure's paths, header and deployments."""

from __future__ import annotations

import json
import logging

import pytest
from openai import AzureOpenAI, OpenAI

from chatproxy import SettingsError, create_app
from chatproxy.callers import hash_token
from chatproxy.demo.upstream import Reply
from chatproxy.state import state
from chatproxy.upstream import mask_key as redact
from tests.helpers import TEST_KEY
from tests.sse import post_stream

AZURE_KEY = "c0ffee0123456789abcdef0123456789"  # Azure keys are 32 hex characters
DEPLOYMENTS = {"gpt-4o": "prod-gpt4o", "gpt-4o-mini": "prod-gpt4o-mini"}
TOKEN = "cpx_azure-test-token-0123456789"
FAST = {"CHATPROXY_MAX_RETRIES": 0, "CHATPROXY_RETRY_MAX_WAIT": 0.05, "CHATPROXY_COOLDOWN_MIN_CALLS": 1000}


@pytest.fixture
def azure(settings_for, fake):
    """Build an app in Azure mode, pointed at the fake as its Azure resource; no OPENAI_API_KEY at all."""

    def make(**overrides: object):
        config = {
            "OPENAI_API_KEY": "",
            "OPENAI_BASE_URL": "",
            "AZURE_OPENAI_ENDPOINT": fake.base_url.removesuffix("/v1"),
            "AZURE_OPENAI_API_KEY": AZURE_KEY,
            "CHATPROXY_AZURE_DEPLOYMENTS": ",".join(f"{a}={d}" for a, d in DEPLOYMENTS.items()),
            "CHATPROXY_API_TOKENS": f"alice={hash_token(TOKEN)}",
            **FAST,
            **overrides,
        }
        return create_app(settings_for(**config))

    return make


def ask(app, model: str = "gpt-4o", **body: object):
    """POST /api/chat; fails the test on a 500, a stack trace or the key in the body."""
    response = app.test_client().post("/api/chat", json={"message": "hi", "model": model, **body})
    assert response.status_code != 500
    assert "Traceback" not in response.get_data(as_text=True) and AZURE_KEY not in response.get_data(as_text=True)
    return response


def deployments(fake) -> list[str | None]:
    """The Azure deployments the fake was called for, in order."""
    return [call.deployment for call in fake.chat_calls()]


def spoke_azure(fake) -> None:
    """Every call used an Azure path with the api-version, our Azure key in `api-key` and no other credential."""
    calls = fake.chat_calls()
    assert calls
    for call in calls:
        assert call.path.startswith(f"/openai/deployments/{call.deployment}/chat/completions?")
        assert call.api_version == "2024-10-21"
        assert call.headers["api-key"] == AZURE_KEY
        assert "authorization" not in call.headers
        assert call.body["model"] == call.deployment  # the SDK also names the deployment in the body


def test_the_client_is_an_azure_client_without_sdk_retries(azure):
    client = state(azure()).client

    assert isinstance(client, AzureOpenAI) and client.max_retries == 0


def test_json_chat_goes_to_the_models_deployment_and_answers_with_the_alias(azure, fake):
    app = azure()

    response = ask(app, "gpt-4o")

    assert response.status_code == 200
    body = response.get_json()
    assert (body["content"], body["model"], body["degraded"]) == ("Echo: hi", "gpt-4o", False)
    assert response.headers["X-Chatproxy-Model"] == "gpt-4o"
    assert deployments(fake) == ["prod-gpt4o"]
    spoke_azure(fake)
    [row] = state(app).ledger.rows()
    assert (row["model_requested"], row["model_answered"], row["outcome"]) == ("gpt-4o", "gpt-4o", "ok")
    assert row["tokens_exact"] and row["cost_micros"] > 0  # priced as the alias, not as the deployment name


def test_stream_ends_with_done_despite_azures_prompt_filter_chunk(azure, fake, serve):
    received, _ = post_stream(serve(azure()), {"message": "hello there", "model": "gpt-4o-mini", "stream": True})

    assert received.status == 200
    assert received.events[0] == {"type": "start", "model": "gpt-4o-mini", "degraded": False}
    assert received.text() == "Echo: hello there"
    done = received.events[-1]
    assert (done["type"], done["model"], done["finish_reason"]) == ("done", "gpt-4o-mini", "stop")
    assert done["usage"]["completion_tokens"] > 0
    assert deployments(fake) == ["prod-gpt4o-mini"]
    assert fake.chat_calls()[0].body["stream_options"] == {"include_usage": True}
    spoke_azure(fake)


def test_fallback_to_the_next_deployment_and_cooldown(azure, fake):
    app = azure(CHATPROXY_COOLDOWN_MIN_CALLS=1, CHATPROXY_COOLDOWN_SECONDS=60)
    fake.for_model("prod-gpt4o", Reply(status=503))

    first, second = ask(app), ask(app)

    for response in (first, second):
        assert response.status_code == 200
        assert (response.get_json()["model"], response.get_json()["degraded"]) == ("gpt-4o-mini", True)
        assert response.headers["X-Chatproxy-Model"] == "gpt-4o-mini"
    assert deployments(fake) == ["prod-gpt4o", "prod-gpt4o-mini", "prod-gpt4o-mini"]  # cooling down: skipped
    spoke_azure(fake)
    rows = state(app).ledger.rows()
    assert [(r["model_answered"], r["outcome"]) for r in rows] == [
        ("gpt-4o", "upstream_http_503"),
        ("gpt-4o-mini", "fallback"),
        ("gpt-4o-mini", "fallback"),
    ]


@pytest.mark.parametrize("status", [401, 403])
def test_a_rejected_azure_key_is_upstream_auth_failed_and_logged_without_the_key(azure, fake, caplog, status):
    fake.script(
        Reply(
            status=status,
            error={
                "code": str(status),
                "message": "Access denied due to invalid subscription key or wrong API endpoint.",
            },
        )
    )

    response = ask(azure())

    assert response.status_code == 502
    assert response.get_json()["error"]["code"] == "upstream_auth_failed"
    assert deployments(fake) == ["prod-gpt4o"]
    [loud] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "AZURE_OPENAI_API_KEY" in loud.getMessage() and redact(AZURE_KEY) in loud.getMessage()
    assert all(AZURE_KEY not in r.getMessage() for r in caplog.records)


def test_the_compat_endpoint_works_in_azure_mode(azure, fake, serve):
    client = OpenAI(base_url=f"{serve(azure())}/v1", api_key=TOKEN, max_retries=0)

    completion = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hey"}])
    chunks = list(
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hey"}], stream=True)
    )

    assert (completion.model, completion.choices[0].message.content) == ("gpt-4o-mini", "Echo: hey")
    assert {chunk.model for chunk in chunks} == {"gpt-4o"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: hey"
    assert deployments(fake) == ["prod-gpt4o-mini", "prod-gpt4o"]
    spoke_azure(fake)


def test_the_azure_key_leaks_nowhere(azure, fake, serve, caplog):
    caplog.set_level(logging.DEBUG)
    app = azure(OPENAI_API_KEY=TEST_KEY)  # set but unused in Azure mode: it must not be sent either
    url = serve(app)
    seen: list[str] = []
    echo = {"code": "401", "message": f"Access denied: key {AZURE_KEY} is not valid."}

    for status in (400, 401, 429, 500):
        for stream in (False, True):
            fake.script(Reply(status=status, error=echo, headers={"x-echo": AZURE_KEY}))
            response = app.test_client().post("/api/chat", json={"message": "hi", "stream": stream})
            seen += [response.get_data(as_text=True), str(response.headers)]
    for reply in (
        Reply(),
        Reply(chunks=["a ", "b"], error_after=1, error=echo),
        Reply(chunks=["a ", "b"], drop_after=1),
    ):
        fake.script(reply)
        received, _ = post_stream(url, {"message": "hi", "stream": True})
        seen += [received.raw.decode(), str(received.headers)]
    logged = [record.getMessage() for record in caplog.records] + [caplog.text]

    assert len(fake.chat_calls()) == 11
    spoke_azure(fake)
    assert not [call for call in fake.chat_calls() if TEST_KEY in json.dumps(call.headers)]
    assert not [text for text in seen if AZURE_KEY in text]
    assert not [line for line in logged if AZURE_KEY in line]


# --- settings: Azure mode fails fast, naming the variable ---------------------------------------


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"CHATPROXY_AZURE_DEPLOYMENTS": "gpt-4o=prod-gpt4o"}, "CHATPROXY_AZURE_DEPLOYMENTS"),
        ({"CHATPROXY_AZURE_DEPLOYMENTS": "gpt-4o=prod/../../x,gpt-4o-mini=m"}, "CHATPROXY_AZURE_DEPLOYMENTS"),
        ({"CHATPROXY_AZURE_DEPLOYMENTS": "gpt-4o"}, "CHATPROXY_AZURE_DEPLOYMENTS"),
        ({"AZURE_OPENAI_API_KEY": ""}, "AZURE_OPENAI_API_KEY"),
        ({"AZURE_OPENAI_API_VERSION": "latest"}, "AZURE_OPENAI_API_VERSION"),
        ({"AZURE_OPENAI_ENDPOINT": "my-resource.openai.azure.com"}, "AZURE_OPENAI_ENDPOINT"),
        ({"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"}, "OPENAI_BASE_URL"),
    ],
)
def test_a_bad_azure_setting_stops_start_up_naming_it(azure, overrides, variable):
    with pytest.raises(SettingsError, match=variable) as raised:
        azure(**overrides)

    assert AZURE_KEY not in str(raised.value)


def test_the_missing_deployment_is_named(azure):
    with pytest.raises(SettingsError, match="missing: gpt-4o-mini"):
        azure(CHATPROXY_AZURE_DEPLOYMENTS="gpt-4o=prod-gpt4o")


def test_without_azure_the_openai_key_is_still_required(settings_for):
    with pytest.raises(SettingsError, match="OPENAI_API_KEY is not set"):
        create_app(settings_for(OPENAI_API_KEY=""))


def test_openai_mode_is_unchanged(settings_for, fake):
    app = create_app(settings_for(CHATPROXY_AZURE_DEPLOYMENTS="gpt-4o=ignored-outside-azure"))

    response = app.test_client().post("/api/chat", json={"message": "hi", "model": "gpt-4o"})

    assert response.status_code == 200
    assert not isinstance(state(app).client, AzureOpenAI)
    [call] = fake.chat_calls()
    assert (call.path, call.model, call.deployment) == ("/v1/chat/completions", "gpt-4o", None)
    assert call.headers["authorization"] == f"Bearer {TEST_KEY}" and "api-key" not in call.headers
