"""Images on the chat page in real Chromium: attach by picker, paste or drop, resized, sent, shown, kept."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from chatproxy import create_app
from chatproxy.images import read_header
from tests.browser import answers, ask, open_chat, questions, wait_state

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)"
)
expect = sync_api.expect

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "screenshot-mobile.png"  # a real 720 x 1480 PNG
# gpt-4o sees; o3-mini (kept alive for the test) does not.
MODELS = {
    "CHATPROXY_MODELS": "gpt-4o,o3-mini",
    "CHATPROXY_DEFAULT_MODEL": "gpt-4o",
    "CHATPROXY_MODEL_TABLE": json.dumps({"gpt-4o": {"shutdown": None}, "o3-mini": {"shutdown": None}}),
}
# A picture made in the page (a canvas as a PNG File) and handed over as a paste or a drop would.
HAND_OVER = """async ([kind, target]) => {
    const canvas = document.createElement('canvas');
    canvas.width = 300; canvas.height = 200;
    const context = canvas.getContext('2d');
    context.fillStyle = '#c03'; context.fillRect(0, 0, 300, 200);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
    const data = new DataTransfer();
    data.items.add(new File([blob], 'red.png', {type: 'image/png'}));
    const event = kind === 'paste'
        ? new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true})
        : new DragEvent(kind, {dataTransfer: data, bubbles: true, cancelable: true});
    document.querySelector(target).dispatchEvent(event);
}"""


@pytest.fixture
def url(settings_for, serve) -> str:
    """The page of an app with a model that sees and one that does not."""
    return serve(create_app(settings_for(**MODELS)))


def attach(page, path: Path = SCREENSHOT) -> None:
    """Pick a file with the attach button's file chooser, as a user does."""
    with page.expect_file_chooser() as chooser:
        page.locator("#attach").click()
    chooser.value.set_files(str(path))


def tray(page):
    return page.locator("#attachments .thumb")


def picture(url: str):
    """The header of a data URL's image."""
    assert url.startswith("data:image/jpeg;base64,"), url[:40]
    return read_header(base64.b64decode(url.split(",", 1)[1]))


def test_attach_by_picker_end_to_end(page, fake, url):
    open_chat(page, url)
    attach(page)
    expect(tray(page)).to_have_count(1)
    expect(tray(page)).to_have_attribute("alt", "Image 1 to send")

    ask(page, "What is on this screen?")
    wait_state(page, "done")

    expect(answers(page).last.locator(".answer")).to_have_text("Echo: What is on this screen? [1 image]")
    expect(questions(page).last).to_contain_text("What is on this screen?")
    thumb = questions(page).last.locator("img.thumb")
    expect(thumb).to_have_count(1)
    expect(thumb).to_have_attribute("alt", "Attached image 1")
    assert page.evaluate("() => document.querySelector('.msg-user img.thumb').naturalWidth") > 0  # it loaded
    expect(page.locator("#attachments")).to_be_hidden()  # sent: the tray is empty again
    (call,) = fake.chat_calls()
    text, image = call.body["messages"][-1]["content"]
    assert text == {"type": "text", "text": "What is on this screen?"}
    assert image["type"] == "image_url"
    sent = picture(image["image_url"]["url"])
    assert (sent.kind, sent.height) == ("JPEG", 1024) and 490 <= sent.width <= 500  # 720 x 1480, resized
    assert page.seen.console_errors == []


def test_pictures_are_kept_with_the_conversation_and_sent_again(page, fake, url):
    open_chat(page, url)
    attach(page)
    expect(tray(page)).to_have_count(1)
    ask(page, "Describe it")
    wait_state(page, "done")

    page.reload()
    expect(page.locator("#app")).to_have_attribute("data-ready", "true")
    expect(questions(page).last.locator("img.thumb")).to_have_count(1)
    ask(page, "And the colours?")
    wait_state(page, "done", index=1)

    first, second = fake.chat_calls()
    assert second.body["messages"][1] == first.body["messages"][1]  # the picture went with the history
    assert second.body["messages"][-1] == {"role": "user", "content": "And the colours?"}
    assert page.seen.console_errors == []


@pytest.mark.parametrize(("kind", "target"), [("paste", "#prompt"), ("drop", "#composer"), ("drop", "#transcript")])
def test_paste_and_drop_attach_a_picture(page, fake, url, kind, target):
    open_chat(page, url)
    page.evaluate(HAND_OVER, [kind, target])
    expect(tray(page)).to_have_count(1)

    page.locator("#prompt").press("Enter")  # a picture alone is a question too
    wait_state(page, "done")

    (call,) = fake.chat_calls()
    [image] = call.body["messages"][-1]["content"]
    sent = picture(image["image_url"]["url"])
    assert (sent.width, sent.height) == (300, 200)  # small pictures keep their size
    assert page.seen.console_errors == []


def test_no_attaching_for_a_model_that_does_not_see(page, fake, url):
    open_chat(page, url)
    expect(page.locator("#attach")).to_be_visible()
    attach(page)
    expect(tray(page)).to_have_count(1)

    page.locator("#model").select_option("o3-mini")
    expect(page.locator("#attach")).to_be_hidden()
    ask(page, "What is this?")
    expect(page.locator("#note")).to_have_text(
        "o3-mini does not accept images: remove them or choose a model that does."
    )
    assert fake.chat_calls() == []

    page.evaluate(HAND_OVER, ["drop", "#composer"])
    expect(page.locator("#note")).to_contain_text("The selected model does not accept images")
    expect(tray(page)).to_have_count(1)  # the dropped picture was not taken

    page.locator("#attachments .attachment-remove").click()
    expect(page.locator("#attachments")).to_be_hidden()
    page.locator("#prompt").press("Enter")
    wait_state(page, "done")
    assert fake.chat_calls()[-1].body["messages"][-1] == {"role": "user", "content": "What is this?"}
    assert fake.chat_calls()[-1].body["model"] == "o3-mini"
    assert page.seen.console_errors == []


def test_a_file_that_is_not_a_picture_is_refused_on_the_page(page, fake, url, tmp_path):
    fake_png = tmp_path / "notes.png"
    fake_png.write_bytes(b"these are not the pixels you are looking for")
    open_chat(page, url)

    attach(page, fake_png)

    expect(page.locator("#note")).to_have_text("notes.png could not be read as an image, or is too large.")
    expect(page.locator("#attachments")).to_be_hidden()
    assert page.seen.console_errors == []


def test_a_model_that_does_not_see_gets_the_history_without_its_pictures(page, fake, url):
    open_chat(page, url)
    attach(page)
    expect(tray(page)).to_have_count(1)
    page.locator("#prompt").press("Enter")  # the picture alone
    wait_state(page, "done")

    page.locator("#model").select_option("o3-mini")
    ask(page, "Summarise")
    wait_state(page, "done", index=1)

    call = fake.chat_calls()[-1]
    assert call.body["model"] == "o3-mini"
    assert call.body["messages"][1] == {"role": "user", "content": "[an image the selected model cannot see]"}
    assert call.body["messages"][-1] == {"role": "user", "content": "Summarise"}
    expect(questions(page).first.locator("img.thumb")).to_have_count(1)  # still shown on the page
