"""Fixtures: the loopback fake upstream, the app pointed at it, a test client and a live server; the ledger's
databases, the test Redis, and the browser of the page tests. Plain helpers are in tests/helpers.py."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask import Flask
from werkzeug.serving import make_server

from chatproxy import create_app
from chatproxy.demo.upstream import FakeOpenAI
from tests.browser import DESKTOP, chromium_missing, launch, must_run, watch
from tests.helpers import LIVING_MODELS, REDIS_URL, TEST_KEY, postgres_schema_url


@pytest.fixture(scope="session")
def _fake_server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(_fake_server: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """The fake upstream, with no calls, scripts or rules left from other tests."""
    _fake_server.reset()
    yield _fake_server
    _fake_server.reset()


@pytest.fixture
def settings_for(fake: FakeOpenAI, tmp_path):
    """Build a test_config pointed at the fake, with its own ledger database, with overrides."""

    def make(**overrides: object) -> dict[str, object]:
        config: dict[str, object] = {
            "TESTING": True,
            "OPENAI_API_KEY": TEST_KEY,
            "OPENAI_BASE_URL": fake.base_url,
            "CHATPROXY_MAX_RETRIES": 0,
            "CHATPROXY_READ_TIMEOUT": 5,
            "CHATPROXY_SECRET_KEY": "test-secret-key",
            "CHATPROXY_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
            # Proxy behaviour tests call as anonymous; tests/test_guards.py turns access control back on.
            "CHATPROXY_ALLOW_ANONYMOUS": True,
            "CHATPROXY_RATE_LIMIT_ANONYMOUS": "100000/minute",
            "CHATPROXY_RATE_LIMIT_PAGE": "100000/minute",
            "CHATPROXY_MAX_STREAMS": 1000,
            # The test client never closes a streamed response it was not asked to, so its slots stay taken.
            "CHATPROXY_MAX_CONCURRENT": 1000,
            "CHATPROXY_MAX_CONCURRENT_PER_IP": 1000,
            "CHATPROXY_THREADS": 1000,
            "CHATPROXY_RATE_LIMIT_SESSIONS": "100000/minute",
            "CHATPROXY_MODEL_TABLE": LIVING_MODELS,
        }
        config.update(overrides)
        return config

    return make


@pytest.fixture
def app(settings_for) -> Flask:
    """An app talking to the fake upstream, SDK retries off unless a test turns them on."""
    return create_app(settings_for())


@pytest.fixture
def client(app: Flask):
    """Flask's test client for `app`."""
    return app.test_client()


@pytest.fixture
def serve():
    """Serve an app on a real loopback port in a thread; returns its base URL."""
    servers = []

    def start(app: Flask) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def live_url(app: Flask, serve) -> str:
    """`app` served on a real loopback port."""
    return serve(app)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """The same test on a SQLite file (one host) and on a private PostgreSQL schema (many hosts)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        with postgres_schema_url() as url:
            yield url


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    """A client for the test Redis; skips (which fails under CI=true) when none is running."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip(f"needs a Redis server at TEST_REDIS_URL={REDIS_URL} (Debian: redis-server)")
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test:chatproxy:{uuid.uuid4().hex}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=prefix + "*"))
    if keys:
        redis_client.delete(*keys)


# --- the page tests' browser: system Chromium driven by Playwright ---------------------------------------------


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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With CI=true a skipped test fails the run: a missing tool must not hide behind a skip."""
    if os.environ.get("CI", "").lower() not in {"1", "true", "yes"}:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and exitstatus == 0:
        reporter.write_line(f"CI=true: {len(skipped)} skipped test(s) count as failures.", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
