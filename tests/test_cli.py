"""The command line, `python -m chatproxy`: the offline demo without a key, one-line errors, `new-token`, `make run`.

Commands run in-process through click's runner where that shows the behaviour, and as real processes in a
fresh copy of the project where the entry point itself is the point.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from chatproxy import create_app
from chatproxy.callers import hash_token
from chatproxy.cli import build, new_token
from tests.fresh_copy import clean_env, fresh_copy, run
from tests.helpers import free_port

CHAT = {"message": "hi"}
BAD_SETTING = "chatproxy: CHATPROXY_MAX_TOKENS must be an integer from 1 to 128000; got 'abc'."
DEMO_ANSWER = "This answer comes from the offline demo upstream"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the project: no .env, no ledger yet."""
    return fresh_copy(tmp_path_factory.mktemp("clone"))


@pytest.fixture
def no_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No OPENAI_API_KEY (the offline demo's normal state) and a ledger of this test's own; the ledger's path."""
    monkeypatch.setenv("OPENAI_API_KEY", "")  # the environment wins over any .env
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "")
    monkeypatch.setenv("CHATPROXY_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    return tmp_path / "ledger.db"


# --- new-token -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a,b=c", "a=b", "billing service", "x" * 65, "", "naïve", "a;b"])
def test_new_token_refuses_a_name_that_start_up_would_reject(monkeypatch, name: str) -> None:
    monkeypatch.setenv("CHATPROXY_API_TOKENS", "")
    result = CliRunner().invoke(new_token, [name])

    assert result.exit_code == 2
    assert "1 to 64 letters, digits, '.', '_' or '-'" in result.output
    assert "cpx_" not in result.output


def test_new_token_refuses_a_name_that_already_has_a_token(monkeypatch) -> None:
    monkeypatch.setenv("CHATPROXY_API_TOKENS", f"billing={hash_token('cpx-old')}")
    result = CliRunner().invoke(new_token, ["billing"])

    assert result.exit_code == 1
    assert "already has a token named 'billing'" in result.output and "new name" in result.output
    assert "cpx_" not in result.output


def test_new_token_prints_the_whole_setting_line_and_both_tokens_then_work(monkeypatch, settings_for, fake) -> None:
    monkeypatch.setenv("CHATPROXY_API_TOKENS", f"alice={hash_token('cpx-alice-token')}")
    result = CliRunner().invoke(new_token, ["bob.ci-2"])

    assert result.exit_code == 0, result.output
    token = re.search(r"token \(give it to the client, shown once\): (cpx_\S+)", result.output).group(1)
    name, _, value = result.output.splitlines()[-1].partition("=")
    assert name == "CHATPROXY_API_TOKENS"
    assert value == f"alice={hash_token('cpx-alice-token')},bob.ci-2={hash_token(token)}"
    client = create_app(settings_for(CHATPROXY_ALLOW_ANONYMOUS=False, CHATPROXY_API_TOKENS=value)).test_client()
    for secret in ("cpx-alice-token", token):
        response = client.post("/api/chat", json=CHAT, headers={"Authorization": f"Bearer {secret}"})
        assert response.status_code == 200, response.get_json()


# --- commands without a key: the offline demo --------------------------------------------------------------------


def test_ledger_commands_run_without_a_key(no_key: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(build(), ["init-db"])
    report = runner.invoke(build(), ["usage", "--json"])

    assert created.exit_code == 0, created.output
    assert f"Ledger ready at sqlite:///{no_key}" in created.stdout
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["totals"]["requests"] == 0
    assert "OFFLINE DEMO" in report.stderr  # said on stderr, so stdout stays data


def test_batch_submit_in_the_demo_waits_and_writes_the_results(no_key: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("custom_id,message\nq1,Name a colour.\nq2,FAIL this one\n", encoding="utf-8")

    result = CliRunner().invoke(build(), ["batch", "submit", str(prompts)])

    assert result.exit_code == 0, result.output
    batch_id, *lines = result.stdout.splitlines()
    results = [json.loads(line) for line in lines]
    assert batch_id.startswith("batch_")
    assert results[0]["custom_id"] == "q1" and DEMO_ANSWER in results[0]["content"]
    assert results[1] == {
        "custom_id": "q2",
        "error": {"code": "upstream_rejected", "message": "The model provider refused this request."},
    }
    assert "Offline demo" in result.stderr and "completed" in result.stderr
    engine = sa.create_engine(f"sqlite:///{no_key}")
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT identity FROM ledger WHERE request_id = ?", (batch_id,)).all()
        reserved = conn.exec_driver_sql("SELECT SUM(reserved_micros) FROM budget_counters").scalar()
    engine.dispose()
    assert [row.identity for row in rows] == ["cli:local", "cli:local"]  # recorded: nothing left unsettled
    assert reserved == 0


def test_a_demo_batch_cannot_be_read_by_a_later_command_and_it_says_why(no_key: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("custom_id,message\nq1,hello\n", encoding="utf-8")
    batch_id = CliRunner().invoke(build(), ["batch", "submit", str(prompts)]).stdout.splitlines()[0]

    later = CliRunner().invoke(build(), ["batch", "results", batch_id])  # a new command: a new demo upstream

    assert later.exit_code == 1
    assert "offline demo: a batch lives only while the `batch submit` that made it runs" in later.output
    assert "Traceback" not in later.output


# --- the real entry points ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        [".venv/bin/python", "-m", "chatproxy", "usage"],
        [".venv/bin/python", "-m", "chatproxy", "batch", "status", "batch_x"],
        [".venv/bin/python", "devserver.py", "--port", "0"],
    ],
)
def test_a_bad_setting_is_the_same_one_line_for_the_cli_and_make_run(project: Path, command: list[str]) -> None:
    if command[1] == "devserver.py":
        command[-1] = str(free_port())
    result = run(project, command, clean_env(CHATPROXY_MAX_TOKENS="abc"))

    assert result.returncode == 1
    assert result.stderr == BAD_SETTING + "\n"
    assert "chatproxy on" not in result.stdout


def test_new_token_needs_no_key_and_no_valid_settings(project: Path) -> None:
    result = run(
        project, [".venv/bin/python", "-m", "chatproxy", "new-token", "ci-bot"], clean_env(CHATPROXY_MAX_TOKENS="abc")
    )

    assert result.returncode == 0, result.stderr
    assert re.search(r"^CHATPROXY_API_TOKENS=ci-bot=sha256:[0-9a-f]{64}$", result.stdout, re.M)
    assert result.stderr == ""  # no app was built: no demo upstream, no warnings


def test_make_run_on_a_busy_port_says_so_in_one_line(project: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(project, [".venv/bin/python", "devserver.py", "--port", str(port)], clean_env(), timeout=60)

    assert result.returncode == 1
    assert result.stdout == ""  # in particular no "chatproxy on http://..."
    assert result.stderr == (
        f"chatproxy: port {port} on 127.0.0.1 is already in use (another `make run`?). "
        "Stop that server or pick another port: PORT=8000 make run\n"
    )
