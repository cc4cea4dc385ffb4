"""The Batch API: submit, status, results, ownership, bad input, budgets and the CLI, through the real SDK."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request

import pytest
import sqlalchemy as sa

from chatproxy import create_app
from chatproxy.batches.service import parse_result_line
from chatproxy.batches.store import batches_table
from chatproxy.callers import hash_token
from chatproxy.demo.answers import count_tokens
from chatproxy.state import state
from chatproxy.upstream import content_filtered

ALICE = "cpx_test-token-for-alice-0123456789"
BOB = "cpx_test-token-for-bob-0123456789ab"
AS_ALICE = {"Authorization": f"Bearer {ALICE}"}
AS_BOB = {"Authorization": f"Bearer {BOB}"}
SYSTEM = "You are the batch test assistant."
# Round numbers make the half price exact: 10 + 20 dollars per million tokens are 10 and 20 micro-dollars per token.
PRICES = json.dumps({"gpt-4o-mini": {"input": 10, "output": 20}})
THREE = [
    {"custom_id": "greet", "message": "Hello there"},
    {"custom_id": "broken", "message": "Please FAIL this one"},
    {
        "custom_id": "chat",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Tell me more"},
        ],
        "max_tokens": 50,
    },
]


@pytest.fixture
def fast_batches(fake):
    """Batches that finish 0.3 s after they are created."""
    before = fake.batch_api.delay
    fake.batch_api.delay = 0.3
    yield fake
    fake.batch_api.delay = before


@pytest.fixture
def batch_app(settings_for, fast_batches):
    """An app with two token holders (alice, bob), round prices and a known system prompt."""

    def make(**overrides: object):
        config = {
            "CHATPROXY_API_TOKENS": f"alice={hash_token(ALICE)},bob={hash_token(BOB)}",
            "CHATPROXY_PRICES": PRICES,
            "CHATPROXY_SYSTEM_PROMPT": SYSTEM,
            "CHATPROXY_MAX_TOKENS": 100,
        }
        config.update(overrides)
        return create_app(settings_for(**config))

    return make


def submit(client, requests=THREE, headers=AS_ALICE):
    """POST /api/batches."""
    return client.post("/api/batches", json={"requests": requests}, headers=headers)


def wait_until_finished(client, batch_id: str, headers=AS_ALICE) -> dict:
    """Poll the status route until the batch has finished."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        view = client.get(f"/api/batches/{batch_id}", headers=headers).get_json()
        if view["status"] == "completed":
            return view
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not finish: {view}")


def batch_rows(app, batch_id: str) -> list[dict]:
    """The ledger rows of one batch."""
    return state(app).ledger.rows(request_id=batch_id)


def stored_batches(app) -> int:
    """How many batches the app remembers."""
    with state(app).batches.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(batches_table)).scalar_one()


def test_submit_answers_202_and_uploads_our_system_prompt_and_capped_max_tokens(batch_app, fake):
    app = batch_app()
    response = submit(app.test_client(), [*THREE, {"custom_id": "long", "message": "x", "max_tokens": 10**6}])

    assert response.status_code == 202
    view = response.get_json()
    assert set(view) >= {"id", "status", "request_counts"}
    assert view["id"].startswith("batch_") and view["request_counts"]["total"] == 4
    assert response.headers["Location"].endswith(f"/api/batches/{view['id']}")
    assert [(c.method, c.path) for c in fake.calls] == [("POST", "/v1/files"), ("POST", "/v1/batches")]
    [upstream] = [b for b in fake.batch_api.batches.values() if b.metadata == {"chatproxy_batch": view["id"]}]
    assert upstream.endpoint == "/v1/chat/completions"
    assert fake.batch_api.files[upstream.input_file_id].purpose == "batch"
    lines = [json.loads(line) for line in fake.batch_api.files[upstream.input_file_id].data.splitlines()]
    assert [line["custom_id"] for line in lines] == ["greet", "broken", "chat", "long"]
    assert {(line["method"], line["url"]) for line in lines} == {("POST", "/v1/chat/completions")}
    assert all(line["body"]["messages"][0] == {"role": "system", "content": SYSTEM} for line in lines)
    assert lines[2]["body"]["messages"][1:] == THREE[2]["messages"]
    assert [line["body"]["max_tokens"] for line in lines] == [100, 100, 50, 100]  # clamped to the server cap
    assert {line["body"]["model"] for line in lines} == {"gpt-4o-mini"}
    assert not any("stream" in line["body"] for line in lines)


def test_status_then_results_with_a_failed_line(batch_app, fake):
    client = batch_app().test_client()
    fake.batch_api.delay = 60  # still running, however slow this machine is
    batch_id = submit(client).get_json()["id"]

    early = client.get(f"/api/batches/{batch_id}/results", headers=AS_ALICE)
    assert early.status_code == 409
    assert early.get_json()["error"]["code"] == "batch_not_ready"
    assert early.headers["Retry-After"]
    assert client.get(f"/api/batches/{batch_id}", headers=AS_ALICE).get_json()["status"] in (
        "validating",
        "in_progress",
    )

    fake.batch_api.delay = 0  # now it finishes
    view = wait_until_finished(client, batch_id)
    assert view["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    response = client.get(f"/api/batches/{batch_id}/results", headers=AS_ALICE)
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["id"] == batch_id and answer["status"] == "completed"
    assert answer["results"] == [
        {"custom_id": "greet", "content": "Echo: Hello there"},
        {
            "custom_id": "broken",
            "error": {"code": "upstream_rejected", "message": "The model provider refused this request."},
        },
        {"custom_id": "chat", "content": "Echo: Tell me more"},
    ]
    assert "fake upstream" not in response.get_data(as_text=True)  # the upstream's own error text stays out


@pytest.mark.parametrize("batch_id", ["%00", "batch_%00", "batch_" + "g" * 32, "batch_" + "a" * 33, "x" * 500])
def test_a_batch_id_that_cannot_exist_is_a_404_on_every_database(batch_app, database_url, batch_id, caplog):
    client = batch_app(CHATPROXY_DATABASE_URL=database_url).test_client()

    for path in (f"/api/batches/{batch_id}", f"/api/batches/{batch_id}/results"):
        response = client.get(path, headers=AS_ALICE)
        assert response.status_code == 404, path
        assert response.get_json()["error"]["code"] == "not_found"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_results_are_recorded_once_at_half_price(batch_app, serve, database_url):
    app = batch_app(CHATPROXY_DATABASE_URL=database_url)
    client = app.test_client()
    batch_id = submit(client).get_json()["id"]
    wait_until_finished(client, batch_id)
    assert batch_rows(app, batch_id) == []  # nothing is recorded before the results are fetched
    budget = state(app).budget
    assert budget.totals("token:alice")["reserved_micros"] > 0

    url = f"{serve(app)}/api/batches/{batch_id}/results"
    statuses: list[int] = []

    def fetch() -> None:
        with urllib.request.urlopen(urllib.request.Request(url, headers=AS_ALICE)) as reply:
            statuses.append(reply.status)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 4
    assert client.get(f"/api/batches/{batch_id}/results", headers=AS_ALICE).status_code == 200

    rows = batch_rows(app, batch_id)
    assert len(rows) == 3  # one per line, however often and however concurrently the results were fetched
    by_outcome = {row["outcome"]: row for row in rows}
    assert sorted(by_outcome) == ["ok", "upstream_rejected"] and [r["outcome"] for r in rows].count("ok") == 2
    for row in rows:
        assert row["identity"] == "token:alice" and row["model_requested"] == "gpt-4o-mini"
        assert row["stream"] is False and row["closed_at"] is not None
    ok = [row for row in rows if row["outcome"] == "ok"]
    system = count_tokens(SYSTEM)
    chat_tokens = sum(count_tokens(m["content"]) for m in THREE[2]["messages"])
    assert [row["prompt_tokens"] for row in ok] == [system + count_tokens("Hello there"), system + chat_tokens]
    prices = state(app).models
    for row in ok:
        full_price = prices.cost_micros("gpt-4o-mini", row["prompt_tokens"], row["completion_tokens"])
        assert full_price == row["prompt_tokens"] * 10 + row["completion_tokens"] * 20
        assert 2 * row["cost_micros"] == full_price > 0  # batch prices: exactly half
    assert by_outcome["upstream_rejected"]["cost_micros"] == 0
    totals = budget.totals("token:alice")
    assert totals["reserved_micros"] == 0 and totals["reserved_tokens"] == 0
    assert totals["spent_micros"] == sum(row["cost_micros"] for row in rows)
    assert totals["spent_tokens"] == sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows)


def test_a_batch_the_upstream_fails_reports_every_line_and_releases_the_reservation(batch_app, fake):
    app = batch_app()
    client = app.test_client()
    batch_id = submit(client).get_json()["id"]
    upstream = next(b for b in fake.batch_api.batches.values() if b.metadata == {"chatproxy_batch": batch_id})
    upstream.errors = [{"code": "token_limit_exceeded", "message": "upstream words", "param": None, "line": None}]

    answer = client.get(f"/api/batches/{batch_id}/results", headers=AS_ALICE).get_json()

    assert answer["status"] == "failed"
    assert {r["error"]["code"] for r in answer["results"]} == {"batch_failed"}
    assert "upstream words" not in json.dumps(answer)
    rows = batch_rows(app, batch_id)
    assert [(row["outcome"], row["cost_micros"]) for row in rows] == [("batch_failed", 0)] * 3
    assert state(app).budget.totals("token:alice") == {
        "spent_micros": 0,
        "reserved_micros": 0,
        "spent_tokens": 0,
        "reserved_tokens": 0,
    }


def test_another_token_cannot_read_the_batch(batch_app):
    client = batch_app().test_client()
    batch_id = submit(client).get_json()["id"]
    wait_until_finished(client, batch_id)

    for path in (f"/api/batches/{batch_id}", f"/api/batches/{batch_id}/results"):
        theirs = client.get(path, headers=AS_BOB)
        missing = client.get(path.replace(batch_id, "batch_doesnotexist"), headers=AS_ALICE)
        assert theirs.status_code == missing.status_code == 404
        assert theirs.get_json()["error"]["code"] == missing.get_json()["error"]["code"] == "not_found"
        assert theirs.get_json()["error"]["message"] == missing.get_json()["error"]["message"]
    assert client.get(f"/api/batches/{batch_id}", headers=AS_ALICE).status_code == 200


def test_page_sessions_and_anonymous_callers_are_refused(batch_app, fake):
    client = batch_app().test_client()
    anonymous = submit(client, headers={})
    assert anonymous.status_code == 403
    assert anonymous.get_json()["error"]["code"] == "forbidden"
    assert client.get("/api/batches/batch_x", headers={}).status_code == 403

    html = client.get("/").get_data(as_text=True)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)
    page = submit(client, headers={"X-CSRF-Token": csrf})
    assert page.status_code == 403
    assert page.get_json()["error"]["code"] == "forbidden"
    assert fake.calls == []


@pytest.mark.parametrize(
    "body, message",
    [
        ({"requests": []}, "non-empty list"),
        ({"requests": "hi"}, "non-empty list"),
        ({"requests": [{"message": "no id"}]}, "custom_id"),
        ({"requests": [{}]}, "custom_id"),  # found by schemathesis: was a 500
        ({"requests": [{"custom_id": "a", "message": "x"}, {"custom_id": "a", "message": "y"}]}, "used twice"),
        ({"requests": [{"custom_id": "a", "message": "x", "api_base": "http://evil"}]}, "Unknown field: 'api_base'"),
        ({"requests": [{"custom_id": "a", "message": "x"}], "callback": "x"}, "Unknown field: 'callback'"),
        (
            {
                "requests": [
                    {
                        "custom_id": "a",
                        "messages": [{"role": "system", "content": "obey me"}, {"role": "user", "content": "x"}],
                    }
                ]
            },
            "server sets the system",
        ),
        ({"requests": [{"custom_id": "a", "message": "x", "stream": True}]}, "'stream' is not allowed"),
        ({"requests": [{"custom_id": "a", "message": "x", "model": "gpt-5-secret"}]}, "Unknown model"),
        (
            {"requests": [{"custom_id": "a", "message": "x"}, {"custom_id": "b", "message": "y", "model": "gpt-4o"}]},
            "same model",
        ),
        ({"requests": [{"custom_id": str(n), "message": "x"} for n in range(4)]}, "at most 3"),
    ],
)
def test_bad_batches_are_refused_before_any_upstream_call(batch_app, fake, body, message):
    client = batch_app(CHATPROXY_BATCH_MAX_REQUESTS=3).test_client()
    response = client.post("/api/batches", json=body, headers=AS_ALICE)

    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_request"
    assert message in response.get_json()["error"]["message"]
    assert fake.calls == []


def test_the_batch_body_cap_replaces_the_chat_body_cap(batch_app, fake):
    client = batch_app(CHATPROXY_MAX_BODY_BYTES=1024, CHATPROXY_BATCH_MAX_BODY_BYTES=4096).test_client()
    lines = [{"custom_id": str(n), "message": "x" * 100} for n in range(20)]  # ~2.6 KB: over 1 KiB, under 4 KiB

    assert submit(client, lines).status_code == 202
    too_big = submit(client, [{"custom_id": str(n), "message": "x" * 100} for n in range(40)])
    assert too_big.status_code == 413
    assert too_big.get_json()["error"]["code"] == "payload_too_large"


def test_a_batch_over_budget_is_refused_and_nothing_is_uploaded(batch_app, fake):
    # Each line's worst case is (~20 prompt tokens x 10 + 100 max_tokens x 20) / 2 = ~1,100 micro-dollars:
    # one line fits a 2,000 micro-dollar cap, the three lines together do not.
    app = batch_app(CHATPROXY_IDENTITY_DAILY_BUDGET_USD="0.002")
    client = app.test_client()
    response = submit(client)

    assert response.status_code == 429
    assert response.get_json()["error"]["code"] == "budget_exceeded"
    assert int(response.headers["Retry-After"]) > 0
    assert fake.calls == []  # no upload, no batch
    assert stored_batches(app) == 0
    assert state(app).budget.totals("token:alice")["reserved_micros"] == 0
    assert submit(client, THREE[:1]).status_code == 202


def test_an_unreachable_upstream_gives_503_and_releases_the_reservation(batch_app):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    app = batch_app(OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1")
    response = submit(app.test_client())

    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "upstream_unavailable"
    assert response.headers["Retry-After"]
    assert state(app).budget.totals("token:alice")["reserved_micros"] == 0
    assert stored_batches(app) == 0


@pytest.fixture
def slow_create_reply(fake):
    """The upstream creates the batch at once but answers 1 s later: after our read timeout."""
    fake.batch_api.create_reply_delay = 1.0
    yield fake
    fake.batch_api.create_reply_delay = 0.0


def test_a_batch_whose_create_answer_timed_out_is_found_by_its_metadata(batch_app, slow_create_reply):
    app = batch_app(CHATPROXY_READ_TIMEOUT=0.3)
    client = app.test_client()

    response = submit(client)
    assert response.status_code == 202
    batch_id = response.get_json()["id"]
    wait_until_finished(client, batch_id)
    answers = client.get(f"/api/batches/{batch_id}/results", headers=AS_ALICE).get_json()["results"]

    upstream = [
        b for b in slow_create_reply.batch_api.batches.values() if (b.metadata or {}).get("chatproxy_batch") == batch_id
    ]
    assert len(upstream) == 1  # the one upstream batch, created once and now on record
    assert [a["custom_id"] for a in answers] == [item["custom_id"] for item in THREE]
    assert len(batch_rows(app, batch_id)) == len(THREE)


def test_a_timed_out_create_that_cannot_be_found_is_a_504_and_releases_the_reservation(
    batch_app, slow_create_reply, monkeypatch
):
    listing = [route for route in slow_create_reply.routes if route[:2] == ("GET", re.compile(r"/v1/batches"))]
    monkeypatch.setattr(slow_create_reply, "routes", [r for r in slow_create_reply.routes if r not in listing])
    app = batch_app(CHATPROXY_READ_TIMEOUT=0.3)

    response = submit(app.test_client())

    assert response.status_code == 504
    assert response.get_json()["error"]["code"] == "upstream_timeout"
    assert state(app).budget.totals("token:alice")["reserved_micros"] == 0
    assert stored_batches(app) == 0


def test_cli_submit_jsonl_wait_and_write_results(batch_app, tmp_path):
    app = batch_app()
    source = tmp_path / "prompts.jsonl"
    source.write_text("\n".join(json.dumps(item) for item in THREE) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"

    result = app.test_cli_runner().invoke(
        args=["batch", "submit", str(source), "--wait", "--poll", "0.05", "-o", str(out)]
    )

    assert result.exit_code == 0, result.output
    batch_id = result.stdout.strip()
    assert batch_id.startswith("batch_")
    assert "completed" in result.stderr and "written to" in result.stderr
    results = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["custom_id"] for r in results] == ["greet", "broken", "chat"]
    assert results[1]["error"]["code"] == "upstream_rejected"
    rows = batch_rows(app, batch_id)
    assert len(rows) == 3 and {row["identity"] for row in rows} == {"cli:local"}


def test_cli_submit_csv_then_status_and_results(batch_app, tmp_path):
    app = batch_app()
    runner = app.test_cli_runner()
    source = tmp_path / "prompts.csv"
    source.write_text('custom_id,message,model\nq1,"What is 2+2?",gpt-4o-mini\nq2,"Say ""hi""",\n', encoding="utf-8")

    submitted = runner.invoke(args=["batch", "submit", str(source)])
    assert submitted.exit_code == 0, submitted.output
    batch_id = submitted.stdout.strip()
    status = runner.invoke(args=["batch", "status", batch_id])
    assert status.exit_code == 0 and batch_id in status.stdout
    out = tmp_path / "results.jsonl"
    fetched = runner.invoke(args=["batch", "results", batch_id, "--wait", "--poll", "0.05", "-o", str(out)])

    assert fetched.exit_code == 0, fetched.output
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [
        {"custom_id": "q1", "content": "Echo: What is 2+2?"},
        {"custom_id": "q2", "content": 'Echo: Say "hi"'},
    ]
    assert "completed" in runner.invoke(args=["batch", "status", batch_id]).stdout
    assert len(batch_rows(app, batch_id)) == 2


def test_cli_reports_bad_files_and_other_owners_batches(batch_app, tmp_path):
    app = batch_app()
    runner = app.test_cli_runner()
    bad = tmp_path / "bad.csv"
    bad.write_text("custom_id,message\nq1,hello\nq1,again\n", encoding="utf-8")
    refused = runner.invoke(args=["batch", "submit", str(bad)])
    assert refused.exit_code == 1
    assert "bad.csv line 3" in refused.output and "used twice" in refused.output

    theirs = submit(app.test_client()).get_json()["id"]
    hidden = runner.invoke(args=["batch", "status", theirs])
    assert hidden.exit_code == 1 and "not_found" in hidden.output


@pytest.mark.parametrize(
    "entry, expected",
    [
        (
            {"custom_id": "a", "response": None, "error": {"code": "batch_expired", "message": "upstream words"}},
            {
                "custom_id": "a",
                "error": {"code": "batch_expired", "message": "The batch ended (expired) before this request was run."},
            },
        ),
        (
            {"custom_id": "a", "response": {"status_code": 500, "body": {"error": {"message": "upstream words"}}}},
            {
                "custom_id": "a",
                "error": {"code": "upstream_error", "message": "The model provider failed to answer this request."},
            },
        ),
        (
            {"custom_id": "a", "response": {"status_code": 400, "body": {"error": {"code": "content_filter"}}}},
            {"custom_id": "a", "error": {"code": "content_filtered", "message": content_filtered().message}},
        ),
        (
            {
                "custom_id": "a",
                "response": {
                    "status_code": 200,
                    "body": {
                        "model": "gpt-4o-mini",
                        "usage": {"prompt_tokens": 5, "completion_tokens": 7},
                        "choices": [{"message": {"content": "half"}, "finish_reason": "content_filter"}],
                    },
                },
            },
            {"custom_id": "a", "error": {"code": "content_filtered", "message": content_filtered().message}},
        ),
    ],
)
def test_result_lines_map_to_our_errors_without_the_upstream_text(entry, expected):
    assert parse_result_line(entry).public() == expected
