"""The price table: dollars per million tokens as data (prices.json), costs as integer micro-dollars.

Rates are held as integer micro-dollars per million tokens, so a cost is exact integer
arithmetic rounded up once: ceil(sum(tokens * rate) / 1_000_000). The Batch API bills
half of every rate. A model missing from the table is priced at the highest rate of each
kind in the table (never cheaper than any known model), which keeps budgets safe.
"""

from __future__ import annotations

import logging
import re
from functools import cache
from pathlib import Path

from flask import Flask

from .config import MICROS, Rates, Settings, parse_prices

log = logging.getLogger(__name__)

DEFAULTS = Path(__file__).with_name("prices.json")
BATCH_DIVISOR = 2  # the Batch API costs half
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")  # gpt-4o-2024-08-06 is priced as gpt-4o


class PriceTable:
    """Prices per model; computes costs in integer micro-dollars."""

    def __init__(self, rates: dict[str, Rates]) -> None:
        if not rates:
            raise ValueError("a price table needs at least one model")
        self._rates = dict(rates)
        self._fallback = Rates(
            max(r.input for r in rates.values()),
            max(r.cached_input for r in rates.values()),
            max(r.output for r in rates.values()),
        )
        self._warned: set[str] = set()

    @property
    def models(self) -> tuple[str, ...]:
        """The models the table knows."""
        return tuple(self._rates)

    def known(self, model: str) -> bool:
        """Whether `model` (or its dated snapshot's base name) has its own prices."""
        return self._lookup(model) is not None

    def rates(self, model: str) -> Rates:
        """The model's rates; an unknown model gets the table's highest rate of each kind."""
        rates = self._lookup(model)
        if rates is None:
            if model not in self._warned:
                self._warned.add(model)
                log.warning("no price for model %r: charging the highest known rates", model)
            return self._fallback
        return rates

    def cost_micros(
        self, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, batch: bool = False
    ) -> int:
        """Cost of one call in micro-dollars, rounded up; `cached_tokens` is the cached part of `prompt_tokens`."""
        if min(prompt_tokens, completion_tokens, cached_tokens) < 0:
            raise ValueError("token counts cannot be negative")
        cached = min(cached_tokens, prompt_tokens)
        rates = self.rates(model)
        numerator = (
            (prompt_tokens - cached) * rates.input + cached * rates.cached_input + completion_tokens * rates.output
        )
        divisor = MICROS * (BATCH_DIVISOR if batch else 1)
        return -(-numerator // divisor)

    def worst_case_micros(
        self, models: list[str] | tuple[str, ...], prompt_tokens: int, max_tokens: int, batch: bool = False
    ) -> int:
        """The most a call could cost on any of `models` (e.g. the requested model and its fallbacks)."""
        return max(self.cost_micros(model, prompt_tokens, max_tokens, batch=batch) for model in models)

    def _lookup(self, model: str) -> Rates | None:
        return self._rates.get(model) or self._rates.get(_SNAPSHOT.sub("", model))


@cache
def default_rates() -> dict[str, Rates]:
    """The shipped prices from prices.json (read on first use, not at import)."""
    return parse_prices(DEFAULTS.read_text(encoding="utf-8"), source=DEFAULTS.name)


def load_prices(override: str | None = None) -> PriceTable:
    """The shipped table with the entries of `override` (CHATPROXY_PRICES JSON) replacing or adding models."""
    rates = dict(default_rates())
    if override:
        rates.update(parse_prices(override))
    return PriceTable(rates)


def init_app(app: Flask) -> None:
    """Build the app's price table from settings (a bad CHATPROXY_PRICES stops start-up)."""
    settings: Settings = app.extensions["chatproxy.settings"]
    app.extensions["chatproxy.prices"] = load_prices(settings.prices)
