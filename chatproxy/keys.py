"""API keys in the ledger's database: stored as SHA-256 hashes, shown once, managed at runtime (CLI and admin API).

A key is a bearer token with its own models, rate limit, stream slots and budgets. Its caller identity is
`token:<name>`, the same as a CHATPROXY_API_TOKENS entry of that name, so a token moved into the database
keeps its ledger history and budget rows. Each worker caches what it looked up for CHATPROXY_KEY_CACHE_SECONDS
(default 5): a change (revoke, disable, new limits) takes effect on every worker and host within that delay,
without a restart.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from limits import parse_many
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from .usage import create_tables, usd

CACHE_ENTRIES = 10_000  # past this, the cache starts afresh (unknown tokens are cached too)
LAST_USED_EVERY_S = 60  # last_used_at is written at most this often per key and worker
MAX_TOKEN_CHARS = 200  # longer bearer tokens are not looked up
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-' (no comma, '=' or space)"
TOKEN_PREFIX = "cpx_"  # noqa: S105 - how our tokens begin, not a secret
ACTIVE, DISABLED, EXPIRED, REVOKED = "active", "disabled", "expired", "revoked"
MONEY = ("daily_budget_usd", "monthly_budget_usd", "end_user_daily_budget_usd")
COUNTS = ("daily_tokens", "monthly_tokens", "max_streams")
FIELDS = ("owner", "models", "rate_limit", *COUNTS, *MONEY, "expires_at", "disabled", "end_user_key")
HS256 = "hs256"  # end_user_key for end-user tokens signed with the key's end-user secret
MAX_USD = Decimal(1_000_000)

metadata = sa.MetaData()
keys_table = sa.Table(
    "api_keys",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),  # hex SHA-256 of the token
    sa.Column("token_hint", sa.String(8), nullable=False),  # its last four characters, to tell keys apart
    sa.Column("owner", sa.Text, nullable=False, server_default=""),
    sa.Column("models", sa.Text),  # JSON list; NULL: every allowlisted model
    sa.Column("rate_limit", sa.String(200)),  # NULL: CHATPROXY_RATE_LIMIT_TOKEN
    sa.Column("max_streams", sa.Integer),  # NULL: CHATPROXY_MAX_STREAMS
    sa.Column("daily_micros", sa.BigInteger),  # NULL: no cap of its own
    sa.Column("monthly_micros", sa.BigInteger),
    sa.Column("daily_tokens", sa.BigInteger),
    sa.Column("monthly_tokens", sa.BigInteger),
    sa.Column("end_user_daily_micros", sa.BigInteger),  # each end user's daily cap under this key
    sa.Column("expires_at", sa.DateTime),  # naive UTC
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("revoked_at", sa.DateTime),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Column("last_used_at", sa.DateTime),
    sa.Column("end_user_key", sa.Text),  # NULL: no end-user tokens; "hs256"; or a PEM public key (EdDSA, ES256)
)
_COLUMN = {  # API field -> column, where they differ
    "daily_budget_usd": "daily_micros",
    "monthly_budget_usd": "monthly_micros",
    "end_user_daily_budget_usd": "end_user_daily_micros",
}


class KeyRefused(ValueError):
    """A key field or command the store refuses, with a sentence for the operator or client."""


class NoSuchKey(KeyRefused):
    """The key named does not exist."""


def utc_now() -> datetime:
    """Now as naive UTC, the form stored."""
    return datetime.now(UTC).replace(tzinfo=None)


def digest(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One key's row: what it may do and whether it works now."""

    name: str
    token_hash: str
    token_hint: str
    owner: str
    models: tuple[str, ...] | None
    rate_limit: str | None
    max_streams: int | None
    daily_micros: int | None
    monthly_micros: int | None
    daily_tokens: int | None
    monthly_tokens: int | None
    end_user_daily_micros: int | None
    expires_at: datetime | None
    disabled: bool
    revoked_at: datetime | None
    created_at: datetime
    updated_at: datetime
    last_used_at: datetime | None
    end_user_key: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ApiKey:
        """A key from its database row."""
        values = {name: row[name] for name in cls.__dataclass_fields__}
        values["models"] = tuple(json.loads(row["models"])) if row["models"] else None
        values["disabled"] = bool(row["disabled"])
        return cls(**values)

    def status(self, now: datetime) -> str:
        """active, disabled, expired or revoked (the strongest that holds)."""
        if self.revoked_at is not None:
            return REVOKED
        if self.expires_at is not None and self.expires_at <= now:
            return EXPIRED
        return DISABLED if self.disabled else ACTIVE

    def allows(self, model: str) -> bool:
        """Whether this key may ask for `model`."""
        return self.models is None or model in self.models

    def public(self, now: datetime) -> dict[str, Any]:
        """The key as the CLI and the admin API show it (never the token, which nobody can see again)."""
        return {
            "name": self.name,
            "status": self.status(now),
            "token_hint": f"{TOKEN_PREFIX}…{self.token_hint}",
            "owner": self.owner,
            "models": list(self.models) if self.models is not None else None,
            "rate_limit": self.rate_limit,
            "max_streams": self.max_streams,
            "daily_budget_usd": _usd(self.daily_micros),
            "monthly_budget_usd": _usd(self.monthly_micros),
            "daily_tokens": self.daily_tokens,
            "monthly_tokens": self.monthly_tokens,
            "end_user_daily_budget_usd": _usd(self.end_user_daily_micros),
            "expires_at": _iso(self.expires_at),
            "disabled": self.disabled,
            "revoked_at": _iso(self.revoked_at),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "last_used_at": _iso(self.last_used_at),
            "end_user_tokens": self.end_user_algorithm(),
        }

    def end_user_algorithm(self) -> str | None:
        """The JWT algorithm of this key's end-user tokens (None: it takes none)."""
        if not self.end_user_key:
            return None
        if self.end_user_key == HS256:
            return "HS256"
        return "EdDSA" if isinstance(load_public_key(self.end_user_key), ed25519.Ed25519PublicKey) else "ES256"


def _usd(micros: int | None) -> str | None:
    return None if micros is None else usd(micros)


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.replace(microsecond=0).isoformat() + "Z"


def check_name(name: Any) -> str:
    """A valid key name, or KeyRefused saying what a name may hold."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = repr(name[:80]) if isinstance(name, str) else "that name"
        raise KeyRefused(f"{shown} is not a valid key name: use {NAME_RULE}.")
    return name


def parse_fields(fields: Mapping[str, Any], allowlist: tuple[str, ...], now: datetime) -> dict[str, Any]:
    """API/CLI fields as column values; null clears a limit. KeyRefused names the first field refused."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise KeyRefused(f"Unknown field {unknown[0][:64]!r}. A key takes: {', '.join(FIELDS)}.")
    values: dict[str, Any] = {}
    for field, value in fields.items():
        column = _COLUMN.get(field, field)
        if field == "disabled":
            if not isinstance(value, bool):
                raise KeyRefused("disabled must be true or false.")
            values[column] = value
        elif field == "owner":
            note = "" if value is None else value
            if not isinstance(note, str) or len(note) > 200 or not note.isprintable():
                raise KeyRefused("owner must be a note of at most 200 printable characters.")
            values[column] = note.strip()
        elif value is None:
            values[column] = None
        elif field == "models":
            values[column] = _models(value, allowlist)
        elif field == "rate_limit":
            values[column] = _rate(value)
        elif field in COUNTS:
            high = 10_000 if field == "max_streams" else 10**15
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise KeyRefused(f"{field} must be a whole number from 1 to {high}, or null for none of its own.")
            values[column] = value
        elif field in MONEY:
            values[column] = micros_of(field, value)
        elif field == "expires_at":
            values[column] = _expiry(value, now)
        elif field == "end_user_key":
            values[column] = _end_user_key(value)
    return values


def _models(value: Any, allowlist: tuple[str, ...]) -> str:
    if not isinstance(value, list) or not value or not all(isinstance(m, str) for m in value):
        raise KeyRefused(f"models must be a non-empty list of model names from: {', '.join(allowlist)}.")
    outside = [m for m in value if m not in allowlist]
    if outside:
        raise KeyRefused(f"models must be among the allowlisted ({', '.join(allowlist)}); not {outside[0][:64]!r}.")
    return json.dumps(sorted(set(value)))


def _rate(value: Any) -> str:
    try:
        if not isinstance(value, str) or not value.strip() or len(value) > 200:
            raise ValueError
        parse_many(value.strip())
    except ValueError:
        raise KeyRefused("rate_limit must be a rate such as '30/minute' or '5/second;100/hour'.") from None
    return value.strip()


def micros_of(field: str, value: Any) -> int:
    """Dollars (a string or a number) as micro-dollars; a budget is more than 0 (null: no cap of its own)."""
    try:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise InvalidOperation
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        amount = Decimal("NaN")
    if not amount.is_finite() or not Decimal("0.000001") <= amount <= MAX_USD:
        raise KeyRefused(
            f"{field} must be an amount in dollars from 0.000001 to {MAX_USD}, or null for no cap "
            "(to stop a key, disable or revoke it)."
        )
    return int(amount * 1_000_000)


def _expiry(value: Any, now: datetime) -> datetime:
    try:
        if not isinstance(value, str):
            raise ValueError
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise KeyRefused("expires_at must be a time such as 2027-01-31T00:00:00Z.") from None
    when = when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when
    if when <= now:
        raise KeyRefused("expires_at must be in the future.")
    return when


def _end_user_key(value: Any) -> str:
    if value == HS256:
        return HS256
    try:
        if not isinstance(value, str) or len(value) > 2000:
            raise ValueError
        load_public_key(value)
    except ValueError:
        raise KeyRefused(
            "end_user_key must be 'hs256' or a PEM public key (Ed25519 for EdDSA, P-256 for ES256), or null for none."
        ) from None
    return value.strip() + "\n"


def load_public_key(pem: str) -> ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey:
    """An Ed25519 or P-256 public key from PEM text; ValueError for anything else."""
    try:
        public = load_pem_public_key(pem.encode())
    except Exception as exc:  # bad PEM is a ValueError, an unknown key type UnsupportedAlgorithm
        raise ValueError("not a PEM public key") from exc
    if isinstance(public, ed25519.Ed25519PublicKey):
        return public
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        return public
    raise ValueError("only Ed25519 (EdDSA) and P-256 (ES256) public keys are accepted")


class KeyStore:
    """The `api_keys` table and this worker's short cache of what tokens name."""

    def __init__(self, engine: Engine, *, clock: Any = utc_now, cache_seconds: float = 5.0) -> None:
        self.engine = engine
        self.metadata = metadata
        self.clock = clock
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._used: dict[str, float] = {}  # name -> when this worker last wrote last_used_at (monotonic)
        self._lock = threading.Lock()

    def create_schema(self) -> None:
        """Create the keys table if it is missing."""
        create_tables(self.engine, self.metadata)

    def create(self, name: str, values: dict[str, Any], token_hash: str | None = None) -> tuple[ApiKey, str | None]:
        """A new key from parsed `values`; its token (shown once), or None when `token_hash` (an import) is given."""
        check_name(name)
        token = None if token_hash else TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        row = {
            "name": name,
            "token_hash": token_hash or digest(token or ""),
            "token_hint": (token or "????")[-4:],
            "created_at": now,
            "updated_at": now,
            **values,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(keys_table.insert(), row)
        except IntegrityError:
            raise KeyRefused(f"A key named {name!r} exists already (or holds the same token).") from None
        return self.get(name), token

    def get(self, name: str) -> ApiKey:
        """The key named `name`, or KeyRefused."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(keys_table).where(keys_table.c.name == name)).first()
        if row is None:
            raise NoSuchKey(f"There is no key named {name[:64]!r}.")
        return ApiKey.from_row(row._mapping)

    def all(self) -> list[ApiKey]:
        """Every key, by name (revoked ones too)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(keys_table).order_by(keys_table.c.name))
            return [ApiKey.from_row(row._mapping) for row in rows]

    def update(self, name: str, values: dict[str, Any]) -> ApiKey:
        """Change a key that is not revoked."""
        self._change(name, values)
        return self.get(name)

    def revoke(self, name: str) -> ApiKey:
        """Revoke a key for good (its rows stay for the ledger); revoking twice changes nothing."""
        key = self.get(name)
        if key.revoked_at is None:
            self._change(name, {"revoked_at": self.clock()})
        return self.get(name)

    def rotate(self, name: str) -> tuple[ApiKey, str]:
        """A new token for a key that is not revoked; the old one stops working (within CHATPROXY_KEY_CACHE_SECONDS)."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self._change(name, {"token_hash": digest(token), "token_hint": token[-4:]})
        return self.get(name), token

    def _change(self, name: str, values: dict[str, Any]) -> None:
        t = keys_table
        with self.engine.begin() as conn:
            done = conn.execute(
                t.update().where(t.c.name == name, t.c.revoked_at.is_(None)).values(**values, updated_at=self.clock())
            ).rowcount
        if done != 1:
            self.get(name)  # raises when there is no such key
            raise KeyRefused(f"The key {name!r} is revoked; make a new one.")

    def find(self, token: str) -> ApiKey | None:
        """The key `token` names (in any state), or None; cached for cache_seconds. Raises SQLAlchemyError."""
        if len(token) > MAX_TOKEN_CHARS:
            return None
        hashed = digest(token)
        return self._cached("token:" + hashed, keys_table.c.token_hash == hashed)

    def named(self, name: str) -> ApiKey | None:
        """The key called `name` (in any state), or None; cached like find. Raises SQLAlchemyError."""
        if not NAME.fullmatch(name):
            return None
        return self._cached("name:" + name, keys_table.c.name == name)

    def _cached(self, entry: str, where: sa.ColumnElement[bool]) -> ApiKey | None:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(entry)
        if cached is not None and cached[0] > now:
            return cached[1]
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(keys_table).where(where)).first()
        key = ApiKey.from_row(row._mapping) if row is not None else None
        with self._lock:
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[entry] = (now + self.cache_seconds, key)
        return key

    def touch(self, key: ApiKey) -> None:
        """Record that `key` was used (at most every LAST_USED_EVERY_S per worker)."""
        now = time.monotonic()
        with self._lock:
            if now - self._used.get(key.name, -LAST_USED_EVERY_S) < LAST_USED_EVERY_S:
                return
            self._used[key.name] = now
        with self.engine.begin() as conn:
            conn.execute(keys_table.update().where(keys_table.c.name == key.name).values(last_used_at=self.clock()))
