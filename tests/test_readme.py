"""The README, walked as a newcomer would on a fresh clone: every command runs as written.

On a fresh copy of the project: `cp .env.example .env`, two tokens from `new-token` with each printed
line put in .env, `make run`'s server (devserver.py, the offline demo), then every `curl` and every
`python -m chatproxy` command of the README and its Python example, read from README.md itself so that
the README cannot drift from what works. Only the port is changed (5000 may be taken on a test machine).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from dotenv import dotenv_values

from tests.fresh_copy import clean_env, fresh_copy, run
from tests.helpers import ROOT, free_port

README = (ROOT / "README.md").read_text(encoding="utf-8")
CLI = ".venv/bin/python -m chatproxy"
PLACEHOLDER_BATCH = "batch_3f9c..."  # an id the README cannot know; the CLI tests cover status and results
DEMO_ANSWER = "This answer comes from the offline demo upstream"


def blocks(language: str, text: str = README) -> list[str]:
    """The code blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def section(title: str) -> str:
    """One `## ` section of the README."""
    return re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.M | re.S).group(1)


def commands(block: str) -> list[str]:
    """The shell commands of a block: continuation lines and multi-line quotes joined, comment lines dropped."""
    found, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line + "\n"
        if not line.endswith("\\") and current.count("'") % 2 == 0:
            found.append(current.strip())
            current = ""
    assert not current, f"unfinished command in the README: {current!r}"
    return found


def readme_commands(*prefixes: str) -> list[str]:
    """Every README shell command that starts with one of `prefixes`, in order."""
    return [command for block in blocks("sh") for command in commands(block) if command.startswith(prefixes)]


def put_line(env_file: Path, line: str) -> None:
    """Do what the README says with new-token's line: it replaces any CHATPROXY_API_TOKENS line in .env."""
    kept = [
        old for old in env_file.read_text(encoding="utf-8").splitlines() if not old.startswith("CHATPROXY_API_TOKENS=")
    ]
    env_file.write_text("\n".join([*kept, line]) + "\n", encoding="utf-8")


def test_env_example_sets_nothing_but_the_key() -> None:
    """Copied to .env, it must not set anything `make run` decides for itself (anonymous calls on loopback)."""
    assert dotenv_values(ROOT / ".env.example") == {"OPENAI_API_KEY": ""}


def test_readme_commands_are_the_ones_that_run() -> None:
    """No README command needs a `flask` on the PATH or a virtualenv the README never made."""
    flask = [command for block in blocks("sh") for command in commands(block) if command.startswith("flask")]
    assert flask == []
    assert len(readme_commands(CLI)) >= 8  # init-db, usage (3), new-token, batch (4), --help


@pytest.fixture
def walk(tmp_path: Path):
    """A fresh copy after the Quick start's `cp .env.example .env`, and a way to start `make run`'s server there."""
    root = fresh_copy(tmp_path / "chatproxy")
    [copy] = [c for block in blocks("sh", section("Quick start")) for c in commands(block) if c.startswith("cp ")]
    assert copy.startswith("cp .env.example .env")
    assert run(root, ["bash", "-c", copy], clean_env()).returncode == 0
    servers: list[subprocess.Popen[str]] = []

    def serve(env: dict[str, str]) -> tuple[int, subprocess.Popen[str]]:
        port = free_port()
        server = subprocess.Popen(
            [".venv/bin/python", "devserver.py", "--port", str(port)],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        servers.append(server)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    return port, server
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"make run's server did not come up: {server.communicate(timeout=5)}")

    yield root, serve
    for server in servers:
        if server.poll() is None:
            server.terminate()
            server.communicate(timeout=10)


def test_the_readme_works_as_written_on_a_fresh_clone(walk) -> None:
    if shutil.which("curl") is None:
        pytest.skip("the README's examples need curl (Debian package curl; `make test` installs it as root)")
    root, serve = walk
    env = clean_env()
    # Access control: a token for the curl examples, then a second one as the README adds it.
    tokens = []
    for name in ("readme-curl", "readme-sdk"):
        minted = run(root, [*CLI.split(), "new-token", name], env)
        assert minted.returncode == 0, minted.stderr
        tokens.append(re.search(r"shown once\): (\S+)", minted.stdout).group(1))
        put_line(root / ".env", minted.stdout.splitlines()[-1])
    port, server = serve(env)
    env["CHATPROXY_TOKEN"] = tokens[1]  # the README's /v1 examples read it from the environment

    for command in readme_commands("curl "):
        if PLACEHOLDER_BATCH in command:
            continue
        line = command.replace("localhost:5000", f"localhost:{port}").replace("cpx_...", tokens[0])
        done = run(root, ["bash", "-c", line.replace("curl ", "curl -w '\\n%{http_code}' ", 1)], env, timeout=60)
        body, _, status = done.stdout.rpartition("\n")
        if "admin tokens only" in command:  # as documented: readme-curl is not an admin token
            assert status == "403", (command, body)
            continue
        assert status in {"200", "202"}, (command, status, body)
        if " -N " in command:
            assert any(end in body for end in ('"type":"done"', "data: [DONE]", "event: response.completed")), body
        else:
            assert json.loads(body).get("error") is None, (command, body)  # a response object has "error": null

    [example] = blocks("python", section("OpenAI-compatible endpoint"))
    sdk = run(root, [".venv/bin/python", "-c", example.replace("127.0.0.1:5000", f"127.0.0.1:{port}")], env)
    assert sdk.returncode == 0, sdk.stderr
    reply, streamed, usage = sdk.stdout.splitlines()
    assert reply.startswith(DEMO_ANSWER) and streamed == reply  # the streamed text, and no "None" after it
    assert re.fullmatch(r"\(\d+ tokens\)", usage)
    [example] = blocks("python", section("The Responses API"))
    sdk = run(root, [".venv/bin/python", "-c", example.replace("127.0.0.1:5000", f"127.0.0.1:{port}")], env)
    assert sdk.returncode == 0, sdk.stderr
    reply, streamed, usage, vectors = sdk.stdout.splitlines()
    assert reply.startswith(DEMO_ANSWER) and streamed == reply
    assert re.fullmatch(r"\(\d+ tokens\)", usage) and vectors == "2 embeddings"

    def run_block(block: list[str]) -> list[tuple[str, subprocess.CompletedProcess[str]]]:
        return [(command, run(root, ["bash", "-c", command], env)) for command in block]

    # Each README block's commands in order (printf writes the batch example's prompts.csv), blocks side by side.
    cli_blocks = [
        [c for c in commands(block) if c.startswith((CLI, "printf ")) and PLACEHOLDER_BATCH not in c]
        for block in blocks("sh")
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        ran = [done for results in pool.map(run_block, filter(None, cli_blocks)) for done in results]
    assert len(ran) >= 8
    for command, done in ran:
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, command
    assert DEMO_ANSWER in (root / "results.jsonl").read_text(encoding="utf-8")

    server.terminate()
    _, log = server.communicate(timeout=10)
    assert '"logger": "werkzeug"' in log
    assert "\\u001b" not in log and "\x1b" not in log  # JSON log lines without terminal colour codes
