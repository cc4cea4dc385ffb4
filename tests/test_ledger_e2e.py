"""The ledger reconciles with the upstream: one row per call, also on errors, fallbacks and client aborts."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from chatproxy import create_app, usage
from chatproxy.budget import EVERYONE, PUBLIC, Budget, Caps, SqlCounters
from chatproxy.callers import hash_token
from chatproxy.demo.upstream import Blackhole, Reply
from chatproxy.metering import ROW_HEADER
from chatproxy.state import state
from chatproxy.usage import estimate_prompt_tokens, make_engine
from tests.helpers import free_port, start_gunicorn
from tests.sse import post_stream


def test_every_upstream_call_leaves_exactly_one_matching_row(fake, settings_for, serve, database_url):
    app = create_app(settings_for(CHATPROXY_DATABASE_URL=database_url, CHATPROXY_KEEPALIVE_SECONDS=0.2))
    url, client = serve(app), app.test_client()
    ledger = state(app).ledger

    for i in range(4):
        assert client.post("/api/chat", json={"message": f"json {i}"}).status_code == 200
    for i in range(3):
        assert post_stream(url, {"message": f"stream {i}", "stream": True})[0].events[-1]["type"] == "done"
    for _ in range(2):  # client aborts
        fake.script(Reply(chunks=[f"t{n} " for n in range(40)], pace=0.05))
        post_stream(url, {"message": "abort me", "stream": True}, stop_after_deltas=2)
    fake.script(Reply(status=500))  # an upstream error with no fallback left (gpt-4o-mini ends the chain)
    assert client.post("/api/chat", json={"message": "fail"}).status_code == 503
    fake.script(Reply(chunks=["a ", "b ", "c"], drop_after=2))  # cut mid-stream
    assert post_stream(url, {"message": "cut", "stream": True})[0].events[-1]["code"] == "upstream_truncated"
    fake.for_model("gpt-4o", Reply(status=503))  # gpt-4o down: one failed call, then gpt-4o-mini answers
    assert client.post("/api/chat", json={"message": "fallback", "model": "gpt-4o"}).get_json()["degraded"] is True
    assert client.post("/api/chat", json={"message": ""}).status_code == 400  # no call, no row

    calls = fake.chat_calls()
    assert fake.wait_for(lambda: all(r["outcome"] != "interrupted" for r in ledger.rows()), timeout=5)
    rows = {row["id"]: row for row in ledger.rows()}
    assert len(calls) == 13
    assert len(rows) == len(calls)
    assert sorted(int(call.headers[ROW_HEADER.lower()]) for call in calls) == sorted(rows)
    outcomes = sorted(row["outcome"] for row in rows.values())
    assert outcomes == sorted(
        ["ok"] * 7 + ["aborted"] * 2 + ["upstream_http_500", "upstream_truncated", "upstream_http_503", "fallback"]
    )
    for call in calls:
        row = rows[int(call.headers[ROW_HEADER.lower()])]
        assert row["model_requested"] == (call.model if row["outcome"] != "fallback" else "gpt-4o")
        if row["tokens_exact"]:
            assert (row["prompt_tokens"], row["completion_tokens"]) == (call.prompt_tokens, call.completion_tokens)
        assert row["closed_at"] is not None
    exact_calls = [c for c in calls if rows[int(c.headers[ROW_HEADER.lower()])]["tokens_exact"]]
    for field in ("prompt_tokens", "completion_tokens"):
        assert sum(rows[int(c.headers[ROW_HEADER.lower()])][field] for c in exact_calls) == sum(
            getattr(c, field) for c in exact_calls
        )
    aborted = [r for r in rows.values() if r["outcome"] == "aborted"]
    assert all(not r["tokens_exact"] and r["completion_tokens"] >= 1 and r["cost_micros"] > 0 for r in aborted)
    ok = [r for r in rows.values() if r["outcome"] in ("ok", "fallback")]
    assert all(r["tokens_exact"] and r["cost_micros"] > 0 for r in ok)


def test_budget_spent_refuses_with_retry_after_and_no_upstream_call(fake, settings_for):
    app = create_app(settings_for(CHATPROXY_IDENTITY_DAILY_BUDGET_USD="0.000001"))

    response = app.test_client().post("/api/chat", json={"message": "hi"})

    assert response.status_code == 429
    assert response.get_json()["error"]["code"] == "budget_exceeded"
    assert 0 < int(response.headers["Retry-After"]) <= 86400
    assert fake.calls == []


def test_settled_cost_is_the_real_cost_not_the_reservation(fake, settings_for):
    app = create_app(settings_for())
    client = app.test_client()

    client.post("/api/chat", json={"message": "hi", "max_tokens": 1000})

    budget = state(app).budget
    [row] = state(app).ledger.rows()
    totals = budget.totals()
    assert totals["reserved_micros"] == 0
    assert totals["spent_micros"] == row["cost_micros"] > 0


@pytest.mark.parametrize("k", [5])
def test_concurrent_budget_admits_exactly_k_across_four_gunicorn_workers(fake, database_url, k):
    """Room for exactly K worst-case calls; 4K simultaneous requests over 4 workers; exactly K go upstream."""
    token, name = f"cpx_{uuid.uuid4().hex}", f"budget-{uuid.uuid4().hex[:8]}"
    max_tokens = 100
    # $1 per million tokens in and out: one token costs one micro-dollar, so the arithmetic is exact.
    prices = json.dumps({m: {"input": 1, "cached_input": 1, "output": 1} for m in ("gpt-4o", "gpt-4o-mini")})
    worst = (
        estimate_prompt_tokens(
            [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hi"}]
        )
        + max_tokens
    )
    # Accepted calls hold their reservation for 3 s, while all 4K requests are being decided, and then
    # settle to more than it (the fake ignores max_tokens), so no room frees up for a late request.
    fake.default = Reply(delay=3.0, content="x" * 2000)
    server = start_gunicorn(
        {
            "OPENAI_API_KEY": "sk-test-budget",
            "OPENAI_BASE_URL": fake.base_url,
            "CHATPROXY_SECRET_KEY": "x",
            "CHATPROXY_API_TOKENS": f"{name}={hash_token(token)}",
            "CHATPROXY_RATE_LIMIT_TOKEN": "1000/minute",
            "CHATPROXY_DATABASE_URL": database_url,
            "CHATPROXY_PRICES": prices,
            "CHATPROXY_IDENTITY_DAILY_BUDGET_USD": f"{k * worst / 1e6:.6f}",
            "CHATPROXY_MAX_RETRIES": "0",
            "CHATPROXY_READ_TIMEOUT": "10",
        },
        # Flags, not CHATPROXY_THREADS: the app keeps its default per-worker cap, so a worker that accepts more
        # than its share of the 4K requests queues them instead of answering 503 server_busy.
        *("--workers", "4", "--threads", "8"),
    )
    statuses: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request(
            "POST",
            "/api/chat",
            body=json.dumps({"message": "hi", "max_tokens": max_tokens}),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )
        response = conn.getresponse()
        response.read()
        with lock:
            statuses.append(response.status)
        conn.close()

    try:
        threads = [threading.Thread(target=call) for _ in range(4 * k)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        fake.default = Reply()
        server.stop()

    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        counters = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM budget_counters"))]
    engine.dispose()
    assert sorted(statuses) == [200] * k + [429] * (3 * k), repr((statuses, counters, worst))
    assert len(fake.chat_calls()) == k


# --- spend that never got an answer: timeouts, resets, killed workers, a database blip at settle time --------

ONE_MICRO_PER_TOKEN = json.dumps({m: {"input": 1, "cached_input": 1, "output": 1} for m in ("gpt-4o", "gpt-4o-mini")})
PROMPT = estimate_prompt_tokens(
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hi"}]
)  # what "hi" is estimated at


def _money(row: dict) -> tuple:
    return row["outcome"], row["prompt_tokens"], row["completion_tokens"], row["tokens_exact"], row["cost_micros"]


def test_read_timeouts_are_charged_the_estimated_prompt_and_count_against_the_budget(fake, settings_for):
    """The issue's case: READ_TIMEOUT=1, a 1.5 s upstream: six generations OpenAI bills, six rows that say so."""
    app = create_app(settings_for(CHATPROXY_READ_TIMEOUT=1, CHATPROXY_MAX_RETRIES=2, CHATPROXY_RETRY_MAX_WAIT=0.1))
    for model in ("gpt-4o", "gpt-4o-mini"):
        fake.for_model(model, Reply(delay=1.5))

    response = app.test_client().post("/api/chat", json={"message": "hi", "model": "gpt-4o"})

    assert response.status_code in (503, 504)
    prices = state(app).models
    rows = state(app).ledger.rows()
    assert len(rows) == len(fake.chat_calls()) == 6  # three attempts on gpt-4o, three on its fallback
    assert [(row["model_answered"], *_money(row)) for row in rows] == [
        (model, "upstream_timeout", PROMPT, 0, False, prices.cost_micros(model, PROMPT, 0))
        for model in ("gpt-4o",) * 3 + ("gpt-4o-mini",) * 3
    ]
    assert state(app).budget.totals() == {
        "spent_micros": sum(row["cost_micros"] for row in rows),
        "reserved_micros": 0,
        "spent_tokens": 6 * PROMPT,
        "reserved_tokens": 0,
    }


@pytest.mark.parametrize("upstream", ["refused", "connect_timeout"])
def test_attempts_that_never_reached_the_upstream_cost_nothing(fake, settings_for, upstream):
    with Blackhole() as hole:
        base_url = hole.base_url if upstream == "connect_timeout" else f"http://127.0.0.1:{free_port()}/v1"
        app = create_app(settings_for(OPENAI_BASE_URL=base_url, CHATPROXY_CONNECT_TIMEOUT=0.2))
        response = app.test_client().post("/api/chat", json={"message": "hi"})

    assert response.status_code == 503
    [row] = state(app).ledger.rows()
    assert _money(row) == ("upstream_unreachable", 0, 0, True, 0)
    assert state(app).budget.totals() == {
        "spent_micros": 0,
        "reserved_micros": 0,
        "spent_tokens": 0,
        "reserved_tokens": 0,
    }


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_commits_once_before_the_upstream_and_once_after(fake, settings_for, database_url, stream):
    """The reservation opens the attempt's ledger row in its transaction; the settlement closes it in its own."""
    app = create_app(settings_for(CHATPROXY_DATABASE_URL=database_url, CHATPROXY_PRICES=ONE_MICRO_PER_TOKEN))
    client, engine = app.test_client(), state(app).ledger.engine
    assert client.post("/api/chat", json={"message": "warm up"}).status_code == 200  # schema, first sweep
    commits: list[int] = []  # how many upstream calls the fake had seen at each commit

    def counted(_conn: object) -> None:
        commits.append(len(fake.chat_calls()))

    sa.event.listen(engine, "commit", counted)
    try:
        response = client.post("/api/chat", json={"message": "hi", "stream": stream})
        response.get_data()
        response.close()
    finally:
        sa.event.remove(engine, "commit", counted)

    assert response.status_code == 200
    assert commits == [1, 2]
    last = state(app).ledger.rows()[-1]
    assert last["outcome"] == "ok" and last["tokens_exact"]
    assert state(app).budget.totals()["spent_micros"] == sum(row["cost_micros"] for row in state(app).ledger.rows())
    assert state(app).budget.totals()["reserved_micros"] == 0


def test_a_ledger_row_that_cannot_be_opened_undoes_the_reservation_and_sends_nothing(fake, settings_for, database_url):
    app = create_app(settings_for(CHATPROXY_DATABASE_URL=database_url, CHATPROXY_PRICES=ONE_MICRO_PER_TOKEN))
    client, engine = app.test_client(), state(app).ledger.engine
    assert client.post("/api/chat", json={"message": "warm up"}).status_code == 200
    calls = len(fake.chat_calls())

    def blip(_conn, _cursor, statement: str, *_: object) -> None:
        if statement.startswith("INSERT INTO ledger"):
            raise sa.exc.OperationalError(statement, {}, Exception("the server closed the connection"))

    sa.event.listen(engine, "before_cursor_execute", blip)
    try:
        response = client.post("/api/chat", json={"message": "hi", "stream": True})
    finally:
        sa.event.remove(engine, "before_cursor_execute", blip)

    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "ledger_unavailable"
    assert len(fake.chat_calls()) == calls
    assert len(state(app).ledger.rows()) == 1  # the warm-up's
    assert state(app).budget.totals()["reserved_micros"] == 0


def test_a_connection_reset_after_the_upstream_read_the_request_is_charged_the_estimated_prompt(fake, settings_for):
    app = create_app(settings_for(CHATPROXY_MAX_RETRIES=1, CHATPROXY_PRICES=ONE_MICRO_PER_TOKEN))
    fake.script(Reply(reset=True))  # the upstream has the request (the fake recorded it), then the connection dies

    assert app.test_client().post("/api/chat", json={"message": "hi"}).status_code == 200

    reset, answered = state(app).ledger.rows()
    assert len(fake.chat_calls()) == 2
    assert _money(reset) == ("upstream_disconnected", PROMPT, 0, False, PROMPT)
    assert answered["outcome"] == "ok" and answered["tokens_exact"]
    assert state(app).budget.totals()["spent_micros"] == PROMPT + answered["cost_micros"]


@pytest.mark.parametrize("failing", ["settle", "close_and_settle"])
def test_a_settle_that_hits_a_database_error_is_swept_later(fake, settings_for, database_url, failing):
    app = create_app(settings_for(CHATPROXY_DATABASE_URL=database_url, CHATPROXY_PRICES=ONE_MICRO_PER_TOKEN))
    budget = state(app).budget
    failing_statements = ("DELETE FROM budget_holds", "UPDATE ledger")[: 1 if failing == "settle" else 2]

    def blip(_conn, _cursor, statement: str, *_: object) -> None:
        if statement.startswith(failing_statements):
            raise sa.exc.OperationalError(statement, {}, Exception("the server closed the connection"))

    sa.event.listen(budget.counters.engine, "before_cursor_execute", blip)
    try:
        response = app.test_client().post("/api/chat", json={"message": "hi"})
    finally:
        sa.event.remove(budget.counters.engine, "before_cursor_execute", blip)

    assert response.status_code == 200  # the answer was delivered; only the bookkeeping failed
    [row] = state(app).ledger.rows()
    assert budget.totals()["reserved_micros"] > 0  # held until the sweeper comes
    assert budget.sweep(datetime.now(UTC) + timedelta(hours=1)) == 1
    [row] = state(app).ledger.rows()
    if failing == "settle":  # the row was closed with the real cost: that is what is settled
        assert row["outcome"] == "ok" and row["tokens_exact"] and row["cost_micros"] == 10  # 8 prompt + 2 completion
    else:  # the row stayed open: the estimated prompt is all that is known
        assert _money(row) == ("abandoned", PROMPT, 0, False, PROMPT)
    assert budget.totals() == {
        "spent_micros": row["cost_micros"],
        "reserved_micros": 0,
        "spent_tokens": row["prompt_tokens"] + row["completion_tokens"],
        "reserved_tokens": 0,
    }


@pytest.mark.parametrize("stop", ["sigkill_worker", "sigterm_past_the_graceful_timeout"])
def test_a_worker_killed_mid_stream_leaves_a_hold_that_the_sweeper_settles(fake, database_url, stop):
    env = {
        "OPENAI_API_KEY": "sk-test-killed",
        "OPENAI_BASE_URL": fake.base_url,
        "CHATPROXY_SECRET_KEY": "x",
        "CHATPROXY_ALLOW_ANONYMOUS": "true",
        "CHATPROXY_DATABASE_URL": database_url,
        "CHATPROXY_PRICES": ONE_MICRO_PER_TOKEN,
        "CHATPROXY_MAX_RETRIES": "0",
        "CHATPROXY_KEEPALIVE_SECONDS": "0",
        "GUNICORN_CMD_ARGS": "--graceful-timeout 1",
    }
    fake.script(Reply(chunks=[f"w{i} " for i in range(200)], pace=0.05))  # a 10 s answer
    server = start_gunicorn(env, "--workers", "1", "--threads", "4")

    def ask() -> None:
        with contextlib.suppress(OSError):  # the connection dies with the worker
            post_stream(server.url, {"message": "hi", "stream": True}, timeout=60)

    client = threading.Thread(target=ask)
    try:
        client.start()  # a worker that is still booting takes a while on a busy machine
        assert fake.wait_for(lambda: fake.chat_calls() and len(fake.chat_calls()[0].chunk_times) >= 3, timeout=60)
        if stop == "sigkill_worker":
            [worker] = subprocess.run(
                ["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True, check=True
            ).stdout.split()
            os.kill(int(worker), signal.SIGKILL)
        else:
            server.process.send_signal(signal.SIGTERM)  # the stream outlives the graceful timeout: the master kills it
            server.process.wait(timeout=20)
        client.join(20)
    finally:
        server.stop()

    engine = make_engine(database_url)
    budget = Budget(SqlCounters(engine), Caps())
    ledger = usage.Ledger(database_url)
    [row] = ledger.rows()
    assert row["outcome"] == "interrupted" and budget.totals()["reserved_micros"] > 0
    assert budget.sweep(datetime.now(UTC) + timedelta(hours=1)) == 1
    [row] = ledger.rows()
    assert _money(row) == ("abandoned", PROMPT, 0, False, PROMPT)
    for key in (EVERYONE, "ip:127.0.0.1", PUBLIC, "public-ip:127.0.0.1"):
        assert budget.totals(key) == {
            "spent_micros": PROMPT,
            "reserved_micros": 0,
            "spent_tokens": PROMPT,
            "reserved_tokens": 0,
        }, key
    ledger.dispose()
    engine.dispose()


def test_sqlite_commits_reach_the_database_file_from_a_background_checkpoint(fake, settings_for, tmp_path):
    ledger = tmp_path / "ledger.db"
    app = create_app(settings_for(CHATPROXY_DATABASE_URL=f"sqlite:///{ledger}"))
    client = app.test_client()

    for i in range(5):
        assert client.post("/api/chat", json={"message": f"hi {i}"}).status_code == 200

    def rows_in_the_file() -> int:
        """Ledger rows in the database file itself (immutable: the WAL, where commits land first, is not read)."""
        try:
            with contextlib.closing(sqlite3.connect(f"file:{ledger}?immutable=1", uri=True)) as conn:
                return conn.execute("SELECT count(*) FROM ledger WHERE outcome = 'ok'").fetchone()[0]
        except sqlite3.DatabaseError:  # read while a checkpoint writes it
            return -1

    # Five requests are far from SQLite's own checkpoint at 1,000 WAL pages, which a request would pay for.
    assert fake.wait_for(lambda: rows_in_the_file() == 5, timeout=3)
    with contextlib.closing(sqlite3.connect(ledger)) as conn:
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000  # a new connection: the default
    with state(app).ledger.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0  # the app's: never in a commit
