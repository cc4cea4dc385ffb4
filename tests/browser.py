"""Launching the system Chromium for the browser tests, and watching a page for errors and dialogs."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("CHATPROXY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MISSING = (
    f"Chromium not found at {CHROMIUM}: install the Debian package `chromium` "
    "(apt-get install chromium), or set CHATPROXY_CHROMIUM to its path. "
    "Never `playwright install`: the tests drive the system browser."
)


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    path = Path(CHROMIUM)
    if path.is_file() and os.access(path, os.X_OK):
        return None
    if shutil.which(CHROMIUM):
        return None
    return MISSING


def must_run() -> bool:
    """In CI (or when asked) a missing browser is a failure, not a skip that hides it."""
    return bool(os.environ.get("CI") or os.environ.get("CHATPROXY_REQUIRE_BROWSER"))


def launch(playwright: Any) -> Any:
    """Start the system Chromium headless with the flags that keep it quiet and offline."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@dataclass
class Watch:
    """What a page reported while a test ran: console errors, uncaught exceptions and dialogs."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


def watch(page: Any) -> Watch:
    """Record console errors, uncaught exceptions and dialogs (which are dismissed) on `page`."""
    seen = Watch()

    def on_console(msg: Any) -> None:
        if msg.type == "error":
            seen.console_errors.append(msg.text)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: seen.page_errors.append(str(exc)))

    def on_dialog(dialog: Any) -> None:
        seen.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    return seen


# ---------------------------------------------------------------- shared by the page tests (tests/test_page*.py)
# The browser, context and page fixtures are in tests/conftest.py.

DESKTOP = {"width": 1280, "height": 800}
MOBILE = {"width": 360, "height": 740}


def open_chat(page: Any, url: str) -> None:
    """Load the page and wait until its script has wired everything up."""
    from playwright.sync_api import expect

    page.goto(url + "/")
    expect(page.locator("#app")).to_have_attribute("data-ready", "true")


def ask(page: Any, text: str) -> None:
    """Type a question and press Enter, as a user would."""
    page.locator("#prompt").fill(text)
    page.locator("#prompt").press("Enter")


def answers(page: Any) -> Any:
    """Every assistant answer in the transcript."""
    return page.locator("#transcript .msg-assistant")


def questions(page: Any) -> Any:
    """Every question bubble in the transcript."""
    return page.locator("#transcript .msg-user .bubble")


def wait_state(page: Any, state: str, index: int = -1, timeout: float = 5000) -> None:
    """Wait until an answer (default: the last) reaches `state`."""
    from playwright.sync_api import expect

    locator = answers(page).nth(index) if index >= 0 else answers(page).last
    expect(locator).to_have_attribute("data-state", state, timeout=timeout)


def answer_text(page: Any, index: int = -1) -> str:
    """The visible text of an answer (default: the last)."""
    locator = answers(page).nth(index) if index >= 0 else answers(page).last
    return locator.locator(".answer").inner_text()


def assert_ready(page: Any) -> None:
    """The composer is ready for the next question."""
    from playwright.sync_api import expect

    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#prompt")).to_be_enabled()
    expect(page.locator("#stop")).to_be_hidden()
