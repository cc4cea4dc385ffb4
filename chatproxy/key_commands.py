"""`flask keys create|list|show|update|revoke|rotate|import`: API keys in the database, from the server's shell."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from .config import EPHEMERAL_SECRET
from .end_users import end_user_secret
from .keys import HS256, ApiKey, KeyRefused, check_name, parse_fields, utc_now
from .state import state

keys_group = AppGroup("keys", help="API keys in the ledger's database: each with its own models, limits and budgets.")
NONE = "none"  # an option's value that clears a limit (update)


def _limit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options create, import and update share; each is left out of the change when not given."""
    options = [
        click.option("--owner", help="A note on who holds the key."),
        click.option("--models", help="Comma-separated models it may use (default: every allowlisted one; 'all')."),
        click.option("--rate-limit", help="e.g. 60/minute (default: CHATPROXY_RATE_LIMIT_TOKEN; 'none')."),
        click.option("--max-streams", help="Simultaneous streams (default: CHATPROXY_MAX_STREAMS; 'none')."),
        click.option("--daily-usd", help="Its daily budget in dollars ('none': no cap of its own)."),
        click.option("--monthly-usd", help="Its monthly budget in dollars (UTC calendar month; 'none')."),
        click.option("--daily-tokens", help="Its daily token budget ('none')."),
        click.option("--monthly-tokens", help="Its monthly token budget ('none')."),
        click.option("--end-user-daily-usd", help="Each of its end users' daily budget in dollars ('none')."),
        click.option("--expires", help="When it stops working, e.g. 2027-01-31T00:00:00Z ('none': never)."),
        click.option("--disable/--enable", "disabled", default=None, help="Stop it for now / let it work again."),
        click.option(
            "--end-user-key",
            help="Accept signed end-user tokens: 'hs256' (see end-user-secret), a PEM public key file "
            "(Ed25519: EdDSA, P-256: ES256), or 'none'.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _fields(options: dict[str, Any]) -> dict[str, Any]:
    """The given options as the admin API's fields (strings parsed as the API parses JSON)."""
    fields: dict[str, Any] = {}
    names = {
        "owner": "owner",
        "rate_limit": "rate_limit",
        "daily_usd": "daily_budget_usd",
        "monthly_usd": "monthly_budget_usd",
        "end_user_daily_usd": "end_user_daily_budget_usd",
        "expires": "expires_at",
    }
    for option, value in options.items():
        if value is None:
            continue
        if option == "disabled":
            fields["disabled"] = value
        elif isinstance(value, str) and value.strip().lower() == NONE and option != "owner":
            fields[names.get(option, option)] = None
        elif option == "end_user_key":
            fields["end_user_key"] = value if value == "hs256" else _read_pem(value)
        elif option == "models":
            fields["models"] = None if value.strip() == "all" else [m.strip() for m in value.split(",") if m.strip()]
        elif option in ("max_streams", "daily_tokens", "monthly_tokens"):
            try:
                fields[option] = int(value)
            except ValueError:
                raise click.BadParameter("must be a whole number or 'none'.", param_hint=f"--{option}") from None
        else:
            fields[names[option]] = value
    return fields


def _read_pem(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise click.BadParameter(f"cannot read {path!r}.", param_hint="--end-user-key") from None


def _parsed(options: dict[str, Any]) -> dict[str, Any]:
    try:
        return parse_fields(_fields(options), state().settings.every_model, utc_now())
    except KeyRefused as refused:
        raise click.UsageError(str(refused)) from None


def _show(key: ApiKey, as_json: bool = False) -> None:
    shown = key.public(utc_now())
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    for field, value in shown.items():
        click.echo(f"{field:26} {'-' if value is None else value}")


def _name(_ctx: click.Context, _param: click.Parameter, name: str) -> str:
    try:
        return check_name(name)
    except KeyRefused as refused:
        raise click.BadParameter(str(refused)) from None


def _delay() -> str:
    return f"{state().settings.key_cache_seconds:g}"


def _refused(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except KeyRefused as refused:
        raise click.ClickException(str(refused)) from None


@keys_group.command("create")
@click.argument("name", callback=_name)
@_limit_options
def create(name: str, **options: Any) -> None:
    """Make key NAME and print its token (shown once: only its hash is stored)."""
    if name in state().tokens:
        raise click.ClickException(
            f"CHATPROXY_API_TOKENS has a token named {name!r}: `keys import {name}` moves it into the database."
        )
    key, token = _refused(lambda: state().keys.create(name, _parsed(options)))
    click.echo(f"token (give it to the client, shown once): {token}")
    _show(key)


@keys_group.command("import")
@click.argument("name", callback=_name)
@_limit_options
def import_token(name: str, **options: Any) -> None:
    """Move CHATPROXY_API_TOKENS entry NAME into the database; its client keeps its token and identity."""
    digest = state().tokens.get(name)
    if digest is None:
        raise click.ClickException(f"CHATPROXY_API_TOKENS has no token named {name!r}.")
    if name in state().settings.admin_tokens:
        raise click.ClickException(f"{name!r} is an admin token: admin tokens stay in CHATPROXY_API_TOKENS.")
    key, _ = _refused(lambda: state().keys.create(name, _parsed(options), token_hash=digest.hex()))
    _show(key)
    click.echo(
        f"Now remove the {name}= entry from CHATPROXY_API_TOKENS and restart: until then that entry "
        "answers for the token, without the key's limits."
    )


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the keys as JSON.")
def list_keys(as_json: bool) -> None:
    """Every key with its state and limits."""
    keys = state().keys.all()
    if as_json:
        click.echo(json.dumps([key.public(utc_now()) for key in keys], indent=2))
        return
    if not keys:
        click.echo("No keys yet: `keys create NAME`.")
    for key in keys:
        shown = key.public(utc_now())
        models = ",".join(shown["models"]) if shown["models"] else "all models"
        daily = f"${shown['daily_budget_usd']}/day" if shown["daily_budget_usd"] else "no daily cap"
        click.echo(f"{key.name:24} {shown['status']:9} {shown['token_hint']:10} {models:30} {daily:18} {key.owner}")


@keys_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the key as JSON.")
def show(name: str, as_json: bool) -> None:
    """One key's state and limits."""
    _show(_refused(lambda: state().keys.get(name)), as_json)


@keys_group.command("update")
@click.argument("name")
@_limit_options
def update(name: str, **options: Any) -> None:
    """Change key NAME's limits; 'none' clears one. Every worker sees it within the cache delay."""
    changes = _parsed(options)
    if not changes:
        raise click.UsageError("Nothing to change: give at least one option (see --help).")
    _show(_refused(lambda: state().keys.update(name, changes)))
    click.echo(f"Every worker applies it within {_delay()} seconds.")


@keys_group.command("revoke")
@click.argument("name")
def revoke(name: str) -> None:
    """Stop key NAME for good (its usage stays in the ledger)."""
    _refused(lambda: state().keys.revoke(name))
    click.echo(f"Key {name} revoked; every worker refuses it within {_delay()} seconds.")


@keys_group.command("rotate")
@click.argument("name")
def rotate(name: str) -> None:
    """Give key NAME a new token; the old one stops working (same limits, budgets and identity)."""
    _, token = _refused(lambda: state().keys.rotate(name))
    click.echo(f"token (give it to the client, shown once): {token}")
    click.echo(f"The old token stops working on every worker within {_delay()} seconds.")


@keys_group.command("end-user-secret")
@click.argument("name")
def print_end_user_secret(name: str) -> None:
    """Print the HS256 secret key NAME's end-user tokens are signed with (for the app's backend only)."""
    key = _refused(lambda: state().keys.get(name))
    secret_key = state().settings.secret_key
    if key.end_user_key != HS256:
        raise click.ClickException(
            f"Key {name} does not take HS256 end-user tokens: `keys update {name} --end-user-key hs256`."
        )
    if not secret_key or current_app.config.get(EPHEMERAL_SECRET):
        raise click.ClickException("Set CHATPROXY_SECRET_KEY (the server's) first: the secret is derived from it.")
    click.echo(end_user_secret(secret_key, key))
