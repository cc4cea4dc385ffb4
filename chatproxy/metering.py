"""One request's money: the budget reservation, and one ledger row per upstream attempt, closed in `finally`.

One database round trip before the first upstream byte and one after: the reservation opens the first
attempt's ledger row in its transaction, and the settlement closes the last one in its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import httpx2
import openai
from flask import g, request
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from . import metrics
from .budget import Budget, Hold, Reservation, Undone
from .config import Settings
from .dialects import Usage
from .errors import ApiError
from .models import ModelTable
from .state import state
from .upstream import AttemptFailed, NotSent, UnreadableAnswer
from .usage import Ledger, estimate_tokens, unavailable

if TYPE_CHECKING:
    from .pipeline import Call

log = logging.getLogger(__name__)

T = TypeVar("T")
ROW_HEADER = "X-Chatproxy-Row"  # sent upstream, so each upstream call can be matched to its ledger row
HOLD_MARGIN_S = 60  # a reservation's hold outlives the longest its request may run by this much
# Failures before the request was sent: nothing reached the upstream, so nothing was billed.
NEVER_SENT = (
    httpx2.ConnectError,
    httpx2.ConnectTimeout,
    httpx2.PoolTimeout,
    httpx2.WriteError,
    httpx2.WriteTimeout,
    httpx2.UnsupportedProtocol,
    httpx2.ProxyError,
    httpx2.LocalProtocolError,
)
Build = Callable[[str], bytes]  # the encoded request body for one model of the chain
Send = Callable[[bytes, str, openai.Timeout, dict[str, str]], T]  # sends it (body, model, timeout, extra headers)


class Meter:
    """Reserve a request's worst case, record each attempt, and settle to what it really cost."""

    def __init__(self, call: Call, chain: Sequence[str], settings: Settings) -> None:
        app_state = state()
        self.ledger: Ledger = app_state.ledger
        self.budget: Budget = app_state.budget
        self.models: ModelTable = app_state.models
        self.identity: str = g.identity
        self.request_id: str = g.request_id
        self.client_request_id: str | None = g.get("client_request_id")
        self.model = call.model
        self.stream = call.stream
        # What each attempt's ledger row opens with (Ledger.open's arguments).
        self._row_fields = (
            self.request_id,
            self.identity,
            self.model,
            self.stream,
            self.client_request_id,
            call.end_user,
        )
        self.started = time.monotonic()
        self.prompt_estimate = call.prompt_estimate
        self.images = call.images
        # The worst case over every model the router may try: each one's output cap, reasoning included, and the
        # images as that model counts them, at its rates.
        worst = self.models.worst_case_micros(chain, self.prompt_estimate, call.max_output, pictures=self.images)
        most_prompt = max(self.prompt_of(model) for model in chain)
        caller = g.get("caller")
        # The client address is the one the guards count per-IP limits under (ProxyFix has applied).
        caps = (
            self.budget.caps_for(self.identity, caller.kind, request.remote_addr, caller.key, caller.end_user_micros)
            if caller
            else self.budget.caps_for(self.identity, "token", request.remote_addr)
        )
        # If this request never settles (its worker is killed, the database fails at that moment), the sweeper
        # settles it once no request can still be running: its open attempts at the estimated prompt's cost.
        hold = Hold(
            self.request_id,
            most_prompt,
            self.models.worst_case_micros(chain, self.prompt_estimate, 0, pictures=self.images),
            settings.total_timeout + settings.read_timeout + HOLD_MARGIN_S,
        )
        self._spare_row: int | None = None  # opened with the reservation, for the first attempt that goes out
        self.reservation: Reservation = self.budget.reserve(
            self.identity, worst, most_prompt + call.max_output, caps=caps, hold=hold, then=self._open_spare
        )
        self.cost = 0
        self.tokens = 0
        self._open_row: int | None = None
        self._attempt_started = self.started
        self.ttft: float | None = None
        self._settled = False
        self._unrecorded = False  # a ledger row could not be closed: the sweeper settles from the ledger
        self._lock = threading.Lock()

    def attempt(self, build: Build, send: Send[T]) -> Callable[[str, openai.Timeout], T]:
        """Wrap one upstream attempt: build and encode its request, take its ledger row (the one the reservation
        opened, for the first attempt; else a new one), send; close the row on failure.

        A request that cannot be built or recorded raises NotSent before a row is taken (the reservation's, unused,
        is deleted at settlement): it is not an upstream failure (no retry, no cooldown, no upstream-error metric).
        """

        def attempt(model: str, timeout: openai.Timeout) -> T:
            try:
                body = build(model)
                with self._lock:
                    row, self._spare_row = self._spare_row, None
                if row is None:
                    row = self.ledger.open(*self._row_fields)
            except Exception as exc:
                raise NotSent(exc) from exc
            begun = time.monotonic()
            try:
                value = send(body, model, timeout, {ROW_HEADER: str(row)})
            except BaseException as exc:
                code = outcome_of(exc)
                metrics.record_upstream_error(code)
                billed = reached_upstream(exc)  # estimated prompt: billed once received, answer or not
                self._close(row, model, Usage(self.prompt_of(model) if billed else 0, 0), not billed, code, begun, None)
                raise
            self._open_row = row
            self._attempt_started = begun
            self.ttft = time.monotonic() - begun  # a stream attempt returns at its first delta
            return value

        return attempt

    def finish(
        self,
        model: str,
        usage: Usage | None,
        completion_text: str,
        outcome: str,
        ttft: float | None = None,
        response_id: str | None = None,
    ) -> None:
        """Close the open row with the answer's tokens (exact from usage, else estimated) and settle; `response_id`
        names a response the upstream keeps for this row's identity."""
        with self._lock:
            row, self._open_row = self._open_row, None
        if row is None:
            self.settle()
            return
        exact = usage is not None
        if usage is None:
            usage = Usage(self.prompt_of(model), estimate_tokens(completion_text))
        if outcome == "ok" and model != self.model:
            outcome = "fallback"
        self._close(row, model, usage, exact, outcome, self._attempt_started, ttft, response_id, settling=True)

    def prompt_of(self, model: str) -> int:
        """The estimated prompt tokens of this request on `model`: its text, and its images as `model` counts them."""
        return self.prompt_estimate + self.models.image_tokens(model, self.images)

    def settle(self, last: Callable[[Connection], None] | None = None) -> bool:
        """Replace the reservation by the real cost (or release it when nothing was spent), once, in one transaction
        with closing the `last` row and deleting an unused spare one. False when that transaction did not happen
        (settled already, the database failed, a row could not be closed): the caller then closes `last` on its
        own, and the sweeper settles what is left from the rows."""
        with self._lock:
            if self._settled:
                return False
            self._settled = True
            spare, self._spare_row = self._spare_row, None

        def in_transaction(conn: Connection) -> None:
            if last is not None:
                last(conn)
            if spare is not None:
                self.ledger.discard_in(conn, spare)

        if self._unrecorded:
            log.warning("request %s left to the budget sweeper: a ledger row could not be closed", self.request_id)
            done = False
        elif self.cost or self.tokens:
            done = self.budget.settle(self.reservation, self.cost, self.tokens, then=in_transaction)
        else:
            done = self.budget.release(self.reservation, then=in_transaction)
        if not done and spare is not None:  # never used: the sweeper would charge it a prompt
            self._discard(spare)
        return done

    def abandon(self) -> None:
        """The response was closed before its stream ran: record the open attempt as aborted."""
        if self._open_row is not None:
            self.finish(self.model, None, "", "aborted")
        else:
            self.settle()

    def _open_spare(self, conn: Connection) -> None:
        """Open the first attempt's row in the reservation's transaction (a failure undoes the reservation)."""
        try:
            self._spare_row = self.ledger.open_in(conn, *self._row_fields)
        except SQLAlchemyError:
            raise unavailable() from None

    def _discard(self, row: int) -> None:
        try:
            with self.ledger.engine.begin() as conn:
                self.ledger.discard_in(conn, row)
        except SQLAlchemyError:
            log.exception("cannot delete the unused usage row %s", row)

    def _close(
        self,
        row: int,
        model: str,
        usage: Usage,
        exact: bool,
        outcome: str,
        begun: float,
        ttft: float | None,
        response_id: str | None = None,
        *,
        settling: bool = False,
    ) -> None:
        """Close an attempt's row; `settling`: the request's last, closed in the settlement's transaction."""
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        cost = self.models.cost_micros(model, prompt, completion, usage.cached_tokens) if prompt or completion else 0
        self.cost += cost
        self.tokens += prompt + completion
        fields = {
            "model_answered": model,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cached_tokens": usage.cached_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "tokens_exact": exact,
            "cost_micros": cost,
            "outcome": outcome,
            "latency_ms": round((time.monotonic() - begun) * 1000),
            "ttft_ms": None if ttft is None else round(ttft * 1000),
            "response_id": response_id,
        }
        settled = False
        if settling:

            def close_last(conn: Connection) -> None:
                if not self.ledger.close_in(conn, row, **fields):
                    raise Undone(f"usage row {row} was already closed")

            settled = self.settle(close_last)
        if not settled and not self.ledger.close(row, **fields):
            # The counters must agree with the ledger: settling this cost while the row stays open would
            # count it twice or never; the sweeper settles the whole request from its rows instead.
            self._unrecorded = True
        if prompt or completion:
            metrics.record_upstream(model, prompt, completion, cost, ttft)


def outcome_of(exc: BaseException) -> str:
    """A snake_case ledger outcome for a failed attempt."""
    if isinstance(exc, ApiError):
        return exc.code
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)) and not reached_upstream(exc):
        return "upstream_unreachable"
    if isinstance(exc, openai.APITimeoutError):
        return "upstream_timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "upstream_disconnected"
    if isinstance(exc, openai.APIStatusError):
        return f"upstream_http_{exc.status_code}"
    if isinstance(exc, UnreadableAnswer):
        return "upstream_bad_response"
    if isinstance(exc, AttemptFailed):
        return "upstream_error"
    if isinstance(exc, (GeneratorExit, KeyboardInterrupt, SystemExit)):
        return "aborted"
    return "internal_error"  # our own bug after the call went out


def reached_upstream(exc: BaseException) -> bool:
    """Whether a failed attempt's request reached the upstream, which then bills its prompt.

    OpenAI bills a request once it has received it, whether or not the answer arrives: a read timeout
    (a non-stream request may even finish upstream), a connection closed or reset while waiting for or
    reading the answer, an unreadable or cut answer, a worker stopping mid-call. Not billed: an error
    answer (HTTP 4xx/5xx), and a request that never got there (connection refused, connect timeout).
    """
    if isinstance(exc, openai.APIStatusError):
        return False
    if isinstance(exc, ApiError):
        return exc.code == "content_filtered"  # the upstream read the prompt before filtering it
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, NEVER_SENT):
            return False
        cause = cause.__cause__
    return True
