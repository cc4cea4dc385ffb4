"""One request's money: the budget reservation, and one ledger row per upstream attempt, closed in `finally`."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import openai
from flask import current_app, g

from . import metrics
from .budget import Budget, Reservation
from .config import Settings
from .errors import ApiError
from .prices import PriceTable
from .router import Transient, candidates
from .schemas import ChatRequest
from .usage import Ledger, estimate_prompt_tokens, estimate_tokens

log = logging.getLogger(__name__)

T = TypeVar("T")
ROW_HEADER = "X-Chatproxy-Row"  # sent upstream, so each upstream call can be matched to its ledger row


class Meter:
    """Reserve a request's worst case, record each attempt, and settle to what it really cost."""

    def __init__(self, chat: ChatRequest, settings: Settings, *, batch: bool = False) -> None:
        self.ledger: Ledger = current_app.extensions["chatproxy.ledger"]
        self.budget: Budget = current_app.extensions["chatproxy.budget"]
        self.prices: PriceTable = current_app.extensions["chatproxy.prices"]
        self.identity: str = g.identity
        self.request_id: str = g.request_id
        self.client_request_id: str | None = g.get("client_request_id")
        self.model = chat.model
        self.stream = chat.stream
        self.started = time.monotonic()
        messages = [{"role": "system", "content": chat.system_prompt or settings.system_prompt}, *chat.messages]
        self.prompt_estimate = estimate_prompt_tokens(messages)
        worst = self.prices.worst_case_micros(candidates(chat.model, settings), self.prompt_estimate,
                                              chat.max_tokens, batch=batch)
        self.reservation: Reservation = self.budget.reserve(self.identity, worst,
                                                            self.prompt_estimate + chat.max_tokens)
        self.cost = 0
        self.tokens = 0
        self._open_row: int | None = None
        self._attempt_started = self.started
        self.ttft: float | None = None
        self._settled = False
        self._lock = threading.Lock()

    def attempt(self, call: Callable[[str, openai.Timeout, dict[str, str]], T]
                ) -> Callable[[str, openai.Timeout], T]:
        """Wrap one upstream attempt: open its ledger row before the call, close it on failure."""

        def attempt(model: str, timeout: openai.Timeout) -> T:
            row = self.ledger.open(self.request_id, self.identity, self.model, self.stream, self.client_request_id)
            begun = time.monotonic()
            try:
                value = call(model, timeout, {ROW_HEADER: str(row)})
            except BaseException as exc:
                code = outcome_of(exc)
                metrics.record_upstream_error(code)
                if code == "content_filtered":  # the upstream read (and bills) the prompt before filtering
                    self._close(row, model, self.prompt_estimate, 0, False, code, begun, None)
                else:
                    self._close(row, model, 0, 0, True, code, begun, None)
                raise
            self._open_row = row
            self._attempt_started = begun
            self.ttft = time.monotonic() - begun  # a stream attempt returns at its first delta
            return value

        return attempt

    def finish(self, model: str, usage: dict[str, int] | None, completion_text: str, outcome: str,
               ttft: float | None = None) -> None:
        """Close the open row with the answer's tokens (exact from usage, else estimated) and settle."""
        with self._lock:
            row, self._open_row = self._open_row, None
        if row is not None:
            if usage is not None:
                prompt, completion, exact = usage["prompt_tokens"], usage["completion_tokens"], True
            else:
                prompt, completion, exact = self.prompt_estimate, estimate_tokens(completion_text), False
            if outcome == "ok" and model != self.model:
                outcome = "fallback"
            self._close(row, model, prompt, completion, exact, outcome, self._attempt_started, ttft)
        self.settle()

    def settle(self) -> None:
        """Replace the reservation by the real cost (or release it when nothing was spent); once."""
        with self._lock:
            if self._settled:
                return
            self._settled = True
        if self.cost or self.tokens:
            self.budget.settle(self.reservation, self.cost, self.tokens)
        else:
            self.budget.release(self.reservation)

    def abandon(self) -> None:
        """The response was closed before its stream ran: record the open attempt as aborted."""
        if self._open_row is not None:
            self.finish(self.model, None, "", "aborted")
        else:
            self.settle()

    def _close(self, row: int, model: str, prompt: int, completion: int, exact: bool, outcome: str,
               begun: float, ttft: float | None) -> None:
        cost = self.prices.cost_micros(model, prompt, completion) if prompt or completion else 0
        self.cost += cost
        self.tokens += prompt + completion
        now = time.monotonic()
        self.ledger.close(row, model_answered=model, prompt_tokens=prompt, completion_tokens=completion,
                          tokens_exact=exact, cost_micros=cost, outcome=outcome,
                          latency_ms=round((now - begun) * 1000),
                          ttft_ms=None if ttft is None else round(ttft * 1000))
        if prompt or completion:
            metrics.record_upstream(model, prompt, completion, cost, ttft)


def outcome_of(exc: BaseException) -> str:
    """A snake_case ledger outcome for a failed attempt."""
    if isinstance(exc, ApiError):
        return exc.code
    if isinstance(exc, openai.APITimeoutError):
        return "upstream_timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "upstream_unreachable"
    if isinstance(exc, openai.APIStatusError):
        return f"upstream_http_{exc.status_code}"
    if isinstance(exc, Transient):
        return "upstream_error"
    if isinstance(exc, (GeneratorExit, KeyboardInterrupt, SystemExit)):
        return "aborted"
    return "upstream_bad_response"


def usage_of(value: Any) -> dict[str, int] | None:
    """Token counts from an SDK usage object."""
    if value is None:
        return None
    return {"prompt_tokens": value.prompt_tokens, "completion_tokens": value.completion_tokens}
