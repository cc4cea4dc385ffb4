"""Fixtures: the loopback fake upstream, the app pointed at it, a test client and a live server."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from flask import Flask
from werkzeug.serving import make_server

from chatproxy import create_app
from chatproxy.demo.upstream import FakeOpenAI

TEST_KEY = "sk-test-0123456789abcdefghijklmnopqrstuvwxyz"


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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With CI=true a skipped test fails the run: a missing tool must not hide behind a skip."""
    if os.environ.get("CI", "").lower() not in {"1", "true", "yes"}:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and exitstatus == 0:
        reporter.write_line(f"CI=true: {len(skipped)} skipped test(s) count as failures.", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
