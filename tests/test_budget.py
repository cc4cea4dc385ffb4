"""Hard daily budgets on SQLite and PostgreSQL: caps, settle/release, Retry-After, and concurrent workers."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from chatproxy import budget, create_app, usage
from chatproxy.budget import EVERYONE, PUBLIC, Budget, Caps, Hold, SqlCounters, seconds_to_midnight
from chatproxy.callers import hash_token
from chatproxy.demo.upstream import Reply
from chatproxy.errors import ApiError
from chatproxy.state import state
from chatproxy.usage import estimate_prompt_tokens, make_engine
from tests.helpers import page_session, process_context

NOON = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC)
DAY = NOON.date()


@dataclass(frozen=True)
class Store:
    """How to reach one backend's counters; picklable, so worker processes can open their own connections."""

    kind: str  # sqlite, postgresql
    url: str

    def open(self) -> SqlCounters:
        """New counters on new connections."""
        return SqlCounters(make_engine(self.url))


@pytest.fixture
def store(database_url: str) -> Store:
    """A SQLite file or a private PostgreSQL schema, with the counters ready."""
    spec = Store("sqlite" if database_url.startswith("sqlite") else "postgresql", database_url)
    _create(spec)
    return spec


def _create(spec: Store) -> None:
    """The counters, holds and ledger tables, as the app creates them (the sweeper reads the ledger)."""
    counters = spec.open()
    counters.create_schema()
    usage.create_tables(counters.engine, usage.metadata)
    counters.engine.dispose()


class Clock:
    """A settable clock (aware UTC)."""

    def __init__(self, now: datetime = NOON) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make_budget(store: Store, clock: Clock | None = None, **caps: int) -> Budget:
    return Budget(store.open(), Caps(**caps), clock=clock or Clock())


def refusal(call) -> ApiError:
    with pytest.raises(ApiError) as error:
        call()
    return error.value


# --- Retry-After --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "seconds"),
    [
        (datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC), 43_200),
        (datetime(2025, 3, 14, 0, 0, 0, tzinfo=UTC), 86_400),
        (datetime(2025, 3, 14, 23, 59, 59, 500_000, tzinfo=UTC), 1),
        (datetime.fromisoformat("2025-03-14T20:00:00-05:00"), 82_800),  # 01:00 UTC on the 15th
        (datetime(2025, 3, 14, 23, 0, 0), 3_600),  # naive times are taken as UTC
    ],
)
def test_retry_after_counts_to_the_next_utc_midnight(now: datetime, seconds: int) -> None:
    assert seconds_to_midnight(now) == seconds


# --- caps (every backend) -----------------------------------------------------------------------------------


def test_reserve_settle_release_move_the_counters(store: Store) -> None:
    b = make_budget(store, daily_micros=10_000, identity_daily_micros=5_000)
    first = b.reserve("token:a", 3_000, 1_100)
    second = b.reserve("token:a", 1_000, 300)
    assert b.totals("token:a") == {
        "spent_micros": 0,
        "reserved_micros": 4_000,
        "spent_tokens": 0,
        "reserved_tokens": 1_400,
    }
    b.settle(first, 1_234, 456)  # the real cost replaces the worst case
    b.release(second)  # the call failed before it cost anything
    expected = {"spent_micros": 1_234, "reserved_micros": 0, "spent_tokens": 456, "reserved_tokens": 0}
    assert b.totals("token:a") == expected
    assert b.totals() == expected  # the global row moves with it
    b.settle(first, 99_999, 1)  # settling twice is ignored
    b.release(first)
    assert b.totals("token:a") == expected


def test_identity_cap_refuses_only_that_identity(store: Store) -> None:
    b = make_budget(store, daily_micros=1_000_000, identity_daily_micros=5_000)
    b.settle(b.reserve("token:a", 5_000, 1), 4_000, 1)
    b.reserve("token:a", 1_000, 1)  # 4,000 spent + 1,000 = the cap exactly
    error = refusal(lambda: b.reserve("token:a", 1, 1))
    assert (error.status, error.code, error.retry_after) == (429, "budget_exceeded", 43_200)
    assert error.message == "You have reached your usage limit for today. Try again after midnight UTC."
    b.reserve("token:b", 5_000, 1)  # someone else still has room
    assert b.totals()["reserved_micros"] == 6_000  # the refused call held nothing, globally either


def test_global_cap_refuses_everyone(store: Store) -> None:
    b = make_budget(store, daily_micros=10_000, identity_daily_micros=0)
    b.reserve("token:a", 6_000, 1)
    b.reserve("token:b", 4_000, 1)
    error = refusal(lambda: b.reserve("token:c", 1, 1))
    assert (error.status, error.code) == (429, "budget_exceeded")
    assert error.message == "The service has reached its usage limit for today. Try again after midnight UTC."
    assert b.totals("token:c")["reserved_micros"] == 0


def test_token_caps(store: Store) -> None:
    b = make_budget(store, daily_tokens=1_000, identity_daily_tokens=600)
    b.reserve("token:a", 0, 600)
    assert refusal(lambda: b.reserve("token:a", 0, 1)).message.startswith("You have reached")
    b.reserve("token:b", 0, 400)
    assert refusal(lambda: b.reserve("token:c", 0, 1)).message.startswith("The service has reached")


def test_zero_means_no_cap(store: Store) -> None:
    b = make_budget(store)
    b.reserve("token:a", 10**15, 10**12)
    assert b.totals()["reserved_micros"] == 10**15


def test_a_call_bigger_than_the_cap_is_told_to_ask_for_less(store: Store) -> None:
    b = make_budget(store, daily_micros=10_000, identity_daily_micros=1_000)
    error = refusal(lambda: b.reserve("token:a", 1_001, 1))
    assert error.code == "budget_exceeded" and "max_tokens" in error.message


def test_a_new_utc_day_starts_afresh_and_settles_on_the_day_reserved(store: Store) -> None:
    clock = Clock(datetime(2025, 3, 14, 23, 59, 59, tzinfo=UTC))
    b = make_budget(store, clock, identity_daily_micros=1_000)
    late = b.reserve("token:a", 1_000, 1)
    assert refusal(lambda: b.reserve("token:a", 1, 1)).retry_after == 1
    clock.now = datetime(2025, 3, 15, 0, 0, 1, tzinfo=UTC)
    b.reserve("token:a", 1_000, 1)  # the 15th has its own budget
    b.settle(late, 700, 1)  # lands on the 14th, where it was reserved
    assert b.totals("token:a", date(2025, 3, 14))["spent_micros"] == 700
    assert b.totals("token:a")["spent_micros"] == 0 and b.totals("token:a")["reserved_micros"] == 1_000


def test_settle_may_exceed_the_reservation_and_then_blocks_further_calls(store: Store) -> None:
    b = make_budget(store, identity_daily_micros=1_000)
    b.settle(b.reserve("token:a", 500, 1), 1_200, 1)  # the upstream billed more than we estimated
    assert refusal(lambda: b.reserve("token:a", 1, 1)).code == "budget_exceeded"


def test_an_unreachable_store_refuses_fast_with_503_and_settle_does_not_raise(tmp_path: Path) -> None:
    b = Budget(SqlCounters(make_engine("postgresql+psycopg://chatproxy@127.0.0.1:1/none")), Caps(1, 1))
    started = time.monotonic()
    error = refusal(lambda: b.reserve("token:a", 1, 1))
    assert (error.status, error.code, error.retry_after) == (503, "budget_unavailable", 5)
    b.settle(budget.Reservation("token:a", DAY, 1, 1), 1, 1)  # logged, not raised: it runs in `finally`
    assert time.monotonic() - started < 2  # no seconds of retry backoff on every request during an outage
    sql = Budget(SqlCounters(make_engine(f"sqlite:///{tmp_path / 'no-table.db'}")), Caps(1, 1))
    assert refusal(lambda: sql.reserve("token:a", 1, 1)).code == "budget_unavailable"
    sql.release(budget.Reservation("token:a", DAY, 1, 1))


def test_the_429_response_carries_retry_after(settings_for) -> None:
    app = create_app(settings_for())
    with app.test_request_context():
        response = ApiError(429, "budget_exceeded", "x", retry_after=seconds_to_midnight(NOON)).response()
    assert response.headers["Retry-After"] == "43200"


# --- which caps apply to whom: public callers share a cap and are capped per client IP ----------------------

ADDR = "198.51.100.9"
ORIGIN = "origin:https://app.example.com"
ALL_CAPS = Caps(
    daily_micros=100,
    identity_daily_micros=10,
    daily_tokens=7,
    identity_daily_tokens=3,
    public_daily_micros=50,
    public_ip_daily_micros=20,
)
GLOBAL_ROW = ("global", EVERYONE, 100, 7)
PUBLIC_ROWS = [("public", PUBLIC, 50, 0), ("public_ip", f"public-ip:{ADDR}", 20, 0)]


@pytest.mark.parametrize(
    ("kind", "identity", "rows"),
    [
        ("token", "token:app", [GLOBAL_ROW, ("identity", "token:app", 10, 3)]),
        ("page", "session:s1", [GLOBAL_ROW, *PUBLIC_ROWS, ("identity", "session:s1", 10, 3)]),
        ("anonymous", f"ip:{ADDR}", [GLOBAL_ROW, *PUBLIC_ROWS, ("identity", f"ip:{ADDR}", 10, 3)]),
        ("origin", ORIGIN, [GLOBAL_ROW, *PUBLIC_ROWS]),  # anyone can send the Origin: no cap shared by all its users
    ],
)
def test_caps_for_each_kind_of_caller(kind: str, identity: str, rows: list[tuple]) -> None:
    b = Budget(SqlCounters(make_engine("sqlite://")), ALL_CAPS)
    assert [(cap.name, cap.key, cap.micros, cap.tokens) for cap in b.caps_for(identity, kind, ADDR)] == rows


def page(b: Budget, session: object, ip: str = ADDR) -> tuple[budget.Cap, ...]:
    return b.caps_for(f"session:{session}", "page", ip)


def test_page_sessions_from_one_ip_stop_at_the_ip_cap(store: Store) -> None:
    b = make_budget(store, identity_daily_micros=5_000, public_ip_daily_micros=12_000, public_daily_micros=100_000)
    for n in range(4):  # four fresh sessions, each far below its own cap
        b.reserve(f"session:{n}", 3_000, 1, caps=page(b, n))
    error = refusal(lambda: b.reserve("session:4", 3_000, 1, caps=page(b, 4)))
    assert (error.status, error.code, error.retry_after) == (429, "budget_exceeded", 43_200)
    assert error.message == "Your network address has reached its usage limit for today. Try again after midnight UTC."
    b.reserve("session:5", 3_000, 1, caps=page(b, 5, "198.51.100.10"))  # another address has its own
    assert b.totals(f"public-ip:{ADDR}")["reserved_micros"] == 12_000
    assert b.totals("session:4")["reserved_micros"] == 0  # the refusal held nothing on any row
    assert b.totals(PUBLIC)["reserved_micros"] == b.totals()["reserved_micros"] == 15_000


def test_public_callers_stop_at_their_share_while_token_callers_get_through(store: Store) -> None:
    b = make_budget(store, daily_micros=20_000, public_daily_micros=10_000)
    b.reserve("session:a", 6_000, 1, caps=page(b, "a", "198.51.100.1"))
    b.reserve("ip:198.51.100.2", 4_000, 1, caps=b.caps_for("ip:198.51.100.2", "anonymous", "198.51.100.2"))
    error = refusal(lambda: b.reserve(ORIGIN, 1, 1, caps=b.caps_for(ORIGIN, "origin", "198.51.100.3")))
    assert error.message == (
        "The service has reached its usage limit for today for callers without an API token. "
        "Try again after midnight UTC."
    )
    b.reserve("token:app", 10_000, 1)  # server-side callers still have the other half
    assert refusal(lambda: b.reserve("token:app", 1, 1)).message.startswith(
        "The service has reached its usage limit for today. Try"
    )


def test_an_allowed_origin_is_capped_per_client_ip_not_as_one_identity(store: Store) -> None:
    b = make_budget(store, identity_daily_micros=1_000, public_ip_daily_micros=3_000)
    for _ in range(3):  # more than one identity's cap: the origin as a whole has none
        b.reserve(ORIGIN, 1_000, 1, caps=b.caps_for(ORIGIN, "origin", "198.51.100.1"))
    assert refusal(
        lambda: b.reserve(ORIGIN, 1, 1, caps=b.caps_for(ORIGIN, "origin", "198.51.100.1"))
    ).message.startswith("Your network address")
    b.reserve(ORIGIN, 1_000, 1, caps=b.caps_for(ORIGIN, "origin", "198.51.100.2"))  # its other users go on


def test_a_call_bigger_than_a_public_cap_is_told_to_ask_for_less(store: Store) -> None:
    b = make_budget(store, public_ip_daily_micros=1_000)
    error = refusal(lambda: b.reserve("session:a", 1_001, 1, caps=page(b, "a")))
    assert error.code == "budget_exceeded" and "max_tokens" in error.message


# --- holds: what the sweeper settles when a request never does ----------------------------------------------

HOLD = Hold("req-1", prompt_tokens=50, prompt_micros=125, seconds=300)


def holds(store: Store) -> list[dict]:
    """The open reservations' holds."""
    counters = store.open()
    with counters.engine.connect() as conn:
        rows = [dict(row._mapping) for row in conn.execute(sa.select(counters.holds))]
    counters.engine.dispose()
    return rows


def eventually(predicate, timeout: float = 10) -> bool:
    """Poll until `predicate()` holds or `timeout` passes."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_a_hold_is_written_with_the_reservation_and_deleted_with_its_settle(store: Store) -> None:
    b = make_budget(store, identity_daily_micros=10_000)
    first = b.reserve("token:a", 3_000, 100, hold=HOLD)
    second = b.reserve("token:a", 2_000, 100, hold=Hold("req-2", 50, 125, 300))
    refusal(lambda: b.reserve("token:a", 6_000, 1, hold=Hold("req-3", 50, 125, 300)))  # refused: no hold
    [held, _] = sorted(holds(store), key=lambda h: h["request_id"])
    assert (
        held["request_id"],
        held["identity"],
        held["cost_micros"],
        held["tokens"],
        held["prompt_tokens"],
        held["prompt_micros"],
        held["keys"],
    ) == ("req-1", "token:a", 3_000, 100, 50, 125, '["*", "token:a"]')
    assert held["expires_at"] == datetime(2025, 3, 14, 12, 5, 0)  # reserved at noon, for 300 s
    b.settle(first, 1_000, 40)
    b.release(second)
    assert holds(store) == []
    assert b.sweep(NOON + timedelta(days=1)) == 0
    assert b.totals("token:a") == {
        "spent_micros": 1_000,
        "reserved_micros": 0,
        "spent_tokens": 40,
        "reserved_tokens": 0,
    }


def test_the_sweeper_settles_an_expired_hold_from_the_request_s_ledger_rows(store: Store) -> None:
    b = make_budget(store)
    ledger = usage.Ledger(store.url, clock=lambda: NOON.replace(tzinfo=None))
    reservation = b.reserve("session:a", 3_000, 600, caps=page(b, "a"), hold=HOLD)
    failed = ledger.open("req-1", "session:a", "gpt-4o", True)  # a first attempt timed out: closed, with its cost
    ledger.close(
        failed,
        model_answered="gpt-4o",
        prompt_tokens=50,
        completion_tokens=0,
        tokens_exact=False,
        cost_micros=125,
        outcome="upstream_timeout",
        latency_ms=1000,
        ttft_ms=None,
    )
    cut = ledger.open("req-1", "session:a", "gpt-4o", True)  # the worker died during the second attempt
    other = ledger.open("req-1", "session:b", "gpt-4o", True)  # another caller's open row, same request id

    assert b.sweep(NOON + timedelta(seconds=299)) == 0  # not expired: its request may still be running
    assert b.sweep(NOON + timedelta(seconds=301)) == 1
    assert b.sweep(NOON + timedelta(seconds=302)) == 0  # once

    settled = {"spent_micros": 250, "reserved_micros": 0, "spent_tokens": 100, "reserved_tokens": 0}
    for key in ("session:a", f"public-ip:{ADDR}", PUBLIC, EVERYONE):
        assert b.totals(key) == settled, key
    rows = {row["id"]: row for row in ledger.rows()}
    assert {
        k: rows[cut][k]
        for k in ("outcome", "prompt_tokens", "completion_tokens", "tokens_exact", "cost_micros", "closed_at")
    } == {
        "outcome": "abandoned",
        "prompt_tokens": 50,
        "completion_tokens": 0,
        "tokens_exact": False,
        "cost_micros": 125,
        "closed_at": datetime(2025, 3, 14, 12, 5, 1),
    }
    assert rows[failed]["outcome"] == "upstream_timeout" and rows[other]["outcome"] == "interrupted"
    b.settle(reservation, 99_999, 1)  # the request's own settle, after the sweep, changes nothing
    assert b.totals("session:a") == settled
    ledger.dispose()


def _sweep(spec: Store, barrier, results) -> None:
    """Worker process: sweep an hour after noon, at the same moment as the others."""
    b = Budget(spec.open(), Caps(), clock=lambda: NOON)
    barrier.wait(timeout=30)
    results.put(b.sweep(NOON + timedelta(hours=1)))


def test_concurrent_sweepers_settle_each_hold_exactly_once(store: Store) -> None:
    b = make_budget(store)
    ledger = usage.Ledger(store.url)
    for i in range(20):
        b.reserve(f"token:{i % 3}", 1_000, 10, hold=Hold(f"req-{i}", 10, 7, 60))
        ledger.open(f"req-{i}", f"token:{i % 3}", "gpt-4o", False)
    ctx = process_context()
    barrier, results = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_sweep, args=(store, barrier, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    swept = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(10)
    assert sum(swept) == 20
    assert b.totals() == {"spent_micros": 140, "reserved_micros": 0, "spent_tokens": 200, "reserved_tokens": 0}
    assert [(row["outcome"], row["cost_micros"]) for row in ledger.rows()] == [("abandoned", 7)] * 20
    ledger.dispose()


def test_each_worker_sweeps_at_its_first_reservation_and_then_every_minute(store: Store) -> None:
    clock = Clock()
    b = make_budget(store, clock)
    b.reserve("token:a", 1_000, 10, hold=Hold("req-a", 10, 7, seconds=5))  # the first reservation sweeps
    clock.now = NOON + timedelta(seconds=30)
    b.reserve("token:b", 1_000, 10)  # req-a's hold has expired, but this worker swept 30 s ago
    time.sleep(0.5)
    assert b.totals("token:a")["reserved_micros"] == 1_000
    clock.now = NOON + timedelta(seconds=61)
    b.reserve("token:c", 1_000, 10, hold=Hold("req-c", 10, 7, seconds=5))  # a minute on: it sweeps again
    assert eventually(lambda: b.totals("token:a")["reserved_micros"] == 0)
    restarted = make_budget(store, Clock(NOON + timedelta(seconds=67)))  # a new worker (a restart, a new host)
    restarted.reserve("token:d", 1, 1)  # sweeps at its first reservation
    assert eventually(lambda: restarted.totals("token:c")["reserved_micros"] == 0)
    assert len(holds(store)) == 0


def test_a_settle_that_fails_leaves_the_hold_for_the_sweeper(store: Store) -> None:
    b = make_budget(store)
    reservation = b.reserve("token:a", 1_000, 10, hold=HOLD)

    def blip(*_: object) -> None:
        raise sa.exc.OperationalError("UPDATE budget_counters", {}, Exception("server closed the connection"))

    sa.event.listen(b.counters.engine, "before_cursor_execute", blip)
    b.settle(reservation, 300, 5)  # logged, not raised: it runs in `finally`
    sa.event.remove(b.counters.engine, "before_cursor_execute", blip)
    assert len(holds(store)) == 1 and b.totals("token:a")["reserved_micros"] == 1_000
    assert b.sweep(NOON + timedelta(seconds=301)) == 1  # no ledger rows: the request cost nothing on record
    assert b.totals("token:a") == {"spent_micros": 0, "reserved_micros": 0, "spent_tokens": 0, "reserved_tokens": 0}


# --- concurrency: exactly K of 4K reservations from 4 processes ---------------------------------------------

K = 10
COST = 12_500  # one worst-case call


# Each cap on its own, and the counter row it fills; the callers differ and have only that row in common.
CONTENDED = {
    "global": (Caps(daily_micros=K * COST), EVERYONE),
    "identity": (Caps(identity_daily_micros=K * COST), "token:shared"),
    "public": (Caps(public_daily_micros=K * COST), PUBLIC),
    "public_ip": (Caps(public_ip_daily_micros=K * COST), "public-ip:203.0.113.7"),
}


def _contend(spec: Store, cap: str, attempts: int, barrier, results) -> None:
    """Worker process: wait for the others, then try `attempts` reservations as fast as possible."""
    b = Budget(spec.open(), CONTENDED[cap][0], clock=lambda: NOON)
    statuses = []
    barrier.wait(timeout=30)
    for i in range(attempts):
        caller = f"{os.getpid()}-{i}"
        if cap in ("global", "identity"):
            identity = "token:shared" if cap == "identity" else f"token:{caller}"
            caps = b.caps_for(identity)
        else:  # page sessions, each its own: from one address, or (public) each from its own
            identity = f"session:{caller}"
            caps = b.caps_for(identity, "page", "203.0.113.7" if cap == "public_ip" else caller)
        try:
            b.reserve(identity, COST, 100, caps=caps, hold=Hold(f"req-{caller}", 10, 10, 60))
            statuses.append(200)
        except ApiError as error:
            statuses.append(error.status)
    results.put(statuses)


@pytest.mark.parametrize("cap", list(CONTENDED))
def test_exactly_k_of_4k_concurrent_reservations_from_4_processes_succeed(store: Store, cap: str) -> None:
    ctx = process_context()
    barrier, results = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_contend, args=(store, cap, K, barrier, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    statuses = [status for _ in workers for status in results.get(timeout=60)]
    for worker in workers:
        worker.join(10)
    assert sorted(statuses) == [200] * K + [429] * (3 * K)
    assert make_budget(store).totals(CONTENDED[cap][1], DAY)["reserved_micros"] == K * COST
    assert make_budget(store).totals(EVERYONE, DAY)["reserved_micros"] == K * COST  # refusals held nothing
    assert len(holds(store)) == K


def test_threads_of_one_worker_share_the_budget_exactly(store: Store) -> None:
    b = make_budget(store, identity_daily_micros=K * COST)  # one Budget, as in a gthread worker
    statuses: list[int] = []

    def call() -> None:
        for _ in range(K):
            try:
                b.reserve("token:threads", COST, 1)
                statuses.append(200)
            except ApiError as error:
                statuses.append(error.status)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses) == [200] * K + [429] * (3 * K)


# --- the app's budget -----------------------------------------------------------------------------------------------


def test_init_app_keeps_counters_in_the_ledger_database(settings_for, tmp_path: Path) -> None:
    app = create_app(
        settings_for(
            CHATPROXY_DATABASE_URL=f"sqlite:///{tmp_path / 'app.db'}",
            CHATPROXY_DAILY_BUDGET_USD="2.5",
            CHATPROXY_IDENTITY_DAILY_BUDGET_USD="0.25",
            CHATPROXY_IDENTITY_DAILY_TOKEN_BUDGET=1000,
        )
    )
    b: Budget = state(app).budget  # create_app initialised usage, then budget
    assert b.caps == Caps(
        2_500_000, 250_000, 0, 1000, public_daily_micros=5_000_000, public_ip_daily_micros=2_000_000
    )  # the public caps' defaults
    assert isinstance(b.counters, SqlCounters)
    with app.app_context():
        state().ledger.create_schema()
    assert "budget_counters" in sa.inspect(b.counters.engine).get_table_names()


def test_budgets_stay_in_the_database_when_redis_is_configured(settings_for, tmp_path: Path) -> None:
    """A Redis outage must not stop the proxy: budgets live with the ledger, which every call needs anyway."""
    app: Flask = create_app(
        settings_for(
            CHATPROXY_DATABASE_URL=f"sqlite:///{tmp_path / 'app.db'}",
            CHATPROXY_REDIS_URL="redis://127.0.0.1:1/0",
            CHATPROXY_IDENTITY_DAILY_BUDGET_USD="0.001",
            CHATPROXY_DAILY_BUDGET_USD="0",
        )
    )
    b: Budget = state(app).budget
    assert isinstance(b.counters, SqlCounters)
    b.reserve("token:redis-app", 1_000, 1)
    assert refusal(lambda: b.reserve("token:redis-app", 1, 1)).code == "budget_exceeded"


# --- through the app: public callers cannot spend what token holders need -----------------------------------

ONE_MICRO_PER_TOKEN = json.dumps({m: {"input": 1, "cached_input": 1, "output": 1} for m in ("gpt-4o", "gpt-4o-mini")})
ALLOWED = "https://app.example.com"
TOKEN = "cpx_budget-test-token-0123456789"
ASK = {"message": "hi", "max_tokens": 100}
WORST = (
    estimate_prompt_tokens(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hi"}]
    )
    + 100
)  # micro-dollars at one per token


@pytest.fixture
def public_app(settings_for, fake):
    """An app as shipped (no anonymous callers) with a page, an allowed origin and a token; one token = 1 µ$."""
    fake.for_model("gpt-4o-mini", Reply(content="x" * 400))  # 100 completion tokens: each call costs ~108 µ$

    def make(**caps: str) -> Flask:
        return create_app(
            settings_for(
                CHATPROXY_ALLOW_ANONYMOUS=False,
                CHATPROXY_ALLOWED_ORIGINS=ALLOWED,
                CHATPROXY_API_TOKENS=f"app={hash_token(TOKEN)}",
                CHATPROXY_RATE_LIMIT_ORIGIN="100000/minute",
                CHATPROXY_PRICES=ONE_MICRO_PER_TOKEN,
                **caps,
            )
        )

    return make


def page_call(app: Flask, ip: str):
    """A fresh page session from `ip` (a new visitor, or one who reloaded) asks one question."""
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = ip
    return client.post("/api/chat", json=ASK, headers={"X-CSRF-Token": page_session(client)})


def token_call(app: Flask):
    return app.test_client().post("/api/chat", json=ASK, headers={"Authorization": f"Bearer {TOKEN}"})


def origin_call(app: Flask, ip: str):
    return app.test_client().post("/api/chat", json=ASK, headers={"Origin": ALLOWED}, environ_base={"REMOTE_ADDR": ip})


def until_refused(call, limit: int = 12) -> list:
    """Responses of `call()` up to and including the first refusal (at most `limit`)."""
    responses = [call()]
    while responses[-1].status_code == 200 and len(responses) < limit:
        responses.append(call())
    return responses


def fits_exactly(costs: list[int], cap: int) -> bool:
    """Whether calls with these real costs are exactly those a cap admits: each fitted its worst case, one more not."""
    return all(sum(costs[:i]) + WORST <= cap for i in range(len(costs))) and sum(costs) + WORST > cap


def test_page_sessions_from_one_ip_stop_at_the_ip_cap_while_others_get_through(public_app, fake) -> None:
    app = public_app(CHATPROXY_PUBLIC_IP_DAILY_BUDGET_USD="0.0004")  # 400 µ$: three or four calls
    responses = until_refused(lambda: page_call(app, "198.51.100.7"))

    *answered, refused = responses
    assert [r.status_code for r in answered] == [200] * len(answered) and len(answered) >= 2
    assert (refused.status_code, refused.get_json()["error"]) == (
        429,
        {
            "code": "budget_exceeded",
            "request_id": refused.headers["X-Request-ID"],
            "message": "Your network address has reached its usage limit for today. Try again after midnight UTC.",
        },
    )
    assert 0 < int(refused.headers["Retry-After"]) <= 86_400
    rows = state(app).ledger.rows()
    assert len({row["identity"] for row in rows}) == len(answered) == len(fake.chat_calls())  # one call a session
    assert fits_exactly([row["cost_micros"] for row in rows], 400)
    assert page_call(app, "198.51.100.8").status_code == 200  # another visitor
    assert token_call(app).status_code == 200


def test_public_traffic_stops_at_its_share_while_a_token_caller_gets_through(public_app) -> None:
    app = public_app(CHATPROXY_PUBLIC_DAILY_BUDGET_USD="0.0004", CHATPROXY_PUBLIC_IP_DAILY_BUDGET_USD="0")
    addresses = (f"198.51.100.{n}" for n in range(1, 100))
    responses = until_refused(lambda: page_call(app, next(addresses)))  # every visitor from their own address

    *answered, refused = responses
    assert [r.status_code for r in answered] == [200] * len(answered) and len(answered) >= 2
    message = (
        "The service has reached its usage limit for today for callers without an API token. "
        "Try again after midnight UTC."
    )
    assert (refused.status_code, refused.get_json()["error"]["message"]) == (429, message)
    assert origin_call(app, "203.0.113.1").get_json()["error"]["message"] == message  # frontends share it
    assert fits_exactly([row["cost_micros"] for row in state(app).ledger.rows()], 400)
    assert token_call(app).status_code == 200  # the server-side caller was not starved
    assert state(app).budget.totals(PUBLIC)["reserved_micros"] == 0


def test_one_client_of_an_allowed_origin_cannot_lock_its_other_users_out(public_app) -> None:
    app = public_app(CHATPROXY_PUBLIC_IP_DAILY_BUDGET_USD="0.0004")
    responses = until_refused(lambda: origin_call(app, "198.51.100.7"))  # anyone can send that Origin header

    assert responses[-1].status_code == 429
    assert responses[-1].get_json()["error"]["message"].startswith("Your network address")
    assert origin_call(app, "198.51.100.8").status_code == 200  # the frontend's other users go on
