"""Plain helpers the test modules share: ports, databases, real gunicorn and nginx, the page's CSRF token.

Fixtures are in conftest.py; reading an SSE stream is sse.py, the browser browser.py, nginx nginx_site.py,
a fresh clone fresh_copy.py.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests import nginx_site

ROOT = Path(__file__).resolve().parent.parent
TEST_KEY = "sk-test-0123456789abcdefghijklmnopqrstuvwxyz"  # the upstream key of the apps the fixtures build
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
# A structured-output request: a city as strict JSON (the fake answers with an example of the schema).
CITY_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
            "required": ["name", "population"],
            "additionalProperties": False,
        },
    },
}


def described(chars: int) -> dict:
    """CITY_FORMAT with a json_schema.description of `chars` characters."""
    return {"type": "json_schema", "json_schema": {**CITY_FORMAT["json_schema"], "description": "d" * chars}}


def free_port() -> int:
    """A loopback port nobody listens on right now (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def postgres_schema_url() -> Iterator[str]:
    """A URL whose connections use a fresh schema of TEST_DATABASE_URL (dropped afterwards); skip if unreachable."""
    admin = sa.create_engine(PG_URL)
    schema = f"chatproxy_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL at TEST_DATABASE_URL is not reachable ({type(exc.orig).__name__})")
    url = sa.make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def process_context() -> multiprocessing.context.BaseContext:
    """Fresh worker processes that share nothing with pytest's (no inherited connections, threads or locks).

    A forkserver imports the heavy modules once; each worker is then a cheap fork of it.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["chatproxy.usage", "chatproxy.budget", "tests.test_usage", "tests.test_budget"])
    return ctx


def page_session(client: Any) -> str:
    """Load the page with Flask's test client like a browser would; its CSRF token."""
    html = client.get("/").get_data(as_text=True)
    return re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)


# --- servers in subprocesses: gunicorn and nginx ---------------------------------------------------------------


@dataclass
class Server:
    """A running server process, its port, the settings it was started with and every line it printed."""

    process: subprocess.Popen
    port: int
    output: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    def json_lines(self) -> list[dict]:
        """The printed lines, each parsed as JSON (fails the test on a line that is not)."""
        return [json.loads(line) for line in self.output if line.strip()]

    def stop(self) -> None:
        """SIGTERM, then wait."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def collect_output(process: subprocess.Popen, output: list[str]) -> None:
    """Append each line `process` prints to `output`, from a thread (so its pipe never fills up)."""
    threading.Thread(target=lambda: output.extend(line.decode() for line in process.stdout), daemon=True).start()


def wait_for_port(port: int, process: subprocess.Popen, output: list[str], timeout: float = 30) -> None:
    """Block until `process` listens on `port`; raise with what it printed if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n" + "\n".join(output))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("did not start listening:\n" + "\n".join(output))


def need_nginx() -> None:
    """Skip (which fails the run under CI=true) when nginx is missing, naming the Debian package."""
    if not os.path.exists(nginx_site.NGINX):
        pytest.skip("nginx is not installed: apt-get install nginx-light (Debian package)")


def start_nginx(tmp: Path, upstream_port: int) -> Server:
    """nginx from the Debian package, with deploy/nginx.conf's upstream and proxy directives, without TLS."""
    need_nginx()
    port = free_port()
    conf = nginx_site.write_conf(tmp, upstream_port, port)
    process = subprocess.Popen(nginx_site.argv(tmp, conf), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = Server(process, port)
    collect_output(process, server.output)
    wait_for_port(port, process, server.output)
    return server


# The suite's models do not retire while it runs: gpt-4o and gpt-4o-mini shut down on 2027-01-14, and start-up
# refuses a model past its shutdown. Tests of retirement set their own dates (tests/test_model_capabilities.py).
LIVING_MODELS = json.dumps({"gpt-4o": {"shutdown": None}, "gpt-4o-mini": {"shutdown": None}})


def worker_class() -> dict[str, str]:
    """The gunicorn worker class this test run asked for (`CHATPROXY_WORKER_CLASS=gthread pytest ...`), if any."""
    chosen = os.environ.get("CHATPROXY_WORKER_CLASS")
    return {"CHATPROXY_WORKER_CLASS": chosen} if chosen else {}


def environment(settings: dict[str, str]) -> dict[str, str]:
    """This process's environment without chatproxy's settings (nor a metrics folder), plus `settings`.

    The run's worker class is kept: the Makefile runs the server tests once per worker class.
    """
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k != "PROMETHEUS_MULTIPROC_DIR" and not k.startswith(("CHATPROXY_", "OPENAI_", "AZURE_OPENAI_"))
    }
    return {**inherited, "CHATPROXY_MODEL_TABLE": LIVING_MODELS, **worker_class(), **settings}


def start_gunicorn(settings: dict[str, str], *args: str, cwd: Path = ROOT) -> Server:
    """`gunicorn -c gunicorn.conf.py` from `cwd`, flags in `args`, with exactly `settings`; once a worker answers.

    It binds a free loopback port unless `settings` names CHATPROXY_BIND. Stop it with `Server.stop()`.
    """
    settings = {"CHATPROXY_BIND": f"127.0.0.1:{free_port()}", **settings}
    port = int(settings["CHATPROXY_BIND"].rpartition(":")[2])
    process = subprocess.Popen(
        [*GUNICORN, *args], cwd=cwd, env=environment(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    server = Server(process, port, settings=settings)
    collect_output(process, server.output)
    wait_for_port(port, process, server.output)
    _wait_for_a_worker(server)
    return server


def _wait_for_a_worker(server: Server, timeout: float = 60) -> None:
    """Block until a worker answers: workers import Flask and the SDK first, seconds on a busy machine."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        conn.getresponse().read()
    except OSError as exc:
        server.process.kill()
        raise RuntimeError(f"no worker answered ({exc}):\n" + "\n".join(server.output)) from None
    finally:
        conn.close()
