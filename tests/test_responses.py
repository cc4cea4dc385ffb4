"""/v1/responses, /v1/embeddings and /v1/models/{id}: the official `openai` SDK as the client, the fake upstream
behind chatproxy, speaking the Responses wire format."""

from __future__ import annotations

import json
import threading

import httpx2
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from chatproxy import create_app
from chatproxy.callers import hash_token
from chatproxy.demo.upstream import Reply
from chatproxy.metering import ROW_HEADER
from chatproxy.schemas.responses import parse_responses_request
from chatproxy.sse import EventStream
from chatproxy.state import state

ALICE = "cpx_responses-token-for-alice-0123456789"
BOB = "cpx_responses-token-for-bob-0123456789ab"
SYSTEM = "You are the proxy's assistant."
PIXEL = (  # a 1 x 1 PNG
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


class City(BaseModel):
    name: str
    population: int


@pytest.fixture
def make_app(settings_for):
    """An app as shipped (no anonymous access) with two tokens, alice and bob."""

    def make(**overrides: object):
        config = {
            "CHATPROXY_ALLOW_ANONYMOUS": False,
            "CHATPROXY_API_TOKENS": f"alice={hash_token(ALICE)},bob={hash_token(BOB)}",
            "CHATPROXY_SYSTEM_PROMPT": SYSTEM,
            **overrides,
        }
        return create_app(settings_for(**config))

    return make


@pytest.fixture
def sdk(make_app, serve):
    """Serve an app; `sdk(**settings)` returns alice's SDK client, `sdk.client(token)` another caller's."""

    def make(**overrides: object) -> OpenAI:
        make.app = make_app(**overrides)
        make.url = f"{serve(make.app)}/v1"
        return make.client(ALICE)

    make.client = lambda token: OpenAI(base_url=make.url, api_key=token, max_retries=0)
    return make


def rows(app, fake) -> list[dict]:
    """The app's ledger once every row is closed (a stream closes its row after its last event)."""
    ledger = state(app).ledger
    assert fake.wait_for(lambda: all(row["outcome"] != "interrupted" for row in ledger.rows()))
    return ledger.rows()


def post(app, body: dict, token: str = ALICE):
    """POST /v1/responses with Flask's test client."""
    return app.test_client().post("/v1/responses", json=body, headers={"Authorization": f"Bearer {token}"})


# --- create and stream, through the real SDK ---------------------------------------------------------------------


def test_create_answers_with_the_response_object_and_its_usage(sdk, fake):
    client = sdk()

    raw = client.responses.with_raw_response.create(
        model="gpt-4o", input="hello there", max_output_tokens=5000, metadata={"ticket": "42"}, user="u-1"
    )
    response = raw.parse()

    assert response.output_text == "Echo: hello there"
    assert response.status == "completed" and raw.headers["x-chatproxy-model"] == "gpt-4o"
    [call] = fake.responses_calls()
    assert response.usage.input_tokens == call.prompt_tokens and response.usage.output_tokens == call.completion_tokens
    # Our instructions go upstream, first; the client never sees them, and the cap is clamped to the server's.
    assert call.body["instructions"] == SYSTEM and call.body["max_output_tokens"] == 1024
    assert (call.body["metadata"], call.body["user"]) == ({"ticket": "42"}, "u-1")
    assert response.instructions is None
    assert call.headers["authorization"] == "Bearer sk-test-0123456789abcdefghijklmnopqrstuvwxyz"
    [row] = rows(sdk.app, fake)
    assert (row["identity"], row["outcome"], row["tokens_exact"]) == ("token:alice", "ok", True)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (call.prompt_tokens, call.completion_tokens)
    assert row["cost_micros"] > 0 and row["response_id"] is None


def test_stream_relays_the_events_in_order_and_the_final_response_has_usage(sdk, fake):
    client = sdk()
    fake.script(Reply(chunks=["one ", "two ", "three"]))

    with client.responses.stream(model="gpt-4o", input="count") as stream:
        events = list(stream)
        final = stream.get_final_response()

    kinds = [event.type for event in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds.index("response.output_text.delta") < kinds.index("response.completed")
    assert final.output_text == "one two three" and final.usage.output_tokens == 3
    assert final.instructions is None
    [row] = rows(sdk.app, fake)
    assert (row["outcome"], row["completion_tokens"], row["tokens_exact"], row["stream"]) == ("ok", 3, True, True)


def test_the_stream_carries_event_lines_and_no_done(sdk, fake):
    sdk()
    fake.script(Reply(chunks=["a", "b"]))

    with httpx2.stream(
        "POST",
        f"{sdk.url}/responses",
        json={"model": "gpt-4o", "input": "x", "stream": True},
        headers={"Authorization": f"Bearer {ALICE}"},
    ) as response:
        text = response.read().decode()

    blocks = [block for block in text.split("\n\n") if block.strip() and not block.startswith(":")]
    for block in blocks:
        event_line, data_line = block.split("\n")
        name = event_line.removeprefix("event: ")
        assert json.loads(data_line.removeprefix("data: "))["type"] == name
    assert "[DONE]" not in text and blocks[-1].startswith("event: response.completed")
    assert response.headers["x-accel-buffering"] == "no"


def test_structured_output_is_parsed_by_the_sdk(sdk, fake):
    client = sdk()

    parsed = client.responses.parse(model="gpt-4o", input="a city, please: paris", text_format=City)

    assert isinstance(parsed.output_parsed, City)
    sent = fake.responses_calls()[0].body["text"]["format"]
    assert (sent["type"], sent["name"], sent["strict"]) == ("json_schema", "City", True)


def test_json_mode_gets_the_word_json_that_openai_requires(sdk, fake):
    sdk().responses.create(model="gpt-4o", input="a city", text={"format": {"type": "json_object"}})

    assert "json" in fake.responses_calls()[0].body["instructions"].lower()


def test_a_function_tool_round_trip(sdk, fake):
    client = sdk()

    first = client.responses.create(model="gpt-4o", input="weather in Paris?", tools=[WEATHER])
    [tool_call] = [item for item in first.output if item.type == "function_call"]
    assert tool_call.name == "get_weather" and json.loads(tool_call.arguments)["city"]
    second = client.responses.create(
        model="gpt-4o",
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "weather in Paris?"},
            *[item.model_dump(exclude_none=True) for item in first.output],
            {"type": "function_call_output", "call_id": tool_call.call_id, "output": '{"celsius": 21}'},
        ],
    )

    assert second.output_text == "Echo: weather in Paris?"
    sent = fake.responses_calls()[1].body["input"]
    assert [item.get("type") for item in sent[-2:]] == ["function_call", "function_call_output"]


def test_a_streamed_function_call_arrives_in_pieces(sdk, fake):
    with sdk().responses.stream(model="gpt-4o", input="weather?", tools=[WEATHER]) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()

    assert len(deltas) > 1 and "".join(deltas) == final.output[0].arguments


# --- stored responses are owned -----------------------------------------------------------------------------------


def test_store_arrives_upstream_as_false(sdk, fake):
    client = sdk()
    client.responses.create(model="gpt-4o", input="hi")
    client.responses.create(model="gpt-4o", input="hi", stream=True).close()

    assert fake.wait_for(lambda: len(fake.responses_calls()) == 2)
    assert [call.body["store"] for call in fake.responses_calls()] == [False, False]
    assert fake.stored == {}


def test_store_true_is_refused_unless_the_setting_allows_it(sdk, fake):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk().responses.create(model="gpt-4o", input="hi", store=True)

    assert "'store' must be false" in raised.value.message
    assert fake.calls == []


def test_only_the_caller_who_stored_a_response_may_continue_read_or_delete_it(sdk, fake, database_url):
    alice = sdk(CHATPROXY_RESPONSES_STORE=True, CHATPROXY_DATABASE_URL=database_url)
    bob = sdk.client(BOB)
    first = alice.responses.create(model="gpt-4o", input="my secret plan", store=True)
    assert fake.responses_calls()[0].body["store"] is True
    calls = len(fake.calls)

    with pytest.raises(openai.NotFoundError) as continued:
        bob.responses.create(model="gpt-4o", input="what was my plan?", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError) as read:
        bob.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as deleted:
        bob.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as unknown:
        bob.responses.retrieve("resp_does_not_exist")

    assert len(fake.calls) == calls  # nothing reached the upstream
    bodies = [e.value.body for e in (continued, read, deleted)]
    assert all(body["code"] == "not_found" for body in bodies)
    assert {e.value.message.replace(first.id, "ID") for e in (continued, read, deleted)} == {
        unknown.value.message.replace("resp_does_not_exist", "ID")
    }
    second = alice.responses.create(model="gpt-4o", input="and then?", previous_response_id=first.id)
    assert second.output_text == "Echo: and then?"
    assert fake.responses_calls()[-1].body["previous_response_id"] == first.id
    assert alice.responses.retrieve(first.id).id == first.id
    alice.responses.delete(first.id)
    assert first.id not in fake.stored


def test_a_continuation_reserves_for_the_earlier_conversation(sdk, fake, tmp_path):
    """The upstream reads a stored conversation again as input: its tokens count in the worst case."""
    sdk(CHATPROXY_RESPONSES_STORE=True).responses.create(model="gpt-4o", input="x" * 4000, store=True)
    [row] = rows(sdk.app, fake)
    earlier = row["prompt_tokens"] + row["completion_tokens"]
    more = {"model": "gpt-4o", "input": "more", "max_output_tokens": 16}
    small = parse_responses_request(more, state(sdk.app).settings, state(sdk.app).models).prompt_estimate + 16
    client = sdk(
        CHATPROXY_RESPONSES_STORE=True,
        CHATPROXY_DATABASE_URL=f"sqlite:///{tmp_path / 'second.db'}",
        CHATPROXY_IDENTITY_DAILY_TOKEN_BUDGET=earlier + small + earlier // 2,
    )
    first = client.responses.create(model="gpt-4o", input="x" * 4000, store=True)
    calls = len(fake.calls)

    with pytest.raises(openai.RateLimitError) as raised:
        client.responses.create(**more, previous_response_id=first.id)

    assert raised.value.code == "budget_exceeded" and len(fake.calls) == calls
    assert client.responses.create(**more).output_text == "Echo: more"


def test_a_streamed_stored_response_is_recorded_for_its_owner(sdk, fake):
    client = sdk(CHATPROXY_RESPONSES_STORE=True)
    with client.responses.stream(model="gpt-4o", input="hi", store=True) as stream:
        final = stream.get_final_response()

    [row] = rows(sdk.app, fake)
    assert row["response_id"] == final.id and row["identity"] == "token:alice"
    with pytest.raises(openai.NotFoundError):
        sdk.client(BOB).responses.create(model="gpt-4o", input="x", previous_response_id=final.id)


# --- bad input: 400, nothing upstream -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"input": "hi", "background": True}, "Unknown or unsupported field: 'background'"),
        ({"input": "hi", "metadata": {"k": "v" * 513}}, "metadata"),
        ({"input": "hi", "metadata": {"k": 1}}, "metadata"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "the hosted tool 'web_search' is not allowed"),
        ({"input": "hi", "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "not allowed"),
        ({"input": "hi", "tools": [{**WEATHER, "name": f"f{i}"} for i in range(65)]}, "1 to 64 tools"),
        ({"input": "hi", "tools": [WEATHER, WEATHER]}, "unique"),
        ({"input": "hi", "tool_choice": "auto"}, "need 'tools'"),
        ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "x"}}, "'tool_choice'"),
        ({"input": "x" * 8001}, "too long"),
        ({"input": [{"role": "user", "content": "x"}] * 41}, "Too many input items"),
        ({"input": "hi", "max_output_tokens": 8}, "at least 16"),
        ({"input": "hi", "max_output_tokens": "100"}, "'max_output_tokens' must be an integer"),
        ({"input": "hi", "temperature": 3}, "'temperature' must be a number from 0 to 2"),
        ({"input": "hi", "stream": "yes"}, "'stream' must be true or false"),
        ({"input": "hi", "reasoning": {"effort": "high"}}, "gpt-4o does not reason"),
        ({"input": "hi", "model": "gpt-9"}, "Unknown model"),
        ({"input": []}, "non-empty"),
        ({"input": ""}, "input[0].content must not be empty"),
        ({"input": 7}, "'input' must be"),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type must be one of"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type must be one of: input_text, input_image, output_text, refusal",
        ),
        ({"input": "hi", "k" * 5000: 1}, "Unknown or unsupported field: 'kkkk"),
        ({"input": [{"role": "user", "content": "hi", "k" * 5000: 1}]}, "is not a supported field"),
        ({"input": [{"role": "user", "content": "hi", "api_key": "x"}]}, "input[0].api_key is not a supported"),
        ({"input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "last input item"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "file:///etc/passwd"}]}]},
            "input[0].content[0].image_url must be a base64 data URL",
        ),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name is required"),
        ({"input": "hi", "previous_response_id": "resp_123"}, "No response with id 'resp_123'"),
    ],
)
def test_bad_requests_are_4xx_naming_the_problem_with_nothing_upstream(make_app, fake, body, says):
    app = make_app()
    response = post(app, {"model": "gpt-4o", **body})

    assert response.status_code in (400, 404)
    error = response.get_json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
    assert len(error["message"]) < 600  # one sentence, whatever the client sent
    assert "Traceback" not in response.get_data(as_text=True)
    assert fake.calls == []
    assert state(app).ledger.rows() == []


def test_an_image_to_a_text_only_model_is_refused(make_app, fake):
    table = json.dumps({"gpt-4o": {"shutdown": None}, "gpt-4o-mini": {"shutdown": None, "images": False}})
    app = make_app(CHATPROXY_MODEL_TABLE=table)
    image = {"type": "input_image", "image_url": PIXEL}
    body = {
        "model": "gpt-4o-mini",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "?"}, image]}],
    }

    response = post(app, body)

    assert response.status_code == 400
    assert "gpt-4o-mini does not accept images" in response.get_json()["error"]["message"]
    assert fake.calls == []
    assert post(app, {**body, "model": "gpt-4o"}).status_code == 200


def test_an_allowlisted_hosted_tool_goes_upstream(make_app, fake):
    app = make_app(CHATPROXY_RESPONSES_HOSTED_TOOLS="web_search")

    body = {
        "model": "gpt-4o",
        "input": "news?",
        "tools": [{"type": "web_search"}],
        "tool_choice": {"type": "web_search"},
    }
    response = post(app, body)
    not_offered = post(app, {**body, "tool_choice": {"type": "file_search"}})

    assert response.status_code == 200
    sent = fake.responses_calls()[0].body
    assert (sent["tools"], sent["tool_choice"]) == ([{"type": "web_search"}], {"type": "web_search"})
    assert not_offered.status_code == 400 and "'tool_choice' must be" in not_offered.get_json()["error"]["message"]
    assert len(fake.responses_calls()) == 1


def test_a_reasoning_model_gets_its_effort_and_no_temperature(make_app, fake):
    app = make_app(CHATPROXY_MODELS="gpt-4o-mini,gpt-4o,gpt-5.4-nano")

    ok = post(app, {"model": "gpt-5.4-nano", "input": "think", "reasoning": {"effort": "low", "summary": "auto"}})
    refused = post(app, {"model": "gpt-5.4-nano", "input": "think", "temperature": 0.2})

    assert ok.status_code == 200 and ok.get_json()["usage"]["output_tokens_details"]["reasoning_tokens"] == 12
    sent = fake.responses_calls()[0].body
    assert sent["reasoning"] == {"effort": "low", "summary": "auto"} and "temperature" not in sent
    assert refused.status_code == 400 and "gpt-5.4-nano" in refused.get_json()["error"]["message"]
    assert len(fake.responses_calls()) == 1


def test_reasoning_summary_events_are_relayed_and_reasoning_tokens_recorded(sdk, fake):
    client = sdk(CHATPROXY_MODELS="gpt-4o-mini,gpt-4o,gpt-5.4-nano", CHATPROXY_MAX_TOKENS=4096)

    with client.responses.stream(
        model="gpt-5.4-nano", input="why?", reasoning={"effort": "low", "summary": "auto"}
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()

    assert "response.reasoning_summary_text.delta" in kinds
    assert kinds.index("response.reasoning_summary_text.done") < kinds.index("response.output_text.delta")
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].summary[0].text == "Thinking about: why?"
    [row] = rows(sdk.app, fake)
    assert row["reasoning_tokens"] == 12 == final.usage.output_tokens_details.reasoning_tokens
    assert row["completion_tokens"] == final.usage.output_tokens


# --- fallback, faults, aborts and the ledger ----------------------------------------------------------------------


def test_fallback_happens_before_the_first_output_event(sdk, fake):
    client = sdk()
    fake.for_model("gpt-4o", Reply(error_after=0))

    with client.responses.stream(model="gpt-4o", input="hi") as stream:
        final = stream.get_final_response()

    assert final.model == "gpt-4o-mini" and final.output_text == "Echo: hi"
    assert [call.model for call in fake.responses_calls()] == ["gpt-4o", "gpt-4o-mini"]
    failed, answered = rows(sdk.app, fake)
    assert (failed["outcome"], answered["outcome"]) == ("upstream_error", "fallback")


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (Reply(chunks=["one ", "two ", "three"], error_after=2), "upstream_error"),
        (Reply(chunks=["one ", "two ", "three"], drop_after=2), "upstream_truncated"),
        (Reply(chunks=["one ", "two ", "three"], malformed_after=2), "upstream_bad_response"),
        (
            Reply(chunks=["one ", "two ", "three"], malformed_after=2, malformed=b'{"delta": "x"}'),
            "upstream_bad_response",
        ),
    ],
)
def test_a_failure_after_the_first_event_ends_the_stream_with_an_error_event(sdk, fake, reply, code):
    client = sdk()
    fake.script(reply)

    events = list(client.responses.create(model="gpt-4o", input="hi", stream=True))

    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == "one two "
    last = events[-1]
    assert (last.type, last.code) == ("error", code)
    assert last.sequence_number == events[-2].sequence_number + 1
    assert "fake" not in last.message  # the upstream's own words stay in the log
    [row] = rows(sdk.app, fake)
    assert row["outcome"] == code and row["completion_tokens"] > 0 and not row["tokens_exact"]


def test_a_refusal_before_the_first_byte_is_a_json_error(sdk, fake):
    client = sdk(CHATPROXY_FALLBACK_CHAIN="")
    fake.script(Reply(status=429, headers={"retry-after": "7"}))

    with pytest.raises(openai.APIStatusError) as raised:
        client.responses.create(model="gpt-4o", input="hi", stream=True)

    assert raised.value.response.headers["content-type"] == "application/json"
    assert raised.value.response.headers["retry-after"] == "7"
    [row] = rows(sdk.app, fake)
    assert row["outcome"] == "upstream_http_429" and row["cost_micros"] == 0


def test_an_incomplete_response_is_relayed_and_billed(sdk, fake):
    client = sdk()
    fake.script(Reply(chunks=["cut"], finish_reason="length"))

    events = list(client.responses.create(model="gpt-4o", input="hi", stream=True))

    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    [row] = rows(sdk.app, fake)
    assert row["outcome"] == "ok" and row["tokens_exact"]


def test_a_response_that_fails_upstream_after_its_first_event_ends_with_response_failed(sdk, fake):
    client = sdk()
    fake.script(Reply(chunks=["half"], finish_reason="failed"))

    events = list(client.responses.create(model="gpt-4o", input="hi", stream=True))

    assert [e.type for e in events][-2:] == ["response.output_item.done", "response.failed"]  # nothing after it
    [row] = rows(sdk.app, fake)
    assert row["outcome"] == "upstream_error" and row["tokens_exact"]


def test_a_failed_response_object_falls_back(sdk, fake):
    client = sdk()
    fake.for_model("gpt-4o", Reply(finish_reason="failed"))

    response = client.responses.create(model="gpt-4o", input="hi")

    assert response.model == "gpt-4o-mini" and response.status == "completed"
    assert [row["outcome"] for row in rows(sdk.app, fake)] == ["upstream_error", "fallback"]


def test_a_filtered_response_is_relayed_as_incomplete_and_recorded_as_filtered(sdk, fake):
    client = sdk()
    fake.script(Reply(chunks=["no"], finish_reason="content_filter"))

    events = list(client.responses.create(model="gpt-4o", input="hi", stream=True))

    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "content_filter"
    [row] = rows(sdk.app, fake)
    assert row["outcome"] == "content_filtered"


def test_a_client_that_hangs_up_closes_the_upstream_stream(sdk, fake):
    client = sdk()
    fake.script(Reply(chunks=[f"w{i} " for i in range(100)], pace=0.05))

    stream = client.responses.create(model="gpt-4o", input="hi", stream=True)
    for number, _ in enumerate(stream):
        if number == 6:
            break
    stream.close()

    assert fake.wait_for(lambda: fake.responses_calls()[0].disconnected_at is not None, timeout=3)
    [row] = rows(sdk.app, fake)
    assert row["outcome"] == "aborted" and row["completion_tokens"] > 0 and row["cost_micros"] > 0


def test_keepalive_pings_do_not_disturb_the_sdk(sdk, fake):
    client = sdk(CHATPROXY_KEEPALIVE_SECONDS=0.1)
    fake.script(Reply(chunks=["slow ", "answer"], stall_after=1, stall=0.5))

    with client.responses.stream(model="gpt-4o", input="hi") as stream:
        assert stream.get_final_response().output_text == "slow answer"


def test_ledger_rows_reconcile_with_upstream_calls_across_json_streams_aborts_and_faults(sdk, fake):
    client = sdk(CHATPROXY_FALLBACK_CHAIN="")
    fake.script(
        Reply(),
        Reply(chunks=["a ", "b"]),
        Reply(status=500),
        Reply(chunks=["a ", "b ", "c"], drop_after=1),
        Reply(chunks=[f"w{i} " for i in range(50)], pace=0.02),
        Reply(cached_tokens=2),
    )
    client.responses.create(model="gpt-4o", input="one")
    list(client.responses.create(model="gpt-4o", input="two", stream=True))
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="gpt-4o", input="three")
    list(client.responses.create(model="gpt-4o", input="four", stream=True))
    stream = client.responses.create(model="gpt-4o", input="five", stream=True)
    next(iter(stream)), next(iter(stream)), next(iter(stream)), next(iter(stream)), next(iter(stream))
    stream.close()
    client.responses.create(model="gpt-4o", input="six six six six")

    ledger = {row["id"]: row for row in rows(sdk.app, fake)}
    calls = fake.responses_calls()
    assert len(ledger) == len(calls) == 6
    for call in calls:
        row = ledger[int(call.headers[ROW_HEADER.lower()])]
        if row["tokens_exact"]:
            assert (row["prompt_tokens"], row["completion_tokens"]) == (call.prompt_tokens, call.completion_tokens)
            assert row["cached_tokens"] == call.cached_tokens
    outcomes = sorted(row["outcome"] for row in ledger.values())
    assert outcomes == sorted(["ok", "ok", "upstream_http_500", "upstream_truncated", "aborted", "ok"])
    assert state(sdk.app).budget.totals()["reserved_micros"] == 0


def test_budgets_are_exact_under_concurrency(sdk, fake):
    """Room for exactly K worst-case responses; 3K at once; exactly K reach the upstream."""
    k, cap = 3, 100
    prices = json.dumps({m: {"input": 1, "cached_input": 1, "output": 1} for m in ("gpt-4o", "gpt-4o-mini")})
    client = sdk(CHATPROXY_PRICES=prices, CHATPROXY_FALLBACK_CHAIN="")
    req = parse_responses_request(
        {"model": "gpt-4o", "input": "hi", "max_output_tokens": cap}, state(sdk.app).settings, state(sdk.app).models
    )
    worst = req.prompt_estimate + cap  # one token costs one micro-dollar
    client = sdk(
        CHATPROXY_PRICES=prices,
        CHATPROXY_FALLBACK_CHAIN="",
        CHATPROXY_IDENTITY_DAILY_BUDGET_USD=f"{k * worst / 1e6:.6f}",
    )
    fake.default = Reply(delay=1.0, content="x" * 2000)
    results: list[str] = []

    def one() -> None:
        try:
            client.responses.create(model="gpt-4o", input="hi", max_output_tokens=cap)
            results.append("ok")
        except openai.RateLimitError as exc:
            results.append(exc.code)

    try:
        threads = [threading.Thread(target=one) for _ in range(3 * k)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        fake.default = Reply()

    assert sorted(results) == ["budget_exceeded"] * (2 * k) + ["ok"] * k
    assert len(fake.responses_calls()) == k


def test_the_tokens_rate_limit_applies(sdk, fake):
    client = sdk(CHATPROXY_RATE_LIMIT_TOKEN="1/minute")
    client.responses.create(model="gpt-4o", input="hi")

    with pytest.raises(openai.RateLimitError) as raised:
        client.responses.create(model="gpt-4o", input="hi")

    assert raised.value.code == "rate_limited" and len(fake.responses_calls()) == 1


def test_azure_mode_refuses_the_responses_api_clearly(make_app, fake):
    app = make_app(
        OPENAI_API_KEY="",
        OPENAI_BASE_URL="",
        AZURE_OPENAI_ENDPOINT="https://example.openai.azure.com",
        AZURE_OPENAI_API_KEY="azure-key-0123456789",
        CHATPROXY_AZURE_DEPLOYMENTS="gpt-4o-mini=mini,gpt-4o=big",
    )

    response = post(app, {"model": "gpt-4o", "input": "hi"})

    assert response.status_code == 400
    assert "Azure OpenAI mode" in response.get_json()["error"]["message"]


# --- /v1/embeddings and /v1/models/{id} ---------------------------------------------------------------------------


def test_embeddings_through_the_sdk_are_metered_at_input_prices(sdk, fake):
    client = sdk()

    result = client.embeddings.create(model="text-embedding-3-small", input=["first text", "second"])

    assert [item.index for item in result.data] == [0, 1] and len(result.data[0].embedding) == 16
    [call] = [c for c in fake.calls if c.path.endswith("/embeddings")]
    [row] = rows(sdk.app, fake)
    assert (row["model_answered"], row["prompt_tokens"], row["completion_tokens"]) == (
        "text-embedding-3-small",
        call.prompt_tokens,
        0,
    )
    expected = state(sdk.app).models.cost_micros("text-embedding-3-small", call.prompt_tokens, 0)
    assert row["cost_micros"] == expected


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"model": "gpt-4o", "input": "x"}, "Unknown embedding model"),
        ({"input": ["x"] * 65}, "1 to 64 strings"),
        ({"input": "x" * 8001}, "at most 8000 characters"),
        ({"input": [[1, 2, 3]]}, "input"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "extra": 1}, "Unknown or unsupported field: 'extra'"),
    ],
)
def test_bad_embeddings_requests_are_400s(make_app, fake, body, says):
    app = make_app()
    response = app.test_client().post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {ALICE}"})

    assert response.status_code == 400 and says in response.get_json()["error"]["message"]
    assert fake.calls == []


def test_models_by_id_only_for_allowlisted_models(sdk, fake):
    client = sdk()

    assert client.models.retrieve("gpt-4o").id == "gpt-4o"
    assert client.models.retrieve("text-embedding-3-small").id == "text-embedding-3-small"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4.1")
    assert {m.id for m in client.models.list()} == {"gpt-4o-mini", "gpt-4o", "text-embedding-3-small"}
    assert fake.calls == []


def test_no_token_no_responses(make_app, fake):
    app = make_app(CHATPROXY_ALLOW_ANONYMOUS=True)

    response = app.test_client().post("/v1/responses", json={"model": "gpt-4o", "input": "hi"})

    assert response.status_code == 401 and fake.calls == []


# --- the stream decoder, byte by byte, on Responses events -------------------------------------------------------

RESPONSES_WIRE = (
    'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"caf\u00e9 \u2603"}\n\n'
    ": ping\n\n"
    'event: response.completed\ndata: {"type":"response.completed",\ndata: "response":{"id":"resp_1"}}\n\n'
).encode()


def decoded(chunks) -> EventStream:
    """An EventStream over a body that arrives in `chunks`."""
    request = httpx2.Request("POST", "http://upstream.test/v1/responses")
    return EventStream(httpx2.Response(200, content=iter(chunks), request=request))


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("size", [1, 2, 3, 7, len(RESPONSES_WIRE)])
def test_the_decoder_reads_event_lines_split_anywhere(size, ending):
    wire = RESPONSES_WIRE.replace(b"\n", ending)  # SSE allows CRLF and CR line ends too
    chunks = [wire[i : i + size] for i in range(0, len(wire), size)]

    events = list(decoded(chunks))

    assert [(event.name, event["type"]) for event in events] == [
        ("response.output_text.delta", "response.output_text.delta"),
        ("response.completed", "response.completed"),
    ]
    assert events[0]["delta"] == "caf\u00e9 \u2603"  # a multibyte character split across reads
    assert events[1]["response"] == {"id": "resp_1"}  # two data: lines make one event


def test_the_decoder_raises_the_sdks_error_when_the_body_breaks_mid_event():
    def body():
        yield RESPONSES_WIRE[:40]
        raise httpx2.ReadError("connection reset")

    with pytest.raises(openai.APIConnectionError):
        list(decoded(body()))
