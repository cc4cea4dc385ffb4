"""Hard daily budgets: reserve a call's worst case before it, settle the real cost after it, per UTC day.

Counter rows per (day, key) hold what was spent and what is reserved by calls in flight, in the ledger's
database (SQLite or PostgreSQL). A key is a cap's row: "*" for everyone, "*public" for all callers without
a bearer token, "public-ip:<addr>" for one client address of theirs, the caller's identity, "key:<name>"
for an API key's daily budget, "month:key:<name>" for its monthly one (a "month:" row lives on the first
day of its UTC month), and "end-user:<identity>" for an end user of a key. `caps_for`
decides which rows a caller's reservation must fit; a reservation is one atomic check-and-add over all of
them (a transaction of conditional UPDATEs, in key order so concurrent ones cannot deadlock).

A request's reservation is also written down as a hold, in the same transaction; settling deletes it in
the transaction that adjusts the counters. Both transactions can carry the caller's own statements
(`then`): metering opens the call's ledger row in the reservation's and closes it in the settlement's,
one database round trip on each side of the upstream call. A hold nobody settled (a killed worker, a database error at
settle time) expires, and the sweeper settles it from the ledger: the request's closed rows at their
cost, its rows still `interrupted` at the estimated prompt cost (outcome `abandoned`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from .config import Settings
from .errors import ApiError
from .keys import ApiKey
from .usage import create_tables, ledger_table, usd

log = logging.getLogger(__name__)

EVERYONE = "*"  # the key of the global counter row
PUBLIC = "*public"  # the key of the row all callers without a bearer token share
PUBLIC_KINDS = frozenset({"page", "origin", "anonymous"})  # callers without a bearer token (guards.Caller.kind)
FIELDS = ("spent_micros", "reserved_micros", "spent_tokens", "reserved_tokens")
# Which cap refused a reservation (the 429 message names it); ALONE: the call is bigger than a cap by itself.
GLOBAL, PUBLIC_SHARE, PUBLIC_IP, IDENTITY, ALONE = "global", "public", "public_ip", "identity", "alone"
KEY_DAILY, KEY_MONTHLY, END_USER = "key_daily", "key_monthly", "end_user"  # an API key's own caps
MONTH = "month:"  # the prefix of a counter row that spans a UTC calendar month
ABANDONED = "abandoned"  # the outcome the sweeper gives a ledger row its worker never closed
SWEEP_EVERY = timedelta(seconds=60)  # how often each worker looks for expired holds
SWEEP_BATCH = 100  # holds settled per look


@dataclass(frozen=True)
class Caps:
    """Daily caps from the settings; 0 means no cap."""

    daily_micros: int = 0
    identity_daily_micros: int = 0
    daily_tokens: int = 0
    identity_daily_tokens: int = 0
    public_daily_micros: int = 0
    public_ip_daily_micros: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Caps:
        """The caps configured by CHATPROXY_*DAILY_*BUDGET* settings."""
        return cls(
            settings.daily_budget_micros,
            settings.identity_daily_budget_micros,
            settings.daily_token_budget,
            settings.identity_daily_token_budget,
            settings.public_daily_budget_micros,
            settings.public_ip_daily_budget_micros,
        )


@dataclass(frozen=True)
class Cap:
    """One counter row a reservation must fit: which cap it is (a refusal names it), its key, its limits (0: none)."""

    name: str
    key: str
    micros: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Hold:
    """What the sweeper needs to settle a request's reservation if the request never does.

    The ledger rows it covers are the request's (by request id and identity); a row still open is
    charged `prompt_micros` for `prompt_tokens` (the upstream bills a prompt once it has it). The hold
    expires `seconds` after the reservation, when the request must long be over.
    """

    request_id: str
    prompt_tokens: int
    prompt_micros: int
    seconds: float


@dataclass
class Reservation:
    """Money and tokens held on counter rows `keys` on `day` until they are settled or released.

    `keys` defaults to the global and the identity's rows (what a batch reserves); `hold_id` names the
    hold the sweeper would settle (None: the caller settles it itself, however late, as batches do).
    """

    identity: str
    day: date
    cost_micros: int
    tokens: int
    keys: tuple[str, ...] = ()
    hold_id: str | None = None
    done: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        self.keys = tuple(sorted(set(self.keys or (EVERYONE, self.identity))))


def row_day(day: date, key: str) -> date:
    """The `day` of counter row `key` for a reservation made on `day`: a monthly row's is its month's first."""
    return day.replace(day=1) if key.startswith(MONTH) else day


InTransaction = Callable[[Connection], None]  # more work for the same transaction (the ledger's row)


class Undone(Exception):
    """Raised by an InTransaction to roll its whole transaction back (the counters are left as they were)."""


class _Refused(Exception):
    """A cap refused a reservation inside a transaction (raised to roll it back)."""

    def __init__(self, cap: Cap) -> None:
        super().__init__(cap.name)
        self.cap = cap


class SqlCounters:
    """Counters in a `budget_counters` table, one row per (day, key), and open reservations in `budget_holds`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.metadata = sa.MetaData()
        self.table = sa.Table(
            "budget_counters",
            self.metadata,
            sa.Column("day", sa.Date, primary_key=True),
            sa.Column("identity", sa.Text, primary_key=True),  # the row's key (an identity, or a shared cap's)
            *(sa.Column(name, sa.BigInteger, nullable=False, server_default="0") for name in FIELDS),
        )
        self.holds = sa.Table(
            "budget_holds",
            self.metadata,
            sa.Column("id", sa.String(32), primary_key=True),
            sa.Column("request_id", sa.String(64), nullable=False),
            sa.Column("identity", sa.Text, nullable=False),
            sa.Column("day", sa.Date, nullable=False),
            sa.Column("keys", sa.Text, nullable=False),  # JSON list of the counter rows it holds
            sa.Column("cost_micros", sa.BigInteger, nullable=False),
            sa.Column("tokens", sa.BigInteger, nullable=False),
            sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
            sa.Column("prompt_micros", sa.BigInteger, nullable=False),
            sa.Column("created_at", sa.DateTime, nullable=False),
            sa.Column("expires_at", sa.DateTime, nullable=False, index=True),
        )
        dialect = engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"budget counters need SQLite or PostgreSQL, not {dialect}")
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        # Statements are built once with bound parameters: building SQLAlchemy expressions per call was a
        # visible share of a request's CPU (BENCHMARKS.md).
        self._ensure = (
            insert(self.table)
            .values(day=sa.bindparam("b_day"), identity=sa.bindparam("b_who"))
            .on_conflict_do_nothing()
        )
        self._reserve: dict[tuple[bool, bool], sa.Update] = {}
        self._adjust: dict[tuple[str, ...], sa.Update] = {}
        self._hold = self.holds.insert()
        self._unhold = self.holds.delete().where(self.holds.c.id == sa.bindparam("b_id"))
        t = ledger_table
        request_rows = (t.c.request_id == sa.bindparam("b_request"), t.c.identity == sa.bindparam("b_who"))
        self._abandon = (
            t.update()
            .where(*request_rows, t.c.closed_at.is_(None))
            .values(
                prompt_tokens=sa.bindparam("b_prompt_tokens"),
                completion_tokens=0,
                tokens_exact=False,
                cost_micros=sa.bindparam("b_prompt_micros"),
                outcome=ABANDONED,
                closed_at=sa.bindparam("b_now"),
            )
        )
        self._spent = sa.select(
            sa.func.coalesce(sa.func.sum(t.c.cost_micros), 0),
            sa.func.coalesce(sa.func.sum(t.c.prompt_tokens + t.c.completion_tokens), 0),
        ).where(*request_rows)

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
                conditions.append(
                    c.spent_micros + c.reserved_micros + sa.bindparam("b_cost", type_=sa.BigInteger)
                    <= sa.bindparam("b_money_cap", type_=sa.BigInteger)
                )
            if tokens_capped:
                conditions.append(
                    c.spent_tokens + c.reserved_tokens + sa.bindparam("b_tokens", type_=sa.BigInteger)
                    <= sa.bindparam("b_token_cap", type_=sa.BigInteger)
                )
            self._reserve[key] = (
                self.table.update()
                .where(*conditions)
                .values(
                    reserved_micros=c.reserved_micros + sa.bindparam("b_cost", type_=sa.BigInteger),
                    reserved_tokens=c.reserved_tokens + sa.bindparam("b_tokens", type_=sa.BigInteger),
                )
            )
        return self._reserve[key]

    def _adjust_statement(self, names: tuple[str, ...]) -> sa.Update:
        """An UPDATE adding a bound amount `b_<name>` to each named counter of one row."""
        if names not in self._adjust:
            c = self.table.c
            self._adjust[names] = (
                self.table.update()
                .where(*self._row())
                .values({name: c[name] + sa.bindparam(f"b_{name}", type_=sa.BigInteger) for name in names})
            )
        return self._adjust[names]

    def create_schema(self) -> None:
        """Create the counters and holds tables if they are missing."""
        create_tables(self.engine, self.metadata)

    def reserve(
        self,
        day: date,
        caps: Sequence[Cap],
        cost_micros: int,
        tokens: int,
        hold: dict[str, Any] | None = None,
        then: InTransaction | None = None,
    ) -> Cap | None:
        """One transaction: make sure every row exists, a conditional UPDATE per row, write the hold, run `then`.

        Rows are taken in key order, the same in every transaction that touches several, so two of them
        cannot deadlock. Returns the cap that refused (everything rolled back), or None.
        """
        ordered = sorted(caps, key=lambda cap: cap.key)
        try:
            with self.engine.begin() as conn:
                conn.execute(self._ensure, [{"b_day": row_day(day, cap.key), "b_who": cap.key} for cap in ordered])
                for cap in ordered:
                    params = {
                        "b_day": row_day(day, cap.key),
                        "b_who": cap.key,
                        "b_cost": cost_micros,
                        "b_tokens": tokens,
                        "b_money_cap": cap.micros,
                        "b_token_cap": cap.tokens,
                    }
                    update = self._reserve_statement(bool(cap.micros), bool(cap.tokens))
                    if conn.execute(update, params).rowcount != 1:
                        raise _Refused(cap)  # rolls back the rows already reserved on
                if hold is not None:
                    conn.execute(self._hold, hold)
                if then is not None:
                    then(conn)
        except _Refused as refused:
            return refused.cap
        return None

    def finish(
        self,
        day: date,
        keys: Sequence[str],
        deltas: dict[str, int],
        hold_id: str | None = None,
        then: InTransaction | None = None,
    ) -> bool:
        """Delete the hold, run `then`, and add `deltas` to every row (key order, like reserve), in one transaction.

        False, changing nothing, when the hold is gone: the sweeper has settled the reservation already.
        """
        with self.engine.begin() as conn:
            if hold_id is not None and conn.execute(self._unhold, {"b_id": hold_id}).rowcount != 1:
                return False
            if then is not None:
                then(conn)
            self._add(conn, day, keys, deltas)
        return True

    def _add(self, conn: Connection, day: date, keys: Sequence[str], deltas: dict[str, int]) -> None:
        update = self._adjust_statement(tuple(deltas))
        amounts = {f"b_{name}": amount for name, amount in deltas.items()}
        conn.execute(update, [{"b_day": row_day(day, key), "b_who": key, **amounts} for key in sorted(keys)])

    def expired_holds(self, now: datetime, limit: int = SWEEP_BATCH) -> list[dict[str, Any]]:
        """Holds past their expiry, oldest first."""
        h = self.holds.c
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(self.holds).where(h.expires_at < now).order_by(h.expires_at).limit(limit))
            return [dict(row._mapping) for row in rows]

    def sweep_hold(self, hold: dict[str, Any], now: datetime) -> bool:
        """Settle one expired hold from the ledger, in one transaction; False if someone else settled it first.

        Deleting the hold is the claim: of the workers (and the late request) that try, exactly one
        deletes it, and the others find nothing to do.
        """
        who = {"b_request": hold["request_id"], "b_who": hold["identity"]}
        with self.engine.begin() as conn:
            if conn.execute(self._unhold, {"b_id": hold["id"]}).rowcount != 1:
                return False
            conn.execute(
                self._abandon,
                {
                    **who,
                    "b_prompt_tokens": hold["prompt_tokens"],
                    "b_prompt_micros": hold["prompt_micros"],
                    "b_now": now,
                },
            )
            spent_micros, spent_tokens = conn.execute(self._spent, who).one()
            self._add(
                conn,
                hold["day"],
                json.loads(hold["keys"]),
                {
                    "reserved_micros": -hold["cost_micros"],
                    "reserved_tokens": -hold["tokens"],
                    "spent_micros": int(spent_micros),
                    "spent_tokens": int(spent_tokens),
                },
            )
        return True

    def totals(self, day: date, key: str) -> dict[str, int]:
        """One row's counters (zeros when it does not exist)."""
        c = self.table.c
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(*(c[name] for name in FIELDS)).where(c.day == row_day(day, key), c.identity == key)
            ).first()
        return {name: int(row._mapping[name]) if row else 0 for name in FIELDS}


def utc_now() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


def utc_day(now: datetime) -> date:
    """The UTC day of `now` (a naive time is taken as UTC)."""
    return now.astimezone(UTC).date() if now.tzinfo else now.date()


def naive_utc(now: datetime) -> datetime:
    """`now` as naive UTC, the form stored in the database."""
    return now.astimezone(UTC).replace(tzinfo=None) if now.tzinfo else now


def seconds_to_midnight(now: datetime) -> int:
    """Whole seconds (at least 1) until the next UTC midnight, when the day's budgets start afresh."""
    now = now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return max(1, math.ceil((midnight - now).total_seconds()))


def month_end(now: datetime) -> datetime:
    """The next first of a month at 00:00 UTC, when monthly budgets start afresh."""
    now = now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


class Budget:
    """Daily spend and token caps (global, public, per client IP, per identity), enforced by reservations."""

    def __init__(self, counters: SqlCounters, caps: Caps, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.counters = counters
        self.caps = caps
        self.clock = clock
        self._next_sweep: datetime | None = None  # None: sweep at the first reservation (after start-up)
        self._sweep_lock = threading.Lock()

    def create_schema(self) -> None:
        """Create the counters and holds tables (SQL) if they are missing."""
        self.counters.create_schema()

    def caps_for(
        self,
        identity: str,
        kind: str = "token",
        ip: str | None = None,
        key: ApiKey | None = None,
        end_user_micros: int | None = None,
    ) -> tuple[Cap, ...]:
        """The caps a caller's reservation must fit: the one place that decides which counter rows apply.

        Everyone fits the global cap. Callers without a bearer token (`kind` page, origin or anonymous)
        also share the public cap, so a public page cannot spend what server-side callers need, and each
        client IP of theirs has its own cap, so one address cannot spend the public share by minting
        sessions. The identity cap applies to every caller except an allowed origin: anyone can send that
        Origin header, so one shared cap would let one client lock out every user of the frontend. An API
        `key` adds its own daily and monthly caps, and an end user of it (an identity under the key's)
        the key's per-end-user daily cap, or `end_user_micros` (its token's own) where that is lower.
        """
        caps = self.caps
        chosen = [Cap(GLOBAL, EVERYONE, caps.daily_micros, caps.daily_tokens)]
        if kind in PUBLIC_KINDS:
            chosen.append(Cap(PUBLIC_SHARE, PUBLIC, caps.public_daily_micros))
            chosen.append(Cap(PUBLIC_IP, f"public-ip:{ip or 'unknown'}", caps.public_ip_daily_micros))
        if kind != "origin":
            chosen.append(Cap(IDENTITY, identity, caps.identity_daily_micros, caps.identity_daily_tokens))
        if key is not None:
            if key.daily_micros or key.daily_tokens:
                chosen.append(Cap(KEY_DAILY, f"key:{key.name}", key.daily_micros or 0, key.daily_tokens or 0))
            if key.monthly_micros or key.monthly_tokens:
                monthly = Cap(KEY_MONTHLY, f"{MONTH}key:{key.name}", key.monthly_micros or 0, key.monthly_tokens or 0)
                chosen.append(monthly)
            limits = [m for m in (key.end_user_daily_micros, end_user_micros) if m]
            if limits and identity != f"token:{key.name}":
                chosen.append(Cap(END_USER, f"end-user:{identity}", min(limits)))
        return tuple(chosen)

    def standing(self, caps: Sequence[Cap]) -> list[dict[str, Any]]:
        """What is left of each capped row of `caps` (reservations in flight count as spent), and when it resets."""
        now = self.clock()
        day = utc_day(now)
        midnight = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
        shown = []
        for cap in caps:
            if not (cap.micros or cap.tokens):
                continue
            used = self.counters.totals(day, cap.key)
            money = used["spent_micros"] + used["reserved_micros"]
            tokens = used["spent_tokens"] + used["reserved_tokens"]
            monthly = cap.key.startswith(MONTH)
            shown.append(
                {
                    "cap": cap.name,
                    "period": "month" if monthly else "day",
                    "limit_usd": usd(cap.micros) if cap.micros else None,
                    "remaining_usd": usd(max(0, cap.micros - money)) if cap.micros else None,
                    "limit_tokens": cap.tokens or None,
                    "remaining_tokens": max(0, cap.tokens - tokens) if cap.tokens else None,
                    "resets_at": f"{month_end(now) if monthly else midnight:%Y-%m-%dT%H:%M:%SZ}",
                }
            )
        return shown

    def reserve(
        self,
        identity: str,
        cost_micros: int,
        tokens: int,
        *,
        caps: Sequence[Cap] | None = None,
        hold: Hold | None = None,
        then: InTransaction | None = None,
    ) -> Reservation:
        """Hold a call's worst-case cost and tokens on every row of `caps` (default: global and identity).

        Raises 429 budget_exceeded, naming the cap that refused, with Retry-After until it resets (UTC
        midnight), or 503 budget_unavailable. With `hold`, the sweeper settles what the caller never does.
        `then` runs in the same transaction once the reservation fits (one database round trip for both);
        what it raises rolls the reservation back and reaches the caller.
        """
        if identity == EVERYONE or cost_micros < 0 or tokens < 0:
            raise ValueError("reserve needs a real identity and non-negative amounts")
        caps = tuple(caps) if caps is not None else self.caps_for(identity)
        now = self.clock()
        day = utc_day(now)
        record = self._hold_row(identity, day, caps, cost_micros, tokens, hold, now) if hold else None
        alone = next(
            (
                Cap(ALONE, cap.key)
                for cap in caps
                if (cap.micros and cost_micros > cap.micros) or (cap.tokens and tokens > cap.tokens)
            ),
            None,
        )
        try:
            refused = alone or self.counters.reserve(day, caps, cost_micros, tokens, record, then)
        except SQLAlchemyError:
            log.exception("budget counters unavailable")
            raise ApiError(
                503,
                "budget_unavailable",
                "Spending limits cannot be checked right now, so the request was not sent. Try again shortly.",
                retry_after=5,
            ) from None
        finally:
            self._sweep_if_due(now)
        if refused:
            log.info("budget refused %s for %s (%s cap, row %s)", cost_micros, identity, refused.name, refused.key)
            raise refusal(refused, now)
        return Reservation(
            identity, day, cost_micros, tokens, tuple(cap.key for cap in caps), record["id"] if record else None
        )

    def settle(
        self, reservation: Reservation, actual_cost_micros: int, actual_tokens: int, then: InTransaction | None = None
    ) -> bool:
        """Replace the reservation by what the call really cost (may exceed it), running `then` in the same
        transaction. Errors are logged, not raised: False when the database failed and nothing changed."""
        return self._finish(
            reservation,
            {
                "reserved_micros": -reservation.cost_micros,
                "spent_micros": actual_cost_micros,
                "reserved_tokens": -reservation.tokens,
                "spent_tokens": actual_tokens,
            },
            then,
        )

    def release(self, reservation: Reservation, then: InTransaction | None = None) -> bool:
        """Give the reservation back (the call cost nothing), running `then` in the same transaction; as settle."""
        return self._finish(
            reservation, {"reserved_micros": -reservation.cost_micros, "reserved_tokens": -reservation.tokens}, then
        )

    def sweep(self, now: datetime | None = None) -> int:
        """Settle every expired hold from the ledger (see SqlCounters.sweep_hold); the number this call settled."""
        now = naive_utc(now or self.clock())
        swept = 0
        while True:
            holds = self.counters.expired_holds(now)
            swept_now = sum(self.counters.sweep_hold(hold, now) for hold in holds)
            swept += swept_now
            if len(holds) < SWEEP_BATCH or not swept_now:
                break
        if swept:
            log.warning("settled %d budget reservation(s) their requests never settled, from the ledger", swept)
        return swept

    def totals(self, key: str = EVERYONE, day: date | None = None) -> dict[str, int]:
        """Spent and reserved money and tokens of counter row `key` (default: everyone) on `day` (default: today)."""
        return self.counters.totals(day or utc_day(self.clock()), key)

    def _hold_row(
        self, identity: str, day: date, caps: Sequence[Cap], cost_micros: int, tokens: int, hold: Hold, now: datetime
    ) -> dict[str, Any]:
        return {
            "id": uuid.uuid4().hex,
            "request_id": hold.request_id[:64],
            "identity": identity,
            "day": day,
            "keys": json.dumps(sorted({cap.key for cap in caps})),
            "cost_micros": cost_micros,
            "tokens": tokens,
            "prompt_tokens": hold.prompt_tokens,
            "prompt_micros": hold.prompt_micros,
            "created_at": naive_utc(now),
            "expires_at": naive_utc(now + timedelta(seconds=hold.seconds)),
        }

    def _finish(self, reservation: Reservation, deltas: dict[str, int], then: InTransaction | None) -> bool:
        if reservation.done:
            log.warning("reservation for %s settled or released twice; ignored", reservation.identity)
            return True
        reservation.done = True
        try:
            if not self.counters.finish(reservation.day, reservation.keys, deltas, reservation.hold_id, then):
                log.warning(
                    "reservation for %s was settled by the sweeper before its request ended", reservation.identity
                )
        except Undone as undone:
            log.warning("reservation for %s left to the budget sweeper: %s", reservation.identity, undone)
            return False
        except SQLAlchemyError:
            log.exception(
                "cannot update budget counters for %s: %s (the sweeper settles it when its hold expires)"
                if reservation.hold_id
                else "cannot update budget counters for %s: %s",
                reservation.identity,
                deltas,
            )
            return False
        return True

    def _sweep_if_due(self, now: datetime) -> None:
        """Start a sweep in the background at the first reservation, then every SWEEP_EVERY (per worker)."""
        with self._sweep_lock:
            if self._next_sweep is not None and now < self._next_sweep:
                return
            self._next_sweep = now + SWEEP_EVERY
        threading.Thread(target=self._sweep_logged, args=(now,), name="budget-sweep", daemon=True).start()

    def _sweep_logged(self, now: datetime) -> None:
        try:
            self.sweep(now)
        except SQLAlchemyError:
            log.warning("cannot sweep expired budget reservations now; the next sweep tries again", exc_info=True)


def refusal(cap: Cap, now: datetime) -> ApiError:
    """The 429 budget_exceeded naming the cap that refused, with Retry-After until it resets."""
    if cap.name == KEY_MONTHLY or (cap.name == ALONE and cap.key.startswith(MONTH)):
        resets = month_end(now)
        seconds = max(1, math.ceil((resets - now.astimezone(UTC)).total_seconds()))
        return ApiError(
            429, "budget_exceeded", _MESSAGES[cap.name].format(resets=f"{resets:%Y-%m-%d}"), retry_after=seconds
        )
    return ApiError(429, "budget_exceeded", _MESSAGES[cap.name], retry_after=seconds_to_midnight(now))


_MESSAGES = {
    GLOBAL: "The service has reached its usage limit for today. Try again after midnight UTC.",
    PUBLIC_SHARE: "The service has reached its usage limit for today for callers without an API token. "
    "Try again after midnight UTC.",
    PUBLIC_IP: "Your network address has reached its usage limit for today. Try again after midnight UTC.",
    IDENTITY: "You have reached your usage limit for today. Try again after midnight UTC.",
    ALONE: "This request could cost more than a spending limit allows. Ask for fewer tokens (max_tokens).",
    KEY_DAILY: "This API key has reached its daily budget. It resets at midnight UTC.",
    KEY_MONTHLY: "This API key has reached its monthly budget. It resets on {resets} at 00:00 UTC.",
    END_USER: "You have reached your daily budget in this app. It resets at midnight UTC.",
}
