"""The Batch API at half price: POST /api/batches, GET /api/batches/<id>[/results], for bearer tokens.

A batch takes the path of a chat request, once for all its lines: each line is validated by the
/api/chat schema, the worst case of every line is priced at batch rates and reserved against the
caller's budget before anything is uploaded, and the input file carries our system prompt and the
clamped max_tokens. The first fetch of the finished results writes one ledger row per line (at
batch prices) and settles the reservation, in one transaction guarded by `results_recorded`, so
concurrent fetches record once. Batches live in a `batches` table in the ledger's database.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import openai
import sqlalchemy as sa
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request, url_for
from openai import OpenAI
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import metrics
from .budget import Budget, Reservation
from .config import SETTINGS, Settings
from .errors import ApiError, invalid
from .metering import estimate_prompt
from .prices import PriceTable
from .router import DEFAULT_RETRY_AFTER, classify, content_filtered, upstream_params
from .schemas import ChatRequest, parse_chat_request, parse_json_body
from .usage import Ledger, create_tables, ledger_table

log = logging.getLogger(__name__)

T = TypeVar("T")
bp = Blueprint("batch", __name__)

ENDPOINT = "/v1/chat/completions"
CLI_IDENTITY = "cli:local"  # who `flask batch ...` acts as: it runs on the server, with direct access
FINISHED = frozenset({"completed", "failed", "expired", "cancelled"})  # the upstream's final statuses
POLL_SECONDS = 30  # Retry-After while a batch is still running
LOOKUP_LIMIT = 100  # newest upstream batches searched for one whose create timed out
ID_LENGTH = 38  # "batch_" + 32 hex digits
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
_CUSTOM_ID = re.compile(r"[^\x00-\x1f\x7f]{1,64}")

metadata = sa.MetaData()
batches_table = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.String(ID_LENGTH), primary_key=True),  # ours, given to the client; never the upstream's
    sa.Column("owner", sa.Text, nullable=False, index=True),  # the identity that submitted it
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("custom_ids", sa.Text, nullable=False),  # JSON list, in submitted order
    sa.Column("status", sa.String(32), nullable=False),  # "submitting", then the upstream's status
    sa.Column("request_counts", sa.Text),  # JSON {"total", "completed", "failed"} as last seen
    sa.Column("upstream_id", sa.Text),
    sa.Column("input_file_id", sa.Text),
    sa.Column("output_file_id", sa.Text),
    sa.Column("error_file_id", sa.Text),
    sa.Column("reserved_day", sa.Date, nullable=False),  # the budget reservation, settled with the results
    sa.Column("reserved_micros", sa.BigInteger, nullable=False),
    sa.Column("reserved_tokens", sa.BigInteger, nullable=False),
    sa.Column("results_recorded", sa.Boolean, nullable=False, server_default=sa.false()),
)


@dataclass(frozen=True)
class BatchLine:
    """One validated request of a batch."""

    custom_id: str
    chat: ChatRequest


@dataclass(frozen=True)
class BatchLimits:
    """The caps on one batch."""

    max_requests: int
    max_body_bytes: int


@dataclass
class Outcome:
    """What became of one line: an answer or an error, and the tokens it was billed for."""

    custom_id: str
    content: str | None = None
    error: tuple[str, str] | None = None  # (code, client-safe message)
    model: str | None = None  # the model that answered, as the upstream names it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def public(self) -> dict[str, Any]:
        """The client's view: {custom_id, content} or {custom_id, error: {code, message}}."""
        if self.error is not None:
            return {"custom_id": self.custom_id, "error": {"code": self.error[0], "message": self.error[1]}}
        return {"custom_id": self.custom_id, "content": self.content}


class BatchStore:
    """The `batches` table: who owns which batch, its upstream ids and status, its reservation."""

    def __init__(self, ledger: Ledger) -> None:
        self.engine: Engine = ledger.engine
        self.clock = ledger.clock

    def create_schema(self) -> None:
        """Create the table if it is missing."""
        create_tables(self.engine, metadata)

    def insert(self, batch_id: str, owner: str, lines: list[BatchLine], reservation: Reservation) -> None:
        """Remember a batch before it is uploaded; 503 if the database is down."""
        values = {
            "id": batch_id,
            "owner": owner,
            "created_at": self.clock(),
            "model": lines[0].chat.model,
            "custom_ids": json.dumps([line.custom_id for line in lines]),
            "status": "submitting",
            "request_counts": json.dumps({"total": len(lines), "completed": 0, "failed": 0}),
            "reserved_day": reservation.day,
            "reserved_micros": reservation.cost_micros,
            "reserved_tokens": reservation.tokens,
        }
        with _database("store a new batch"), self.engine.begin() as conn:
            conn.execute(batches_table.insert().values(**values))

    def owned(self, batch_id: str, owner: str) -> dict[str, Any]:
        """The batch if `owner` submitted it; else 404 (not 403: ids cannot be probed)."""
        t = batches_table.c
        row = None
        if BATCH_ID.fullmatch(batch_id):  # anything else cannot exist (and a NUL byte upsets PostgreSQL)
            with _database("read a batch"), self.engine.connect() as conn:
                row = conn.execute(sa.select(batches_table).where(t.id == batch_id, t.owner == owner)).first()
        if row is None:
            raise ApiError(404, "not_found", "There is no batch with this id.")
        return dict(row._mapping)

    def update(self, batch_id: str, **values: Any) -> None:
        """Change some columns of a batch."""
        with _database(f"update batch {batch_id}"), self.engine.begin() as conn:
            conn.execute(batches_table.update().where(batches_table.c.id == batch_id).values(**values))

    def delete(self, batch_id: str) -> None:
        """Forget a batch whose submission failed (best effort: logged, never raised)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(batches_table.delete().where(batches_table.c.id == batch_id))
        except SQLAlchemyError:
            log.exception("cannot delete the failed batch %s", batch_id)

    def record_once(self, batch_id: str, rows: list[dict[str, Any]]) -> bool:
        """Flip `results_recorded` and insert the ledger rows in one transaction; False if already recorded."""
        t = batches_table.c
        claim = (
            batches_table.update().where(t.id == batch_id, t.results_recorded.is_(False)).values(results_recorded=True)
        )
        with _database(f"record the results of batch {batch_id}"), self.engine.begin() as conn:
            if conn.execute(claim).rowcount != 1:  # another fetch got there first (it held the lock until then)
                return False
            if rows:
                conn.execute(ledger_table.insert(), rows)
        return True


@contextmanager
def _database(what: str) -> Iterator[None]:
    """Turn a database failure into 503 ledger_unavailable (logged with what was being done)."""
    try:
        yield
    except SQLAlchemyError:
        log.exception("cannot %s: the ledger's database failed", what)
        raise ApiError(
            503, "ledger_unavailable", "Usage cannot be recorded right now. Try again shortly.", retry_after=5
        ) from None


def init_app(app: Flask) -> None:
    """Keep batches in the ledger's database (after usage.init_app; the table is made on first use); routes, CLI."""
    from .batch_cli import batch_group  # here, not at the top: batch_cli imports this module

    ledger: Ledger | None = app.extensions.get("chatproxy.ledger")
    if ledger is None:
        raise RuntimeError("batch.init_app needs usage.init_app first: batches live in the ledger's database")
    ledger.schema.add(metadata)  # created with the ledger's tables, on first use
    app.extensions["chatproxy.batches"] = BatchStore(ledger)
    app.extensions["chatproxy.batch_limits"] = BatchLimits(
        _setting(app, "CHATPROXY_BATCH_MAX_REQUESTS"), _setting(app, "CHATPROXY_BATCH_MAX_BODY_BYTES")
    )
    app.register_blueprint(bp)
    app.cli.add_command(batch_group)


def _setting(app: Flask, name: str) -> Any:
    """A setting validate() checked at start-up, parsed from the app's config."""
    setting = next(s for s in SETTINGS if s.name == name)
    return setting.parse(str(app.config.get(name, setting.default)))


def limits() -> BatchLimits:
    """The current app's batch caps."""
    return current_app.extensions["chatproxy.batch_limits"]


def parse_requests(
    body: Any, settings: Settings, max_requests: int, where: Callable[[int], str] = lambda index: f"requests[{index}]"
) -> list[BatchLine]:
    """Validate {"requests": [...]}: each item a /api/chat body plus a unique custom_id, one model, no stream."""
    if not isinstance(body, dict) or set(body) != {"requests"}:
        extra = sorted(set(body) - {"requests"}) if isinstance(body, dict) else []
        raise invalid(
            f'Unknown field: {extra[0][:64]!r}. The body is {{"requests": [...]}}.'
            if extra
            else 'The body must be {"requests": [...]}.'
        )
    items = body["requests"]
    if not isinstance(items, list) or not items:
        raise invalid("'requests' must be a non-empty list of {custom_id, message or messages, ...} objects.")
    if len(items) > max_requests:
        raise invalid(f"Too many requests: at most {max_requests} in one batch.")
    lines: list[BatchLine] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise invalid(f"{where(index)} must be an object.")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not _CUSTOM_ID.fullmatch(custom_id) or not custom_id.strip():
            raise invalid(f"{where(index)}: 'custom_id' must be a string of 1 to 64 printable characters.")
        if custom_id in seen:
            raise invalid(f"{where(index)}: custom_id {custom_id!r} is used twice; each must be unique.")
        seen.add(custom_id)
        if "stream" in item:
            raise invalid(f"{where(index)} ({custom_id}): 'stream' is not allowed in a batch.")
        try:
            chat = parse_chat_request({k: v for k, v in item.items() if k != "custom_id"}, settings)
        except ApiError as exc:
            raise invalid(f"{where(index)} ({custom_id}): {exc.message}") from None
        lines.append(BatchLine(custom_id, chat))
    models = sorted({line.chat.model for line in lines})
    if len(models) > 1:
        raise invalid(
            f"All requests in one batch must use the same model (the Batch API's rule); this one "
            f"mixes {', '.join(models)}. Send one batch per model."
        )
    return lines


def input_file(lines: list[BatchLine], settings: Settings) -> bytes:
    """The JSONL the upstream runs: one Chat Completions request per line, with our system prompt and caps.

    Strict JSON, as the SDK encodes a request: a value that fails here is our bug (the edge admits strict JSON only).
    """
    return "".join(
        json.dumps(
            {
                "custom_id": line.custom_id,
                "method": "POST",
                "url": ENDPOINT,
                "body": upstream_params(line.chat, settings),
            },
            ensure_ascii=False,
            allow_nan=False,
        )
        + "\n"
        for line in lines
    ).encode("utf-8")


def worst_case(lines: list[BatchLine], settings: Settings, prices: PriceTable) -> tuple[int, int]:
    """Micro-dollars and tokens to reserve: every line's estimated prompt (schema included) + max_tokens, at batch
    prices."""
    cost = tokens = 0
    for line in lines:
        prompt = estimate_prompt(line.chat, settings)
        cost += prices.worst_case_micros([line.chat.model], prompt, line.chat.max_tokens, batch=True)
        tokens += prompt + line.chat.max_tokens
    return cost, tokens


def submit(lines: list[BatchLine], identity: str) -> dict[str, Any]:
    """Reserve the worst case, upload the input file and create the upstream batch; the batch's public view."""
    settings, store, budget = _settings(), _store(), _budget()
    data = input_file(lines, settings)  # built first: a request we cannot build holds no reservation and no row
    cost, tokens = worst_case(lines, settings, current_app.extensions["chatproxy.prices"])
    reservation = budget.reserve(identity, cost, tokens)  # 429 budget_exceeded before anything is uploaded
    batch_id = f"batch_{secrets.token_hex(16)}"  # unguessable, and not the upstream's id
    try:
        store.insert(batch_id, identity, lines, reservation)
    except BaseException:
        budget.release(reservation)
        raise
    try:
        upstream = _create_upstream(batch_id, data)
    except BaseException:
        budget.release(reservation)
        store.delete(batch_id)
        raise
    try:
        store.update(batch_id, upstream_id=upstream.id, input_file_id=upstream.input_file_id, **_state(upstream))
    except ApiError:
        log.error(
            "batch %s runs upstream as %s, but that could not be stored; its reservation stays held",
            batch_id,
            upstream.id,
        )
        raise
    log.info(
        "batch %s (%d requests, %s) submitted by %s as upstream %s; reserved %d micro-dollars",
        batch_id,
        len(lines),
        lines[0].chat.model,
        identity,
        upstream.id,
        cost,
    )
    return public(store.owned(batch_id, identity))


def _create_upstream(batch_id: str, data: bytes) -> Any:
    """Upload the file and create the batch (no retries: a retried create could run the batch twice)."""
    client = _client()
    file = _upstream(
        "upload the batch file",
        lambda: client.files.create(file=(f"{batch_id}.jsonl", data, "application/jsonl"), purpose="batch"),
    )
    try:
        return _upstream(
            "create the batch",
            lambda: client.batches.create(
                input_file_id=file.id,
                endpoint=ENDPOINT,
                completion_window="24h",
                metadata={"chatproxy_batch": batch_id},
            ),
        )
    except ApiError as exc:
        if exc.code != "upstream_timeout":
            raise
        found = _find_upstream(batch_id)  # the create may have worked and only its answer been lost
        if found is None:
            log.error(
                "creating batch %s timed out and no upstream batch carries its id (metadata "
                "chatproxy_batch=%s): if one appears later it is not on record",
                batch_id,
                batch_id,
            )
            raise
        log.warning("creating batch %s timed out, but it exists upstream as %s: carrying on", batch_id, found.id)
        return found


def _find_upstream(batch_id: str) -> Any | None:
    """The upstream batch created for `batch_id` (by its metadata) among the newest ones, or None."""
    try:
        page = _client().batches.list(limit=LOOKUP_LIMIT)
    except openai.OpenAIError:
        log.warning("could not list upstream batches to look for %s", batch_id, exc_info=True)
        return None
    return next((b for b in page.data if (b.metadata or {}).get("chatproxy_batch") == batch_id), None)


def status(batch_id: str, identity: str) -> dict[str, Any]:
    """The batch's public view, refreshed from the upstream while it runs."""
    return public(_refreshed(_store().owned(batch_id, identity)))


def results(batch_id: str, identity: str) -> dict[str, Any]:
    """Every line's answer or error, in submitted order; the first fetch records them and settles the budget."""
    row = _refreshed(_store().owned(batch_id, identity))
    if row["status"] not in FINISHED:
        raise ApiError(
            409,
            "batch_not_ready",
            f"The batch is {row['status']}; its results are not ready yet.",
            retry_after=POLL_SECONDS,
        )
    outcomes = _download(row)
    lines = [
        outcomes.get(custom_id) or _unprocessed(custom_id, row["status"]) for custom_id in json.loads(row["custom_ids"])
    ]
    if not row["results_recorded"]:
        _record(row, lines)
    return {"id": row["id"], "status": row["status"], "results": [line.public() for line in lines]}


def public(row: dict[str, Any]) -> dict[str, Any]:
    """What a client sees of a batch."""
    return {
        "id": row["id"],
        "status": row["status"],
        "model": row["model"],
        "request_counts": json.loads(row["request_counts"]),
        "created_at": row["created_at"].isoformat() + "Z",
    }


def _refreshed(row: dict[str, Any]) -> dict[str, Any]:
    """The row with the upstream's current status (no upstream call once the batch has finished)."""
    if row["status"] in FINISHED or row["upstream_id"] is None:
        return row
    upstream = _upstream("read the batch", lambda: _client().batches.retrieve(row["upstream_id"]))
    state = _state(upstream)
    if upstream.status == "failed" and upstream.errors and upstream.errors.data:
        log.warning(
            "upstream batch %s failed validation: %s",
            upstream.id,
            ", ".join(f"{e.code} (line {e.line})" for e in upstream.errors.data),
        )
    if any(row[key] != value for key, value in state.items()):
        _store().update(row["id"], **state)
    return {**row, **state}


def _state(upstream: Any) -> dict[str, Any]:
    """The columns that follow the upstream Batch object."""
    counts = upstream.request_counts
    state: dict[str, Any] = {
        "status": upstream.status,
        "output_file_id": upstream.output_file_id,
        "error_file_id": upstream.error_file_id,
    }
    if counts is not None and counts.total:
        state["request_counts"] = json.dumps(
            {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
        )
    return state


def _download(row: dict[str, Any]) -> dict[str, Outcome]:
    """Each answered line's outcome, from the output and error files."""
    outcomes: dict[str, Outcome] = {}
    for file_id in (row["output_file_id"], row["error_file_id"]):
        if not file_id:
            continue
        content = _upstream("download batch results", lambda file_id=file_id: _client().files.content(file_id)).content
        for number, text in enumerate(content.decode("utf-8", "replace").splitlines(), 1):
            if not text.strip():
                continue
            try:
                outcome = parse_result_line(json.loads(text))
            except (ValueError, TypeError, AttributeError, KeyError):
                log.warning("batch %s: line %d of file %s is not a result line; skipped", row["id"], number, file_id)
                continue
            outcomes[outcome.custom_id] = outcome
    return outcomes


def parse_result_line(entry: dict[str, Any]) -> Outcome:
    """One line of an output or error file; upstream error texts are logged, never passed on."""
    custom_id = entry["custom_id"]
    if not isinstance(custom_id, str):
        raise TypeError("custom_id")
    if entry.get("error"):
        code = entry["error"].get("code")
        log.info("batch line %s not run: %s", custom_id, code)
        if code in ("batch_expired", "batch_cancelled"):
            return _unprocessed(custom_id, code.removeprefix("batch_"))
        return Outcome(custom_id, error=("upstream_error", "The model provider could not run this request."))
    response = entry["response"]
    body = response.get("body") or {}
    if response.get("status_code") != 200:
        return Outcome(custom_id, error=_refusal(response.get("status_code"), body.get("error") or {}))
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    usage = body.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    outcome = Outcome(
        custom_id,
        content=message.get("content") or "",
        model=body.get("model"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
    )
    if choice.get("finish_reason") == "content_filter":
        outcome.error = (content_filtered().code, content_filtered().message)
    elif message.get("refusal"):
        outcome.error = ("model_refused", f"The model declined to answer: {str(message['refusal'])[:500]}")
    elif not message:
        outcome.error = ("upstream_bad_response", "The model provider's answer had no message.")
    if outcome.error:
        outcome.content = None
    return outcome


def _refusal(status: Any, error: dict[str, Any]) -> tuple[str, str]:
    code = error.get("code")
    log.info("batch line refused upstream: HTTP %s, code %s", status, code)
    if code == "content_filter":
        return content_filtered().code, content_filtered().message
    if code == "context_length_exceeded":
        return code, "The conversation is too long for the model. Shorten it."
    if isinstance(status, int) and status >= 500:
        return "upstream_error", "The model provider failed to answer this request."
    return "upstream_rejected", "The model provider refused this request."


def _unprocessed(custom_id: str, batch_status: str) -> Outcome:
    code = f"batch_{batch_status}" if batch_status in ("expired", "cancelled", "failed") else "not_processed"
    return Outcome(custom_id, error=(code, f"The batch ended ({batch_status}) before this request was run."))


def _record(row: dict[str, Any], lines: list[Outcome]) -> None:
    """One ledger row per line at batch prices, then settle the reservation; only the first fetch does it."""
    prices: PriceTable = current_app.extensions["chatproxy.prices"]
    store = _store()
    now = store.clock()
    rows, cost, tokens = [], 0, 0
    for line in lines:
        billed = line.prompt_tokens or line.completion_tokens
        line_cost = (
            prices.cost_micros(
                line.model or row["model"], line.prompt_tokens, line.completion_tokens, line.cached_tokens, batch=True
            )
            if billed
            else 0
        )
        cost += line_cost
        tokens += line.prompt_tokens + line.completion_tokens
        rows.append(
            {
                "request_id": row["id"],
                "created_at": now,
                "identity": row["owner"],
                "model_requested": row["model"],
                "model_answered": line.model,
                "prompt_tokens": line.prompt_tokens,
                "completion_tokens": line.completion_tokens,
                "tokens_exact": True,
                "cost_micros": line_cost,  # the upstream's counts (0 when not run)
                "outcome": line.error[0] if line.error else "ok",
                "stream": False,
                "closed_at": now,
            }
        )
    if not store.record_once(row["id"], rows):
        return
    reservation = Reservation(row["owner"], row["reserved_day"], row["reserved_micros"], row["reserved_tokens"])
    if cost or tokens:
        _budget().settle(reservation, cost, tokens)
    else:
        _budget().release(reservation)
    for line, entry in zip(lines, rows):
        if line.error:
            metrics.record_upstream_error(line.error[0])
        if line.prompt_tokens or line.completion_tokens:
            metrics.record_upstream(row["model"], line.prompt_tokens, line.completion_tokens, entry["cost_micros"])
    log.info(
        "batch %s: %d results recorded for %s, %d micro-dollars (reserved %d)",
        row["id"],
        len(rows),
        row["owner"],
        cost,
        row["reserved_micros"],
    )


def _upstream(what: str, call: Callable[[], T]) -> T:
    """Run one upstream call; failures become the contract's errors (details are only logged)."""
    try:
        return call()
    except openai.OpenAIError as exc:
        failure = classify(exc, _settings())  # raises the client-safe ApiError for final refusals
        log.warning("could not %s: %s", what, failure.reason)
        retry = math.ceil(failure.retry_after) if failure.retry_after else DEFAULT_RETRY_AFTER
        if isinstance(exc, openai.APITimeoutError):
            raise ApiError(
                504, "upstream_timeout", "The model provider took too long to answer. Try again.", retry_after=retry
            ) from None
        raise ApiError(
            503,
            "upstream_unavailable",
            "The model provider could not be reached. Try again shortly.",
            retry_after=retry,
        ) from None


def _settings() -> Settings:
    return current_app.extensions["chatproxy.settings"]


def _store() -> BatchStore:
    return current_app.extensions["chatproxy.batches"]


def _budget() -> Budget:
    return current_app.extensions["chatproxy.budget"]


def _client() -> OpenAI:
    return current_app.extensions["chatproxy.client"]


def _require_token() -> str:
    """The caller's identity if it holds a bearer token; the page, origins and anonymous callers get 403."""
    caller = g.get("caller")
    if caller is None or caller.kind != "token":
        raise ApiError(403, "forbidden", "The Batch API is for bearer tokens: send Authorization: Bearer <token>.")
    return caller.identity


@bp.post("/api/batches")
def create_batch() -> Response:
    """Submit a batch: 202 with its id and status."""
    identity = _require_token()
    request.max_content_length = limits().max_body_bytes  # batches may be larger than chat bodies
    body = parse_json_body(request.get_data(cache=False), request.content_type)
    view = submit(parse_requests(body, _settings(), limits().max_requests), identity)
    response = jsonify(view)
    response.status_code = 202
    response.headers["Location"] = url_for("batch.batch_status", batch_id=view["id"])
    return response


@bp.get("/api/batches/<batch_id>")
def batch_status(batch_id: str) -> Response:
    """A batch's status and request counts."""
    return jsonify(status(batch_id, _require_token()))


@bp.get("/api/batches/<batch_id>/results")
def batch_results(batch_id: str) -> Response:
    """A finished batch's answers and errors per custom_id; 409 while it runs."""
    return jsonify(results(batch_id, _require_token()))
