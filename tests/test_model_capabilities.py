"""Issue 16: each model gets the parameters it takes, cached and reasoning tokens are billed as OpenAI bills them,
and retired models stop start-up. The fake upstream refuses what the real API refuses (max_tokens and a
non-default temperature to the reasoning families), so a request chatproxy shaped wrongly fails these tests."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, timedelta

import openai
import pytest
import sqlalchemy as sa
from openai import OpenAI

from chatproxy import create_app, models
from chatproxy.callers import hash_token
from chatproxy.config import SettingsError, raw_settings, validate
from chatproxy.demo.upstream import Reply
from chatproxy.state import state
from tests.helpers import TEST_KEY
from tests.sse import parse_sse

REASONING = "gpt-5.4-mini"  # reasons; takes max_completion_tokens; temperature only with reasoning_effort none
MIXED = {"CHATPROXY_MODELS": f"{REASONING},gpt-4o-mini", "CHATPROXY_DEFAULT_MODEL": REASONING}
TOKEN = "cpx_capabilities-0123456789"
AS_TOKEN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def mixed(settings_for):
    """An app allowing a reasoning model (the default) and gpt-4o-mini, with a token for /v1 and batches."""

    def make(**overrides: object):
        return create_app(settings_for(**MIXED, CHATPROXY_API_TOKENS=f"caps={hash_token(TOKEN)}", **overrides))

    return make


def sent(fake) -> dict:
    """The body of the one call the fake upstream received."""
    [call] = fake.chat_calls()
    return call.body


# --- every route works with a reasoning model, and sends it only what it takes ---------------------------------


def test_api_chat_json_sends_a_reasoning_model_max_completion_tokens(mixed, fake):
    response = mixed().test_client().post("/api/chat", json={"message": "hi", "max_tokens": 50})

    assert response.status_code == 200, response.get_json()
    body = sent(fake)
    assert body["model"] == REASONING and body["max_completion_tokens"] == 50 and "max_tokens" not in body
    usage = response.get_json()["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == fake.chat_calls()[0].reasoning_tokens > 0


def test_api_chat_stream_to_a_reasoning_model(mixed, fake):
    app = mixed()  # held while its stream is read (a collected app closes its client)
    response = app.test_client().post("/api/chat", json={"message": "hello there", "stream": True})

    events = parse_sse(response.get_data())[0]
    assert events[0]["type"] == "start" and events[-1]["type"] == "done"
    assert "max_tokens" not in sent(fake) and sent(fake)["max_completion_tokens"] > 0
    assert events[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0


def test_v1_with_the_official_sdk_to_a_reasoning_model(mixed, fake, serve):
    client = OpenAI(base_url=f"{serve(mixed())}/v1", api_key=TOKEN, max_retries=0)

    completion = client.chat.completions.create(
        model=REASONING, messages=[{"role": "user", "content": "hi"}], max_tokens=64, reasoning_effort="low"
    )

    body = sent(fake)
    assert body["max_completion_tokens"] == 64 and "max_tokens" not in body and body["reasoning_effort"] == "low"
    assert completion.usage.completion_tokens_details.reasoning_tokens > 0


def test_classify_with_a_reasoning_model_sends_no_temperature(mixed, fake):
    app = mixed(CHATPROXY_CLASSIFY_MODEL=REASONING)
    response = app.test_client().post("/api/classify", json={"text": "My invoice is wrong"})

    assert response.status_code == 200, response.get_json()
    body = sent(fake)
    assert "temperature" not in body and "max_tokens" not in body
    assert body["max_completion_tokens"] == state(app).settings.max_tokens  # its reasoning needs the whole cap


def test_classify_keeps_temperature_zero_for_a_model_that_takes_it(mixed, fake):
    mixed(CHATPROXY_CLASSIFY_MODEL="gpt-4o-mini").test_client().post("/api/classify", json={"text": "An invoice"})

    assert sent(fake)["temperature"] == 0.0 and sent(fake)["max_tokens"] == 300


def test_a_batch_for_a_reasoning_model_is_written_in_its_parameters(mixed, fake):
    client = mixed().test_client()
    requests = [{"custom_id": "a", "message": "one", "max_tokens": 40}, {"custom_id": "b", "message": "two"}]

    created = client.post("/api/batches", json={"requests": requests}, headers=AS_TOKEN)

    assert created.status_code == 202, created.get_json()
    batch_id = created.get_json()["id"]
    upstream = next(b for b in fake.batch_api.batches.values() if b.metadata == {"chatproxy_batch": batch_id})
    upload = fake.batch_api.files[upstream.input_file_id]
    lines = [json.loads(line) for line in upload.data.decode().splitlines()]
    assert [line["body"]["max_completion_tokens"] for line in lines] == [
        40,
        state(client.application).settings.max_tokens,
    ]
    assert not any("max_tokens" in line["body"] for line in lines)


def test_the_page_marks_reasoning_models(mixed, fake):
    html = mixed().test_client().get("/").get_data(as_text=True)

    assert f"{REASONING} · reasoning" in html and "gpt-4o-mini ·" not in html


# --- what a model refuses is our 400, and nothing goes upstream ----------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"message": "hi", "temperature": 0.3}, f"{REASONING} accepts 'temperature' only with 'reasoning_effort'"),
        ({"message": "hi", "model": "gpt-4o-mini", "reasoning_effort": "low"}, "gpt-4o-mini does not reason"),
        ({"message": "hi", "reasoning_effort": "extreme"}, "'reasoning_effort'"),
        ({"message": "hi", "max_tokens": 5, "max_completion_tokens": 5}, "not both"),
    ],
)
def test_a_parameter_the_model_refuses_is_a_400_sent_nowhere(mixed, fake, body, says):
    response = mixed().test_client().post("/api/chat", json=body)

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_request"
    assert says in response.get_json()["error"]["message"]
    assert fake.chat_calls() == []


def test_temperature_goes_to_a_reasoning_model_with_effort_none(mixed, fake):
    body = {"message": "hi", "temperature": 0.3, "reasoning_effort": "none"}
    response = mixed().test_client().post("/api/chat", json=body)

    assert response.status_code == 200
    assert sent(fake)["temperature"] == 0.3 and sent(fake)["reasoning_effort"] == "none"


def test_the_drop_setting_leaves_out_what_the_model_refuses(mixed, fake):
    app = mixed(CHATPROXY_UNSUPPORTED_PARAMS="drop")
    response = app.test_client().post("/api/chat", json={"message": "hi", "temperature": 0.3})

    assert response.status_code == 200
    assert "temperature" not in sent(fake)


def test_v1_refuses_a_temperature_for_a_fixed_model_with_openais_error_type(mixed, fake, serve):
    client = OpenAI(base_url=f"{serve(mixed())}/v1", api_key=TOKEN, max_retries=0)

    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=REASONING, messages=[{"role": "user", "content": "hi"}], temperature=0.5)

    assert raised.value.code == "invalid_request" and "temperature" in raised.value.message
    assert fake.chat_calls() == []


# --- fallback from one family to the other -----------------------------------------------------------------


def test_a_fallback_to_a_reasoning_model_gets_its_own_parameters(settings_for, fake):
    app = create_app(
        settings_for(
            CHATPROXY_MODELS=f"gpt-4o,{REASONING}",
            CHATPROXY_DEFAULT_MODEL="gpt-4o",
            CHATPROXY_FALLBACK_CHAIN=f"gpt-4o,{REASONING}",
        )
    )
    fake.for_model("gpt-4o", Reply(status=503))

    response = app.test_client().post("/api/chat", json={"message": "hi", "temperature": 0.3, "max_tokens": 80})

    assert response.status_code == 200 and response.get_json()["model"] == REASONING
    first, second = (call.body for call in fake.chat_calls())
    assert first["max_tokens"] == 80 and first["temperature"] == 0.3
    assert second["max_completion_tokens"] == 80 and "max_tokens" not in second and "temperature" not in second


def test_a_fallback_from_a_reasoning_model_to_gpt_4o_mini_drops_the_effort(settings_for, fake):
    app = create_app(settings_for(**MIXED, CHATPROXY_FALLBACK_CHAIN=f"{REASONING},gpt-4o-mini"))
    fake.for_model(REASONING, Reply(status=503))

    response = app.test_client().post("/api/chat", json={"message": "hi", "reasoning_effort": "high"})

    assert response.status_code == 200 and response.get_json()["model"] == "gpt-4o-mini"
    first, second = (call.body for call in fake.chat_calls())
    assert first["reasoning_effort"] == "high" and "reasoning_effort" not in second and second["max_tokens"] > 0


# --- money: cached and reasoning tokens, as OpenAI bills them ----------------------------------------------


def test_cached_prompt_tokens_are_billed_at_the_cached_rate(settings_for, fake):
    """gpt-4o: $2.50 input, $1.25 cached input, $10 output per 1M tokens = 2.5, 1.25 and 10 µ$ per token."""
    app = create_app(settings_for())
    question = "x" * 4000  # the fake counts 4 characters a token
    fake.script(Reply(content="ok " * 10, cached_tokens=800))

    response = app.test_client().post("/api/chat", json={"message": question, "model": "gpt-4o"})

    [row] = state(app).ledger.rows()
    prompt, completion = row["prompt_tokens"], row["completion_tokens"]
    assert row["cached_tokens"] == 800 and prompt > 800
    # (prompt - 800) uncached at 2.5 + 800 cached at 1.25 + completion at 10, rounded up once:
    assert row["cost_micros"] == math.ceil((prompt - 800) * 2.5 + 800 * 1.25 + completion * 10)
    assert row["cost_micros"] < math.ceil(prompt * 2.5 + completion * 10)  # what charging them in full would say
    assert response.get_json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 800}
    assert state(app).budget.totals()["spent_micros"] == row["cost_micros"]


def test_reasoning_tokens_are_billed_as_output_and_recorded(mixed, fake):
    app = mixed()
    app.test_client().post("/api/chat", json={"message": "think"})

    [row] = state(app).ledger.rows()
    [call] = fake.chat_calls()
    assert row["reasoning_tokens"] == call.reasoning_tokens > 0
    assert row["completion_tokens"] == call.completion_tokens + call.reasoning_tokens  # reasoning is output
    assert row["cost_micros"] == state(app).models.cost_micros(
        REASONING, row["prompt_tokens"], row["completion_tokens"]
    )


def test_a_stream_without_usage_says_what_is_estimated(settings_for, fake):
    fake.script(Reply(content="one two three", omit_usage=True))  # as llama.cpp's server does

    app = create_app(settings_for())  # held: a collected app closes its OpenAI client, and the stream with it
    response = app.test_client().post("/api/chat", json={"message": "hi", "stream": True})

    done = parse_sse(response.get_data())[0][-1]
    assert done["type"] == "done" and done["usage"]["estimated"] is True
    assert done["usage"]["completion_tokens"] > 0 and done["usage"]["prompt_tokens"] > 0


def test_a_local_model_behind_a_compatible_server_is_priced_at_zero(settings_for, fake, caplog):
    app = create_app(settings_for(CHATPROXY_MODELS="llama3.1", CHATPROXY_DEFAULT_MODEL="llama3.1"))

    app.test_client().post("/api/chat", json={"message": "hi", "temperature": 0.2, "max_tokens": 20})

    [row] = state(app).ledger.rows()
    assert row["cost_micros"] == 0 and row["prompt_tokens"] > 0
    assert sent(fake)["max_tokens"] == 20 and sent(fake)["temperature"] == 0.2  # what such servers take
    assert "llama3.1 is not in the model table" in caplog.text and "priced at 0" in caplog.text


# --- retirement -------------------------------------------------------------------------------------------


def settings_with(**values: str):
    return validate({**raw_settings(None), "OPENAI_API_KEY": TEST_KEY, **values})


def test_a_configured_model_past_its_shutdown_stops_start_up(settings_for):
    with pytest.raises(SettingsError) as refused:
        create_app(settings_for(CHATPROXY_MODELS="gpt-4o-mini,o3-mini"))

    assert "o3-mini was shut down by OpenAI on 2026-10-23" in str(refused.value)
    assert "gpt-5.6-sol" in str(refused.value)  # its announced replacement


def test_a_model_within_30_days_of_its_shutdown_is_warned_about_and_named_by_readyz(settings_for, caplog):
    soon = (datetime.now(UTC).date() + timedelta(days=10)).isoformat()
    app = create_app(settings_for(CHATPROXY_MODEL_TABLE=json.dumps({"gpt-4o": {"shutdown": soon}})))

    ready = app.test_client().get("/readyz")

    assert ready.status_code == 200
    [retiring] = ready.get_json()["retiring_models"]
    assert retiring["model"] == "gpt-4o" and retiring["shutdown"] == soon and retiring["days_left"] == 10
    assert f"gpt-4o shuts down on {soon} (10 days)" in caplog.text


def test_a_new_user_on_2027_01_15_gets_the_replacements_of_the_retired_defaults():
    table = models.load_models(settings_with())
    found = models.check_configured(settings_with(), table, date(2027, 1, 15))

    assert found.settings.models == ("gpt-6-luna", "gpt-6.1-terra")  # OpenAI's replacement, and a stronger one
    assert found.settings.default_model == found.settings.classify_model == "gpt-6-luna"
    assert found.settings.fallback_chain == ("gpt-6.1-terra", "gpt-6-luna")
    assert found.settings.max_tokens == 8192  # room for their hidden reasoning
    assert not [w for w in found.warnings if "reasons" in w]


def test_models_someone_chose_are_never_replaced_behind_their_back():
    chosen = settings_with(CHATPROXY_MODELS="gpt-4o-mini,gpt-4.1-mini")
    with pytest.raises(SettingsError, match="gpt-4o-mini was shut down by OpenAI on 2027-01-14"):
        models.check_configured(chosen, models.load_models(chosen), date(2027, 1, 15))


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("CHATPROXY_MODEL_TABLE", "{not json", "not valid JSON"),
        ("CHATPROXY_MODEL_TABLE", '{"gpt-4o": {"colour": "blue"}}', "unknown field(s) 'colour'"),
        ("CHATPROXY_MODEL_TABLE", '{"gpt-4o": {"shutdown": "soon"}}', "YYYY-MM-DD"),
        ("CHATPROXY_MODEL_TABLE", "/no/such/file.json", "readable JSON file"),
        ("CHATPROXY_PRICES", '{"gpt-4o": {"input": 1}}', "missing 'output'"),
    ],
)
def test_a_bad_table_override_stops_start_up_naming_the_setting(settings_for, name, value, says):
    with pytest.raises(SettingsError) as refused:
        create_app(settings_for(**{name: value}))

    assert name in str(refused.value) and says in str(refused.value)


# --- existing ledgers get the new columns --------------------------------------------------------------------


def test_a_ledger_of_the_previous_schema_gets_the_token_detail_columns(settings_for, database_url):
    old = sa.MetaData()
    sa.Table(
        "ledger",
        old,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("identity", sa.Text, nullable=False),
        sa.Column("model_requested", sa.Text, nullable=False),
        sa.Column("model_answered", sa.Text),
        sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("tokens_exact", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("cost_micros", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("outcome", sa.String(64), nullable=False),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("latency_ms", sa.Integer),
        sa.Column("ttft_ms", sa.Integer),
        sa.Column("closed_at", sa.DateTime),
        sa.Column("client_request_id", sa.String(64)),
    )
    engine = sa.create_engine(database_url)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            old.tables["ledger"].insert(),
            {
                "request_id": "old",
                "created_at": datetime(2026, 11, 1),
                "identity": "token:a",
                "model_requested": "gpt-4o",
                "outcome": "ok",
                "stream": False,
                "prompt_tokens": 7,
            },
        )
    engine.dispose()
    app = create_app(settings_for(CHATPROXY_DATABASE_URL=database_url))

    result = app.test_cli_runner().invoke(args=["init-db"])

    assert result.exit_code == 0, result.output
    [row] = state(app).ledger.rows()
    assert (row["request_id"], row["prompt_tokens"], row["cached_tokens"], row["reasoning_tokens"]) == ("old", 7, 0, 0)
