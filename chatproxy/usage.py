"""The usage ledger: one row per upstream call, opened before the call and closed after it; token estimates; CLI.

SQLAlchemy Core, one `ledger` table, the same statements on SQLite (one host) and PostgreSQL (many hosts).
Times are naive UTC. Money is integer micro-dollars.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from .errors import ApiError
from .images import text_of
from .wal import Checkpointer

log = logging.getLogger(__name__)

PG_CONNECT_TIMEOUT_S = 3
SCHEMA_RETRY_SECONDS = 5  # after a failed schema check, the next one waits this long
SQLITE_BUSY_TIMEOUT_MS = 5000
PER_MESSAGE_TOKENS = 4  # role, separators and framing around each message
REPLY_PRIMING_TOKENS = 3  # the assistant header the model is primed with
OPEN = "interrupted"  # a row's outcome until close() records the real one
_OUTCOME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

metadata = sa.MetaData()
ledger_table = sa.Table(
    "ledger",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),  # ours: one per request, never the client's
    sa.Column("created_at", sa.DateTime, nullable=False, index=True),
    sa.Column("identity", sa.Text, nullable=False),
    sa.Column("model_requested", sa.Text, nullable=False),
    sa.Column("model_answered", sa.Text),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("tokens_exact", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("cost_micros", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("outcome", sa.String(64), nullable=False),
    sa.Column("stream", sa.Boolean, nullable=False),
    sa.Column("latency_ms", sa.Integer),
    sa.Column("ttft_ms", sa.Integer),
    sa.Column("closed_at", sa.DateTime),
    # Columns added later go last, nullable or with a server default: Schema adds them to existing ledgers.
    sa.Column("client_request_id", sa.String(64)),  # the X-Request-ID the client sent, if it was sane
    sa.Column("cached_tokens", sa.Integer, nullable=False, server_default="0"),  # part of prompt_tokens
    sa.Column("reasoning_tokens", sa.Integer, nullable=False, server_default="0"),  # part of completion_tokens
    sa.Column("end_user", sa.String(256)),  # /v1's user or safety_identifier, an end-user token's identity
    # The id of a response the upstream keeps (/v1/responses with store): only this row's identity may use it.
    sa.Column("response_id", sa.String(128), index=True),
)


def utc_now() -> datetime:
    """The current time as naive UTC, the form stored in the ledger."""
    return datetime.now(UTC).replace(tzinfo=None)


def estimate_tokens(text: str) -> int:
    """Tokens in `text` without a tokenizer: ceil(UTF-8 bytes / 4), which is chars/4 for English."""
    return math.ceil(len(text.encode("utf-8")) / 4)


def estimate_prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """Prompt tokens of a chat: each message's text estimate + 4 per message, + 3 for the reply priming.

    Image parts are not text: the model table counts them per model (ModelTable.image_tokens)."""
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += PER_MESSAGE_TOKENS + estimate_tokens(text_of(message.get("content")))
    return total


def estimate_prompt(messages: Iterable[Mapping[str, Any]], response_format: Mapping[str, Any] | None = None) -> int:
    """Prompt tokens of a request: its messages, and the response_format, whose schema the upstream reads too."""
    tokens = estimate_prompt_tokens(messages)
    if response_format is not None:
        tokens += estimate_tokens(json.dumps(response_format, ensure_ascii=False))
    return tokens


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite files get their folder, WAL journaling and a busy timeout on every connection."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # connect_timeout: an unreachable host fails the request in seconds, not after the OS's TCP timeout.
        return sa.create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
    database = parsed.database or ""
    if database in ("", ":memory:"):
        # One shared connection: each new connection to :memory: would be a different, empty database.
        engine = sa.create_engine(parsed, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; safe for workers on one host
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")  # wait for the write lock, do not fail
        # WAL + NORMAL: no fsync per commit; a killed worker loses nothing, a power cut may lose the last commits.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run off the request path (wal.Checkpointer)
        cursor.close()

    sa.event.listen(engine, "commit", Checkpointer(database, SQLITE_BUSY_TIMEOUT_MS / 1000).after_commit)
    return engine


def create_tables(engine: Engine, meta: sa.MetaData) -> None:
    """Create the missing tables of `meta` and add their missing columns now; raises SQLAlchemyError."""
    with engine.connect() as conn:
        _apply(conn, [meta])


def _apply(conn: sa.Connection, metas: Iterable[sa.MetaData]) -> None:
    """CREATE missing tables, then migrate; tolerates another process doing the same at the same moment."""
    for meta in metas:
        for attempt in range(3):
            try:
                meta.create_all(conn, checkfirst=True)
                add_missing_columns(conn, meta)
                conn.commit()
                break
            except SQLAlchemyError:
                conn.rollback()
                if attempt == 2:
                    raise
                log.info("schema creation raced with another process; checking again")


def add_missing_columns(conn: sa.Connection, meta: sa.MetaData) -> None:
    """The migration step: ALTER TABLE ... ADD COLUMN for each column of `meta` an existing table lacks (+ its indexes).

    Enough for the one kind of change this schema makes (a new column, nullable or with a server default),
    on SQLite and PostgreSQL alike. Renames, drops and type changes would need a real migration tool.
    """
    inspector = sa.inspect(conn)
    preparer = conn.dialect.identifier_preparer
    for table in meta.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        missing = [column for column in table.columns if column.name not in present]
        for column in missing:
            if not column.nullable and column.server_default is None:
                raise sa.exc.ArgumentError(
                    f"cannot add {table.name}.{column.name} to existing rows: "
                    "new columns must be nullable or have a server default"
                )
            spec = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {spec}"))
            log.warning("added column %s.%s to the existing table", table.name, column.name)
        if missing:
            indexes = {index["name"] for index in inspector.get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in indexes:
                    index.create(conn)


class Schema:
    """The tables in one database (ledger, budget counters, batches), created and migrated on first use.

    Not at start-up: a worker that starts while the database is down must serve (503 ledger_unavailable or
    budget_unavailable, /readyz 503) rather than fail to boot, which would stop gunicorn altogether. The
    check runs on the engine's `engine_connect` event, so the first connection anything opens in this process
    (a request, /readyz, a CLI command) makes sure the tables and columns exist, once. A failure is logged
    and tried again on a connection opened SCHEMA_RETRY_SECONDS later or more; meanwhile requests run
    their statements and fail as they would on a missing table. `flask init-db` runs it directly.
    """

    def __init__(self, engine: Engine, *metas: sa.MetaData) -> None:
        self.engine = engine
        self._metas = list(metas)
        self._ready = False
        self._next_try = 0.0
        self._lock = threading.Lock()
        self._direct = threading.local()  # set while ensure() runs in this thread: the event stays out of it
        sa.event.listen(engine, "engine_connect", self._on_connect)

    def add(self, meta: sa.MetaData) -> None:
        """Also look after the tables of `meta` (budget counters, batches)."""
        with self._lock:
            self._metas.append(meta)
            self._ready = False

    def ensure(self) -> None:
        """Create and migrate every table now; raises SQLAlchemyError when the database refuses."""
        self._direct.active = True
        try:
            with self.engine.connect() as conn, self._lock:
                _apply(conn, self._metas)
                self._ready = True
        finally:
            self._direct.active = False

    def _on_connect(self, conn: sa.Connection) -> None:
        if self._ready or time.monotonic() < self._next_try or getattr(self._direct, "active", False):
            return
        with self._lock:
            if self._ready or time.monotonic() < self._next_try:
                return
            try:
                _apply(conn, self._metas)
            except SQLAlchemyError:
                self._next_try = time.monotonic() + SCHEMA_RETRY_SECONDS
                log.exception("cannot create or check the database schema; trying again in %s s", SCHEMA_RETRY_SECONDS)
                return
            self._ready = True


@dataclass(frozen=True)
class KeptResponse:
    """A response stored upstream: the identity that created it, and its tokens (a continuation reads them again)."""

    identity: str
    tokens: int


def unavailable() -> ApiError:
    """The 503 for a call that cannot be recorded (logged with the database error)."""
    log.exception("cannot write the usage ledger")
    return ApiError(
        503,
        "ledger_unavailable",
        "Usage cannot be recorded right now, so the request was not sent. Try again shortly.",
        retry_after=5,
    )


# Built once: the keys of the parameters name the columns set (building expressions per call costs CPU).
_INSERT = ledger_table.insert()
_CLOSE = ledger_table.update().where(ledger_table.c.id == sa.bindparam("b_id"), ledger_table.c.closed_at.is_(None))
_DISCARD = ledger_table.delete().where(ledger_table.c.id == sa.bindparam("b_id"), ledger_table.c.closed_at.is_(None))


class Ledger:
    """The usage ledger in one database."""

    def __init__(self, url: str, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.engine = make_engine(url)
        self.schema = Schema(self.engine, metadata)
        self.clock = clock

    @property
    def url(self) -> str:
        """The database URL with any password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    def create_schema(self) -> None:
        """Create or migrate every table in this database now (ledger, and what budget and batches added)."""
        self.schema.ensure()

    def dispose(self) -> None:
        """Close pooled connections (before a fork, or when the app goes away)."""
        self.engine.dispose()

    def open(
        self,
        request_id: str,
        identity: str,
        model_requested: str,
        stream: bool,
        client_request_id: str | None = None,
        end_user: str | None = None,
    ) -> int:
        """Insert an `interrupted` row before the upstream call; return its id. Raises 503 if the ledger is down."""
        try:
            with self.engine.begin() as conn:
                return self.open_in(conn, request_id, identity, model_requested, stream, client_request_id, end_user)
        except SQLAlchemyError:
            raise unavailable() from None

    def open_in(
        self,
        conn: sa.Connection,
        request_id: str,
        identity: str,
        model_requested: str,
        stream: bool,
        client_request_id: str | None = None,
        end_user: str | None = None,
    ) -> int:
        """open() inside the caller's transaction (the budget reservation's); database errors propagate."""
        values = {
            "request_id": request_id[:64],
            "created_at": self.clock(),
            "identity": identity,
            "model_requested": model_requested,
            "outcome": OPEN,
            "stream": stream,
            "client_request_id": client_request_id[:64] if client_request_id else None,
            "end_user": end_user[:256] if end_user else None,
        }
        return int(conn.execute(_INSERT, values).inserted_primary_key[0])

    def close(self, row_id: int, **fields: Any) -> bool:
        """Record how an open row's call ended; False if it was already closed or the database failed (logged).

        `fields` are close_in's: model_answered, the token counts, tokens_exact, cost_micros, outcome, latency_ms,
        ttft_ms.
        """
        try:
            with self.engine.begin() as conn:
                return self.close_in(conn, row_id, **fields)
        except SQLAlchemyError:
            log.exception("cannot close usage row %s (it stays %r)", row_id, OPEN)
            return False

    def close_in(
        self,
        conn: sa.Connection,
        row_id: int,
        *,
        model_answered: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        tokens_exact: bool,
        cost_micros: int,
        outcome: str,
        latency_ms: int | None,
        ttft_ms: int | None,
        cached_tokens: int = 0,
        reasoning_tokens: int = 0,
        response_id: str | None = None,
    ) -> bool:
        """close() inside the caller's transaction (the budget settlement's); database errors propagate."""
        if not _OUTCOME.match(outcome) or outcome == OPEN:
            raise ValueError(f"outcome must be a snake_case code other than {OPEN!r}; got {outcome!r}")
        values = {
            "b_id": row_id,
            "model_answered": model_answered,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cached_tokens": cached_tokens,
            "reasoning_tokens": reasoning_tokens,
            "response_id": response_id[:128] if response_id else None,
            "tokens_exact": tokens_exact,
            "cost_micros": cost_micros,
            "outcome": outcome,
            "latency_ms": latency_ms,
            "ttft_ms": ttft_ms,
            "closed_at": self.clock(),
        }
        closed = conn.execute(_CLOSE, values).rowcount == 1
        if not closed:
            log.warning("usage row %s was already closed or does not exist", row_id)
        return closed

    def kept_response(self, response_id: str) -> KeptResponse | None:
        """Who created the stored response `response_id` and the tokens it holds, or None if no row names it."""
        t = ledger_table
        query = (
            sa.select(t.c.identity, t.c.prompt_tokens, t.c.completion_tokens)
            .where(t.c.response_id == response_id[:128])
            .order_by(t.c.id)
            .limit(1)
        )
        try:
            with self.engine.connect() as conn:
                row = conn.execute(query).first()
        except SQLAlchemyError:
            log.exception("cannot read the usage ledger")
            raise ApiError(
                503,
                "ledger_unavailable",
                "Stored responses cannot be checked right now. Try again shortly.",
                retry_after=5,
            ) from None
        return None if row is None else KeptResponse(row.identity, row.prompt_tokens + row.completion_tokens)

    def discard_in(self, conn: sa.Connection, row_id: int) -> None:
        """Delete a row opened for an attempt that never went out (still open), inside the caller's transaction."""
        conn.execute(_DISCARD, {"b_id": row_id})

    def rows(self, *, request_id: str | None = None, identity: str | None = None) -> list[dict[str, Any]]:
        """Rows as dicts in insertion order, optionally filtered (for tests and debugging)."""
        query = sa.select(ledger_table).order_by(ledger_table.c.id)
        if request_id is not None:
            query = query.where(ledger_table.c.request_id == request_id)
        if identity is not None:
            query = query.where(ledger_table.c.identity == identity)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def report(self, since: date, until: date) -> dict[str, Any]:
        """Requests, tokens and spend from `since` to `until` (UTC days, both included), in totals and groups."""
        if since > until:
            raise ValueError("since must not be after until")
        t = ledger_table
        day = sa.func.date(t.c.created_at).label("day")
        model = sa.func.coalesce(t.c.model_answered, t.c.model_requested).label("model")
        window = (
            t.c.created_at >= datetime.combine(since, datetime.min.time()),
            t.c.created_at < datetime.combine(until + timedelta(days=1), datetime.min.time()),
        )
        sums = (
            sa.func.count().label("requests"),
            sa.func.sum(t.c.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(t.c.completion_tokens).label("completion_tokens"),
            sa.func.sum(t.c.cached_tokens).label("cached_tokens"),
            sa.func.sum(t.c.reasoning_tokens).label("reasoning_tokens"),
            sa.func.sum(t.c.cost_micros).label("cost_micros"),
        )
        grouped = (
            sa.select(day, model, t.c.identity, *sums)
            .where(*window)
            .group_by(day, model, t.c.identity)
            .order_by(day, model, t.c.identity)
        )
        outcomes = sa.select(t.c.outcome, sa.func.count()).where(*window).group_by(t.c.outcome).order_by(t.c.outcome)
        with self.engine.connect() as conn:
            groups = [_group(row._mapping) for row in conn.execute(grouped)]
            outcome_counts = {name: int(count) for name, count in conn.execute(outcomes)}
        return {
            "since": since.isoformat(),
            "until": until.isoformat(),
            "currency": "USD",
            "totals": _totals(groups),
            "outcomes": outcome_counts,
            "by_day": _roll_up(groups, "day"),
            "by_model": _roll_up(groups, "model"),
            "by_identity": _roll_up(groups, "identity"),
            "by_key": _roll_up([{**g, "key": key_of(g["identity"])} for g in groups], "key"),
            "by_end_user": _roll_up([g for g in groups if is_end_user(g["identity"])], "identity"),
            "groups": groups,
        }


METRICS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "cost_micros")


def key_of(identity: str) -> str:
    """The API key (or kind of caller) an identity spends under: token:web/alice -> web, session:... -> session."""
    kind, _, rest = identity.partition(":")
    return rest.partition("/")[0] if kind == "token" else kind


def is_end_user(identity: str) -> bool:
    """Whether an identity is an end user of an API key (token:<key>/<sub>)."""
    return identity.startswith("token:") and "/" in identity


def usd(micros: int) -> str:
    """Micro-dollars as an exact dollar string with six decimals, e.g. "0.012500"."""
    return f"{Decimal(micros).scaleb(-6):.6f}"


def _group(row: Mapping[str, Any]) -> dict[str, Any]:
    group = {"day": str(row["day"])[:10], "model": row["model"], "identity": row["identity"]}
    group.update({metric: int(row[metric] or 0) for metric in METRICS})
    return _with_totals(group)


def _with_totals(entry: dict[str, Any]) -> dict[str, Any]:
    entry["total_tokens"] = entry["prompt_tokens"] + entry["completion_tokens"]
    entry["cost_usd"] = usd(entry["cost_micros"])
    return entry


def _totals(groups: list[dict[str, Any]]) -> dict[str, Any]:
    return _with_totals({metric: sum(g[metric] for g in groups) for metric in METRICS})


def _roll_up(groups: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    sums: dict[str, Counter[str]] = {}
    for group in groups:
        sums.setdefault(group[key], Counter()).update({metric: group[metric] for metric in METRICS})
    return [
        _with_totals({key: name, **{metric: counts[metric] for metric in METRICS}})
        for name, counts in sorted(sums.items())
    ]


def default_database_url(instance_path: str | Path) -> str:
    """sqlite:///<instance folder>/chatproxy.db, creating the folder."""
    folder = Path(instance_path)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'chatproxy.db'}"


def default_range(since: date | None, until: date | None, today: date | None = None) -> tuple[date, date]:
    """Fill a missing end with today (UTC) and a missing start with 29 days before the end."""
    until = until or today or utc_now().date()
    return since or until - timedelta(days=29), until
