"""Images for models that see (issue 20): image parts on /api/chat and /v1, checked from their bytes, priced.

Every bad image is a 400 in the contract's shape, with no upstream call, no ledger row and no cooldown; a good
one arrives upstream as OpenAI's image_url part, and its tokens are in the budget's worst-case reservation.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib

import openai
import pytest
from openai import OpenAI

from chatproxy import create_app
from chatproxy.callers import hash_token
from chatproxy.config import SettingsError
from chatproxy.demo.upstream import Reply
from chatproxy.images import Picture
from chatproxy.models import load_table
from chatproxy.state import state

TOKEN = "cpx_images-token-0123456789abcdefgh"
# gpt-4o sees; o3-mini (kept alive for the test) does not.
TABLE = json.dumps({"gpt-4o": {"shutdown": None}, "o3-mini": {"shutdown": None}})
MODELS = {"CHATPROXY_MODELS": "gpt-4o,o3-mini", "CHATPROXY_DEFAULT_MODEL": "gpt-4o", "CHATPROXY_MODEL_TABLE": TABLE}


def png(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG of width x height grey pixels (or with `idat` as its compressed data, whatever the header says)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if idat is None:
        idat = zlib.compress((b"\x00" + b"\x80" * width) * height)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gif(width: int, height: int, frames: int = 1) -> bytes:
    """A GIF whose logical screen is width x height, with `frames` 1 x 1 images (each after a delay)."""
    delay = b"!\xf9\x04\x00\x0a\x00\x00\x00"  # a graphic control extension: 0.1 s
    image = b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00"
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + (delay + image) * frames + b";"


def jpeg(width: int, height: int) -> bytes:
    """The start of a baseline JPEG: SOI, a JFIF APP0 segment, and the frame header naming its size."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"


def webp(width: int, height: int) -> bytes:
    """The start of a lossless WebP naming its size."""
    bits = (width - 1) | ((height - 1) << 14)
    body = b"WEBP" + b"VP8L" + struct.pack("<I", 5) + b"\x2f" + struct.pack("<I", bits)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def animated_webp(width: int, height: int) -> bytes:
    """The start of an extended WebP with its animation flag set."""
    size = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\x02\x00\x00\x00" + size
    return b"RIFF" + struct.pack("<I", len(body)) + body


def data_url(data: bytes, mime: str = "image/png") -> str:
    """`data` as a base64 data URL."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str, **extra: str) -> dict:
    """OpenAI's image content part."""
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def asking(*images: dict, text: str = "What is in this picture?") -> list[dict]:
    """A user turn of text and image parts."""
    return [{"role": "user", "content": [{"type": "text", "text": text}, *images]}]


PICTURE = image_part(data_url(png(64, 48)))


@pytest.fixture
def app(settings_for):
    """An app with gpt-4o (sees) and o3-mini (does not), anonymous callers allowed and one token."""
    return create_app(settings_for(CHATPROXY_API_TOKENS=f"alice={hash_token(TOKEN)}", **MODELS))


@pytest.fixture
def sdk(app, serve) -> OpenAI:
    """The real SDK on our /v1."""
    return OpenAI(base_url=f"{serve(app)}/v1", api_key=TOKEN, max_retries=0)


def nothing_happened(app, fake) -> None:
    """No upstream call, no ledger row, no cooldown."""
    assert fake.chat_calls() == []
    assert state(app).ledger.rows() == []
    assert all(state(app).cooldowns.remaining(model) == 0 for model in ("gpt-4o", "o3-mini"))


# --- what arrives upstream ---------------------------------------------------------------------------------------


def test_an_image_on_api_chat_arrives_upstream_as_an_image_part(client, fake) -> None:
    response = client.post("/api/chat", json={"model": "gpt-4o", "messages": asking(PICTURE)})

    assert response.status_code == 200, response.get_json()
    assert response.get_json()["content"] == "Echo: What is in this picture? [1 image]"
    (call,) = fake.chat_calls()
    user = call.body["messages"][-1]
    assert user == {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": PICTURE["image_url"]["url"], "detail": "auto"}},
        ],
    }
    assert call.body["messages"][0]["role"] == "system"  # our system prompt still comes first


def test_text_only_requests_are_unchanged(client, fake) -> None:
    response = client.post("/api/chat", json={"model": "gpt-4o", "message": "hi"})

    assert response.status_code == 200
    assert fake.chat_calls()[0].body["messages"][-1] == {"role": "user", "content": "hi"}


def test_an_image_on_v1_arrives_upstream_and_is_billed_as_openai_counts_it(sdk, app, fake) -> None:
    url = data_url(jpeg(1024, 1024), "image/jpeg")

    completion = sdk.chat.completions.create(
        model="gpt-4o", messages=asking(image_part(url, detail="high"), text="Describe it")
    )

    assert completion.choices[0].message.content == "Echo: Describe it [1 image]"
    (call,) = fake.chat_calls()
    assert call.body["messages"][-1]["content"][1] == {"type": "image_url", "image_url": {"url": url, "detail": "high"}}
    assert completion.usage.prompt_tokens == call.prompt_tokens > 765  # 1024 x 1024 at detail high: 4 tiles
    (row,) = state(app).ledger.rows()
    assert row["prompt_tokens"] == completion.usage.prompt_tokens


@pytest.mark.parametrize(
    ("data", "mime"),
    [(png(8, 8), "image/png"), (jpeg(8, 8), "image/jpeg"), (webp(8, 8), "image/webp"), (gif(8, 8), "image/gif")],
    ids=["png", "jpeg", "webp", "gif"],
)
def test_each_accepted_type_arrives(client, fake, data, mime) -> None:
    url = data_url(data, mime)

    response = client.post("/api/chat", json={"model": "gpt-4o", "messages": asking(image_part(url))})

    assert response.status_code == 200, response.get_json()
    assert fake.chat_calls()[0].body["messages"][-1]["content"][1]["image_url"]["url"] == url


def test_an_image_only_message_and_an_earlier_turn_with_an_image(client, fake) -> None:
    messages = [
        {"role": "user", "content": [PICTURE]},
        {"role": "assistant", "content": "A grey rectangle."},
        {"role": "user", "content": "And its size?"},
    ]

    response = client.post("/api/chat", json={"model": "gpt-4o", "messages": messages})

    assert response.status_code == 200, response.get_json()
    assert fake.chat_calls()[0].body["messages"][1]["content"][0]["type"] == "image_url"


# --- bad images: a 400, nothing upstream --------------------------------------------------------------------------

BOMB = png(100_000, 100_000, idat=zlib.compress(b"\x00" * 10_000))  # a few hundred bytes claiming 10^10 pixels
BAD = {
    "not-an-image": (image_part(data_url(b"hello, I am text " * 4)), "is not a PNG, JPEG, WebP or GIF image"),
    "mismatched-type": (image_part(data_url(png(8, 8), "image/jpeg")), "says image/jpeg but its bytes are a PNG"),
    "unsupported-type": (image_part(data_url(b"<svg/>", "image/svg+xml")), "must be PNG, JPEG, WebP or GIF"),
    "bomb": (image_part(data_url(BOMB)), "is 100000 x 100000 pixels: at most 4096 x 4096"),
    "animated-gif": (image_part(data_url(gif(8, 8, frames=2), "image/gif")), "is an animated GIF"),
    "animated-webp": (image_part(data_url(animated_webp(8, 8), "image/webp")), "is an animated WebP"),
    "remote-url": (image_part("https://example.com/cat.png"), "the server fetches no URL"),
    "not-base64": (image_part("data:image/png;base64,%%%%"), "must be a base64 data URL"),
    "bad-padding": (image_part("data:image/png;base64,iVBORw0KGgo"), "is not valid base64"),
    "bad-detail": (image_part(data_url(png(8, 8)), detail="ultra"), "detail must be one of: auto, low, high"),
    "extra-field": ({"type": "image_url", "image_url": {"url": data_url(png(8, 8))}, "x": 1}, "must be"),
    "audio": ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "must be"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
@pytest.mark.parametrize("route", ["/api/chat", "/v1/chat/completions"])
def test_a_bad_image_is_a_400_and_nothing_is_sent(app, client, fake, route, case) -> None:
    part, expected = BAD[case]

    response = client.post(
        route,
        json={"model": "gpt-4o", "messages": asking(part)},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )

    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request"
    assert expected in error["message"] and "messages[0].content[1]" in error["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    nothing_happened(app, fake)


def test_an_oversized_image_is_a_400(settings_for, fake) -> None:
    app = create_app(settings_for(CHATPROXY_MAX_IMAGE_BYTES=1000, **MODELS))
    big = png(200, 200, idat=bytes(range(256)) * 8)  # over 1,000 bytes; its pixel size is fine

    response = app.test_client().post(
        "/api/chat", json={"model": "gpt-4o", "messages": asking(image_part(data_url(big)))}
    )

    assert response.status_code == 400
    assert response.get_json()["error"]["message"].endswith("is too large: at most 1000 bytes per image.")
    nothing_happened(app, fake)


def test_a_body_over_the_cap_is_a_413(settings_for, fake) -> None:
    app = create_app(settings_for(CHATPROXY_MAX_BODY_BYTES=4096, **MODELS))
    big = png(100, 100, idat=bytes(range(256)) * 16)

    response = app.test_client().post(
        "/api/chat", json={"model": "gpt-4o", "messages": asking(image_part(data_url(big)))}
    )

    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "payload_too_large"
    nothing_happened(app, fake)


def test_too_many_images_in_a_message_and_in_a_request(settings_for, fake) -> None:
    app = create_app(settings_for(CHATPROXY_MAX_IMAGES_PER_MESSAGE=2, CHATPROXY_MAX_IMAGES=3, **MODELS))
    client = app.test_client()

    one_message = client.post("/api/chat", json={"model": "gpt-4o", "messages": asking(PICTURE, PICTURE, PICTURE)})
    turns = [*asking(PICTURE, PICTURE), {"role": "assistant", "content": "ok"}, *asking(PICTURE, PICTURE)]
    across_turns = client.post("/api/chat", json={"model": "gpt-4o", "messages": turns})

    assert one_message.status_code == across_turns.status_code == 400
    assert one_message.get_json()["error"]["message"] == (
        "messages[0].content has too many images: at most 2 per message."
    )
    assert across_turns.get_json()["error"]["message"] == "Too many images: at most 3 per request."
    nothing_happened(app, fake)


def test_an_image_to_a_text_only_model_is_a_400(app, client, sdk, fake) -> None:
    response = client.post("/api/chat", json={"model": "o3-mini", "messages": asking(PICTURE)})
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="o3-mini", messages=asking(PICTURE))

    assert response.status_code == 400
    message = "o3-mini does not accept images. Choose a model that does, or send text only."
    assert response.get_json()["error"]["message"] == message
    assert refused.value.body["message"] == message
    nothing_happened(app, fake)


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": [PICTURE]},  # only users show images
        {"role": "user", "content": [{"type": "text", "text": "  "}]},  # no text, no image
    ],
    ids=["assistant-image", "blank-parts"],
)
def test_parts_where_they_do_not_belong_are_a_400(app, client, fake, message) -> None:
    messages = [message] if message["role"] == "user" else [message, {"role": "user", "content": "hi"}]

    response = client.post("/api/chat", json={"model": "gpt-4o", "messages": messages})

    assert response.status_code == 400
    assert "messages[0].content" in response.get_json()["error"]["message"]
    nothing_happened(app, fake)


def test_the_fake_upstream_refuses_images_as_the_real_api_does(fake) -> None:
    direct = OpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0)

    with pytest.raises(openai.BadRequestError) as text_only:
        direct.chat.completions.create(model="o3-mini", messages=asking(PICTURE))
    with pytest.raises(openai.BadRequestError) as unreadable:
        direct.chat.completions.create(model="gpt-4o", messages=asking(image_part(data_url(b"not a picture"))))

    assert text_only.value.body["message"] == "Invalid content type. image_url is only supported by certain models."
    assert text_only.value.body["param"] == "messages.[0].content.[1].type"
    assert unreadable.value.body["code"] == "invalid_image_format"
    assert all(call.completion_tokens == 0 for call in fake.chat_calls())  # refused before any answer


def test_the_data_url_is_sent_with_its_media_type_in_lower_case(client, fake) -> None:
    shouted = "DATA:IMAGE/PNG;BASE64," + PICTURE["image_url"]["url"].split(",", 1)[1]

    response = client.post("/api/chat", json={"model": "gpt-4o", "messages": asking(image_part(shouted))})

    assert response.status_code == 200
    sent = fake.chat_calls()[0].body["messages"][-1]["content"][1]["image_url"]["url"]
    assert sent == PICTURE["image_url"]["url"]


# --- the price of an image ----------------------------------------------------------------------------------------


SQUARE = Picture(1024, 1024)  # 4 tiles once scaled to 768 x 768; 32 x 32 = 1,024 patches


@pytest.mark.parametrize(
    ("model", "picture", "expected"),
    [
        ("gpt-4o", SQUARE, 85 + 4 * 170),  # the guide's worked examples
        ("gpt-4o", Picture(2048, 4096, "high"), 85 + 6 * 170),  # to 1024 x 2048, then 768 x 1536: 6 tiles
        ("gpt-4o", Picture(4096, 8192, "low"), 85),
        ("gpt-4o", Picture(64, 48), 85 + 170),
        ("gpt-4.1", SQUARE, 85 + 4 * 170),
        ("gpt-4o-mini", SQUARE, 2833 + 4 * 5667),
        ("gpt-4o-mini", Picture(1024, 1024, "low"), 2833),
        ("gpt-5", SQUARE, 70 + 4 * 140),
        ("o3", SQUARE, 75 + 4 * 150),
        ("gpt-4.1-mini", SQUARE, 1659),  # 1,024 patches x 1.62 = 1,658.88, billed whole
        ("gpt-4.1-mini", Picture(1024, 1024, "low"), 1659),  # patch models ignore detail
        ("gpt-4.1-nano", SQUARE, 2520),  # x 2.46
        ("gpt-5-mini", Picture(256, 256), 104),  # 64 patches x 1.62 = 103.68
        ("gpt-5-nano", SQUARE, 2520),
        ("o4-mini", SQUARE, 1762),  # x 1.72
        ("gpt-4.1-mini", Picture(1800, 2400), 2489),  # past 1,536 patches: the cap, x 1.62 = 2,488.32
        ("gpt-5.5", SQUARE, 2833 + 4 * 5667),  # no documented rule: the table's highest count for the image
    ],
)
def test_each_model_counts_an_image_as_openai_bills_it(model, picture, expected) -> None:
    assert load_table().image_tokens(model, [picture, picture]) == 2 * expected


def test_the_worst_case_prices_each_model_of_the_chain_with_its_own_image_count() -> None:
    table = load_table()

    worst = table.worst_case_micros(["gpt-4o", "gpt-4o-mini"], 100, 16, pictures=[SQUARE])

    assert table.cost_micros("gpt-4o", 100 + 765, 16) < table.cost_micros("gpt-4o-mini", 100 + 25_501, 16) == worst


@pytest.mark.parametrize(
    ("rule", "expected"),
    [({"tile": [100, 200]}, 100 + 4 * 200), ({"patch": 1.5}, 1536), (None, 2833 + 4 * 5667)],
    ids=["tile", "patch", "undocumented"],
)
def test_an_override_sets_a_model_s_rule(rule, expected) -> None:
    table = load_table(json.dumps({"acme-vision": {"images": True, "image_tokens": rule}}))

    assert table.image_tokens("acme-vision", [SQUARE]) == expected


@pytest.mark.parametrize("rule", [{"tile": [85]}, {"patch": 0}, {"patch": True}, {"tiles": [85, 170]}, 85])
def test_a_bad_rule_stops_start_up_naming_the_entry(rule) -> None:
    with pytest.raises(SettingsError, match="'acme-vision' 'image_tokens' must be null, "):
        load_table(json.dumps({"acme-vision": {"image_tokens": rule}}))


PRICED = {
    "gpt-4o-mini": 2833 + 4 * 5667,  # tiles
    "gpt-4.1-mini": 1659,  # patches
}


@pytest.mark.parametrize("model", PRICED)
def test_the_reservation_covers_what_the_image_is_billed(settings_for, fake, tmp_path, model) -> None:
    """The fake bills the image by the model's rule; a budget just above that admits the call, a budget below the
    image's own tokens refuses it before anything is sent (a gpt-4o count, 765, would have let it through)."""
    square = image_part(data_url(jpeg(1024, 1024), "image/jpeg"))
    plain = create_app(settings_for(CHATPROXY_MODELS=model, CHATPROXY_DEFAULT_MODEL=model)).test_client()
    text = plain.post("/api/chat", json={"messages": asking(), "max_tokens": 16}).get_json()
    billed = plain.post("/api/chat", json={"messages": asking(square), "max_tokens": 16}).get_json()
    assert billed["usage"]["prompt_tokens"] - text["usage"]["prompt_tokens"] == PRICED[model]

    def with_budget(tokens: int):
        settings = settings_for(
            CHATPROXY_MODELS=model, CHATPROXY_DEFAULT_MODEL=model, CHATPROXY_DAILY_TOKEN_BUDGET=tokens
        )
        app = create_app({**settings, "CHATPROXY_DATABASE_URL": f"sqlite:///{tmp_path / f'{tokens}.db'}"})  # unspent
        return app.test_client().post("/api/chat", json={"messages": asking(square), "max_tokens": 16})

    calls = len(fake.chat_calls())
    below = with_budget(PRICED[model] + 16 - 1)
    assert (below.status_code, below.get_json()["error"]["code"]) == (429, "budget_exceeded")
    assert len(fake.chat_calls()) == calls
    assert with_budget(billed["usage"]["prompt_tokens"] + 16 + 50).status_code == 200


def test_an_answer_without_usage_is_recorded_with_the_model_s_image_count(settings_for, fake) -> None:
    """A stream whose upstream reports no usage: the row and the done event estimate the image as billed."""
    app = create_app(settings_for(CHATPROXY_MODELS="gpt-4o-mini", CHATPROXY_DEFAULT_MODEL="gpt-4o-mini"))
    fake.script(Reply(omit_usage=True))
    square = image_part(data_url(jpeg(1024, 1024), "image/jpeg"))

    response = app.test_client().post("/api/chat", json={"messages": asking(square), "stream": True})

    done = [json.loads(line[6:]) for line in response.get_data(as_text=True).splitlines() if line.startswith("data:")]
    assert done[-1]["type"] == "done" and done[-1]["usage"]["estimated"] is True
    assert done[-1]["usage"]["prompt_tokens"] > PRICED["gpt-4o-mini"]
    (row,) = state(app).ledger.rows()
    assert (row["tokens_exact"], row["prompt_tokens"]) == (False, done[-1]["usage"]["prompt_tokens"])


def test_the_reservation_counts_the_image(settings_for, fake) -> None:
    """A daily token cap the text fits under but the image does not: refused before anything is sent."""
    app = create_app(settings_for(CHATPROXY_DAILY_TOKEN_BUDGET=700, **MODELS))
    client = app.test_client()
    big = image_part(data_url(jpeg(1024, 1024), "image/jpeg"))  # 765 tokens at detail high (and auto)
    low = image_part(data_url(jpeg(1024, 1024), "image/jpeg"), detail="low")  # 85 tokens

    text_only = client.post("/api/chat", json={"model": "gpt-4o", "message": "hi", "max_tokens": 16})
    with_low = client.post("/api/chat", json={"model": "gpt-4o", "messages": asking(low), "max_tokens": 16})
    calls = len(fake.chat_calls())
    with_image = client.post("/api/chat", json={"model": "gpt-4o", "messages": asking(big), "max_tokens": 16})

    assert text_only.status_code == with_low.status_code == 200
    assert (with_image.status_code, with_image.get_json()["error"]["code"]) == (429, "budget_exceeded")
    assert len(fake.chat_calls()) == calls == 2


@pytest.mark.parametrize(
    ("model", "part", "expected"),
    [
        ("o3-mini", PICTURE, "o3-mini does not accept images"),
        ("gpt-4o", BAD["bomb"][0], "is 100000 x 100000 pixels"),
    ],
    ids=["text-only-model", "bomb"],
)
def test_a_batch_line_with_a_refused_image_is_a_400_and_nothing_is_uploaded(client, fake, model, part, expected):
    line = {"custom_id": "q1", "model": model, "messages": asking(part)}

    response = client.post("/api/batches", json={"requests": [line]}, headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 400
    assert response.get_json()["error"]["message"].startswith("requests[0] (q1): ")
    assert expected in response.get_json()["error"]["message"]
    assert fake.calls == []


# --- /v1/responses: the same checks, caps and prices ----------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def responses_input(*images: dict, text: str = "What is in this picture?") -> list[dict]:
    """A Responses user message of text and input_image parts."""
    return [{"role": "user", "content": [{"type": "input_text", "text": text}, *images]}]


def input_image(url: str, **extra: str) -> dict:
    """The Responses API's image part."""
    return {"type": "input_image", "image_url": url, **extra}


def test_an_input_image_arrives_upstream_and_is_billed_by_the_model_s_rule(sdk, app, fake) -> None:
    url = data_url(jpeg(1024, 1024), "image/jpeg")

    response = sdk.responses.create(model="gpt-4o", input=responses_input(input_image(url, detail="high")))
    text_only = sdk.responses.create(model="gpt-4o", input=responses_input())

    image, plain = fake.responses_calls()
    assert image.body["input"][-1]["content"][1] == {"type": "input_image", "image_url": url, "detail": "high"}
    assert response.usage.input_tokens - text_only.usage.input_tokens == 765  # gpt-4o: 85 + 4 tiles of 170
    assert [row["prompt_tokens"] for row in state(app).ledger.rows()] == [image.prompt_tokens, plain.prompt_tokens]


RESPONSES_BAD = {
    "remote-url": (
        input_image("https://example.com/cat.png"),
        "input[0].content[1].image_url must be a base64 data URL (data:image/png;base64,...): images are sent "
        "inline, the server fetches no URL.",
    ),
    "file-url": (input_image("file:///etc/passwd"), "input[0].content[1].image_url must be a base64 data URL"),
    "not-an-image": (input_image(data_url(b"hello, I am text " * 4)), "is not a PNG, JPEG, WebP or GIF image"),
    "mismatched-type": (input_image(data_url(png(8, 8), "image/jpeg")), "says image/jpeg but its bytes are a PNG"),
    "unsupported-type": (input_image(data_url(b"<svg/>", "image/svg+xml")), "must be PNG, JPEG, WebP or GIF"),
    "bomb": (input_image(data_url(BOMB)), "input[0].content[1].image_url is 100000 x 100000 pixels"),
    "animated-gif": (input_image(data_url(gif(8, 8, frames=2), "image/gif")), "is an animated GIF"),
    "bad-detail": (input_image(data_url(png(8, 8)), detail="ultra"), "input[0].content[1].detail"),
}


@pytest.mark.parametrize("case", RESPONSES_BAD, ids=list(RESPONSES_BAD))
def test_a_bad_input_image_is_a_400_and_nothing_is_sent(app, client, fake, case) -> None:
    part, expected = RESPONSES_BAD[case]

    response = client.post("/v1/responses", json={"model": "gpt-4o", "input": responses_input(part)}, headers=AUTH)

    assert response.status_code == 400
    assert expected in response.get_json()["error"]["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    assert fake.calls == []
    nothing_happened(app, fake)


@pytest.mark.parametrize(
    ("settings", "messages", "expected"),
    [
        ({}, [5], "input[0].content has too many images: at most 4 per message."),
        ({}, [3, 3, 3], "Too many images: at most 8 per request."),
        ({"CHATPROXY_MAX_IMAGES": 1}, [1, 1], "Too many images: at most 1 per request."),
        ({"CHATPROXY_MAX_IMAGES_PER_MESSAGE": 0}, [1], "input[0].content has too many images: at most 0 per message."),
    ],
    ids=["per-message", "per-request", "max-images-setting", "images-off"],
)
def test_too_many_input_images_are_a_400(settings_for, fake, settings, messages, expected) -> None:
    app = create_app(settings_for(CHATPROXY_API_TOKENS=f"alice={hash_token(TOKEN)}", **MODELS, **settings))
    turns = []
    for count in messages:
        turns += [*responses_input(*[input_image(data_url(png(8, 8)))] * count), {"role": "assistant", "content": "ok"}]

    response = app.test_client().post("/v1/responses", json={"model": "gpt-4o", "input": turns[:-1]}, headers=AUTH)

    assert response.status_code == 400
    assert response.get_json()["error"]["message"] == expected
    nothing_happened(app, fake)


def test_an_input_image_counts_in_the_reservation_by_the_model_s_rule(settings_for, fake) -> None:
    app = create_app(
        settings_for(
            CHATPROXY_API_TOKENS=f"alice={hash_token(TOKEN)}",
            CHATPROXY_MODELS="gpt-4o-mini",
            CHATPROXY_DEFAULT_MODEL="gpt-4o-mini",
            CHATPROXY_DAILY_TOKEN_BUDGET=PRICED["gpt-4o-mini"] + 16 - 1,  # the text fits; the image's 25,501 do not
        )
    )
    square = input_image(data_url(jpeg(1024, 1024), "image/jpeg"))
    client = app.test_client()

    text = client.post("/v1/responses", json={"input": responses_input(), "max_output_tokens": 16}, headers=AUTH)
    calls = len(fake.calls)
    image = client.post("/v1/responses", json={"input": responses_input(square), "max_output_tokens": 16}, headers=AUTH)

    assert text.status_code == 200
    assert (image.status_code, image.get_json()["error"]["code"]) == (429, "budget_exceeded")
    assert len(fake.calls) == calls


def test_a_timed_out_attempt_is_recorded_with_its_model_s_image_count(settings_for, fake) -> None:
    """gpt-4o-mini times out (billed: the upstream had the prompt), gpt-4o answers: each row counts the image as
    its own model bills it, the estimate for the first, the upstream's usage for the second."""
    app = create_app(
        settings_for(CHATPROXY_FALLBACK_CHAIN="gpt-4o-mini,gpt-4o", CHATPROXY_READ_TIMEOUT=0.2, CHATPROXY_MAX_RETRIES=0)
    )
    fake.for_model("gpt-4o-mini", Reply(delay=1.0))
    square = image_part(data_url(jpeg(1024, 1024), "image/jpeg"))
    client = app.test_client()

    text = client.post("/api/chat", json={"model": "gpt-4o-mini", "messages": asking(), "max_tokens": 16})
    image = client.post("/api/chat", json={"model": "gpt-4o-mini", "messages": asking(square), "max_tokens": 16})

    assert text.get_json()["model"] == image.get_json()["model"] == "gpt-4o"
    timed_out_text, answered_text, timed_out_image, answered_image = state(app).ledger.rows()
    assert timed_out_image["outcome"] == "upstream_timeout" and timed_out_image["tokens_exact"] is False
    assert timed_out_image["prompt_tokens"] - timed_out_text["prompt_tokens"] == 2833 + 4 * 5667  # gpt-4o-mini
    assert answered_image["prompt_tokens"] - answered_text["prompt_tokens"] == 765  # gpt-4o: 85 + 4 x 170
