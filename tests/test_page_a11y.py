"""Keyboard, focus, live regions, contrast in both themes, and the conversation drawer at 360 px, in real Chromium.

`python -m tests.test_page_a11y` prints the contrast ratio of every colour pair in static/chat.css.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from chatproxy.demo.upstream import Reply
from tests.browser import MOBILE, answers, ask, open_chat, questions, wait_state, watch

pytestmark = pytest.mark.browser

CSS = Path(__file__).resolve().parent.parent / "static" / "chat.css"

# (foreground, background, minimum): 4.5 for text (WCAG 1.4.3 AA), 3 for focus rings and control
# boundaries (WCAG 1.4.11).
PAIRS = [
    ("text", "bg", 4.5),
    ("text", "surface", 4.5),
    ("text", "sidebar-bg", 4.5),
    ("text", "user-bg", 4.5),
    ("text", "code-bg", 4.5),
    ("text", "selected-bg", 4.5),
    ("muted", "bg", 4.5),
    ("muted", "surface", 4.5),
    ("muted", "sidebar-bg", 4.5),
    ("muted", "code-bg", 4.5),
    ("muted", "selected-bg", 4.5),
    ("accent-text", "accent", 4.5),
    ("link", "surface", 4.5),
    ("link", "code-bg", 4.5),
    ("quote", "surface", 4.5),
    ("error", "error-bg", 4.5),
    ("banner-text", "banner-bg", 4.5),
    ("tooltip-text", "tooltip-bg", 4.5),
    ("accent", "bg", 3),
    ("accent", "surface", 3),
    ("accent", "sidebar-bg", 3),
    ("accent", "user-bg", 3),
    ("control-border", "surface", 3),
    ("control-border", "bg", 3),
]


def _theme_colours() -> dict[str, dict[str, str]]:
    """The custom properties of the light :root and of the dark-scheme :root in chat.css."""
    css = re.sub(r"/\*.*?\*/", "", CSS.read_text(encoding="utf-8"), flags=re.DOTALL)
    light = re.search(r"^:root\s*{(.*?)}", css, re.DOTALL | re.MULTILINE)
    dark = re.search(r"prefers-color-scheme:\s*dark\)\s*{\s*:root\s*{(.*?)}", css, re.DOTALL)
    assert light and dark, "chat.css lost its light or dark :root block"

    def props(block: str) -> dict[str, str]:
        return dict(re.findall(r"--([\w-]+):\s*(#[0-9a-fA-F]{6})\s*;", block))

    base = props(light.group(1))
    return {"light": base, "dark": {**base, **props(dark.group(1))}}


def _luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two #rrggbb colours."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def contrast_table() -> list[tuple[str, str, str, float, float]]:
    """(theme, foreground, background, ratio, minimum) for every pair in both themes."""
    rows = []
    for theme, colours in _theme_colours().items():
        for fg, bg, minimum in PAIRS:
            rows.append((theme, fg, bg, round(contrast(colours[fg], colours[bg]), 2), minimum))
    return rows


def test_colour_pairs_meet_wcag_aa_in_both_themes():
    failing = [row for row in contrast_table() if row[3] < row[4]]
    assert failing == [], failing


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_rendered_text_meets_wcag_aa_in_both_themes(browser, fake, settings_for, serve, scheme):
    """What Chromium actually paints: each text's colour against the first opaque background behind it."""
    from chatproxy import create_app

    url = serve(create_app(settings_for(CHATPROXY_DEMO=True)))
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme=scheme)
    try:
        tab = ctx.new_page()
        seen = watch(tab)
        fake.script(
            Reply(
                content="## Head\n\n> quoted [link](https://example.com/x) `code`\n\n| a |\n|---|\n| b |\n\n"
                "```py\nx = 1\n```\n\n[https://a.example](https://b.example/)"
            ),
            Reply(status=400),
        )
        open_chat(tab, url)
        ask(tab, "Show me everything")
        wait_state(tab, "done")
        ask(tab, "And an error")
        wait_state(tab, "error")
        tab.locator("#prompt").fill("")
        ratios = tab.evaluate("""() => {
          const parse = (c) => c.match(/[\\d.]+/g).map(Number);
          const lum = ([r, g, b]) => [r, g, b].map((v) => { v /= 255; return v <= 0.04045 ? v / 12.92
            : ((v + 0.055) / 1.055) ** 2.4; }).reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
          const ratio = (a, b) => {
            const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p);
            return (x + 0.05) / (y + 0.05);
          };
          const background = (el) => {
            for (let node = el; node; node = node.parentElement) {
              const c = parse(getComputedStyle(node).backgroundColor);
              if (c.length < 4 || c[3] === 1) return c.slice(0, 3);
            }
            return [255, 255, 255];
          };
          const selectors = ['.answer p', '.answer h3', '.answer blockquote p', '.answer a', '.link-host', '.answer th',
            '.answer td', '.answer :not(pre) > code', '.answer pre code', '.code-lang', '.code-copy', '.meta .usage',
            '.meta .copy', '.meta .regenerate', '.error-text', '.msg-user .bubble', '.hint', '.banner', '.brand',
            '.control-label', '#model', '#new-chat', '#send', '#prompt', '.conv-open', '.sidebar-title',
            '.storage-note'];
          const out = selectors.map((s) => {
            const el = document.querySelector(s);
            if (!el) return [s, null];
            return [s, Math.round(ratio(parse(getComputedStyle(el).color).slice(0, 3), background(el)) * 100) / 100];
          });
          const prompt = document.getElementById('prompt');
          out.push(['#prompt::placeholder', Math.round(ratio(parse(getComputedStyle(prompt, '::placeholder').color)
            .slice(0, 3), background(prompt)) * 100) / 100]);
          return out;
        }""")
        missing = [s for s, r in ratios if r is None]
        assert missing == [], f"nothing on the page matches {missing}"
        low = [(s, r) for s, r in ratios if r < 4.5]
        assert low == [], f"{scheme}: text below 4.5:1: {low}"
        assert seen.page_errors == []
        # Chromium itself logs the refused request; the page's script logs nothing.
        assert [e for e in seen.console_errors if not e.startswith("Failed to load resource")] == []
    finally:
        ctx.close()


# ---------------------------------------------------------------- keyboard and focus


def test_shortcuts_for_new_chat_and_the_input(page, fake, live_url):
    open_chat(page, live_url)
    ask(page, "First question")
    wait_state(page, "done")
    expect = pytest.importorskip("playwright.sync_api").expect
    expect(page.locator("#new-chat")).to_have_attribute("aria-keyshortcuts", "Control+Shift+O Meta+Shift+O")

    page.locator("#conversations .conv-open").first.focus()
    page.keyboard.press("Shift+Escape")
    expect(page.locator("#prompt")).to_be_focused()

    page.locator("#model").focus()
    page.keyboard.press("Control+Shift+O")
    expect(page.locator("#transcript .msg")).to_have_count(0)
    expect(page.locator("#prompt")).to_be_focused()

    page.locator("#new-chat").focus()
    page.keyboard.press("/")
    expect(page.locator("#prompt")).to_be_focused()
    expect(page.locator("#prompt")).to_have_value("")  # the slash only moved focus
    page.keyboard.type("a/b")
    expect(page.locator("#prompt")).to_have_value("a/b")  # inside the input it is just a character
    page.keyboard.press("Control+Shift+O")
    expect(page.locator("#prompt")).to_have_value("")
    expect(page.locator("#conversations .conv-open")).to_have_text(["First question"])


def test_focus_returns_to_the_input_after_send_and_stop(page, fake, live_url):
    expect = pytest.importorskip("playwright.sync_api").expect
    fake.script(
        Reply(chunks=[f"w{i} " for i in range(100)], pace=0.05), Reply(chunks=[f"v{i} " for i in range(100)], pace=0.05)
    )
    open_chat(page, live_url)
    page.locator("#prompt").fill("Count")
    page.locator("#send").click()  # the button hides while the answer streams: focus must not be lost
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#prompt")).to_be_focused()
    expect(answers(page).last.locator(".answer")).to_contain_text("w2")
    page.locator("#stop").click()
    wait_state(page, "stopped")
    expect(page.locator("#prompt")).to_be_focused()

    page.keyboard.type("Again")
    page.keyboard.press("Enter")
    expect(answers(page).last.locator(".answer")).to_contain_text("v2")
    page.keyboard.press("Escape")  # Esc in the input stops too
    wait_state(page, "stopped")
    expect(page.locator("#prompt")).to_be_focused()
    expect(questions(page)).to_have_text(["Count", "Again"])


def test_every_control_shows_visible_focus(page, fake, live_url):
    fake.script(
        Reply(content="See [docs](https://example.com/) and:\n\n```sh\nls\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    )
    open_chat(page, live_url)
    ask(page, "Focus test")
    wait_state(page, "done")
    targets = [
        "#prompt",
        "#send",
        "#model",
        "#new-chat",
        "#conversations .conv-open",
        "#conversations .conv-rename",
        ".msg-user .edit",
        ".answer a",
        ".code-copy",
        ".table-wrap",
        ".meta .regenerate",
        ".meta .copy",
    ]
    seen = {}
    for selector in targets:
        page.locator(selector).first.focus()
        page.keyboard.press("Shift+Tab")  # arrive by keyboard, so :focus-visible applies
        page.keyboard.press("Tab")
        seen[selector] = page.evaluate("""() => { const el = document.activeElement, s = getComputedStyle(el);
            return [el.matches(':focus-visible'), s.outlineStyle, parseFloat(s.outlineWidth), s.outlineColor,
                    getComputedStyle(el, '::after').content]; }""")
    accent = page.evaluate("() => getComputedStyle(document.getElementById('send')).backgroundColor")
    bad = {s: v for s, v in seen.items() if not (v[0] and v[1] == "solid" and v[2] >= 2 and v[3] == accent)}
    assert bad == {}, bad
    assert seen[".answer a"][4] == '"https://example.com/"'  # a focused link says where it goes, like on hover


def test_live_regions_for_the_streaming_answer_and_the_status(page, fake, live_url):
    expect = pytest.importorskip("playwright.sync_api").expect
    fake.script(Reply(chunks=[f"w{i} " for i in range(30)], pace=0.05))
    open_chat(page, live_url)
    expect(page.locator("#transcript")).to_have_attribute("aria-live", "polite")
    expect(page.locator("#note")).to_have_attribute("role", "status")
    expect(page.locator("#countdown")).to_have_attribute("role", "timer")
    ask(page, "Stream")
    wait_state(page, "streaming")
    expect(answers(page).last).to_have_attribute("aria-busy", "true")  # read once it is complete, not word by word
    wait_state(page, "done")
    expect(answers(page).last).to_have_attribute("aria-busy", "false")
    expect(page.locator("#transcript")).to_have_attribute("aria-busy", "false")
    for selector in ("#sidebar-toggle", "#new-chat", ".msg-user .edit", ".meta .copy", "#conversations .conv-rename"):
        name = page.locator(selector).first.evaluate("(el) => el.getAttribute('aria-label') || el.textContent.trim()")
        assert name, f"{selector} has no accessible name"


# ---------------------------------------------------------------- the drawer at 360 px


def test_the_conversation_list_is_a_drawer_at_360_px(browser, fake, live_url):
    expect = pytest.importorskip("playwright.sync_api").expect
    ctx = browser.new_context(viewport=MOBILE, has_touch=True)
    try:
        tab = ctx.new_page()
        seen = watch(tab)
        open_chat(tab, live_url)
        ask(tab, "Phone question one")
        wait_state(tab, "done")
        tab.locator("#new-chat").click()
        ask(tab, "Phone question two")
        wait_state(tab, "done")

        sidebar, toggle = tab.locator("#sidebar"), tab.locator("#sidebar-toggle")
        expect(sidebar).to_be_hidden()
        expect(toggle).to_be_visible()
        expect(toggle).to_have_attribute("aria-expanded", "false")
        width = tab.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert width[0] <= width[1], width
        for control in ("#sidebar-toggle", "#model", "#new-chat", "#prompt", "#send"):
            box = tab.locator(control).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= MOBILE["width"], control

        toggle.click()
        expect(sidebar).to_be_visible()
        expect(toggle).to_have_attribute("aria-expanded", "true")
        expect(tab.locator("#conversations .conv-open").first).to_be_focused()  # the open one
        expect(tab.locator("#conversations .conv-rename").first).to_be_visible()  # no hover on a phone
        tab.keyboard.press("Escape")
        expect(sidebar).to_be_hidden()
        expect(toggle).to_be_focused()

        toggle.click()
        tab.locator("#conversations .conv-open").nth(1).click()
        expect(sidebar).to_be_hidden()
        expect(questions(tab)).to_have_text(["Phone question one"])
        toggle.click()
        tab.locator("#scrim").click(position={"x": 340, "y": 400})
        expect(sidebar).to_be_hidden()
        assert seen.page_errors == [] and seen.console_errors == []
    finally:
        ctx.close()


if __name__ == "__main__":
    width = max(len(f"{fg} on {bg}") for fg, bg, _ in PAIRS)
    for theme, fg, bg, ratio, minimum in contrast_table():
        print(f"{theme:5}  {fg + ' on ' + bg:{width}}  {ratio:5.2f}:1  (needs {minimum}:1)", file=sys.stdout)
