"""The Batch API at half price: validate, reserve, upload and create a batch; its status; its results, recorded once.

A batch takes the path of a chat request, once for all its lines: each line is validated by the
/api/chat schema and built into the same Call (our system prompt, the clamped max_tokens), the worst
case of every line is priced at batch rates and reserved against the caller's budget before anything
is uploaded. The first fetch of the finished results writes one ledger row per line (at batch prices)
and settles the reservation, in one transaction guarded by `results_recorded`, so concurrent fetches
record once. Creating a batch is never retried (a retried create could run the batch twice).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import openai

from .. import metrics
from ..budget import Reservation
from ..errors import ApiError, invalid
from ..keys import ApiKey
from ..models import ModelTable
from ..pipeline import Call, params_for, plan
from ..schemas.batch import Where, items
from ..state import AppState, state
from ..upstream import DEFAULT_RETRY_AFTER, as_failure, content_filtered
from .store import BATCH_ID, batches_table  # noqa: F401 - re-exported for callers that name batches by id

log = logging.getLogger(__name__)

T = TypeVar("T")

ENDPOINT = "/v1/chat/completions"
CLI_IDENTITY = "cli:local"  # who `python -m chatproxy batch ...` acts as: it runs on the server, with direct access
FINISHED = frozenset({"completed", "failed", "expired", "cancelled"})  # the upstream's final statuses
POLL_SECONDS = 30  # Retry-After while a batch is still running
LOOKUP_LIMIT = 100  # newest upstream batches searched for one whose create timed out


@dataclass(frozen=True)
class BatchLine:
    """One validated request of a batch."""

    custom_id: str
    call: Call


@dataclass
class Outcome:
    """What became of one line: an answer or an error, and the tokens it was billed for."""

    custom_id: str
    content: str | None = None
    error: tuple[str, str] | None = None  # (code, client-safe message)
    model: str | None = None  # the model that answered, as the upstream names it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # part of prompt_tokens
    reasoning_tokens: int = 0  # part of completion_tokens

    def public(self) -> dict[str, Any]:
        """The client's view: {custom_id, content} or {custom_id, error: {code, message}}."""
        if self.error is not None:
            return {"custom_id": self.custom_id, "error": {"code": self.error[0], "message": self.error[1]}}
        return {"custom_id": self.custom_id, "content": self.content}


def parse_requests(body: dict[str, Any], where: Where = items) -> list[BatchLine]:
    """Validate {"requests": [...]}: each item a /api/chat body plus a unique custom_id, one model, no stream."""
    app_state = state()
    batch = app_state.requests.batch.parse(body, where=where)
    lines: list[BatchLine] = []
    for index, item in enumerate(batch.requests):
        call = item.call()
        try:
            plan(call, app_state)  # what the model refuses is refused here, before anything is reserved or uploaded
        except ApiError as exc:
            raise invalid(f"{where(index)} ({item.custom_id}): {exc.message}") from None
        lines.append(BatchLine(item.custom_id, call))
    models = sorted({line.call.model for line in lines})
    if len(models) > 1:
        raise invalid(
            f"All requests in one batch must use the same model (the Batch API's rule); this one "
            f"mixes {', '.join(models)}. Send one batch per model."
        )
    return lines


def input_file(lines: list[BatchLine], app_state: AppState) -> bytes:
    """The JSONL the upstream runs: one Chat Completions request per line, with our system prompt and caps.

    Strict JSON, as the SDK encodes a request: a value that fails here is our bug (the edge admits strict JSON only).
    """
    return "".join(
        json.dumps(
            {
                "custom_id": line.custom_id,
                "method": "POST",
                "url": ENDPOINT,
                "body": params_for(line.call, line.call.model, app_state),
            },
            ensure_ascii=False,
            allow_nan=False,
        )
        + "\n"
        for line in lines
    ).encode("utf-8")


def worst_case(lines: list[BatchLine], table: ModelTable) -> tuple[int, int]:
    """Micro-dollars and tokens to reserve: every line's estimated prompt (schema and images included) + its output
    cap (reasoning included), at batch prices."""
    cost = tokens = 0
    for line in lines:
        call = line.call
        cost += table.worst_case_micros(
            [call.model], call.prompt_estimate, call.max_output, batch=True, pictures=call.images
        )
        tokens += call.prompt_estimate + table.image_tokens(call.model, call.images) + call.max_output
    return cost, tokens


def submit(lines: list[BatchLine], identity: str, key: ApiKey | None = None) -> dict[str, Any]:
    """Reserve the worst case, upload the input file and create the upstream batch; the batch's public view.

    An API `key`'s own budgets hold the reservation too (the rows it was made on are kept with the batch).
    """
    app_state = state()
    store, budget = app_state.batches, app_state.budget
    data = input_file(lines, app_state)  # built first: a request we cannot build holds no reservation and no row
    cost, tokens = worst_case(lines, app_state.models)
    caps = budget.caps_for(identity, key=key) if key is not None else None
    reservation = budget.reserve(identity, cost, tokens, caps=caps)  # 429 budget_exceeded before any upload
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
        store.update(batch_id, upstream_id=upstream.id, input_file_id=upstream.input_file_id, **_tracked(upstream))
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
        lines[0].call.model,
        identity,
        upstream.id,
        cost,
    )
    return public(store.owned(batch_id, identity))


def _create_upstream(batch_id: str, data: bytes) -> Any:
    """Upload the file and create the batch (no retries: a retried create could run the batch twice)."""
    client = state().client
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
        page = state().client.batches.list(limit=LOOKUP_LIMIT)
    except openai.OpenAIError:
        log.warning("could not list upstream batches to look for %s", batch_id, exc_info=True)
        return None
    return next((b for b in page.data if (b.metadata or {}).get("chatproxy_batch") == batch_id), None)


def status(batch_id: str, identity: str) -> dict[str, Any]:
    """The batch's public view, refreshed from the upstream while it runs."""
    return public(_refreshed(state().batches.owned(batch_id, identity)))


def results(batch_id: str, identity: str) -> dict[str, Any]:
    """Every line's answer or error, in submitted order; the first fetch records them and settles the budget."""
    row = _refreshed(state().batches.owned(batch_id, identity))
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
    upstream = _upstream("read the batch", lambda: state().client.batches.retrieve(row["upstream_id"]))
    tracked = _tracked(upstream)
    if upstream.status == "failed" and upstream.errors and upstream.errors.data:
        log.warning(
            "upstream batch %s failed validation: %s",
            upstream.id,
            ", ".join(f"{e.code} (line {e.line})" for e in upstream.errors.data),
        )
    if any(row[key] != value for key, value in tracked.items()):
        state().batches.update(row["id"], **tracked)
    return {**row, **tracked}


def _tracked(upstream: Any) -> dict[str, Any]:
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
        content = _upstream(
            "download batch results", lambda file_id=file_id: state().client.files.content(file_id)
        ).content
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
        reasoning_tokens=int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0),
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
    app_state = state()
    table = app_state.models
    store = app_state.batches
    now = store.clock()
    rows, cost, tokens = [], 0, 0
    for line in lines:
        billed = line.prompt_tokens or line.completion_tokens
        line_cost = (
            table.cost_micros(
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
                "cached_tokens": line.cached_tokens,
                "reasoning_tokens": line.reasoning_tokens,
                "tokens_exact": True,
                "cost_micros": line_cost,  # the upstream's counts (0 when not run)
                "outcome": line.error[0] if line.error else "ok",
                "stream": False,
                "closed_at": now,
            }
        )
    if not store.record_once(row["id"], rows):
        return
    keys = tuple(json.loads(row["reserved_keys"])) if row.get("reserved_keys") else ()
    reservation = Reservation(row["owner"], row["reserved_day"], row["reserved_micros"], row["reserved_tokens"], keys)
    if cost or tokens:
        app_state.budget.settle(reservation, cost, tokens)
    else:
        app_state.budget.release(reservation)
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
        failure = as_failure(exc, state().settings)  # raises the client-safe ApiError for final refusals
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
