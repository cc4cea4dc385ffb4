"""Hard daily budgets: reserve a call's worst case before it, settle the real cost after it, per UTC day.

Counters per (day, identity), plus one global row per day (identity "*"), hold what was spent and what
is reserved by calls in flight, in the ledger's database (SQLite or PostgreSQL). A reservation is one
atomic check-and-add: a transaction of conditional UPDATEs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from flask import Flask, current_app
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from .config import Settings
from .errors import ApiError
from .usage import Ledger, create_tables

log = logging.getLogger(__name__)

EVERYONE = "*"  # the identity of the global counter row
FIELDS = ("spent_micros", "reserved_micros", "spent_tokens", "reserved_tokens")
GLOBAL, IDENTITY = "global", "identity"  # which cap refused a reservation


@dataclass(frozen=True)
class Caps:
    """Daily caps; 0 means no cap."""

    daily_micros: int = 0
    identity_daily_micros: int = 0
    daily_tokens: int = 0
    identity_daily_tokens: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Caps:
        """The caps configured by CHATPROXY_*DAILY_*BUDGET* settings."""
        return cls(settings.daily_budget_micros, settings.identity_daily_budget_micros,
                   settings.daily_token_budget, settings.identity_daily_token_budget)


@dataclass
class Reservation:
    """Money and tokens held for one call of `identity` on `day` until it is settled or released."""

    identity: str
    day: date
    cost_micros: int
    tokens: int
    done: bool = field(default=False, compare=False)


class _Refused(Exception):
    """A cap refused a reservation inside a transaction (raised to roll it back)."""

    def __init__(self, cap: str) -> None:
        super().__init__(cap)
        self.cap = cap


class SqlCounters:
    """Counters in a `budget_counters` table, one row per (day, identity); SQLite or PostgreSQL."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.metadata = sa.MetaData()
        self.table = sa.Table(
            "budget_counters", self.metadata,
            sa.Column("day", sa.Date, primary_key=True),
            sa.Column("identity", sa.Text, primary_key=True),
            *(sa.Column(name, sa.BigInteger, nullable=False, server_default="0") for name in FIELDS),
        )
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"budget counters need SQLite or PostgreSQL, not {dialect}")
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        # Statements are built once with bound parameters: building SQLAlchemy expressions per call was a
        # visible share of a request's CPU (BENCHMARKS.md).
        self._ensure = (insert(self.table).values(day=sa.bindparam("b_day"), identity=sa.bindparam("b_who"))
                        .on_conflict_do_nothing())
        self._reserve: dict[tuple[bool, bool], sa.Update] = {}
        self._adjust: dict[tuple[str, ...], sa.Update] = {}

    def _row(self) -> list[sa.ColumnElement[bool]]:
        c = self.table.c
        return [c.day == sa.bindparam("b_day"), c.identity == sa.bindparam("b_who")]

    def _reserve_statement(self, money_capped: bool, tokens_capped: bool) -> sa.Update:
        """The conditional UPDATE that adds a reservation if the row's caps allow it."""
        key = (money_capped, tokens_capped)
        if key not in self._reserve:
            c = self.table.c
            conditions = self._row()
            if money_capped:
                conditions.append(c.spent_micros + c.reserved_micros + sa.bindparam("b_cost", type_=sa.BigInteger)
                                  <= sa.bindparam("b_money_cap", type_=sa.BigInteger))
            if tokens_capped:
                conditions.append(c.spent_tokens + c.reserved_tokens + sa.bindparam("b_tokens", type_=sa.BigInteger)
                                  <= sa.bindparam("b_token_cap", type_=sa.BigInteger))
            self._reserve[key] = self.table.update().where(*conditions).values(
                reserved_micros=c.reserved_micros + sa.bindparam("b_cost", type_=sa.BigInteger),
                reserved_tokens=c.reserved_tokens + sa.bindparam("b_tokens", type_=sa.BigInteger))
        return self._reserve[key]

    def _adjust_statement(self, names: tuple[str, ...]) -> sa.Update:
        """An UPDATE adding a bound amount `b_<name>` to each named counter of one row."""
        if names not in self._adjust:
            c = self.table.c
            self._adjust[names] = self.table.update().where(*self._row()).values(
                {name: c[name] + sa.bindparam(f"b_{name}", type_=sa.BigInteger) for name in names})
        return self._adjust[names]

    def create_schema(self) -> None:
        """Create the counters table if it is missing."""
        create_tables(self.engine, self.metadata)

    def reserve(self, day: date, identity: str, cost_micros: int, tokens: int, caps: Caps) -> str | None:
        """One transaction: make sure both rows exist, then a conditional UPDATE per row (global first, always)."""
        rows = ((EVERYONE, GLOBAL, caps.daily_micros, caps.daily_tokens),
                (identity, IDENTITY, caps.identity_daily_micros, caps.identity_daily_tokens))
        try:
            with self.engine.begin() as conn:
                conn.execute(self._ensure, [{"b_day": day, "b_who": key} for key, *_ in rows])
                for key, name, money_cap, token_cap in rows:
                    params = {"b_day": day, "b_who": key, "b_cost": cost_micros, "b_tokens": tokens,
                              "b_money_cap": money_cap, "b_token_cap": token_cap}
                    update = self._reserve_statement(bool(money_cap), bool(token_cap))
                    if conn.execute(update, params).rowcount != 1:
                        raise _Refused(name)  # rolls back the global row's reservation too
        except _Refused as refused:
            return refused.cap
        return None

    def adjust(self, day: date, identity: str, deltas: dict[str, int]) -> None:
        """Add `deltas` to both rows in one transaction (global first, like reserve, so no deadlock)."""
        update = self._adjust_statement(tuple(deltas))
        amounts = {f"b_{name}": amount for name, amount in deltas.items()}
        with self.engine.begin() as conn:
            for key in (EVERYONE, identity):
                conn.execute(update, {"b_day": day, "b_who": key, **amounts})

    def totals(self, day: date, identity: str) -> dict[str, int]:
        """One row's counters (zeros when it does not exist)."""
        c = self.table.c
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*(c[name] for name in FIELDS))
                               .where(c.day == day, c.identity == identity)).first()
        return {name: int(row._mapping[name]) if row else 0 for name in FIELDS}


def utc_now() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


def utc_day(now: datetime) -> date:
    """The UTC day of `now` (a naive time is taken as UTC)."""
    return now.astimezone(UTC).date() if now.tzinfo else now.date()


def seconds_to_midnight(now: datetime) -> int:
    """Whole seconds (at least 1) until the next UTC midnight, when the day's budgets start afresh."""
    now = now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return max(1, math.ceil((midnight - now).total_seconds()))


class Budget:
    """Daily spend and token caps, global and per identity, enforced by reservations."""

    def __init__(self, counters: SqlCounters, caps: Caps, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.counters = counters
        self.caps = caps
        self.clock = clock

    def create_schema(self) -> None:
        """Create the counters table (SQL) if it is missing."""
        self.counters.create_schema()

    def reserve(self, identity: str, cost_micros: int, tokens: int) -> Reservation:
        """Hold a call's worst-case cost and tokens, or raise 429 budget_exceeded with Retry-After until midnight."""
        if identity == EVERYONE or cost_micros < 0 or tokens < 0:
            raise ValueError("reserve needs a real identity and non-negative amounts")
        now = self.clock()
        day = utc_day(now)
        alone = self._too_big_alone(cost_micros, tokens)
        try:
            refused = alone or self.counters.reserve(day, identity, cost_micros, tokens, self.caps)
        except SQLAlchemyError:
            log.exception("budget counters unavailable")
            raise ApiError(503, "budget_unavailable", "Spending limits cannot be checked right now, so the request "
                           "was not sent. Try again shortly.", retry_after=5) from None
        if refused:
            log.info("budget refused %s for %s (%s cap)", cost_micros, identity, refused)
            raise ApiError(429, "budget_exceeded", _MESSAGES[refused],
                           retry_after=seconds_to_midnight(now))
        return Reservation(identity, day, cost_micros, tokens)

    def settle(self, reservation: Reservation, actual_cost_micros: int, actual_tokens: int) -> None:
        """Replace the reservation by what the call really cost (may exceed it). Errors are logged, not raised."""
        self._finish(reservation, {"reserved_micros": -reservation.cost_micros, "spent_micros": actual_cost_micros,
                                   "reserved_tokens": -reservation.tokens, "spent_tokens": actual_tokens})

    def release(self, reservation: Reservation) -> None:
        """Give the reservation back (the call cost nothing). Errors are logged, not raised."""
        self._finish(reservation, {"reserved_micros": -reservation.cost_micros,
                                   "reserved_tokens": -reservation.tokens})

    def totals(self, identity: str = EVERYONE, day: date | None = None) -> dict[str, int]:
        """Spent and reserved money and tokens of `identity` (default: everyone) on `day` (default: today)."""
        return self.counters.totals(day or utc_day(self.clock()), identity)

    def _too_big_alone(self, cost_micros: int, tokens: int) -> str | None:
        caps = self.caps
        for cap, amount in ((caps.daily_micros, cost_micros), (caps.identity_daily_micros, cost_micros),
                            (caps.daily_tokens, tokens), (caps.identity_daily_tokens, tokens)):
            if cap and amount > cap:
                return "alone"
        return None

    def _finish(self, reservation: Reservation, deltas: dict[str, int]) -> None:
        if reservation.done:
            log.warning("reservation for %s settled or released twice; ignored", reservation.identity)
            return
        reservation.done = True
        try:
            self.counters.adjust(reservation.day, reservation.identity, deltas)
        except SQLAlchemyError:
            log.exception("cannot update budget counters for %s: %s", reservation.identity, deltas)


_MESSAGES = {
    GLOBAL: "The service has reached its usage limit for today. Try again after midnight UTC.",
    IDENTITY: "You have reached your usage limit for today. Try again after midnight UTC.",
    "alone": "This request could cost more than the daily limit allows. Ask for fewer tokens (max_tokens).",
}


def init_app(app: Flask) -> None:
    """Build the app's Budget on counters in the ledger's database (call after usage.init_app).

    Not in Redis, even when CHATPROXY_REDIS_URL is set: the ledger's database is already a hard
    dependency of every call, so budgets add none, and a Redis outage (which rate limits and
    cooldowns survive) cannot stop the proxy.
    """
    settings: Settings = app.extensions["chatproxy.settings"]
    ledger: Ledger | None = app.extensions.get("chatproxy.ledger")
    if ledger is None:
        raise RuntimeError("budget.init_app needs usage.init_app first: the counters live in the ledger's database")
    counters = SqlCounters(ledger.engine)
    ledger.schema.add(counters.metadata)  # created with the ledger's tables, on first use
    app.extensions["chatproxy.budget"] = Budget(counters, Caps.from_settings(settings))


def current_budget() -> Budget:
    """The current app's Budget."""
    return current_app.extensions["chatproxy.budget"]

