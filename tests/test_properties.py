"""Property tests: the SSE framing and the request caps hold for any input hypothesis can think of."""

from __future__ import annotations

import codecs
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from openai._utils._json import openapi_dumps  # how the SDK encodes a request body

from chatproxy.config import SETTINGS, validate
from chatproxy.errors import ApiError
from chatproxy.schemas import request_models
from chatproxy.schemas.base import MAX_TEMPERATURE
from chatproxy.schemas.chat import CLIENT_ROLES
from chatproxy.schemas.formats import format_chars
from chatproxy.sse import PING
from chatproxy.sse import data as sse
from chatproxy.strict import parse_json_body

PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# --- SSE: our framing, read back the way a browser's EventSource / fetch reader does -------------------------


def browser_events(chunks: list[bytes]) -> tuple[list[str], int]:
    """The `data` of each event and the number of comment lines, per the WHATWG event-stream rules.

    Bytes arrive in arbitrary chunks and are decoded incrementally (TextDecoder with {stream: true}); lines end
    in CRLF, LF or CR; a line starting with ':' is a comment; `data:` drops one leading space; data lines of one
    event are joined with LF; a blank line dispatches the event.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    text = "".join(decoder.decode(chunk) for chunk in chunks) + decoder.decode(b"", final=True)
    events, comments, data, pending = [], 0, [], ""
    buffer = text
    lines: list[str] = []
    while buffer:
        for index, char in enumerate(buffer):
            if char in "\r\n":
                lines.append(buffer[:index])
                step = 2 if buffer[index : index + 2] == "\r\n" else 1
                buffer = buffer[index + step :]
                break
        else:
            pending, buffer = buffer, ""  # an unfinished last line is not a line yet
    assert pending == "", "the stream must end on a line break"
    for line in lines:
        if line == "":
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith(":"):
            comments += 1
        else:
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value[1:] if value.startswith(" ") else value)
    return events, comments


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (the network may split anywhere, even inside a UTF-8 character)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


# Any text, surrogates excepted (a Python str from JSON can hold them; they are checked separately below).
any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
line_breaks = st.sampled_from(["\n", "\r", "\r\n", "\u2028", "\u2029", "\u0085", "\n\n", "data: x\n\n", ": ping\n"])
tricky_text = st.lists(st.one_of(any_text, line_breaks), max_size=8).map("".join)


@PROPERTY_SETTINGS
@given(
    pieces=st.lists(tricky_text, min_size=1, max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
    pings=st.lists(st.integers(0, 12), max_size=4),
)
@example(pieces=['a\n\ndata: {"type":"done"}\n\n', "\r\n", "\u2028", ": ping\n"], cuts=[1, 2, 3], pings=[0])
def test_any_text_round_trips_through_the_sse_framing(pieces, cuts, pings):
    events = [{"type": "start", "model": "m", "degraded": False}]
    events += [{"type": "delta", "content": piece} for piece in pieces]
    events.append({"type": "done", "finish_reason": "stop", "usage": None, "model": "m", "degraded": False})
    frames = [sse(event) for event in events]
    for position in sorted(pings, reverse=True):
        frames.insert(min(position, len(frames)), PING)
    wire = b"".join(frames)

    data, comments = browser_events(split_at(wire, cuts))

    assert [json.loads(item) for item in data] == events
    assert "".join(json.loads(item).get("content", "") for item in data) == "".join(pieces)
    assert comments == len(pings)
    assert all(b"\r" not in frame[:-2] and frame.count(b"\n") == 2 for frame in frames if frame is not PING)


@PROPERTY_SETTINGS
@given(st.text(max_size=50))  # surrogates included: json.dumps escapes them, so the frame stays valid UTF-8
def test_every_frame_is_one_line_of_valid_utf8(text):
    frame = sse({"type": "delta", "content": text})

    frame.decode("utf-8")
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n") and frame.count(b"\n") == 2
    assert json.loads(frame[6:-2]) == {"type": "delta", "content": text}


# --- the request model: whatever /api/chat's model accepts is within the caps ------------------------------

CAPS = {
    "CHATPROXY_MAX_MESSAGES": 4,
    "CHATPROXY_MAX_MESSAGE_CHARS": 12,
    "CHATPROXY_MAX_TOTAL_CHARS": 30,
    "CHATPROXY_MAX_TOKENS": 50,
}
SMALL = validate({**{s.name: s.default for s in SETTINGS}, "OPENAI_API_KEY": "sk-properties-test-key", **CAPS})
CHAT = request_models(SMALL).chat

# Text around the surrogate block too: a lone surrogate survives json.loads, and the SDK cannot send it.
near_surrogates = st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010, exclude_categories=()), max_size=3)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=15),
    near_surrogates,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), near_surrogates), inner, max_size=4)
    ),
    max_leaves=10,
)
contents = st.one_of(
    st.text(max_size=16), st.sampled_from(["", "   ", "\n", "x" * 12, "x" * 13, "\ud800"]), json_values
)
roles = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "developer", "", "User"]), json_values)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": roles, "content": contents}),
        st.fixed_dictionaries({"role": roles, "content": contents}, optional={"name": st.text(max_size=4)}),
        json_values,
    ),
    max_size=6,
)
numbers = st.one_of(
    st.integers(-5, 2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from([0, 1, 2, 2.0000001, -0.0, 50, 51, "1"]),
    st.none(),
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "message": contents,
        "messages": messages,
        "model": st.one_of(st.sampled_from(["gpt-4o", "gpt-4o-mini", "gpt-5"]), json_values),
        "max_tokens": numbers,
        "temperature": numbers,
        "stream": json_values,
        "response_format": json_values,
        "api_key": st.text(max_size=4),
        "base_url": st.text(max_size=4),
        "system": st.text(max_size=4),
    },
)
chaotic = st.tuples(st.dictionaries(st.text(max_size=6), json_values, max_size=2), bodies).map(
    lambda parts: {**parts[0], **parts[1]}
)  # sometimes an unknown field too
# Mostly well-formed bodies whose sizes and numbers sit around the caps, so acceptance is tested too.
short_text = st.text(st.characters(codec="utf-8"), min_size=0, max_size=14)
turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "assistant", "system"]), "content": short_text})
near_valid = st.tuples(
    st.one_of(
        st.fixed_dictionaries({"message": short_text}),
        st.fixed_dictionaries({"messages": st.lists(turn, min_size=1, max_size=5)}),
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.sampled_from(["gpt-4o", "gpt-4o-mini", None, "gpt-5"]),
            "max_tokens": st.one_of(st.integers(-1, 120), st.none(), st.just(True), st.just(2.5)),
            "temperature": st.one_of(st.floats(-0.5, 2.5), st.integers(0, 3), st.none(), st.just(math.nan)),
            "stream": st.one_of(st.booleans(), st.none(), st.just("yes")),
            "response_format": st.sampled_from([None, {"type": "text"}, {"type": "json_object"}, {"type": "xml"}]),
        },
    ),
).map(lambda parts: {**parts[0], **parts[1]})
bodies = st.one_of(near_valid, chaotic)


@PROPERTY_SETTINGS
@given(bodies)
@example({"message": "hi", "response_format": {"type": {}}})  # found by schemathesis: was a 500
@example({"message": "x" * 12})
@example({"messages": [{"role": "user", "content": "x" * 12}] * 4})
@example(
    {
        "message": "hi",
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"maximum": math.nan}}},
    }
)  # issue 14: NaN went upstream and failed in the SDK
@example(
    {
        "message": "hi",
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}, "description": "d" * 40}},
    }
)  # issue 14: the schema was outside the caps
def test_any_request_the_schema_accepts_is_within_the_caps(body: dict[str, Any]):
    try:  # the body as it arrives: JSON text (NaN for a NaN, \ud800 escapes for lone surrogates)
        call = CHAT.parse(parse_json_body(json.dumps(body).encode(), "application/json")).call()
    except ApiError as error:  # the only way to refuse: a 400 naming the problem, never another exception
        assert (error.status, error.code) == (400, "invalid_request")
        assert error.message and "Traceback" not in error.message
        return

    messages, response_format = call.body["messages"][1:], call.body.get("response_format")  # after our system prompt
    temperature = call.sampling.get("temperature")
    assert set(body) <= set(CHAT.model_fields)
    assert 1 <= len(messages) <= SMALL.max_messages
    assert all(set(m) == {"role", "content"} and m["role"] in CLIENT_ROLES for m in messages)
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)
    assert all(len(m["content"]) <= SMALL.max_message_chars for m in messages)
    assert sum(len(m["content"]) for m in messages) <= SMALL.max_total_chars
    assert all(m["content"].encode("utf-8") for m in messages)  # no lone surrogates
    assert messages[-1]["role"] == "user"
    assert isinstance(call.max_output, int) and not isinstance(call.max_output, bool)
    assert 1 <= call.max_output <= SMALL.max_tokens
    assert temperature is None or (
        isinstance(temperature, float) and math.isfinite(temperature) and 0 <= temperature <= MAX_TEMPERATURE
    )
    assert call.model in SMALL.models
    assert isinstance(call.stream, bool)
    assert response_format is None or response_format["type"] in ("json_object", "json_schema")
    assert sum(len(m["content"]) for m in messages) + format_chars(response_format) <= SMALL.max_total_chars
    openapi_dumps({"model": call.model, **call.body})  # the SDK can encode what goes upstream


# A batch body: lines that are chat bodies with or without a custom_id (or `stream`), or anything else.
batch_lines = st.one_of(
    st.tuples(
        st.fixed_dictionaries(
            {}, optional={"custom_id": st.one_of(st.sampled_from(["a", "b", " ", "a\n", "x" * 65]), json_values)}
        ),
        bodies,
    ).map(lambda parts: {**parts[0], **parts[1]}),
    json_values,
)
batch_bodies = st.fixed_dictionaries(
    {}, optional={"requests": st.one_of(st.lists(batch_lines, max_size=4), json_values), "callback": json_values}
)
classify_bodies = st.fixed_dictionaries(
    {},
    optional={
        "text": st.one_of(st.text(max_size=14), json_values),
        "labels": st.one_of(st.lists(st.one_of(st.sampled_from(["billing", "other", "x"]), json_values)), json_values),
        "model": json_values,
    },
)


@PROPERTY_SETTINGS
@given(st.one_of(batch_bodies.map(lambda b: ("batch", b)), classify_bodies.map(lambda b: ("classify", b))))
@example(("batch", {"requests": [{}]}))  # found by schemathesis: a line without custom_id was a 500
def test_any_batch_or_classify_body_is_accepted_or_a_400(kind_and_body: tuple[str, dict[str, Any]]):
    kind, body = kind_and_body
    try:
        getattr(request_models(SMALL), kind).parse(parse_json_body(json.dumps(body).encode(), "application/json"))
    except ApiError as error:  # never another exception: a wording that cannot word the error would be a 500
        assert (error.status, error.code) == (400, "invalid_request")
        assert error.message and "Traceback" not in error.message


@PROPERTY_SETTINGS
@given(json_values)
@example(float("nan"))
@example(1e308 * 10)
@example({"ok": ["\udfff"]})
@example({"\ud800": 1})
@example("\ud83d\ude00")
def test_the_edge_admits_exactly_what_the_sdk_can_send(value: Any):
    data = json.dumps({"value": value}).encode()  # as a client would send it
    try:
        openapi_dumps(json.loads(data))
    except ValueError:
        sendable = False
    else:
        sendable = True

    try:
        body = parse_json_body(data, "application/json")
    except ApiError as error:
        assert (error.status, error.code, sendable) == (400, "invalid_request", False)
        assert error.message.startswith("value") and ("finite" in error.message or "Unicode" in error.message)
        return
    assert sendable
    assert openapi_dumps(body) == openapi_dumps(json.loads(data))


@pytest.mark.parametrize("labels", [[{}, "billing"], [["billing"], "other"], ["billing", {"a": 1}]])
def test_unhashable_labels_are_a_400_not_a_500(client, labels):
    """Found by schemathesis: a dict among `labels` crashed the duplicate check."""
    response = client.post("/api/classify", json={"text": "hi", "labels": labels})

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("kind", [{}, [], ["json_object"], {"type": "json_object"}])
def test_unhashable_response_format_type_is_a_400_not_a_500(client, kind):
    """Found by schemathesis: a dict as response_format.type crashed the type check."""
    response = client.post("/api/chat", json={"message": "hi", "response_format": {"type": kind}})

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_request"
