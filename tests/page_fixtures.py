"""The browser, context and page fixtures of the page tests: `pytest_plugins = ["tests.page_fixtures"]`.

A plugin module rather than conftest.py, so only the modules that drive Chromium load them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser import DESKTOP, chromium_missing, launch, must_run, watch


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One system Chromium for the whole module."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)"
    )
    missing = chromium_missing()
    if missing:
        if must_run():
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_api.sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    """A fresh browser profile (so empty localStorage) at desktop size."""
    ctx = browser.new_context(viewport=DESKTOP)
    ctx.set_default_timeout(5000)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: Any) -> Iterator[Any]:
    """A page whose console errors, uncaught exceptions and dialogs are recorded in `page.seen`."""
    tab = context.new_page()
    tab.seen = watch(tab)
    yield tab
    assert tab.seen.page_errors == [], f"uncaught exceptions in the page: {tab.seen.page_errors}"
    assert tab.seen.dialogs == [], f"the page opened dialogs: {tab.seen.dialogs}"
