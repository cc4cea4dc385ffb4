"""Hard daily budgets on SQLite and PostgreSQL: caps, settle/release, Retry-After, and concurrent workers."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from chatproxy import budget, create_app, usage
from chatproxy.budget import EVERYONE, Budget, Caps, SqlCounters, seconds_to_midnight
from chatproxy.errors import ApiError
from chatproxy.usage import make_engine
from tests.test_usage import postgres_schema_url, process_context

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


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A SQLite file or a private PostgreSQL schema, with the counters ready."""
    if request.param == "sqlite":
        spec = Store("sqlite", f"sqlite:///{tmp_path / 'budget.db'}")
        counters = spec.open()
        counters.create_schema()
        counters.engine.dispose()
        yield spec
    else:
        with postgres_schema_url() as url:
            counters = Store("postgresql", url).open()
            counters.create_schema()
            counters.engine.dispose()
            yield Store("postgresql", url)


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

@pytest.mark.parametrize(("now", "seconds"), [
    (datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC), 43_200),
    (datetime(2025, 3, 14, 0, 0, 0, tzinfo=UTC), 86_400),
    (datetime(2025, 3, 14, 23, 59, 59, 500_000, tzinfo=UTC), 1),
    (datetime.fromisoformat("2025-03-14T20:00:00-05:00"), 82_800),  # 01:00 UTC on the 15th
    (datetime(2025, 3, 14, 23, 0, 0), 3_600),  # naive times are taken as UTC
])
def test_retry_after_counts_to_the_next_utc_midnight(now: datetime, seconds: int) -> None:
    assert seconds_to_midnight(now) == seconds


# --- caps (every backend) -----------------------------------------------------------------------------------

def test_reserve_settle_release_move_the_counters(store: Store) -> None:
    b = make_budget(store, daily_micros=10_000, identity_daily_micros=5_000)
    first = b.reserve("token:a", 3_000, 1_100)
    second = b.reserve("token:a", 1_000, 300)
    assert b.totals("token:a") == {"spent_micros": 0, "reserved_micros": 4_000, "spent_tokens": 0,
                                   "reserved_tokens": 1_400}
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


# --- concurrency: exactly K of 4K reservations from 4 processes ---------------------------------------------

K = 10
COST = 12_500  # one worst-case call


def _contend(spec: Store, caps: Caps, identity: str | None, attempts: int, barrier, results) -> None:
    """Worker process: wait for the others, then try `attempts` reservations as fast as possible."""
    b = Budget(spec.open(), caps, clock=lambda: NOON)
    statuses = []
    barrier.wait(timeout=30)
    for i in range(attempts):
        try:
            b.reserve(identity or f"token:worker-{os.getpid()}-{i}", COST, 100)
            statuses.append(200)
        except ApiError as error:
            statuses.append(error.status)
    results.put(statuses)


@pytest.mark.parametrize("cap", ["global", "identity"])
def test_exactly_k_of_4k_concurrent_reservations_from_4_processes_succeed(store: Store, cap: str) -> None:
    caps = Caps(daily_micros=K * COST) if cap == "global" else Caps(identity_daily_micros=K * COST)
    identity = None if cap == "global" else "token:shared"  # global: every attempt a different identity
    ctx = process_context()
    barrier, results = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_contend, args=(store, caps, identity, K, barrier, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    statuses = [status for _ in workers for status in results.get(timeout=60)]
    for worker in workers:
        worker.join(10)
    assert sorted(statuses) == [200] * K + [429] * (3 * K)
    counters = make_budget(store)
    assert counters.totals(identity or EVERYONE, DAY)["reserved_micros"] == K * COST


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


# --- init_app -----------------------------------------------------------------------------------------------

def test_init_app_keeps_counters_in_the_ledger_database(settings_for, tmp_path: Path) -> None:
    app = create_app(settings_for(CHATPROXY_DATABASE_URL=f"sqlite:///{tmp_path / 'app.db'}",
                                  CHATPROXY_DAILY_BUDGET_USD="2.5", CHATPROXY_IDENTITY_DAILY_BUDGET_USD="0.25",
                                  CHATPROXY_IDENTITY_DAILY_TOKEN_BUDGET=1000))
    b: Budget = app.extensions["chatproxy.budget"]  # create_app initialised usage, then budget
    assert b.caps == Caps(2_500_000, 250_000, 0, 1000)
    assert isinstance(b.counters, SqlCounters)
    assert "budget_counters" in sa.inspect(b.counters.engine).get_table_names()
    with app.app_context():
        assert budget.current_budget() is b


def test_budget_needs_the_ledger_initialised_first(app) -> None:
    bare = Flask(__name__)
    bare.extensions["chatproxy.settings"] = app.extensions["chatproxy.settings"]
    with pytest.raises(RuntimeError, match="usage.init_app"):
        budget.init_app(bare)


def test_budgets_stay_in_the_database_when_redis_is_configured(settings_for, tmp_path: Path) -> None:
    """A Redis outage must not stop the proxy: budgets live with the ledger, which every call needs anyway."""
    app: Flask = create_app(settings_for(CHATPROXY_DATABASE_URL=f"sqlite:///{tmp_path / 'app.db'}",
                                         CHATPROXY_REDIS_URL="redis://127.0.0.1:1/0",
                                         CHATPROXY_IDENTITY_DAILY_BUDGET_USD="0.001", CHATPROXY_DAILY_BUDGET_USD="0"))
    b: Budget = app.extensions["chatproxy.budget"]
    assert isinstance(b.counters, SqlCounters)
    b.reserve("token:redis-app", 1_000, 1)
    assert refusal(lambda: b.reserve("token:redis-app", 1, 1)).code == "budget_exceeded"
