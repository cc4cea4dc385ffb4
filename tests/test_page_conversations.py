"""Conversations in real Chromium: kept in localStorage across reloads, the list, regenerate, edit, retry, countdown."""

from __future__ import annotations

import json
import re
import time

import pytest

from chatproxy import create_app
from chatproxy.demo.upstream import Reply
from tests.browser import answer_text, answers, ask, assert_ready, open_chat, questions, wait_state

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)"
)
expect = sync_api.expect

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def titles(page):
    return page.locator("#conversations .conv-open")


def stored(page) -> dict:
    """Everything the page keeps in localStorage, parsed."""
    return page.evaluate("""() => Object.fromEntries(Object.keys(localStorage).filter((k) => k.startsWith('chatproxy.'))
        .map((k) => [k, (() => { try { return JSON.parse(localStorage.getItem(k)); }
                                  catch (e) { return localStorage.getItem(k); } })()]))""")


def reload(page) -> None:
    page.reload()
    expect(page.locator("#app")).to_have_attribute("data-ready", "true")


# ---------------------------------------------------------------- persistence


def test_a_reload_restores_the_open_conversation(page, fake, live_url):
    fake.script(Reply(content="A **proxy** relays requests:\n\n- it keeps the key\n- it caps spend"))
    open_chat(page, live_url)
    ask(page, "What is a proxy?")
    wait_state(page, "done")
    ask(page, "And why?")
    wait_state(page, "done", index=1)
    usage = answers(page).first.locator(".usage").inner_text()

    reload(page)
    expect(questions(page)).to_have_text(["What is a proxy?", "And why?"])
    expect(answers(page)).to_have_count(2)
    expect(answers(page).first.locator(".answer li")).to_have_text(["it keeps the key", "it caps spend"])
    expect(answers(page).first.locator(".answer strong")).to_have_text("proxy")
    expect(answers(page).first.locator(".usage")).to_have_text(usage)
    expect(answers(page).last.locator(".answer")).to_have_text("Echo: And why?")
    expect(page.locator("#empty")).to_be_hidden()
    expect(titles(page)).to_have_text(["What is a proxy?"])
    expect(titles(page).first).to_have_attribute("aria-current", "true")

    # The restored turns are the conversation the model sees next.
    ask(page, "Thanks")
    wait_state(page, "done", index=2)
    assert fake.chat_calls()[-1].body["messages"] == [
        SYSTEM,
        user("What is a proxy?"),
        assistant("A **proxy** relays requests:\n\n- it keeps the key\n- it caps spend"),
        user("And why?"),
        assistant("Echo: And why?"),
        user("Thanks"),
    ]
    keys = sorted(stored(page))
    assert keys[0] == "chatproxy.v1.conv." + stored(page)["chatproxy.v1.open"] and len(keys) == 3


def test_the_page_says_where_conversations_are_kept(page, live_url):
    open_chat(page, live_url)
    note = page.locator("#storage-note")
    expect(note).to_be_visible()
    expect(note).to_contain_text("kept in this browser only")
    expect(note).to_contain_text("the oldest are dropped first")
    expect(note).to_contain_text("The server stores none of their text")
    expect(page.locator("#conversations-empty")).to_have_text("No saved conversations yet.")


def test_a_reload_mid_answer_keeps_the_partial_answer_to_retry(page, fake, live_url):
    fake.script(Reply(chunks=[f"w{i} " for i in range(200)], pace=0.05))
    open_chat(page, live_url)
    ask(page, "Count")
    expect(answers(page).last.locator(".answer")).to_contain_text("w3")
    reload(page)

    expect(questions(page)).to_have_text(["Count"])
    last = answers(page).last
    expect(last).to_have_attribute("data-state", "error")
    expect(last.locator(".answer")).to_contain_text("w0 w1 w2 w3")
    expect(last.locator(".error-text")).to_have_text("The page was closed or reloaded before this answer finished.")
    last.locator(".retry").click()
    wait_state(page, "done")
    expect(questions(page)).to_have_text(["Count"])  # retried in place: one question, one answer
    expect(answers(page)).to_have_count(1)
    expect(answers(page).last.locator(".answer")).to_have_text("Echo: Count")
    assert fake.chat_calls()[-1].body["messages"] == [SYSTEM, user("Count")]


def test_stored_data_is_untrusted_and_shown_as_text(page, context, fake, live_url):
    conv = {
        "id": "x1",
        "title": "<img src=x onerror=alert(1)>",
        "updated": 5,
        "messages": [
            {"role": "user", "content": "<script>alert(2)</script>"},
            {
                "role": "assistant",
                "content": "[a](javascript:alert(3)) <b>b</b>",
                "state": "done",
                "usage": "<i>u</i>",
                "status": 7,
                "error": None,
            },
            {"role": "system", "content": "sneaky"},
            "junk",
            None,
        ],
    }
    context.add_init_script(f"""if (!sessionStorage.getItem('seeded')) {{
        sessionStorage.setItem('seeded', '1');
        localStorage.setItem('chatproxy.v1.index', {
        json.dumps(json.dumps([{"id": "x1", "title": conv["title"]}, {"id": 5}, "bad"]))
    });
        localStorage.setItem('chatproxy.v1.conv.x1', {json.dumps(json.dumps(conv))});
        localStorage.setItem('chatproxy.v1.open', 'x1');
    }}""")
    open_chat(page, live_url)
    expect(questions(page)).to_have_text(["<script>alert(2)</script>"])
    expect(answers(page).locator(".answer")).to_have_text("[a](javascript:alert(3)) <b>b</b>")
    expect(answers(page).locator(".usage")).to_have_text("<i>u</i>")
    expect(titles(page)).to_have_text(["<img src=x onerror=alert(1)>"])
    for selector in ("img", "script", "b", "i", "a"):
        expect(page.locator(f"#transcript {selector}, #conversations {selector}")).to_have_count(0)
    ask(page, "still works")
    wait_state(page, "done", index=1)
    assert fake.chat_calls()[-1].body["messages"] == [
        SYSTEM,
        user("<script>alert(2)</script>"),
        assistant("[a](javascript:alert(3)) <b>b</b>"),
        user("still works"),
    ]
    assert page.seen.console_errors == []


def test_a_browser_that_refuses_storage_still_chats_and_says_so(page, context, fake, live_url):
    context.add_init_script("Storage.prototype.setItem = () => { throw new DOMException('no', 'SecurityError'); }")
    open_chat(page, live_url)
    expect(page.locator("#note")).to_have_text(
        "This browser does not allow storage here: conversations last until the page is closed."
    )
    ask(page, "Hello")
    wait_state(page, "done")
    expect(titles(page)).to_have_text(["Hello"])  # listed for as long as the page is open
    expect(page.locator("#note")).to_contain_text("does not allow storage")


def test_over_the_cap_the_oldest_conversations_are_dropped_and_the_page_says_so(page, fake, live_url):
    open_chat(page, live_url)
    # Two big saved conversations, 1.9 million characters together (the cap is 2 million).
    page.evaluate("""() => {
      const store = ChatStore.create(localStorage);
      for (const [title, when] of [['Oldest big one', 1000], ['Newer big one', 2000]]) {
        const conv = store.create();
        conv.title = title;
        conv.messages = [{role: 'user', content: title},
                         {role: 'assistant', content: 'x'.repeat(950000), state: 'done'}];
        store.save(conv);
        const index = JSON.parse(localStorage.getItem('chatproxy.v1.index'));
        index.find((e) => e.id === conv.id).updated = when;
        localStorage.setItem('chatproxy.v1.index', JSON.stringify(index));
      }
    }""")
    reload(page)
    expect(titles(page)).to_have_text(["Newer big one", "Oldest big one"])
    fake.script(Reply(content="y" * 150_000))
    ask(page, "One more")
    wait_state(page, "done")

    expect(page.locator("#note")).to_have_text(
        "To make room in this browser, the oldest saved conversation was removed: “Oldest big one”."
    )
    expect(titles(page)).to_have_text(["One more", "Newer big one"])
    sizes = page.evaluate("() => JSON.parse(localStorage.getItem('chatproxy.v1.index')).map((e) => e.size)")
    assert sum(sizes) <= 2_000_000 and len(sizes) == 2
    assert not any("Oldest big one" in json.dumps(v) for v in stored(page).values())


# ---------------------------------------------------------------- the list


def test_new_chat_rename_and_delete_in_the_list(page, fake, live_url):
    open_chat(page, live_url)
    ask(page, "First topic: what is SSE?\nwith a second line")
    wait_state(page, "done")
    expect(titles(page)).to_have_text(["First topic: what is SSE?"])  # titled by the first question's first line

    page.locator("#new-chat").click()
    expect(page.locator("#transcript .msg")).to_have_count(0)
    expect(titles(page)).to_have_count(1)  # an empty chat is not listed
    expect(page.locator("#prompt")).to_be_focused()
    ask(page, "Second topic")
    wait_state(page, "done")
    expect(titles(page)).to_have_text(["Second topic", "First topic: what is SSE?"])  # newest first
    expect(titles(page).first).to_have_attribute("aria-current", "true")

    titles(page).nth(1).click()
    expect(questions(page)).to_have_text(["First topic: what is SSE?\nwith a second line"])
    expect(titles(page).nth(1)).to_have_attribute("aria-current", "true")
    expect(page.locator("#prompt")).to_be_focused()

    # Rename: Enter keeps the new title, Escape keeps the old one.
    item = page.locator("#conversations .conv").nth(1)
    item.hover()
    item.locator(".conv-rename").click()
    field = page.locator(".conv-rename-input")
    expect(field).to_be_focused()
    expect(field).to_have_value("First topic: what is SSE?")
    field.fill("SSE notes")
    field.press("Enter")
    expect(titles(page)).to_have_text(["Second topic", "SSE notes"])
    expect(page.locator("#conversations .conv").nth(1).locator(".conv-rename")).to_be_focused()
    page.locator("#conversations .conv").nth(0).hover()
    page.locator("#conversations .conv").nth(0).locator(".conv-rename").click()
    page.locator(".conv-rename-input").fill("ignored")
    page.locator(".conv-rename-input").press("Escape")
    expect(titles(page)).to_have_text(["Second topic", "SSE notes"])
    ask(page, "A later question does not retitle it")
    wait_state(page, "done", index=1)
    reload(page)
    expect(titles(page)).to_have_text(["SSE notes", "Second topic"])

    # Delete asks first; Keep keeps it.
    second = page.locator("#conversations .conv").nth(1)
    second.hover()  # the tools show on hover (or keyboard focus)
    second.locator(".conv-delete").click()
    expect(second.locator(".conv-confirm-text")).to_have_text("Delete “Second topic”?")
    second.locator(".conv-confirm-cancel").click()
    expect(titles(page)).to_have_count(2)
    page.locator("#conversations .conv").nth(1).hover()
    page.locator("#conversations .conv").nth(1).locator(".conv-delete").click()
    page.locator(".conv-confirm-delete").click()
    expect(titles(page)).to_have_text(["SSE notes"])
    expect(questions(page)).to_have_count(2)  # the open conversation was not the deleted one
    assert not any("Second topic" in json.dumps(v) for v in stored(page).values())

    # Deleting the open conversation leaves an empty new chat.
    page.locator("#conversations .conv").hover()
    page.locator("#conversations .conv .conv-delete").click()
    page.locator(".conv-confirm-delete").click()
    expect(titles(page)).to_have_count(0)
    expect(page.locator("#transcript .msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#new-chat")).to_be_focused()
    assert sorted(stored(page)) == ["chatproxy.v1.index"]
    reload(page)
    expect(page.locator("#transcript .msg")).to_have_count(0)


def test_leaving_a_conversation_mid_answer_stops_it_and_keeps_what_arrived(page, fake, live_url):
    fake.script(Reply(chunks=[f"w{i} " for i in range(200)], pace=0.05))
    open_chat(page, live_url)
    ask(page, "Count slowly")
    expect(answers(page).last.locator(".answer")).to_contain_text("w3")
    page.keyboard.press("Control+Shift+O")  # new chat
    expect(page.locator("#transcript .msg")).to_have_count(0)
    [call] = fake.chat_calls()
    assert fake.wait_for(lambda: call.disconnected_at is not None, timeout=3), "the upstream never saw the close"
    assert_ready(page)

    titles(page).first.click()
    expect(answers(page).last).to_have_attribute("data-state", "stopped")
    expect(answers(page).last.locator(".status")).to_have_text("Stopped")
    assert answer_text(page).startswith("w0 w1 w2 w3")


# ---------------------------------------------------------------- regenerate, edit, retry


def test_regenerate_sends_the_same_conversation_and_replaces_the_answer(page, fake, settings_for, serve):
    url = serve(create_app(settings_for(CHATPROXY_MODELS="gpt-4o-mini,gpt-4o")))
    fake.script(
        Reply(content="First answer"),
        Reply(content="A weak answer"),
        Reply(content="A better answer"),
        Reply(content="From the bigger model"),
    )
    open_chat(page, url)
    ask(page, "Question one")
    wait_state(page, "done")
    ask(page, "Question two")
    wait_state(page, "done", index=1)
    expect(answers(page).first.locator(".regenerate")).to_be_hidden()  # only the last answer offers it
    regenerate = answers(page).last.locator(".regenerate")
    expect(regenerate).to_have_text("Regenerate")

    regenerate.click()
    wait_state(page, "done", index=1)
    calls = fake.chat_calls()
    assert len(calls) == 3
    assert (
        calls[2].body["messages"]
        == calls[1].body["messages"]
        == [SYSTEM, user("Question one"), assistant("First answer"), user("Question two")]
    )
    expect(answers(page)).to_have_count(2)
    expect(questions(page)).to_have_count(2)
    expect(answers(page).last.locator(".answer")).to_have_text("A better answer")
    expect(page.locator("#prompt")).to_be_focused()

    # Again, with another model: the button says which.
    page.locator("#model").select_option("gpt-4o")
    expect(regenerate).to_have_text("Regenerate with gpt-4o")
    regenerate.click()
    wait_state(page, "done", index=1)
    calls = fake.chat_calls()
    assert calls[3].model == "gpt-4o" and calls[3].body["messages"] == calls[1].body["messages"]
    expect(answers(page)).to_have_count(2)
    expect(answers(page).last.locator(".answer")).to_have_text("From the bigger model")
    expect(answers(page).last.locator(".usage")).to_contain_text("· gpt-4o")
    expect(regenerate).to_have_text("Regenerate")

    reload(page)
    expect(answers(page).locator(".answer")).to_have_text(["First answer", "From the bigger model"])


def test_edit_a_question_and_resend_drops_the_later_turns(page, fake, live_url):
    open_chat(page, live_url)
    for i, q in enumerate(["One", "Two", "Three"]):
        ask(page, q)
        wait_state(page, "done", index=i)

    # Cancel (or Escape) leaves everything as it was.
    second = page.locator("#transcript .msg-user").nth(1)
    second.hover()
    second.locator(".edit").click()
    editor = second.locator(".edit-input")
    expect(editor).to_be_focused()
    expect(editor).to_have_value("Two")
    editor.press("Escape")
    expect(second.locator(".edit-form")).to_have_count(0)
    expect(second.locator(".edit")).to_be_focused()
    expect(questions(page)).to_have_text(["One", "Two", "Three"])

    second.locator(".edit").click()
    second.locator(".edit-input").fill("Two, edited")
    second.locator(".edit-send").click()
    wait_state(page, "done", index=1)

    assert fake.chat_calls()[-1].body["messages"] == [SYSTEM, user("One"), assistant("Echo: One"), user("Two, edited")]
    expect(questions(page)).to_have_text(["One", "Two, edited"])
    expect(answers(page).locator(".answer")).to_have_text(["Echo: One", "Echo: Two, edited"])
    expect(page.locator("#prompt")).to_be_focused()
    reload(page)
    expect(questions(page)).to_have_text(["One", "Two, edited"])
    expect(answers(page)).to_have_count(2)

    # Editing the first question retitles the conversation (it was never renamed).
    first = page.locator("#transcript .msg-user").first
    first.locator(".edit").click()
    first.locator(".edit-input").fill("Uno")
    first.locator(".edit-input").press("Enter")
    wait_state(page, "done", index=0)
    expect(questions(page)).to_have_text(["Uno"])
    assert fake.chat_calls()[-1].body["messages"] == [SYSTEM, user("Uno")]
    expect(titles(page)).to_have_text(["Uno"])


@pytest.mark.parametrize("how", ["retry-button", "send-again"])
def test_retry_after_an_error_leaves_no_duplicate_question(page, fake, live_url, how):
    fake.script(Reply(chunks=["Half ", "an ", "answer ", "and"], drop_after=3))  # the upstream dies mid-answer
    open_chat(page, live_url)
    ask(page, "Flaky question")
    wait_state(page, "error")
    expect(answers(page).last.locator(".answer")).to_have_text("Half an answer")
    expect(answers(page).last.locator(".status")).to_have_text("Incomplete")
    expect(answers(page).last.locator(".error-text")).to_be_visible()
    retry = answers(page).last.locator(".retry")
    expect(retry).to_be_visible()
    expect(answers(page).last.locator(".regenerate")).to_be_hidden()
    expect(page.locator("#prompt")).to_have_value("Flaky question")

    if how == "retry-button":
        retry.click()
    else:
        page.locator("#prompt").press("Enter")
    wait_state(page, "done")
    expect(questions(page)).to_have_text(["Flaky question"])
    expect(answers(page)).to_have_count(1)
    expect(answers(page).last.locator(".answer")).to_have_text("Echo: Flaky question")
    expect(page.locator("#prompt")).to_have_value("")
    assert fake.chat_calls()[-1].body["messages"] == [SYSTEM, user("Flaky question")]
    reload(page)
    expect(questions(page)).to_have_text(["Flaky question"])
    expect(answers(page)).to_have_count(1)


# ---------------------------------------------------------------- refusals and countdown


def test_retry_after_counts_down_and_send_comes_back(page, fake, live_url):
    fake.script(Reply(status=429, headers={"Retry-After": "3"}))
    open_chat(page, live_url)
    ask(page, "Are you there?")
    wait_state(page, "error")
    countdown = page.locator("#countdown")
    expect(countdown).to_be_visible()
    send = page.locator("#send")
    retry = answers(page).last.locator(".retry")
    expect(send).to_be_disabled()
    expect(retry).to_be_disabled()

    seen = set()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        hidden, text, disabled = page.evaluate("""() => { const c = document.getElementById('countdown');
            return [c.hidden, c.textContent, document.getElementById('send').disabled]; }""")
        if hidden:
            break
        seen.add(text)
        assert disabled, f"send was enabled during the countdown ({text})"
        page.locator("#prompt").press("Enter")  # refused while counting down
        time.sleep(0.1)
    assert {"You can send again in 2 seconds.", "You can send again in 1 second."} <= seen, seen
    assert seen <= {f"You can send again in {n} second{'s' if n > 1 else ''}." for n in (1, 2, 3)}, seen
    expect(countdown).to_be_hidden()
    assert_ready(page)
    expect(retry).to_be_enabled()
    assert len(fake.chat_calls()) == 1  # nothing was sent while it counted down
    expect(questions(page)).to_have_count(1)

    page.locator("#prompt").press("Enter")  # the question was offered again
    wait_state(page, "done")
    expect(questions(page)).to_have_text(["Are you there?"])
    expect(answers(page).last.locator(".answer")).to_have_text("Echo: Are you there?")


def test_the_servers_own_rate_limit_message_is_shown(page, fake, settings_for, serve):
    url = serve(create_app(settings_for(CHATPROXY_RATE_LIMIT_PAGE="4/minute")))
    open_chat(page, url)  # the page load and the model list (reads) are counted apart from messages
    # The 5th message is refused, or the 9th if the minute's window turned over meanwhile (a fixed window).
    for question in ("One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"):
        with page.expect_response("**/api/chat") as caught:
            ask(page, question)
        response = caught.value
        if response.status != 200:
            break
        wait_state(page, "done")
    wait_state(page, "error")
    body = response.json()
    assert response.status == 429 and body["error"]["code"] == "rate_limited"
    message = body["error"]["message"]
    assert re.fullmatch(r"Too many requests\. Try again in \d+ seconds\.", message)
    expect(answers(page).last.locator(".error-text")).to_have_text(message)
    expect(page.locator("#countdown")).to_have_text(re.compile(r"^You can send again in \d+ seconds\.$"))
    expect(page.locator("#send")).to_be_disabled()
    refused = questions(page).last.inner_text()
    assert not [c for c in fake.chat_calls() if c.body["messages"][-1] == user(refused)]  # it never went upstream


def test_the_servers_own_budget_message_is_shown(page, fake, settings_for, serve):
    url = serve(create_app(settings_for(CHATPROXY_MAX_TOKENS=50, CHATPROXY_DAILY_TOKEN_BUDGET=260)))
    fake.script(Reply(content="word " * 100))  # 100 completion tokens spent of 260: the next worst case does not fit
    open_chat(page, url)
    ask(page, "Hi")
    wait_state(page, "done")
    with page.expect_response("**/api/chat") as caught:
        ask(page, "Again")
    wait_state(page, "error", index=1)
    body = caught.value.json()
    assert caught.value.status == 429 and body["error"]["code"] == "budget_exceeded"
    expect(answers(page).last.locator(".error-text")).to_have_text(body["error"]["message"])
    assert "midnight UTC" in body["error"]["message"]  # the service's daily cap, not this request's size
    # Until midnight is too long to count down: the message says when, and the page does not lock up.
    expect(page.locator("#countdown")).to_be_hidden()
    assert_ready(page)
    assert len(fake.chat_calls()) == 1
