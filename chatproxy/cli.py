"""The command line, `.venv/bin/python -m chatproxy COMMAND`: init-db, usage, new-token, batch.

It builds the app the way `make run` does (the offline demo stands in for a missing key, a bad
setting is one line and exit 1). `new-token` needs no app at all. On a server with its settings in
the environment, `flask --app chatproxy COMMAND` runs the same commands on the production app.
"""

from __future__ import annotations

import logging
import re
import secrets

import click
from flask import Flask
from flask.cli import FlaskGroup

from . import ROOT, logs
from .config import raw_settings
from .demo.app import create_dev_app
from .guards import hash_token

TOKEN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def cli_app() -> Flask:
    """The app for a command: .env and the environment, the demo upstream when no key is set."""
    overrides: dict[str, object] = {}
    if not raw_settings(ROOT / ".env")["CHATPROXY_SECRET_KEY"].strip():
        overrides["CHATPROXY_SECRET_KEY"] = secrets.token_hex(32)  # a command serves no page sessions
    return create_dev_app(overrides, say=lambda text: click.echo(text, err=True))


def _valid_name(_ctx: click.Context, _param: click.Parameter, name: str) -> str:
    if not TOKEN_NAME.fullmatch(name):
        raise click.BadParameter(
            f"{name[:80]!r}: use 1 to 64 letters, digits, '.', '_' or '-' "
            "(the name is the caller's identity in limits, budgets and the ledger)."
        )
    return name


@click.command("new-token")
@click.argument("name", callback=_valid_name)
def new_token(name: str) -> None:
    """Print a new bearer token for NAME and the CHATPROXY_API_TOKENS line that adds its hash."""
    current = raw_settings(ROOT / ".env")["CHATPROXY_API_TOKENS"]
    entries = [entry.strip() for entry in current.split(",") if entry.strip()]
    if name in {entry.partition("=")[0].strip() for entry in entries}:
        raise click.ClickException(
            f"CHATPROXY_API_TOKENS already has a token named {name!r}, and a second entry under that name would "
            f"replace it. To rotate it, make a token under a new name, add it, restart, move the client over, "
            f"then remove the old entry (README: Access control)."
        )
    token = "cpx_" + secrets.token_urlsafe(32)
    entry = f"{name}={hash_token(token)}"
    click.echo(f"token (give it to the client, shown once): {token}")
    click.echo(f"setting entry: {entry}")
    kept = f" (it keeps the {len(entries)} token{'s' * (len(entries) != 1)} already set)" if entries else ""
    click.echo(f"Replace the CHATPROXY_API_TOKENS line in .env with this one{kept}, then restart the server:")
    click.echo(f"CHATPROXY_API_TOKENS={','.join([*entries, entry])}")


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
