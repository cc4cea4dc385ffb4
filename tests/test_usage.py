"""Prices in micro-dollars, token estimates, the usage ledger on SQLite and PostgreSQL, its CLI and /api/usage."""

from __future__ import annotations

import json
import os
import signal
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask, g

from chatproxy import build_state, create_app, reports, usage
from chatproxy import state as state_module
from chatproxy.api.usage import usage_report
from chatproxy.callers import Caller, hash_token
from chatproxy.config import SettingsError, raw_settings, validate
from chatproxy.errors import ApiError
from chatproxy.models import ModelTable, load_models
from chatproxy.state import state
from chatproxy.usage import Ledger, estimate_prompt_tokens, estimate_tokens
from tests.helpers import TEST_KEY, free_port, postgres_schema_url, process_context

SVG = "{http://www.w3.org/2000/svg}"


# --- databases: every ledger test runs on a SQLite file and on a private PostgreSQL schema (database_url) ------


class Clock:
    """A settable clock (naive UTC)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2025, 3, 14, 12, 0, 0))


@pytest.fixture
def ledger(database_url: str, clock: Clock) -> Iterator[Ledger]:
    ledger = Ledger(database_url, clock=clock)
    ledger.create_schema()
    yield ledger
    ledger.dispose()


def close_ok(ledger: Ledger, row_id: int, **changes: object) -> bool:
    """Close a row with plausible values, overridden by `changes`."""
    values: dict[str, object] = {
        "model_answered": "gpt-4o",
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "tokens_exact": True,
        "cost_micros": 750,
        "outcome": "ok",
        "latency_ms": 800,
        "ttft_ms": 200,
    }
    values.update(changes)
    return ledger.close(row_id, **values)  # type: ignore[arg-type]


# --- prices ------------------------------------------------------------------------------------------------


def load_prices(prices: str | None = None) -> ModelTable:
    """The app's model table, with CHATPROXY_PRICES set to `prices`."""
    return load_models(validate({**raw_settings(None), "OPENAI_API_KEY": TEST_KEY, "CHATPROXY_PRICES": prices or ""}))


@pytest.mark.parametrize(
    ("model", "prompt", "completion", "cached", "batch", "expected"),
    [
        ("gpt-4o", 1_000_000, 0, 0, False, 2_500_000),  # $2.50 per million input tokens
        ("gpt-4o", 0, 1_000_000, 0, False, 10_000_000),
        ("gpt-4o", 1_000_000, 0, 1_000_000, False, 1_250_000),
        ("gpt-4o-mini", 1_000_000, 1_000_000, 0, False, 750_000),
        ("gpt-4o-mini", 1_000_000, 0, 1_000_000, False, 75_000),
        ("gpt-4o", 1_000_000, 1_000_000, 0, True, 6_250_000),  # Batch API: half of every rate
        ("gpt-4o-mini", 1000, 1000, 400, False, 90 + 30 + 600),
        ("gpt-4o-mini", 1, 0, 0, False, 1),  # 0.15 micro-dollars rounds up to 1
        ("gpt-4o-mini", 0, 0, 1, True, 0),  # cached beyond the prompt is clamped: nothing to pay
        ("gpt-4o-mini", 1, 0, 1, True, 1),  # 0.0375 rounds up
        ("gpt-4o-mini", 0, 0, 0, False, 0),
        ("gpt-4o", 3, 7, 1, False, 77),  # 2 × 2.50 + 1 × 1.25 + 7 × 10.00 = 76.25 micro-dollars, rounded up
    ],
)
def test_cost_is_integer_micro_dollars_rounded_up(model, prompt, completion, cached, batch, expected) -> None:
    cost = load_prices().cost_micros(model, prompt, completion, cached, batch)
    assert cost == expected
    assert type(cost) is int


def test_costs_add_up_exactly_without_float_drift() -> None:
    table = load_prices()
    # 0.1 + 0.2 style drift would show here: 10 million calls worth of tokens, summed in one go.
    assert table.cost_micros("gpt-4o-mini", 10_000_000 * 3, 0) == 4_500_000
    assert table.spec("gpt-4o-mini").prices.base.cached_input == 75_000  # $0.075 per million, exact


def test_dated_snapshots_are_priced_as_their_model_and_unknown_models_at_the_highest_rates(caplog) -> None:
    table = load_prices()
    assert table.cost_micros("gpt-4o-mini-2024-07-18", 1000, 1000) == table.cost_micros("gpt-4o-mini", 1000, 1000)
    assert table.known("gpt-4o-2024-08-06") and not table.known("mystery-model")
    dearest = table.spec("mystery-model").prices.base  # never cheaper than any known model
    assert all(dearest.output >= table.spec(name).prices.base.output for name in ("gpt-4o", "o1", "gpt-6-astra"))
    assert table.cost_micros("mystery-model", 1_000_000, 0) == dearest.input
    assert "mystery-model" in caplog.text
    with pytest.raises(ValueError):
        table.cost_micros("gpt-4o", -1, 0)


def test_unknown_model_takes_the_highest_rate_of_each_kind_across_models() -> None:
    table = load_prices('{"cheap-in": {"input": 100, "output": 0.01}}')
    rates = table.spec("mystery").prices.base
    assert (rates.input, rates.cached_input) == (100_000_000, 100_000_000)  # cheap-in's input is the dearest now


def test_worst_case_is_the_dearest_model_that_may_answer() -> None:
    table = load_prices()
    assert table.worst_case_micros(["gpt-4o-mini", "gpt-4o"], 1000, 1000) == 12_500


def test_override_replaces_and_adds_models() -> None:
    table = load_prices(
        '{"gpt-4o": {"input": 5, "cached_input": 2.5, "output": 20}, "o-new": {"input": 1.1, "output": 4.4}}'
    )
    assert table.cost_micros("gpt-4o", 1_000_000, 1_000_000) == 25_000_000
    assert table.cost_micros("gpt-4o-mini", 1_000_000, 0) == 150_000  # untouched
    assert table.cost_micros("o-new", 1_000_000, 0, cached_tokens=1_000_000) == 1_100_000  # cached = input


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "non-empty JSON object"),
        ("{}", "non-empty JSON object"),
        ('{"gpt-4o": 2.5}', "must be an object"),
        ('{"gpt-4o": {"input": 2.5}}', "missing 'output'"),
        ('{"gpt-4o": {"input": 2.5, "ouput": 10}}', "unknown key(s) 'ouput'"),
        ('{"gpt-4o": {"input": -1, "output": 10}}', "0 or more"),
        ('{"gpt-4o": {"input": "2.5", "output": 10}}', "must be a number"),
        ('{"gpt-4o": {"input": true, "output": 10}}', "must be a number"),
        ('{"gpt-4o": {"input": NaN, "output": 10}}', "must be a number"),
        ('{"gpt-4o": {"input": 0.0000001, "output": 10}}', "millionth of a dollar"),
        ('{" ": {"input": 1, "output": 1}}', "empty model name"),
    ],
)
def test_bad_price_override_names_the_variable(text: str, says: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_prices(text)
    assert "CHATPROXY_PRICES" in str(error.value)
    assert says in str(error.value)


def test_app_prices_come_from_settings_and_a_bad_override_stops_start_up(settings_for) -> None:
    app = create_app(settings_for(CHATPROXY_PRICES='{"gpt-4o-mini": {"input": 1, "output": 2}}'))
    assert state(app).models.cost_micros("gpt-4o-mini", 1_000_000, 1_000_000) == 3_000_000
    assert load_prices().cost_micros("gpt-4o-mini", 1_000_000, 1_000_000) == 750_000  # the shipped table
    with pytest.raises(SettingsError, match="CHATPROXY_PRICES"):
        create_app(settings_for(CHATPROXY_PRICES='{"gpt-4o": {"input": 1}}'))


# --- token estimates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"), [("", 0), ("abcd", 1), ("abcde", 2), ("a" * 400, 100), ("é", 1), ("日本語", 3), ("🙂🙂", 2)]
)
def test_estimate_tokens_is_a_quarter_of_the_utf8_bytes_rounded_up(text: str, tokens: int) -> None:
    assert estimate_tokens(text) == tokens


def test_prompt_estimate_adds_four_per_message_and_three_for_the_reply() -> None:
    messages = [{"role": "system", "content": "a" * 40}, {"role": "user", "content": "hello"}]
    assert estimate_prompt_tokens(messages) == 3 + (4 + 10) + (4 + 2)
    assert estimate_prompt_tokens([]) == 3


# --- the ledger (SQLite and PostgreSQL) --------------------------------------------------------------------


def test_open_inserts_an_interrupted_row_before_the_call(ledger: Ledger, clock: Clock) -> None:
    row_id = ledger.open("req-1", "token:app", "gpt-4o", stream=True)
    [row] = ledger.rows()
    assert row["id"] == row_id
    assert row["outcome"] == "interrupted"
    assert (row["request_id"], row["identity"], row["model_requested"], row["stream"]) == (
        "req-1",
        "token:app",
        "gpt-4o",
        True,
    )
    assert row["created_at"] == clock.now and row["closed_at"] is None
    assert (
        row["model_answered"],
        row["prompt_tokens"],
        row["completion_tokens"],
        row["cost_micros"],
        row["tokens_exact"],
    ) == (None, 0, 0, 0, False)


def test_close_records_the_result_once(ledger: Ledger, clock: Clock) -> None:
    row_id = ledger.open("req-2", "session:abc", "gpt-4o", stream=False)
    clock.now += timedelta(seconds=2)
    assert close_ok(ledger, row_id, model_answered="gpt-4o-2024-08-06", cost_micros=2**40)
    assert not close_ok(ledger, row_id, outcome="upstream_timeout")  # a second close changes nothing
    [row] = ledger.rows(request_id="req-2")
    assert row["outcome"] == "ok" and row["model_answered"] == "gpt-4o-2024-08-06"
    assert row["cost_micros"] == 2**40  # bigint
    assert (row["prompt_tokens"], row["completion_tokens"], row["tokens_exact"]) == (100, 50, True)
    assert (row["latency_ms"], row["ttft_ms"]) == (800, 200)
    assert row["closed_at"] == clock.now


@pytest.mark.parametrize("outcome", ["interrupted", "", "Not Snake", "x" * 65])
def test_close_refuses_an_outcome_that_is_not_a_code(ledger: Ledger, outcome: str) -> None:
    row_id = ledger.open("req-3", "ip:127.0.0.1", "gpt-4o", stream=False)
    with pytest.raises(ValueError):
        close_ok(ledger, row_id, outcome=outcome)


def test_fallback_attempts_share_a_request_id(ledger: Ledger) -> None:
    first = ledger.open("req-4", "token:app", "gpt-4o", stream=True)
    close_ok(
        ledger,
        first,
        model_answered=None,
        prompt_tokens=0,
        completion_tokens=0,
        tokens_exact=False,
        cost_micros=0,
        outcome="fallback",
        ttft_ms=None,
    )
    second = ledger.open("req-4", "token:app", "gpt-4o-mini", stream=True)
    close_ok(ledger, second, model_answered="gpt-4o-mini")
    assert [r["outcome"] for r in ledger.rows(request_id="req-4")] == ["fallback", "ok"]


def _open_then_hang(url: str, ready) -> None:
    """A worker that opens a row and is killed before it can close it."""
    ledger = Ledger(url)
    ready.put(ledger.open("req-killed", "token:app", "gpt-4o", stream=True))
    signal.pause()


def test_a_worker_killed_mid_call_leaves_an_interrupted_row(ledger: Ledger, database_url: str) -> None:
    ctx = process_context()
    ready = ctx.Queue()
    worker = ctx.Process(target=_open_then_hang, args=(database_url, ready))
    worker.start()
    row_id = ready.get(timeout=20)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(5)
    [row] = ledger.rows(request_id="req-killed")
    assert row["id"] == row_id and row["outcome"] == "interrupted" and row["closed_at"] is None


def test_open_without_a_database_is_a_503_not_an_unrecorded_call() -> None:
    broken = Ledger(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test")  # nothing listens there
    with pytest.raises(ApiError) as error:
        broken.open("req-5", "token:app", "gpt-4o", stream=False)
    assert (error.value.status, error.value.code) == (503, "ledger_unavailable")
    assert (
        broken.close(
            1,
            model_answered=None,
            prompt_tokens=0,
            completion_tokens=0,
            tokens_exact=False,
            cost_micros=0,
            outcome="ok",
            latency_ms=None,
            ttft_ms=None,
        )
        is False
    )
    broken.dispose()


def test_an_in_memory_ledger_is_one_database_for_all_threads() -> None:
    ledger = Ledger("sqlite://")
    ledger.create_schema()
    worker = threading.Thread(target=ledger.open, args=("req-6", "ip:127.0.0.1", "gpt-4o", False))
    worker.start()
    worker.join(5)
    assert [row["request_id"] for row in ledger.rows()] == ["req-6"]


def _fill(ledger: Ledger, clock: Clock) -> None:
    """Four rows over three days: two identities, two models, one interrupted."""
    day1, day2 = datetime(2025, 3, 1, 23, 59, 59), datetime(2025, 3, 2, 0, 0, 0)
    for when, identity, model, cost, outcome in [
        (day1, "token:a", "gpt-4o", 1_500_000, "ok"),
        (day1, "token:b", "gpt-4o-mini", 250, "ok"),
        (day2, "token:a", "gpt-4o", 2_000_001, "upstream_timeout"),
        (day2, "token:a", "gpt-4o-mini", 0, None),
        (datetime(2025, 3, 3, 0, 0, 0), "token:a", "gpt-4o", 999, "ok"),  # outside the range below
    ]:
        clock.now = when
        row_id = ledger.open(f"r-{when}-{identity}", identity, model, stream=False)
        if outcome:
            close_ok(
                ledger,
                row_id,
                model_answered=model,
                prompt_tokens=10,
                completion_tokens=5,
                cost_micros=cost,
                outcome=outcome,
            )


def test_report_totals_by_day_model_and_identity(ledger: Ledger, clock: Clock) -> None:
    _fill(ledger, clock)
    report = ledger.report(date(2025, 3, 1), date(2025, 3, 2))
    assert (report["since"], report["until"], report["currency"]) == ("2025-03-01", "2025-03-02", "USD")
    assert report["totals"] == {
        "requests": 4,
        "prompt_tokens": 30,
        "completion_tokens": 15,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "cost_micros": 3_500_251,
        "total_tokens": 45,
        "cost_usd": "3.500251",
    }
    assert report["outcomes"] == {"interrupted": 1, "ok": 2, "upstream_timeout": 1}
    assert [(d["day"], d["requests"], d["cost_usd"]) for d in report["by_day"]] == [
        ("2025-03-01", 2, "1.500250"),
        ("2025-03-02", 2, "2.000001"),
    ]
    assert [(m["model"], m["requests"], m["cost_micros"]) for m in report["by_model"]] == [
        ("gpt-4o", 2, 3_500_001),
        ("gpt-4o-mini", 2, 250),
    ]  # the interrupted row counts under its requested model
    assert [(i["identity"], i["requests"], i["total_tokens"]) for i in report["by_identity"]] == [
        ("token:a", 3, 30),
        ("token:b", 1, 15),
    ]
    assert len(report["groups"]) == 4
    assert json.loads(json.dumps(report)) == report  # plain JSON: no Decimal, no datetime


def test_report_of_an_empty_range_is_zeros(ledger: Ledger, clock: Clock) -> None:
    _fill(ledger, clock)
    report = ledger.report(date(2024, 1, 1), date(2024, 1, 31))
    assert report["totals"]["requests"] == 0 and report["totals"]["cost_usd"] == "0.000000"
    assert report["groups"] == [] and report["outcomes"] == {}
    with pytest.raises(ValueError):
        ledger.report(date(2025, 3, 2), date(2025, 3, 1))


# --- the app: default database, CLI, /api/usage ------------------------------------------------------------


def build_app(settings_for, tmp_path: Path, **overrides: object) -> Flask:
    """An app on its own database; with an empty URL, the ledger is rebuilt in a temporary instance folder."""
    overrides.setdefault("CHATPROXY_DATABASE_URL", f"sqlite:///{tmp_path / 'app.db'}")
    app = create_app(settings_for(**overrides))
    if not overrides["CHATPROXY_DATABASE_URL"]:
        app_state = state(app)
        instance = str(tmp_path / "instance")
        state_module.init_app(app, build_state(app_state.settings, app_state.models, app_state.retiring, instance))
    return app


def test_default_ledger_is_a_wal_sqlite_file_in_the_instance_folder(settings_for, tmp_path: Path) -> None:
    app = build_app(settings_for, tmp_path, CHATPROXY_DATABASE_URL="")
    ledger: Ledger = state(app).ledger
    path = tmp_path / "instance" / "chatproxy.db"
    assert ledger.engine.url.database == str(path)
    with ledger.engine.connect() as conn:  # the first connection makes the file and the tables
        assert path.is_file()
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    tables = {"ledger", "budget_counters", "budget_holds", "batches", "api_keys"}
    assert set(sa.inspect(ledger.engine).get_table_names()) == tables
    assert state(app).budget.counters.engine is ledger.engine


def test_init_db_creates_the_tables(settings_for, tmp_path: Path) -> None:
    app = build_app(settings_for, tmp_path)
    ledger: Ledger = state(app).ledger
    with ledger.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE ledger")
        conn.exec_driver_sql("DROP TABLE budget_counters")
        conn.exec_driver_sql("DROP TABLE budget_holds")
        conn.exec_driver_sql("DROP TABLE batches")
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    assert "Ledger ready at sqlite:///" in result.output
    tables = {"ledger", "budget_counters", "budget_holds", "batches", "api_keys"}
    assert set(sa.inspect(ledger.engine).get_table_names()) == tables


def _previous_ledger(url: str) -> None:
    """The ledger table as the previous release made it (no client_request_id), with one row in it."""
    old = sa.MetaData()
    table = sa.Table(
        "ledger",
        old,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), nullable=False, index=True),
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
    )
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        old.create_all(conn)
        conn.execute(
            table.insert().values(
                request_id="old-1",
                created_at=datetime(2025, 1, 1),
                identity="token:a",
                model_requested="gpt-4o",
                outcome="ok",
                stream=False,
                cost_micros=7,
            )
        )
    engine.dispose()


def test_first_use_adds_the_columns_a_previous_ledger_lacks(database_url: str) -> None:
    _previous_ledger(database_url)
    ledger = Ledger(database_url)  # no create_schema(): the first connection checks the schema

    ledger.open("new-1", "token:a", "gpt-4o", stream=False, client_request_id="theirs-1")

    rows = ledger.rows()
    assert [(r["request_id"], r["client_request_id"], r["cost_micros"]) for r in rows] == [
        ("old-1", None, 7),
        ("new-1", "theirs-1", 0),
    ]
    ledger.dispose()


def test_init_db_adds_the_columns_a_previous_ledger_lacks(database_url: str, settings_for, tmp_path: Path) -> None:
    _previous_ledger(database_url)
    app = build_app(settings_for, tmp_path, CHATPROXY_DATABASE_URL=database_url)

    result = app.test_cli_runner().invoke(args=["init-db"])

    assert result.exit_code == 0, result.output
    engine = sa.create_engine(database_url)
    columns = {column["name"] for column in sa.inspect(engine).get_columns("ledger")}
    tables = set(sa.inspect(engine).get_table_names())
    engine.dispose()
    state(app).ledger.dispose()
    assert "client_request_id" in columns
    assert {"ledger", "budget_counters", "batches"} <= tables


def test_a_new_column_without_a_default_is_refused_not_half_added(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    _previous_ledger(url)
    strict = sa.MetaData()
    sa.Table(
        "ledger", strict, sa.Column("id", sa.Integer, primary_key=True), sa.Column("must", sa.Text, nullable=False)
    )

    with pytest.raises(sa.exc.ArgumentError, match=r"ledger.must"):
        usage.create_tables(sa.create_engine(url), strict)


@pytest.mark.parametrize(("retry_seconds", "attempts"), [(usage.SCHEMA_RETRY_SECONDS, 1), (0, 2)])
def test_a_failed_schema_check_is_logged_and_tried_again_after_a_pause(
    tmp_path: Path, monkeypatch, caplog, retry_seconds: float, attempts: int
) -> None:
    monkeypatch.setattr(usage, "SCHEMA_RETRY_SECONDS", retry_seconds)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    _previous_ledger(url)
    ledger = Ledger(url)
    impossible = sa.MetaData()  # a column no existing row could have
    sa.Table(
        "ledger", impossible, sa.Column("id", sa.Integer, primary_key=True), sa.Column("must", sa.Text, nullable=False)
    )
    ledger.schema.add(impossible)

    for _ in range(2):
        with ledger.engine.connect() as conn:  # the connection still works: requests fail or pass on their own
            assert conn.execute(sa.text("SELECT count(*) FROM ledger")).scalar() == 1

    failures = [r for r in caplog.records if r.getMessage().startswith("cannot create or check the database schema")]
    assert len(failures) == attempts
    ledger.dispose()


def test_a_fresh_start_on_postgresql_creates_the_schema(settings_for, tmp_path: Path) -> None:
    with postgres_schema_url() as url:
        app = build_app(settings_for, tmp_path, CHATPROXY_DATABASE_URL=url)
        ledger: Ledger = state(app).ledger
        assert {"ledger", "budget_counters"} <= set(sa.inspect(ledger.engine).get_table_names())
        ledger.dispose()


@pytest.fixture
def filled_app(settings_for, tmp_path: Path) -> Flask:
    app = build_app(
        settings_for,
        tmp_path,
        CHATPROXY_API_TOKENS=f"ops={hash_token('cpx-ops-token')},app={hash_token('cpx-app-token')}",
        CHATPROXY_ADMIN_TOKENS="ops",
    )
    ledger: Ledger = state(app).ledger
    clock = Clock(datetime(2025, 3, 1))
    ledger.clock = clock
    _fill(ledger, clock)
    clock.now = datetime(2025, 3, 2, 12)
    close_ok(
        ledger,
        ledger.open("r-odd", "token:a", "<weird & model>", stream=True),
        model_answered="<weird & model>",
        cost_micros=500_000,
    )
    return app


def test_usage_command_prints_a_table(filled_app: Flask) -> None:
    result = filled_app.test_cli_runner().invoke(args=["usage", "--since", "2025-03-01", "--until", "2025-03-02"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Usage 2025-03-01 .. 2025-03-02 (UTC)"
    assert lines[1] == "Total: 5 requests, 130 prompt (0 cached) + 65 completion (0 reasoning) tokens, $4.000251"
    assert any(
        line.split() == ["2025-03-01", "gpt-4o", "token:a", "1", "10", "0", "5", "0", "1.500000"] for line in lines
    )


def test_usage_command_json(filled_app: Flask) -> None:
    result = filled_app.test_cli_runner().invoke(
        args=["usage", "--since", "2025-03-02", "--until", "2025-03-02", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["totals"]["requests"] == 3 and report["by_day"][0]["day"] == "2025-03-02"


def test_usage_command_plots_a_valid_svg(filled_app: Flask, tmp_path: Path) -> None:
    chart = tmp_path / "spend.svg"
    result = filled_app.test_cli_runner().invoke(
        args=["usage", "--since", "2025-02-27", "--until", "2025-03-03", "--plot", str(chart)]
    )
    assert result.exit_code == 0, result.output
    root = ET.parse(chart).getroot()  # well-formed XML, even with "<weird & model>" in it
    assert root.tag == f"{SVG}svg" and int(root.get("width")) > 0
    bars = [el for el in root.iter(f"{SVG}rect") if el.get("class") == "bar"]
    assert sorted((b.get("data-day"), b.get("data-model")) for b in bars) == [
        ("2025-03-01", "gpt-4o"),
        ("2025-03-01", "gpt-4o-mini"),
        ("2025-03-02", "<weird & model>"),
        ("2025-03-02", "gpt-4o"),
        ("2025-03-03", "gpt-4o"),
    ]
    heights = {(b.get("data-day"), b.get("data-model")): float(b.get("height")) for b in bars}
    assert (
        heights[("2025-03-02", "gpt-4o")]
        > heights[("2025-03-01", "gpt-4o")]
        > heights[("2025-03-02", "<weird & model>")]
        > 0
    )  # taller bar, more spend
    legend = {el.text for el in root.iter(f"{SVG}text")}
    assert {"gpt-4o", "gpt-4o-mini", "<weird & model>"} <= legend


def test_usage_command_plots_an_empty_range(filled_app: Flask, tmp_path: Path) -> None:
    chart = tmp_path / "empty.svg"
    result = filled_app.test_cli_runner().invoke(
        args=["usage", "--since", "2020-01-01", "--until", "2020-01-01", "--plot", str(chart)]
    )
    assert result.exit_code == 0 and "No usage in this range." in result.output
    assert "No spend in this range" in ET.tostring(ET.parse(chart).getroot(), encoding="unicode")


@pytest.mark.parametrize(
    "args",
    [
        ["--since", "2025-13-01"],
        ["--since", "2025-03-02", "--until", "2025-03-01"],
        ["--until", "9999-12-31"],
        ["--until", "0001-01-01"],
    ],
)
def test_usage_command_refuses_bad_dates(filled_app: Flask, args: list[str]) -> None:
    result = filled_app.test_cli_runner().invoke(args=["usage", *args])
    assert result.exit_code == 2


def test_api_usage_serves_admin_tokens(filled_app: Flask) -> None:
    response = filled_app.test_client().get(
        "/api/usage?since=2025-03-01&until=2025-03-02", headers={"Authorization": "Bearer cpx-ops-token"}
    )
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.json["totals"]["cost_usd"] == "4.000251"
    assert response.json["since"] == "2025-03-01"


def test_api_usage_defaults_to_the_last_30_days(filled_app: Flask) -> None:
    response = filled_app.test_client().get("/api/usage", headers={"Authorization": "Bearer cpx-ops-token"})
    assert response.status_code == 200
    until = date.fromisoformat(response.json["until"])
    assert until == datetime.now(UTC).date() and date.fromisoformat(response.json["since"]) == until - timedelta(29)


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer cpx-app-token"}, {}])
def test_api_usage_refuses_everyone_else(filled_app: Flask, headers: dict[str, str]) -> None:
    response = filled_app.test_client().get("/api/usage", headers=headers)  # a non-admin token; anonymous (ip:)
    assert response.status_code == 403
    assert response.json["error"]["code"] == "forbidden"
    assert "totals" not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    "identity", [None, "session:ops", "origin:https://ops.example", "ip:10.0.0.1", "token:app", "tokenops"]
)
def test_only_an_admin_token_identity_passes(filled_app: Flask, identity: str | None) -> None:
    with filled_app.test_request_context("/api/usage"):
        if identity is not None:
            kind = identity.partition(":")[0] if ":" in identity else "token"
            g.caller = Caller(identity, {"session": "page", "ip": "anonymous"}.get(kind, kind), identity)
        with pytest.raises(ApiError) as error:
            usage_report()
        assert error.value.status == (401 if identity is None else 403)
        g.caller = Caller("token:ops", "token", "token:ops")
        assert usage_report().status_code == 200


@pytest.mark.parametrize(
    "query",
    [
        "since=yesterday",
        "until=2025-02-30",
        "since=2025-03-02&until=2025-03-01",
        "until=9999-12-31",
        "until=0001-01-01",
        "since=0001-01-01&until=0001-03-01",
    ],
)
def test_api_usage_refuses_bad_dates(filled_app: Flask, query: str) -> None:
    response = filled_app.test_client().get(f"/api/usage?{query}", headers={"Authorization": "Bearer cpx-ops-token"})
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_request"
    assert query.split("=")[0] in response.json["error"]["message"]


@pytest.mark.parametrize(
    "query, says",
    [
        ("sinse=2025-03-01", "Unknown query parameter: 'sinse'"),
        ("since=2025-03-01&format=csv", "Unknown query parameter: 'format'"),
        ("since=2025-03-01&since=2025-03-02", "since is given more than once"),
    ],
)
def test_api_usage_refuses_unknown_and_repeated_query_parameters(filled_app: Flask, query: str, says: str) -> None:
    response = filled_app.test_client().get(f"/api/usage?{query}", headers={"Authorization": "Bearer cpx-ops-token"})
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_request"
    assert says in response.json["error"]["message"]
    assert "totals" not in response.get_data(as_text=True)


def test_api_usage_reaches_the_first_and_last_days_it_allows(filled_app: Flask) -> None:
    response = filled_app.test_client().get(
        f"/api/usage?since={reports.FIRST_DAY}&until={reports.LAST_DAY}",
        headers={"Authorization": "Bearer cpx-ops-token"},
    )
    assert response.status_code == 200
    assert response.json["totals"]["requests"] == len(state(filled_app).ledger.rows())  # all
