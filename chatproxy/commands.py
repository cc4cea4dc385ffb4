"""The app's commands: init-db, usage, batch, keys, new-token (`python -m chatproxy ...`, `flask --app ...`)."""

from __future__ import annotations

import re
import secrets

import click
from flask import Flask
from flask.cli import with_appcontext

from .batches.cli import batch_group
from .callers import hash_token
from .config import ROOT, raw_settings
from .key_commands import keys_group
from .reports import usage_command
from .state import state

TOKEN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def init_app(app: Flask) -> None:
    """Register every command on the app."""
    for command in (init_db_command, usage_command, batch_group, keys_group, new_token):
        app.cli.add_command(command)


@click.command("init-db")
@with_appcontext
def init_db_command() -> None:
    """Create the ledger, budget counter and batch tables, or add the columns they lack."""
    ledger = state().ledger
    ledger.create_schema()
    click.echo(f"Ledger ready at {ledger.url}")


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
