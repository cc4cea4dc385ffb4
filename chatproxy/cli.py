"""The command line, `.venv/bin/python -m chatproxy COMMAND`: init-db, usage, new-token, batch.

It builds the app the way `make run` does (the offline demo stands in for a missing key, a bad
setting is one line and exit 1). `new-token` needs no app at all. On a server with its settings in
the environment, `flask --app chatproxy COMMAND` runs the same commands on the production app.
"""

from __future__ import annotations

import logging
import secrets

import click
from flask import Flask
from flask.cli import FlaskGroup

from . import logs
from .commands import new_token
from .config import EPHEMERAL_SECRET, ROOT, raw_settings
from .demo.app import create_dev_app


def cli_app() -> Flask:
    """The app for a command: .env and the environment, the demo upstream when no key is set."""
    overrides: dict[str, object] = {}
    if not raw_settings(ROOT / ".env")["CHATPROXY_SECRET_KEY"].strip():
        overrides["CHATPROXY_SECRET_KEY"] = secrets.token_hex(32)  # a command serves no page sessions
        overrides[EPHEMERAL_SECRET] = True
    return create_dev_app(overrides, say=lambda text: click.echo(text, err=True))


def build() -> FlaskGroup:
    """The command group: the app's commands (built by cli_app) and new-token."""
    group = FlaskGroup(
        name="chatproxy",
        create_app=cli_app,
        add_default_commands=False,
        load_dotenv=False,
        add_version_option=False,
        help="chatproxy's commands; run them from the project directory. See README.md.",
    )
    group.params = [p for p in group.params if p.name not in {"app", "env_file", "debug"}]  # cli_app decides
    group.add_command(new_token)  # on the group itself: it runs without building the app
    return group


def main() -> None:
    """Run the command line."""
    logs.configure()
    logging.getLogger().setLevel(logging.WARNING)  # each command says what it did; INFO lines would repeat it
    build().main(prog_name="python -m chatproxy")
