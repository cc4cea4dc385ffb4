"""The chat page in real Chromium: streaming, stop, history, errors, safe rendering, CSP, keyboard, layout."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from chatproxy import create_app
from chatproxy.demo.upstream import Reply
from tests.browser import DESKTOP, MOBILE, answer_text, answers, ask, assert_ready, open_chat, wait_state, watch

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)"
)
expect = sync_api.expect

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
DOCS = ROOT / "docs"
SYSTEM_PROMPT = "You are a helpful assistant."
STRICT_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'"
)


# ---------------------------------------------------------------- helpers


def save_screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


class Csp:
    """WSGI middleware adding a strict Content-Security-Policy (no 'unsafe-inline') to every response."""

    def __init__(self, app) -> None:
        self.app = app

    def __call__(self, environ, start_response):
        def with_csp(status, headers, exc_info=None):
            return start_response(status, [*headers, ("Content-Security-Policy", STRICT_CSP)], exc_info)

        return self.app(environ, with_csp)


class RawStream:
    """WSGI middleware answering POST /api/chat with hand-made SSE bytes, written in separate pieces."""

    def __init__(self, app, pieces: list[bytes], gap: float = 0.25) -> None:
        self.app = app
        self.pieces = pieces
        self.gap = gap

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] != "POST" or environ.get("PATH_INFO") != "/api/chat":
            return self.app(environ, start_response)
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
        return self._write()

    def _write(self):
        for i, piece in enumerate(self.pieces):
            if i:
                time.sleep(self.gap)
            yield piece


# ---------------------------------------------------------------- 1. streaming


def test_answer_streams_in_token_by_token(page, context, fake, live_url):
    words = ["Streaming ", "answers ", "arrive ", "one ", "piece ", "at ", "a ", "time."]
    fake.script(Reply(chunks=words, pace=0.15))
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_url)
    open_chat(page, live_url)
    ask(page, "Show me streaming")

    expect(page.locator("#transcript .msg-user")).to_have_text("Show me streaming")
    seen: list[str] = []
    deadline = time.monotonic() + 10
    state = ""
    while time.monotonic() < deadline:
        state, text = page.evaluate(
            "() => { const a = [...document.querySelectorAll('#transcript .msg-assistant')].pop();"
            " return [a.dataset.state, a.querySelector('.answer').textContent]; }"
        )
        if state == "streaming" and text and (not seen or seen[-1] != text):
            seen.append(text)
        if state not in ("pending", "streaming"):
            break
        time.sleep(0.02)

    assert state == "done"
    full = "".join(words)
    assert len(seen) >= 2, f"saw only these intermediate answers: {seen}"
    assert all(full.startswith(s) and s != full for s in seen[:2]), seen
    assert answer_text(page) == full
    usage = answers(page).last.locator(".usage")
    expect(usage).to_have_text(re.compile(r"^\d+ prompt \+ 8 completion tokens · gpt-4o-mini$"))
    expect(answers(page).last).to_have_attribute("aria-busy", "false")
    assert_ready(page)

    answers(page).last.locator(".copy").click()
    expect(answers(page).last.locator(".copy")).to_have_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == full


# ---------------------------------------------------------------- 2. stop


def test_stop_mid_stream_returns_to_ready_and_closes_upstream(page, fake, live_url):
    fake.script(Reply(chunks=[f"w{i} " for i in range(80)], pace=0.1))
    open_chat(page, live_url)
    ask(page, "Count slowly")
    expect(answers(page).last.locator(".answer")).to_contain_text("w3")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#stop")).to_be_enabled()

    clicked = time.time()
    page.locator("#stop").click()

    wait_state(page, "stopped")
    expect(answers(page).last.locator(".status")).to_have_text("Stopped")
    assert_ready(page)
    [call] = fake.chat_calls()
    assert fake.wait_for(lambda: call.disconnected_at is not None, timeout=3), "the upstream never saw the close"
    after = [t for t in call.chunk_times if t > clicked]
    assert len(after) <= 2, f"{len(after)} chunks were sent after Stop"
    partial = answer_text(page)
    assert partial.startswith("w0 w1 w2 w3") and "w79" not in partial

    # The partial answer stays in the conversation.
    ask(page, "Go on")
    wait_state(page, "done")
    sent = fake.chat_calls()[-1].body["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[2]["content"].startswith("w0 w1 w2 w3")


# ---------------------------------------------------------------- 3. history


def test_second_turn_sends_the_first_turn(page, fake, live_url):
    open_chat(page, live_url)
    ask(page, "What is a proxy?")
    wait_state(page, "done")
    expect(answers(page).last.locator(".answer")).to_have_text("Echo: What is a proxy?")
    ask(page, "And a reverse proxy?")
    wait_state(page, "done", index=1)

    calls = fake.chat_calls()
    assert len(calls) == 2
    assert calls[-1].body["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "What is a proxy?"},
        {"role": "assistant", "content": "Echo: What is a proxy?"},
        {"role": "user", "content": "And a reverse proxy?"},
    ]
    expect(page.locator("#note")).to_be_hidden()


def test_oldest_turns_are_dropped_to_fit_the_limits_with_a_note(page, fake, settings_for, serve):
    url = serve(create_app(settings_for(CHATPROXY_MAX_MESSAGES=3)))
    open_chat(page, url)
    for i, question in enumerate(["one", "two"]):
        ask(page, question)
        wait_state(page, "done", index=i)
    expect(page.locator("#note")).to_be_hidden()
    ask(page, "three")
    wait_state(page, "done", index=2)

    assert [m["content"] for m in fake.chat_calls()[-1].body["messages"]] == [
        SYSTEM_PROMPT,
        "two",
        "Echo: two",
        "three",
    ]
    expect(page.locator("#note")).to_be_visible()
    expect(page.locator("#note")).to_contain_text("Older messages were left out")
    expect(page.locator("#transcript .msg-user")).to_have_count(3)  # the transcript keeps them all


# ---------------------------------------------------------------- 4. errors


def test_upstream_429_shows_when_to_retry(page, fake, live_url):
    fake.script(Reply(status=429, headers={"Retry-After": "7"}))
    open_chat(page, live_url)
    ask(page, "Hello?")

    wait_state(page, "error")
    error = answers(page).last.locator(".error-text")
    expect(error).to_be_visible()
    # The server says upstream_unavailable (the upstream's 429 put every model in the chain out of reach); the
    # user learns when to come back from a countdown that stops them sending before then.
    expect(error).to_have_text(re.compile(r"^The model provider is having trouble\.$"))
    expect(page.locator("#countdown")).to_have_text(re.compile(r"^You can send again in [67] seconds\.$"))
    expect(page.locator("#send")).to_be_disabled()
    expect(page.locator("#prompt")).to_have_value("Hello?")  # offered again, ready to retry


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected", "wait"),
    [
        (
            429,
            {"Retry-After": "30"},
            {"error": {"code": "rate_limited", "message": "Slow down: 10 per minute."}},
            "Slow down: 10 per minute.",
            30,
        ),
        (
            429,
            {},
            {"error": {"code": "budget_exceeded", "message": "You have reached your usage limit for today."}},
            "You have reached your usage limit for today.",
            None,
        ),
        (
            429,
            {"Retry-After": "40000"},
            {"error": {"code": "budget_exceeded", "message": "Try after midnight UTC."}},
            "Try after midnight UTC.",
            None,
        ),
        (
            504,
            {},
            {"error": {"code": "upstream_timeout", "message": "The model provider took too long."}},
            "The model provider is having trouble — try again later.",
            None,
        ),
        (
            503,
            {"Retry-After": "2"},
            {"error": {"code": "upstream_unavailable", "message": "No model is available."}},
            "The model provider is having trouble.",
            2,
        ),
        (
            400,
            {},
            {"error": {"code": "invalid_request", "message": "The conversation is too long: at most 10."}},
            "The conversation is too long: at most 10.",
            None,
        ),
        (502, {}, "<html>Bad gateway</html>", "The server could not answer (HTTP 502). Try again later.", None),
    ],
    ids=[
        "rate-limited",
        "budget",
        "budget-until-midnight",
        "upstream",
        "upstream-retry-after",
        "server-message",
        "not-json",
    ],
)
def test_error_responses_in_plain_words(page, live_url, status, headers, body, expected, wait):
    """Our own refusals (rate limit, budget) show the server's message; a short Retry-After is counted down."""
    open_chat(page, live_url)
    payload = body if isinstance(body, str) else json.dumps(body)
    kind = "text/html" if isinstance(body, str) else "application/json"
    page.route(
        "**/api/chat", lambda route: route.fulfill(status=status, headers=headers, content_type=kind, body=payload)
    )
    ask(page, "Hi")
    wait_state(page, "error")
    expect(answers(page).last.locator(".error-text")).to_have_text(expected)
    if wait is None:
        expect(page.locator("#countdown")).to_be_hidden()
        assert_ready(page)
    else:
        expect(page.locator("#countdown")).to_have_text(
            re.compile(rf"^You can send again in ({wait}|{wait - 1}) seconds?\.$")
        )
        expect(page.locator("#send")).to_be_disabled()


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (
            (
                'data: {"type":"start","model":"gpt-4o-mini"}\n\ndata: {"type":"delta","content":"Half an"}\n\n'
                'data: {"type":"error","code":"upstream_truncated","message":"cut short"}\n\n'
            ),
            "The model provider is having trouble — try again later.",
        ),
        (
            'data: {"type":"start","model":"gpt-4o-mini"}\n\ndata: {"type":"delta","content":"Half an"}\n\n',
            "The answer was cut off before it finished. Try again.",
        ),
    ],
    ids=["error-event", "ended-without-done"],
)
def test_stream_that_does_not_finish_never_looks_finished(page, live_url, stream, expected):
    open_chat(page, live_url)
    page.route("**/api/chat", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=stream))
    ask(page, "Hi")
    wait_state(page, "error")
    assert answer_text(page) == "Half an"
    expect(answers(page).last.locator(".status")).to_have_text("Incomplete")
    expect(answers(page).last.locator(".error-text")).to_have_text(expected)
    expect(answers(page).last.locator(".usage")).to_have_text("")


def test_fallback_model_is_named(page, live_url):
    stream = (
        'data: {"type":"start","model":"gpt-4o","degraded":true}\n\n'
        'data: {"type":"delta","content":"From the backup."}\n\n'
        'data: {"type":"done","finish_reason":"stop","model":"gpt-4o","degraded":true,'
        '"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}\n\n'
    )
    open_chat(page, live_url)
    page.route("**/api/chat", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=stream))
    ask(page, "Hi")
    wait_state(page, "done")
    expect(answers(page).last.locator(".usage")).to_have_text(
        "12 prompt + 30 completion tokens · answered by gpt-4o (fallback)"
    )


# ---------------------------------------------------------------- 5. safe rendering


def test_model_html_and_links_render_as_text_and_run_nothing(page, fake, live_url):
    chunks = [
        '<img src=x onerror="window.__pwned=1;alert(1)">',
        " <script>window.__pwned=2;alert(2)</script>",
        " [x](javascript:alert(3))",
        ' <a href="javascript:window.__pwned=4">click</a>',
        '\n\n```html\n<svg onload="window.__pwned=5"></svg><iframe src="javascript:alert(6)"></iframe>\n```',
        "\n\n`<b onmouseover=alert(7)>bold</b>`",
    ]
    fake.script(Reply(chunks=chunks))
    open_chat(page, live_url)
    ask(page, '<img src=y onerror="window.__pwned=8"> & <b>hi</b>')
    wait_state(page, "done")
    page.wait_for_timeout(300)  # give any injected handler time to fire

    text = answer_text(page)
    for literal in (
        '<img src=x onerror="window.__pwned=1;alert(1)">',
        "<script>window.__pwned=2;alert(2)</script>",
        "[x](javascript:alert(3))",
        '<a href="javascript:window.__pwned=4">click</a>',
        '<svg onload="window.__pwned=5"></svg>',
        "<b onmouseover=alert(7)>bold</b>",
    ):
        assert literal in text
    expect(page.locator("#transcript .msg-user")).to_have_text('<img src=y onerror="window.__pwned=8"> & <b>hi</b>')
    transcript = page.locator("#transcript")
    for selector in ("img", "script", "svg", "iframe", "b", "a", "[href^='javascript']", "[onerror]", "[onload]"):
        expect(transcript.locator(selector)).to_have_count(0)
    expect(transcript.locator("pre code")).to_contain_text('<iframe src="javascript:alert(6)"></iframe>')
    assert page.evaluate("() => window.__pwned") is None
    assert page.seen.dialogs == []


# ---------------------------------------------------------------- 6. bytes split inside characters


def test_multibyte_characters_split_across_reads_render_correctly(page, app, serve):
    start = b'data: {"type":"start","model":"gpt-4o-mini"}\r\n\r\n'
    pieces = [
        start + b'data: {"type":"delta","content":"Caf\xc3',  # é split after its first byte
        b"\xa9 \xf0\x9f",  # 😀 split after two of its four bytes
        b'\x98\x80 na\xc3\xafve"}\r',  # event boundary split between \r and \n
        b'\n\r\n: ping\n\ndata: {"type":"delta","content":" \xe2\x82',  # a keep-alive comment, then € split
        (
            b'\xac5"}\n\ndata: {"type":"done","finish_reason":"stop","model":"gpt-4o-mini",'
            b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
        ),
    ]
    url = serve(RawStream(app.wsgi_app, pieces))
    page.add_init_script("""
        window.__reads = [];
        const read = ReadableStreamDefaultReader.prototype.read;
        ReadableStreamDefaultReader.prototype.read = function () {
          return read.call(this).then((r) => { if (!r.done) window.__reads.push(Array.from(r.value)); return r; });
        };
    """)
    open_chat(page, url)
    ask(page, "Say café")
    wait_state(page, "done")

    assert answer_text(page) == "Café 😀 naïve €5"
    expect(answers(page).last.locator(".usage")).to_have_text("3 prompt + 4 completion tokens · gpt-4o-mini")
    reads = page.evaluate("() => window.__reads")
    assert any(r and r[-1] == 0xC3 for r in reads), "the split inside é never reached the page in one read"
    assert len(reads) >= 4


# ---------------------------------------------------------------- 7. console and CSP


class _InlineFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []

    def handle_starttag(self, tag, attrs):
        names = {name for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.problems.append("inline <script>")
        if tag == "style":
            self.problems.append("<style> block")
        if "style" in names:
            self.problems.append(f"style= on <{tag}>")
        handlers = sorted(n for n in names if n.startswith("on"))
        if handlers:
            self.problems.append(f"{handlers} on <{tag}>")


def test_no_console_errors_under_a_strict_csp(page, fake, app, serve):
    url = serve(Csp(app.wsgi_app))
    page.add_init_script(
        "window.__csp = []; document.addEventListener('securitypolicyviolation',"
        " (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI), true);"
    )
    fake.script(Reply(chunks=["Some ", "text.\n\n```py\nprint('hi')\n```"]))
    open_chat(page, url)
    ask(page, "Hello")
    wait_state(page, "done")
    answers(page).last.locator(".copy").click()
    page.locator("#new-chat").click()
    ask(page, "Again")
    wait_state(page, "done")

    assert page.seen.console_errors == []
    assert page.evaluate("() => window.__csp") == []
    with urllib.request.urlopen(url + "/") as response:
        html = response.read().decode()
    finder = _InlineFinder()
    finder.feed(html)
    assert finder.problems == []
    assert "<script src=" in html and 'rel="stylesheet"' in html


@pytest.mark.parametrize("name", ["chat.js", "markdown.js", "conversations.js", "images.js", "admin.js"])
def test_script_never_parses_text_as_html(name):
    source = (ROOT / "static" / name).read_text(encoding="utf-8")
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "createContextualFragment",
        "DOMParser",
        ".style.",
        'setTimeout("',
        "srcdoc",
        "javascript:",
    ):
        assert sink not in source, f"static/{name} uses {sink}"
    assert name == "conversations.js" or "textContent" in source


def test_every_script_on_the_page_is_checked():
    assert sorted(p.name for p in (ROOT / "static").glob("*.js")) == [
        "admin.js",
        "chat.js",
        "conversations.js",
        "images.js",
        "markdown.js",
    ]


# ---------------------------------------------------------------- 8. keyboard, new chat, model picker


def test_enter_sends_shift_enter_breaks_line_and_new_chat_clears(page, fake, live_url):
    open_chat(page, live_url)
    prompt = page.locator("#prompt")
    prompt.click()
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    expect(prompt).to_have_value("first line\nsecond line")
    assert fake.chat_calls() == []

    page.keyboard.press("Enter")
    wait_state(page, "done")
    expect(prompt).to_have_value("")
    assert fake.chat_calls()[-1].body["messages"][-1] == {"role": "user", "content": "first line\nsecond line"}
    expect(page.locator("#transcript .msg-user")).to_have_text("first line\nsecond line")

    page.locator("#new-chat").click()
    expect(page.locator("#transcript .msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    ask(page, "fresh start")
    wait_state(page, "done")
    assert fake.chat_calls()[-1].body["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "fresh start"},
    ]


def test_model_picker_and_request_headers(page, fake, settings_for, serve):
    app = create_app(settings_for(CHATPROXY_MODELS="gpt-4o-mini,gpt-4o,gpt-5.4-mini"))
    app.context_processor(lambda: {"csrf_token": "csrf-abc123"})  # used unless the page view passes its own
    url = serve(app)
    open_chat(page, url)
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert token
    select = page.locator("#model")
    expect(select.locator("option")).to_have_text(["gpt-4o-mini", "gpt-4o", "gpt-5.4-mini · reasoning"])  # models.json
    expect(select).to_have_value("gpt-4o-mini")
    select.select_option("gpt-5.4-mini")

    with page.expect_request("**/api/chat") as caught:
        ask(page, "Which model?")
    request = caught.value
    wait_state(page, "done")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-csrf-token"] == token
    assert json.loads(request.post_data) == {
        "messages": [{"role": "user", "content": "Which model?"}],
        "model": "gpt-5.4-mini",
        "stream": True,
    }
    assert fake.chat_calls()[-1].model == "gpt-5.4-mini"
    expect(answers(page).last.locator(".usage")).to_contain_text("· gpt-5.4-mini")


# ---------------------------------------------------------------- layout and screenshots

DEMO_FIRST = (
    "A proxy keeps the OpenAI key **on the server**:\n\n- the browser never sees it\n"
    "- the server caps tokens and *spend*\n- every call leaves one ledger row"
)
DEMO_ANSWER = (
    'Ask for `"stream": true` and read the events as they come:\n\n'
    '```python\nfor event in client.stream("/api/chat", json={"message": "Hi", "stream": True}):\n'
    "    print(event)\n```\n\n"
    "| Event | Carries |\n|---|---|\n| `start` | the model |\n| `delta` | the next few tokens |\n"
    "| `done` | usage and finish reason |\n\n"
    "**Tip:** stop with an `AbortController`; the proxy then closes the upstream stream too."
)


@pytest.mark.parametrize(
    ("viewport", "name", "scheme"),
    [
        (DESKTOP, "desktop", "light"),
        (MOBILE, "mobile", "light"),
        (DESKTOP, "desktop", "dark"),
        (MOBILE, "mobile", "dark"),
    ],
    ids=["desktop", "mobile", "desktop-dark", "mobile-dark"],
)
def test_layout_and_screenshots(browser, fake, settings_for, serve, viewport, name, scheme):
    """No sideways scrolling at 1280 or 360 px, every control on screen; the README's screenshots come from here
    (CHATPROXY_UPDATE_SCREENSHOTS=1 rewrites docs/screenshot-*.png)."""
    url = serve(create_app(settings_for(CHATPROXY_DEMO=True)))
    ctx = browser.new_context(viewport=viewport, device_scale_factor=2 if name == "mobile" else 1, color_scheme=scheme)
    try:
        page = ctx.new_page()
        seen = watch(page)
        open_chat(page, url)
        expect(page.locator("#demo-banner")).to_have_text(
            "Offline demo: answers come from a local fake upstream, not OpenAI"
        )
        page.evaluate("""() => {
          const store = ChatStore.create(localStorage);
          for (const title of ['Budgets per user', 'Deploying behind nginx']) {
            const conv = store.create();
            conv.title = title;
            conv.messages = [{role: 'user', content: title}, {role: 'assistant', content: 'Notes.', state: 'done'}];
            store.save(conv);
          }
        }""")
        fake.script(Reply(content=DEMO_FIRST), Reply(content=DEMO_ANSWER))
        ask(page, "Why use a proxy for the OpenAI API?")
        wait_state(page, "done")
        ask(page, "How do I stream an answer?")
        wait_state(page, "done", index=1)
        expect(page.locator("#transcript pre code")).to_contain_text("for event in client.stream")
        expect(page.locator("#conversations .conv-open")).to_have_count(3)
        page.locator("#prompt").blur()
        page.mouse.move(0, viewport["height"] - 1)

        widths = page.evaluate(
            "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth,"
            " document.getElementById('transcript').scrollWidth,"
            " document.getElementById('transcript').clientWidth]"
        )
        assert widths[0] <= widths[1], f"the page scrolls sideways at {viewport['width']}px: {widths}"
        assert widths[2] <= widths[3], f"the transcript scrolls sideways at {viewport['width']}px: {widths}"
        for control in ("#prompt", "#send", "#model", "#new-chat", "#attach"):
            box = page.locator(control).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], control
        expect(page.locator("#sidebar")).to_be_visible() if name == "desktop" else expect(
            page.locator("#sidebar")
        ).to_be_hidden()

        suffix = "" if scheme == "light" else "-dark"
        shot = save_screenshot(page, f"chat-{name}{suffix}.png")
        target = DOCS / f"screenshot-{name}{suffix}.png"
        if os.environ.get("CHATPROXY_UPDATE_SCREENSHOTS") or not target.exists():
            DOCS.mkdir(exist_ok=True)
            shutil.copyfile(shot, target)
        assert seen.page_errors == [] and seen.console_errors == []
    finally:
        ctx.close()
