"""Answers rendered as markdown in real Chromium: what each construct becomes, streaming, hostile input, speed."""

from __future__ import annotations

import json
import re
import statistics
import time

import pytest

from chatproxy.demo.upstream import Reply
from tests.browser import answer_text, answers, ask, open_chat, wait_state

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)"
)
expect = sync_api.expect


class NoCsp:
    """WSGI middleware removing the Content-Security-Policy, so injected markup would really run if it got in."""

    def __init__(self, app) -> None:
        self.app = app

    def __call__(self, environ, start_response):
        def without_csp(status, headers, exc_info=None):
            kept = [(k, v) for k, v in headers if k.lower() != "content-security-policy"]
            return start_response(status, kept, exc_info)

        return self.app(environ, without_csp)


def pieces(text: str, size: int) -> list[str]:
    """`text` in stream deltas of `size` characters."""
    return [text[i : i + size] for i in range(0, len(text), size)]


# Realistic model answers and awkward corners; every prefix of each must render as it would in one go.
CORPUS = [
    (
        "## Setup\n\n1. Install:\n   ```sh\n   pip install flask\n   ```\n2. Run it:\n   - `flask run`\n"
        "   - open http://127.0.0.1:5000/\n\n> **Note:** keep the key\n> - on the server\n> - never in JS\n\n"
        "| Step | Time |\n|------|-----:|\n| a | 1 s |\n| b | 2 s |\n\nDone. *Enjoy*!"
    ),
    "Text before\n```js\nconst a = `x`;\n\n\nconsole.log(a)\n```\nText after\n\n~~~\ntilde fence\n~~~",
    "* one\n* two\n\n  para in two\n\n* three\n\nafter list\n\n- x\n+ y",
    "# H1\n## H2\n### H3\n#### H4\n##### H5\n###### H6\n####### not\n#nohead",
    "***\n- - -\n___\n\n* * *\n\nPara\n| h1 | h2 |\n|---|---|\n| c | d |\nafter",
    '[a](https://a.com "title") [b](<https://b.com/x y>) [nested [x]](https://n.com) \\*not em\\* \\`not code\\`',
    "| a |\n|---|\n| 1 |\n\n| broken\n|---|---|\n| x |",
    "``` \n``` \n````\n```\n````",
    "1. a\n1. b\n\n7. seven\n8. eight\n\n3) other delimiter",
    "> > nested quote\n> back\n>\n> # heading in quote",
    "**bold with `code**` inside** and __under strong__ and a * b * c and snake_case_name",
    "*a `b*` c* and **unclosed and _under_ and x_y_z ~~gone~~",
    "See https://foo.com/a_(b). and <https://x.org> and [https://bank.com](https://evil.example/login)",
]


# ---------------------------------------------------------------- what each construct becomes


MARKDOWN_ANSWER = (
    "## Getting started\n\n"
    "Run the proxy with **gunicorn**, keep the key *on the server*, and ~~never~~ don't ship `.env`.\n\n"
    "1. Install the requirements\n"
    "2. Set the key:\n"
    "   - in `.env`\n"
    "   - or in the environment\n"
    "3. Start it\n\n"
    "> **Tip:** the page never sees the key.\n\n"
    "| Setting | Default | Meaning |\n"
    "|:--------|:-------:|--------:|\n"
    "| `PORT` | 5000 | where it listens |\n"
    "| MAX_TOKENS | 1024 | **cap** per answer |\n\n"
    "```python\nimport requests\nprint(requests.post('/api/chat', json={'message': 'Hi'}).json())\n```\n\n"
    "---\n\n"
    "Read [the docs](https://example.com/docs?page=1) or https://example.org/faq."
)


def test_markdown_answer_renders_as_structure_while_it_streams(page, fake, live_url):
    fake.script(Reply(chunks=pieces(MARKDOWN_ANSWER, 3), pace=0.004))
    open_chat(page, live_url)
    ask(page, "How do I start?")
    answer = answers(page).last.locator(".answer")
    expect(answer.locator("ol > li")).to_have_count(3, timeout=10000)  # structure appears before the end
    wait_state(page, "done", timeout=15000)

    expect(answer.locator("h3")).to_have_text("Getting started")  # "##" under the page's own h1 and h2
    first = answer.locator("p").first
    expect(first.locator("strong")).to_have_text("gunicorn")
    expect(first.locator("em")).to_have_text("on the server")
    expect(first.locator("del")).to_have_text("never")
    expect(first.locator("code")).to_have_text(".env")
    expect(answer.locator("ol > li")).to_have_count(3)
    expect(answer.locator("ol > li").nth(1).locator("ul > li")).to_have_text(["in .env", "or in the environment"])
    expect(answer.locator("blockquote strong")).to_have_text("Tip:")
    expect(answer.locator("table th")).to_have_text(["Setting", "Default", "Meaning"])
    expect(answer.locator("table th").nth(1)).to_have_class("align-center")
    expect(answer.locator("table tbody tr")).to_have_count(2)
    expect(answer.locator("table tbody tr").first.locator("td code")).to_have_text("PORT")
    expect(answer.locator("table tbody tr").last.locator("td").nth(2)).to_have_class("align-right")
    code = answer.locator(".code")
    expect(code.locator(".code-lang")).to_have_text("python")
    expect(code.locator("pre code")).to_have_text(
        "import requests\nprint(requests.post('/api/chat', json={'message': 'Hi'}).json())"
    )
    expect(code.locator("button.code-copy")).to_have_text("Copy")
    expect(answer.locator("hr")).to_have_count(1)
    links = answer.locator("a")
    expect(links).to_have_count(2)
    expect(links.first).to_have_text("the docs")
    for i, href in enumerate(["https://example.com/docs?page=1", "https://example.org/faq"]):
        expect(links.nth(i)).to_have_attribute("href", href)
        expect(links.nth(i)).to_have_attribute("rel", "noopener noreferrer")
        expect(links.nth(i)).to_have_attribute("target", "_blank")
    # The streamed DOM is exactly what rendering the whole text at once gives.
    same = page.evaluate(
        """(text) => { const d = document.createElement('div'); ChatMarkdown.render(d, text);
        const shown = document.querySelector('#transcript .msg-assistant:last-of-type .answer');
        return d.innerHTML === shown.innerHTML; }""",
        MARKDOWN_ANSWER,
    )
    assert same


def test_every_prefix_renders_as_it_would_in_one_go(page, live_url):
    """The incremental renderer keeps finished blocks and patches the rest: at every chunk size and every
    prefix of the corpus, its DOM equals a fresh render of the same prefix."""
    open_chat(page, live_url)
    mismatches = page.evaluate(
        """(docs) => {
      const bad = [];
      for (const text of docs) {
        for (const step of [1, 2, 3, 5, 8, 13, 40]) {
          const box = document.createElement('div');
          const renderer = ChatMarkdown.createRenderer(box);
          for (let end = step; end < text.length + step; end += step) {
            renderer.update(text.slice(0, end));
            const fresh = document.createElement('div');
            ChatMarkdown.render(fresh, text.slice(0, end));
            if (fresh.innerHTML !== box.innerHTML) {
              bad.push({text, step, end, want: fresh.innerHTML, got: box.innerHTML});
              break;
            }
          }
        }
      }
      return bad.slice(0, 3);
    }""",
        CORPUS,
    )
    assert mismatches == []


# ---------------------------------------------------------------- hostile answers

XSS_CHUNKS = [
    "<script>window.__pwned='script';alert(1)</script>\n\n",
    "<img src=x onerror=\"window.__pwned='img';alert(2)\">\n\n",
    "[js](javascript:window.__pwned='js-link') [JS](JAVASCRIPT:alert(3)) [sp]( javascript:alert(4))\n\n",
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCg1KTwvc2NyaXB0Pg==) [vb](vbscript:msgbox(6))\n\n",
    "![img](javascript:alert(7)) ![pixel](https://tracker.example/p.gif) <javascript:alert(8)>\n\n",
    '[quote](https://ok.example/" onmouseover="window.__pwned=\'attr\') <https://x.example/"onmouseover=alert(9)>\n\n',
    "<a href=\"javascript:window.__pwned='a'\">click</a> <svg onload=\"window.__pwned='svg'\"></svg>\n\n",
    "<iframe src=\"javascript:window.__pwned='iframe'\"></iframe><style>body{display:none}</style>\n\n",
    "<details open ontoggle=\"window.__pwned='details'\"><summary>x</summary></details>\n\n",
    "**<b onmouseover=alert(10)>bold html</b>** `<img src=y onerror=alert(11)>`\n\n",
    "| <img src=z onerror=alert(12)> | [t](javascript:alert(13)) |\n|---|---|\n| <script>alert(14)</script> | ok |\n\n",
    "```html\n<script>window.__pwned='fence'</script>\n```\n\n",
    "[creds](https://user:pass@evil.example/) [rel](/relative/path) [proto](//evil.example/x)\n\n",
    "<form action=https://evil.example><input name=q></form> <object data=x></object> <embed src=x>",
]

INJECTED = (
    "script",
    "img",
    "iframe",
    "svg",
    "style",
    "details",
    "form",
    "input:not(#prompt)",
    "object",
    "embed",
    "b",
    "meta",
    "link",
    "base",
)


def test_hostile_answer_runs_nothing_and_shows_as_text(page, fake, app, serve):
    url = serve(NoCsp(app.wsgi_app))  # the renderer alone must keep this inert
    fake.script(Reply(chunks=XSS_CHUNKS, pace=0.01))
    open_chat(page, url)
    ask(page, "<img src=q onerror=\"window.__pwned='question'\"> [q](javascript:alert(15))")
    wait_state(page, "done")
    links = answers(page).last.locator(".answer a")
    for i in range(links.count()):
        links.nth(i).hover()  # any injected mouseover handler would fire now
    page.wait_for_timeout(300)

    transcript = page.locator("#transcript")
    for selector in INJECTED:
        expect(transcript.locator(selector)).to_have_count(0)
    found = page.evaluate("""() => {
      const all = [...document.querySelectorAll('#transcript *')];
      return {
        handlers: all.flatMap((el) => [...el.attributes].filter((a) => /^on/i.test(a.name)).map((a) => a.name)),
        styled: all.filter((el) => el.hasAttribute('style')).length,
        hrefs: [...document.querySelectorAll('#transcript a')].map((a) => [a.getAttribute('href'), a.rel, a.target]),
      };
    }""")
    assert found["handlers"] == [] and found["styled"] == 0
    # Only real http(s) links survive (a quote in a URL is percent-encoded, never an attribute's end),
    # each opening a new tab without the opener or a referrer. No image is loaded: ![..](..) is a link.
    assert sorted(h for h, _, _ in found["hrefs"]) == [
        "https://evil.example/",
        "https://ok.example/",
        "https://tracker.example/p.gif",
        "https://x.example/%22onmouseover=alert(9)",
    ]
    assert all(rel == "noopener noreferrer" and target == "_blank" for _, rel, target in found["hrefs"])
    text = answer_text(page)
    for literal in (
        "<script>window.__pwned='script';alert(1)</script>",
        "<img src=x onerror=",
        "[js](javascript:window.__pwned='js-link')",
        "(data:text/html;base64,",
        "<javascript:alert(8)>",
        "<svg onload=",
        "<iframe src=",
        "<details open ontoggle=",
        "<b onmouseover=alert(10)>bold html</b>",
        "[creds](https://user:pass@evil.example/)",
        "[rel](/relative/path)",
        "<embed src=x>",
    ):
        assert literal in text, literal
    expect(answers(page).last.locator(".code pre code")).to_have_text("<script>window.__pwned='fence'</script>")
    expect(page.locator("#transcript .msg-user .bubble")).to_have_text(
        "<img src=q onerror=\"window.__pwned='question'\"> [q](javascript:alert(15))"
    )
    assert page.evaluate("() => window.__pwned") is None
    assert page.seen.dialogs == [] and page.seen.console_errors == []


def test_a_misleading_link_label_shows_the_real_target(page, fake, live_url):
    fake.script(
        Reply(
            chunks=pieces(
                "Log in at [https://bank.example.com/login](https://evil.example/steal?x=1) "
                "or [your bank](https://evil.example/) or [bank.example.com](https://bank.example.com/).",
                7,
            )
        )
    )
    open_chat(page, live_url)
    ask(page, "Where do I log in?")
    wait_state(page, "done")
    links = answers(page).last.locator(".answer a")
    expect(links).to_have_count(3)
    misleading = links.first
    expect(misleading).to_have_attribute("href", "https://evil.example/steal?x=1")
    expect(misleading).to_have_text("https://bank.example.com/login (evil.example)")  # the real host, in plain sight
    expect(misleading.locator(".link-host")).to_be_visible()
    expect(links.nth(2)).to_have_text("bank.example.com")  # an honest label gets no note
    for i in range(3):
        link = links.nth(i)
        link.hover()
        shown = page.evaluate("(a) => getComputedStyle(a, '::after').content", link.element_handle())
        assert shown == json.dumps(link.get_attribute("href")), shown  # the full target, on hover
    links.nth(1).focus()
    assert (
        page.evaluate("(a) => getComputedStyle(a, '::after').content", links.nth(1).element_handle())
        == '"https://evil.example/"'
    )


def test_unterminated_code_fence_keeps_the_rest_as_code(page, fake, live_url):
    unterminated = "Here it is:\n\n```python\nprint('hi')\n\n# <script>alert(1)</script>\n**not bold**"
    fake.script(Reply(chunks=pieces(unterminated, 5)), Reply(content="Next answer with **bold**."))
    open_chat(page, live_url)
    ask(page, "Give me code")
    wait_state(page, "done")
    first = answers(page).last
    expect(first.locator(".code .code-lang")).to_have_text("python")
    expect(first.locator(".code pre code")).to_have_text("print('hi')\n\n# <script>alert(1)</script>\n**not bold**")
    expect(first.locator("strong")).to_have_count(0)
    ask(page, "And then?")
    wait_state(page, "done", index=1)
    expect(answers(page).nth(1).locator(".answer strong")).to_have_text("bold")  # nothing leaks into the next answer
    expect(answers(page).nth(1).locator(".code")).to_have_count(0)


def test_each_code_block_copies_its_own_code(page, context, fake, live_url):
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_url)
    answer = (
        "Two ways:\n\n```bash\ncurl -s localhost:5000/healthz\n```\n\nor\n\n"
        "```python\nimport httpx\nprint(httpx.get('http://localhost:5000/healthz').json())\n```\n"
    )
    fake.script(Reply(chunks=pieces(answer, 9)))
    open_chat(page, live_url)
    ask(page, "How do I check health?")
    wait_state(page, "done")
    blocks = answers(page).last.locator(".code")
    expect(blocks).to_have_count(2)
    expect(blocks.locator(".code-lang")).to_have_text(["bash", "python"])

    blocks.nth(1).locator(".code-copy").click()
    expect(blocks.nth(1).locator(".code-copy")).to_have_text("Copied")
    assert page.evaluate("() => navigator.clipboard.readText()") == (
        "import httpx\nprint(httpx.get('http://localhost:5000/healthz').json())"
    )
    expect(blocks.nth(0).locator(".code-copy")).to_have_text("Copy")
    blocks.nth(0).locator(".code-copy").click()
    assert page.evaluate("() => navigator.clipboard.readText()") == "curl -s localhost:5000/healthz"
    expect(blocks.nth(1).locator(".code-copy")).to_have_text("Copy", timeout=3000)  # the label comes back
    answers(page).last.locator(".meta .copy").click()  # the whole answer, as markdown
    assert page.evaluate("() => navigator.clipboard.readText()") == answer


# ---------------------------------------------------------------- size and speed

MEASURE = """() => {
  window.__perf = {updates: [], longtasks: [], beats: [], original: ChatMarkdown.createRenderer};
  ChatMarkdown.createRenderer = (element) => {
    const renderer = window.__perf.original(element);
    const update = renderer.update;
    const changes = new MutationObserver(() => {});
    changes.observe(element, {childList: true, subtree: true});
    let previous = 0;
    renderer.update = (text) => {
      const start = performance.now();
      update(text);
      element.getBoundingClientRect();  // the layout the update causes counts as rendering too
      const took = performance.now() - start;
      const added = changes.takeRecords().reduce((n, record) => n + record.addedNodes.length, 0);
      window.__perf.updates.push({start, took, before: previous, after: text.length, added});
      previous = text.length;
    };
    return renderer;
  };
  new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) window.__perf.longtasks.push([entry.startTime, entry.duration]);
  }).observe({type: 'longtask'});
  let last = performance.now();
  window.__perf.timer = setInterval(() => {
    const now = performance.now();
    window.__perf.beats.push(now - last);
    last = now;
  }, 20);
}"""

RESULTS = """() => { clearInterval(window.__perf.timer); const p = window.__perf;
  return {updates: p.updates, longtasks: p.longtasks, beats: p.beats}; }"""

# Replay one update (from the text it had shown to the text it then showed) in an answer of the same width,
# three times, and keep the fastest: the work the update itself needs, without the machine's hiccups.
REPLAY = """([text, cases]) => cases.map(([before, after]) => {
  let best = Infinity;
  for (let attempt = 0; attempt < 3; attempt++) {
    const article = document.getElementById('assistant-template').content.firstElementChild.cloneNode(true);
    document.getElementById('transcript').appendChild(article);
    const box = article.querySelector('.answer');
    const renderer = window.__perf.original(box);
    renderer.update(text.slice(0, before));
    box.getBoundingClientRect();
    const start = performance.now();
    renderer.update(text.slice(0, after));
    box.getBoundingClientRect();
    best = Math.min(best, performance.now() - start);
    article.remove();
  }
  return [after, Math.round(best * 10) / 10];
})"""


def rendering_in_long_tasks(perf: dict) -> list[tuple[float, float]]:
    """(long task duration, rendering time inside it) for every long task that contains a render update."""
    out = []
    for start, duration in perf["longtasks"]:
        inside = sum(u["took"] for u in perf["updates"] if start <= u["start"] <= start + duration)
        if inside:
            out.append((round(duration), round(inside, 1)))
    return out


def long_answer(tokens: int) -> list[str]:
    """A markdown answer of `tokens` four-character deltas: sections of prose, lists, code and tables."""
    section = (
        "## Section {n}\n\nThis part explains **step {n}** in plain words, with `inline code` and a "
        "[link](https://example.com/{n}) to the reference. It goes on for a while so that the paragraph "
        "wraps over several lines on a phone.\n\n"
        "1. First, check the *settings* file\n2. Then restart the service\n   - wait for the health check\n"
        "   - read the log\n3. Finally, ask again\n\n"
        "```python\ndef step_{n}(client):\n    reply = client.post('/api/chat', json={{'message': 'hi'}})\n"
        "    return reply.json()['content']\n```\n\n"
        "| Name | Value |\n|---|---:|\n| tokens | {n}00 |\n| seconds | {n} |\n\n"
        "> Keep the key on the server.\n\n"
    )
    text = ""
    n = 1
    while len(text) < tokens * 4:
        text += section.format(n=n)
        n += 1
    return pieces(text[: tokens * 4], 4)


def test_long_answer_streams_without_long_frames(page, fake, live_url):
    """4,000 tokens at 50 tokens/s: no render update (DOM work plus the layout it causes) takes 50 ms.

    Frame times on a loaded 2-core machine include whatever else the machine did, so the assertion is on
    the render function's own time per update: every update that took 50 ms or more is replayed on the
    same text, and must take less when the machine lets it. And rendering is incremental: an update adds
    a handful of nodes, never the whole answer again.
    """
    chunks = long_answer(4000)
    text = "".join(chunks)
    fake.script(Reply(chunks=chunks, pace=0.02))
    open_chat(page, live_url)
    page.evaluate(MEASURE)
    ask(page, "Explain everything")
    wait_state(page, "streaming")
    wait_state(page, "done", timeout=180_000)
    perf = page.evaluate(RESULTS)

    expect(answers(page).last.locator(".usage")).to_contain_text("+ 4000 completion tokens")
    assert answer_text(page).startswith("Section 1")
    blocks = answers(page).last.locator(".answer > *").count()
    updates = perf["updates"]
    took = sorted(u["took"] for u in updates)
    slow = [(u["before"], u["after"]) for u in updates if u["took"] >= 50]
    replayed = page.evaluate(REPLAY, [text, slow]) if slow else []
    added = sorted(u["added"] for u in updates)
    summary = (
        f"{len(updates)} updates of a {blocks}-block answer: median {statistics.median(took):.2f} ms, "
        f"p99 {took[int(len(took) * 0.99)]:.2f} ms, max {took[-1]:.2f} ms; nodes added per update: "
        f"median {statistics.median(added)}, max {added[-1]}; updates of 50 ms or more, replayed "
        f"(chars, best ms): {replayed}; long tasks with rendering in them (duration, rendering ms): "
        f"{rendering_in_long_tasks(perf)}; longest gap between 20 ms timer beats {max(perf['beats']):.0f} ms"
    )
    print(summary)
    assert len(updates) > 500 and blocks > 100, summary
    assert took[int(len(took) * 0.99)] < 50, summary
    assert all(best < 50 for _, best in replayed), summary
    assert added[-1] <= 40, summary  # a full re-render would add every block of the answer again


def test_ten_thousand_row_table_stays_responsive(page, context, fake, live_url):
    rows = [f"| {i} | row {i} | **{i % 7}** |\n" for i in range(10_000)]
    table = "| # | Name | Mod |\n|--:|---|:-:|\n" + "".join(rows)
    fake.script(Reply(chunks=["Here:\n\n", *pieces(table, 200), "\nThat is all."]))
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_url)
    open_chat(page, live_url)
    page.evaluate(MEASURE)
    ask(page, "A big table please")
    wait_state(page, "done", timeout=60_000)
    perf = page.evaluate(RESULTS)

    answer = answers(page).last
    expect(answer.locator("tbody tr")).to_have_count(200)  # built up to a cap, then summarised
    expect(answer.locator(".table-more")).to_have_text(
        "Showing the first 200 of 10000 rows. Copy the answer to get them all."
    )
    expect(answer.locator("tbody tr").last.locator("td")).to_have_text(["199", "row 199", "3"])
    expect(answer.locator(".answer > p").last).to_have_text("That is all.")
    took = sorted(u["took"] for u in perf["updates"])
    print(f"{len(took)} updates, max {took[-1]:.1f} ms; longest timer gap {max(perf['beats']):.0f} ms")
    assert took[-1] < 250, took[-5:]  # even parsing 10,000 rows per update leaves the page usable

    # Still responsive: typing works at once, and the whole table is one copy away.
    started = time.monotonic()
    page.locator("#prompt").fill("still here")
    expect(page.locator("#prompt")).to_have_value("still here")
    assert time.monotonic() - started < 5
    answer.locator(".meta .copy").click()
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert copied.count("\n| ") >= 10_000 and "| 9999 | row 9999 |" in copied


def test_a_ten_thousand_row_table_restored_from_storage_opens_quickly(page, fake, live_url):
    table = "| a | b |\n|---|---|\n" + "".join(f"| {i} | x |\n" for i in range(10_000))
    fake.script(Reply(chunks=pieces(table, 5000)))
    open_chat(page, live_url)
    ask(page, "Table")
    wait_state(page, "done", timeout=30_000)
    page.reload()
    expect(page.locator("#app")).to_have_attribute("data-ready", "true", timeout=10_000)
    expect(answers(page).last.locator("tbody tr")).to_have_count(200)
    took = page.evaluate("() => performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")
    assert took < 5000, took
    assert re.search(r"of 10000 rows", answers(page).last.locator(".table-more").inner_text())


@pytest.mark.parametrize("size", [1, 37])
def test_pathological_inline_input_renders_quickly(page, live_url, size):
    """Openers without closers must not make inline parsing quadratic."""
    open_chat(page, live_url)
    hostile = ("**a _b [c ~~e <https://x " * 3000)[:40_000]
    took = page.evaluate(
        """([text, size]) => {
      const box = document.createElement('div');
      const renderer = ChatMarkdown.createRenderer(box);
      let worst = 0;
      for (let end = Math.min(size, text.length); ; end = Math.min(end + 4000, text.length)) {
        const start = performance.now();
        renderer.update(text.slice(0, end));
        worst = Math.max(worst, performance.now() - start);
        if (end === text.length) break;
      }
      return [worst, box.textContent.length];
    }""",
        [hostile, size],
    )
    assert took[1] == len(hostile.strip())  # every character shown, as text
    assert took[0] < 500, took


def test_deep_nesting_is_cut_off_not_recursed_forever(page, live_url):
    open_chat(page, live_url)
    result = page.evaluate("""() => {
      const deep = '> '.repeat(5000) + 'bottom\\n' + '- '.repeat(3000) + 'item\\n' + '*'.repeat(9000) + 'x';
      const box = document.createElement('div');
      ChatMarkdown.render(box, deep);
      let depth = 0;
      for (let node = box.querySelector('blockquote'); node; node = node.querySelector(':scope > blockquote')) depth++;
      return [depth, box.textContent.includes('bottom'), box.textContent.includes('item')];
    }""")
    assert result[0] <= 8 and result[1] and result[2], result


def test_answer_from_a_json_reply_is_rendered_too(page, live_url):
    """Some proxies answer stream requests with plain JSON; that text is markdown as well."""
    open_chat(page, live_url)
    page.route(
        "**/api/chat",
        lambda route: route.fulfill(
            status=200,
            content_type="application/json",
            body=json.dumps(
                {
                    "role": "assistant",
                    "content": "- **one**\n- two",
                    "model": "gpt-4o-mini",
                    "finish_reason": "stop",
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
                }
            ),
        ),
    )
    ask(page, "List")
    wait_state(page, "done")
    expect(answers(page).last.locator("ul > li")).to_have_text(["one", "two"])
    expect(answers(page).last.locator("li strong")).to_have_text("one")
