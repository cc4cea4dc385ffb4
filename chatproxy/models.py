"""The model table: what each model accepts and what a call costs (models.json plus an override), in micro-dollars.

Rates are integer micro-dollars per million tokens, so a cost is exact integer arithmetic
rounded up once: ceil(sum(tokens * rate) / 1_000_000). The Batch API bills half of every rate.
A name resolves to its own entry, else (a dated snapshot such as gpt-4o-2024-08-06) to the entry
of its base name, else to the longest family prefix ("name*"). A model the table does not know gets
the conservative default described in docs/models.md.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import Decimal
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import images
from .config import SETTINGS, Settings, SettingsError

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).with_name("models.json")
SETTING = "CHATPROXY_MODEL_TABLE"
MICROS = 1_000_000  # micro-dollars per dollar, and tokens per "million tokens"
BATCH_DIVISOR = 2  # the Batch API costs half
KINDS = ("chat", "embedding")
TOKEN_PARAMS = ("max_tokens", "max_completion_tokens")
SAMPLING = ("any", "fixed", "effort_none")  # any value / only the default 1 / any value when reasoning_effort is none
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
# The sampling parameters whose acceptance depends on the model: their range, and the default every model takes.
SAMPLING_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}
SAMPLING_DEFAULTS = {"temperature": 1, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0}
FIELDS = (
    "kind",
    "token_param",
    "sampling",
    "reasoning_efforts",
    "default_effort",
    "images",
    "image_tokens",
    "context_window",
    "max_output",
    "prices",
    "shutdown",
    "replacement",
    "source",
)
_PRICE_KEYS = frozenset({"input", "cached_input", "output", "long_context"})
_LONG_KEYS = frozenset({"above", "input", "cached_input", "output"})
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class Rates:
    """Prices in integer micro-dollars per million tokens."""

    input: int
    cached_input: int
    output: int


@dataclass(frozen=True)
class Prices:
    """A model's rates, and the dearer ones billed for a whole call whose prompt has more than `long_above` tokens."""

    base: Rates
    long_above: int | None = None
    long: Rates | None = None

    def rates(self, prompt_tokens: int) -> Rates:
        """The rates a call with `prompt_tokens` input tokens is billed at."""
        if self.long is not None and self.long_above is not None and prompt_tokens > self.long_above:
            return self.long
        return self.base


@dataclass(frozen=True)
class ModelSpec:
    """What one model (or family) takes and costs."""

    name: str
    kind: str
    token_param: str | None
    sampling: str
    reasoning_efforts: tuple[str, ...]
    default_effort: str | None
    images: bool
    image_tokens: images.Rule | None  # how OpenAI counts its image input; None: not documented (the table's most)
    context_window: int
    max_output: int
    prices: Prices
    shutdown: date | None
    replacement: str | None
    source: str
    known: bool = True

    @property
    def reasons(self) -> bool:
        """Whether the model takes reasoning_effort (and bills hidden reasoning tokens as output)."""
        return bool(self.reasoning_efforts)

    def takes_effort(self, effort: str) -> bool:
        """Whether `effort` is a reasoning_effort value this model accepts."""
        return effort in self.reasoning_efforts

    def allows_sampling(self, param: str, value: float, effort: str | None = None) -> bool:
        """Whether temperature/top_p `value` is accepted, given the request's reasoning_effort (None: the default)."""
        low, high = SAMPLING_RANGES[param]
        if not low <= value <= high:
            return False
        # The default is accepted everywhere; the pipeline need not send it to a model whose sampling is not "any".
        if value == SAMPLING_DEFAULTS[param] or self.sampling == "any":
            return True
        return self.sampling == "effort_none" and (effort or self.default_effort) == "none"

    def output_cap(self, requested: int | None, server_cap: int) -> int:
        """The output-token limit to send: the client's request clamped to the server cap and the model's max output."""
        return min(requested or server_cap, server_cap, self.max_output)


@dataclass(frozen=True)
class Retirement:
    """A model's announced shutdown, seen from `today`."""

    model: str
    shutdown: date
    replacement: str | None
    days_left: int

    @property
    def retired(self) -> bool:
        """Whether the shutdown date has come (the model no longer answers from that day on)."""
        return self.days_left <= 0


class ModelTable:
    """Specs per model name or family prefix; resolves names, prices calls and reports retirements."""

    def __init__(self, specs: Mapping[str, ModelSpec], *, openai_upstream: bool = True) -> None:
        if not specs:
            raise ValueError("a model table needs at least one model")
        self._specs = dict(specs)
        self._prefixes = sorted((n[:-1] for n in self._specs if n.endswith("*")), key=len, reverse=True)
        self.openai_upstream = openai_upstream
        self.unknown = _unknown_spec(self._specs.values(), openai_upstream)
        rules = {spec.image_tokens for spec in self._specs.values() if spec.image_tokens is not None}
        self._image_rules = tuple(rules) or (images.GPT_4O,)
        self._warned: set[str] = set()

    @property
    def names(self) -> tuple[str, ...]:
        """The table's keys (model names and "prefix*" families)."""
        return tuple(self._specs)

    def known(self, name: str) -> bool:
        """Whether `name` resolves to an entry of the table."""
        return self._lookup(name) is not None

    def spec(self, name: str) -> ModelSpec:
        """The spec `name` resolves to, else the conservative default for an unknown model (warned about once)."""
        spec = self._lookup(name)
        if spec is not None:
            return spec
        if name not in self._warned:
            self._warned.add(name)
            log.warning(
                "model %r is not in the model table: using the conservative default (%s)",
                name,
                "highest known prices" if self.openai_upstream else "priced at 0",
            )
        return replace(self.unknown, name=name)

    def cost_micros(
        self, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, batch: bool = False
    ) -> int:
        """Cost of one call in micro-dollars, rounded up once; completion_tokens includes reasoning tokens."""
        if min(prompt_tokens, completion_tokens, cached_tokens) < 0:
            raise ValueError("token counts cannot be negative")
        cached = min(cached_tokens, prompt_tokens)  # cached tokens are part of the prompt
        rates = self.spec(model).prices.rates(prompt_tokens)
        numerator = (
            (prompt_tokens - cached) * rates.input + cached * rates.cached_input + completion_tokens * rates.output
        )
        return -(-numerator // (MICROS * (BATCH_DIVISOR if batch else 1)))

    def image_tokens(self, model: str, pictures: Iterable[images.Picture]) -> int:
        """The prompt tokens `pictures` cost on `model`, by its rule; a model whose rule is not documented is counted
        by whichever rule of the table counts each image highest."""
        rule = self.spec(model).image_tokens
        rules = self._image_rules if rule is None else (rule,)
        return sum(max(images.tokens(each, picture) for each in rules) for picture in pictures)

    def worst_case_micros(
        self,
        models: Iterable[str],
        prompt_tokens: int,
        max_output_tokens: int | None = None,
        batch: bool = False,
        pictures: Iterable[images.Picture] = (),
    ) -> int:
        """The most a call could cost on any of `models`: `prompt_tokens` of text plus `pictures` at each model's own
        image count; no cap means each model's max output (reasoning included)."""
        costs = []
        pictures = tuple(pictures)
        for model in models:
            spec = self.spec(model)
            output = spec.max_output if max_output_tokens is None else min(max_output_tokens, spec.max_output)
            prompt = prompt_tokens + self.image_tokens(model, pictures)
            costs.append(self.cost_micros(model, prompt, output, batch=batch))
        if not costs:
            raise ValueError("worst_case_micros needs at least one model")
        return max(costs)

    def retirement(self, name: str, today: date) -> Retirement | None:
        """The announced shutdown of the entry `name` resolves to, or None when none is announced."""
        spec = self._lookup(name)
        if spec is None or spec.shutdown is None:
            return None
        return Retirement(name, spec.shutdown, spec.replacement, (spec.shutdown - today).days)

    def _lookup(self, name: str) -> ModelSpec | None:
        spec = self._specs.get(name) or self._specs.get(_SNAPSHOT.sub("", name))
        if spec is not None:
            return spec
        prefix = next((p for p in self._prefixes if name.startswith(p)), None)
        return None if prefix is None else self._specs[prefix + "*"]


def _unknown_spec(specs: Iterable[ModelSpec], openai_upstream: bool) -> ModelSpec:
    """The default for a model the table lacks: never cheaper than any known model on OpenAI, free elsewhere."""
    specs = list(specs)
    chats = [s for s in specs if s.kind == "chat"] or specs
    rates = [r for s in chats for r in (s.prices.base, s.prices.long) if r is not None]
    if openai_upstream:
        dearest = Rates(max(r.input for r in rates), max(r.cached_input for r in rates), max(r.output for r in rates))
    else:
        dearest = Rates(0, 0, 0)
    return ModelSpec(
        name="",
        kind="chat",
        # api.openai.com: every chat model takes max_completion_tokens and new ones refuse max_tokens and sampling;
        # OpenAI-compatible servers (Ollama, llama.cpp) all take max_tokens and temperature.
        token_param="max_completion_tokens" if openai_upstream else "max_tokens",
        sampling="fixed" if openai_upstream else "any",
        reasoning_efforts=(),
        default_effort=None,
        images=False,
        image_tokens=None,
        context_window=max(s.context_window for s in chats),
        max_output=max(s.max_output for s in chats),
        prices=Prices(dearest),
        shutdown=None,
        replacement=None,
        source="conservative default (docs/models.md)",
        known=False,
    )


def read_override(value: str, setting: str = SETTING) -> str:
    """The override's JSON text: the value itself when it looks like JSON, else the file it names."""
    if value.lstrip()[:1] in ("{", "["):
        return value
    try:
        return Path(value.strip()).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(
            f"{setting} must be a JSON object or the path of a readable JSON file; "
            f"cannot read {value.strip()!r} ({type(exc).__name__})."
        ) from None


def parse_entries(text: str, source: str) -> dict[str, dict[str, Any]]:
    """Parse `{"model": {field: value}}`, rejecting bad JSON, duplicate keys and unknown fields."""
    try:
        data = json.loads(text, parse_float=Decimal, object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        raise SettingsError(
            f"{source} must be a JSON object of models to entries; it is not valid JSON ({exc})."
        ) from None
    if not isinstance(data, dict):
        raise SettingsError(
            f'{source} must be a JSON object such as {{"my-model": {{"prices": {{"input": 0.5, "output": 2}}}}}}.'
        )
    for name, entry in data.items():
        where = f"{source} entry {name!r}"
        if not name.strip() or "*" in name[:-1]:
            raise SettingsError(f"{where}: a name must be a model name or a prefix ending in one '*'.")
        if not isinstance(entry, dict):
            raise SettingsError(f"{where} must be an object with the fields {', '.join(FIELDS)}.")
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            raise SettingsError(
                f"{where} has unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(FIELDS)}."
            )
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {', '.join(map(repr, duplicates))}")
    return dict(pairs)


def build_spec(name: str, fields: Mapping[str, Any], source: str, base: ModelSpec | None = None) -> ModelSpec:
    """A validated spec from `fields`, over `base` when given (else every field is required)."""
    where = f"{source} entry {name!r}"
    missing = [f for f in FIELDS if f not in fields] if base is None else []
    if missing:
        raise SettingsError(f"{where} is missing {', '.join(map(repr, missing))}.")
    values = {"source": source} | {
        field: _FIELD_PARSERS[field](value, f"{where} {field!r}") for field, value in fields.items()
    }
    spec = ModelSpec(name=name, **values) if base is None else replace(base, name=name, known=True, **values)
    if spec.token_param is None and spec.kind == "chat":
        raise SettingsError(f"{where}: a chat model needs a token_param ({' or '.join(TOKEN_PARAMS)}).")
    if spec.default_effort is not None and spec.default_effort not in spec.reasoning_efforts:
        raise SettingsError(f"{where}: default_effort {spec.default_effort!r} is not one of its reasoning_efforts.")
    if spec.sampling == "effort_none" and "none" not in spec.reasoning_efforts:
        raise SettingsError(f"{where}: sampling 'effort_none' needs 'none' among its reasoning_efforts.")
    if spec.max_output > spec.context_window:
        raise SettingsError(f"{where}: max_output {spec.max_output} exceeds context_window {spec.context_window}.")
    return spec


def _choice(options: tuple[str, ...], optional: bool = False) -> Any:
    def parse(value: Any, where: str) -> str | None:
        if value is None and optional:
            return None
        if value not in options:
            raise SettingsError(
                f"{where} must be {'null or ' if optional else ''}one of {', '.join(options)}; got {value!r}."
            )
        return value

    return parse


def _efforts(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or any(v not in EFFORTS for v in value) or len(set(value)) != len(value):
        raise SettingsError(f"{where} must be a list of distinct values from {', '.join(EFFORTS)}; got {value!r}.")
    return tuple(value)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"{where} must be true or false; got {value!r}.")
    return value


def _count(minimum: int) -> Any:
    def parse(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SettingsError(f"{where} must be a whole number of tokens, {minimum} or more; got {value!r}.")
        return value

    return parse


def _day(value: Any, where: str) -> date | None:
    if value is None:
        return None
    try:
        if not isinstance(value, str) or not _DATE.fullmatch(value):
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise SettingsError(f"{where} must be null or a date written YYYY-MM-DD; got {value!r}.") from None


def _text(optional: bool) -> Any:
    def parse(value: Any, where: str) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or (optional and not value.strip()):
            raise SettingsError(f"{where} must be {'null or a model name' if optional else 'a string'}; got {value!r}.")
        return value

    return parse


def _image_rule(value: Any, where: str) -> images.Rule | None:
    """`{"tile": [base, per_tile]}`, `{"patch": multiplier}` or null (not documented)."""
    if value is None:
        return None
    if isinstance(value, dict) and len(value) == 1:
        tile, patch = value.get("tile"), value.get("patch")
        if isinstance(tile, list) and len(tile) == 2 and all(type(n) is int and n >= 0 for n in tile):
            return images.Tiles(*tile)
        if (
            isinstance(patch, int | Decimal)
            and not isinstance(patch, bool)
            and Decimal(patch).is_finite()
            and patch > 0
        ):
            return images.Patches(Fraction(Decimal(patch)))
    raise SettingsError(
        f'{where} must be null, {{"tile": [base tokens, tokens per tile]}} or {{"patch": multiplier}}; got {value!r}.'
    )


def _prices(value: Any, where: str) -> Prices:
    base = _rates(value, where, _PRICE_KEYS)
    long = value.get("long_context")
    if long is None:
        return Prices(base)
    above = _count(1)(long.get("above"), f"{where} long_context 'above'") if isinstance(long, dict) else None
    return Prices(base, above, _rates(long, f"{where} long_context", _LONG_KEYS))


def _rates(value: Any, where: str, keys: frozenset[str]) -> Rates:
    if not isinstance(value, dict):
        raise SettingsError(
            f'{where} must be an object with "input", "output" and optionally "cached_input" '
            f"(dollars per million tokens)."
        )
    unknown = sorted(set(value) - keys)
    if unknown:
        raise SettingsError(
            f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(keys))}."
        )
    for key in ("input", "output"):
        if key not in value:
            raise SettingsError(f"{where} is missing {key!r} (dollars per million tokens).")
    input_rate = _rate(value["input"], f"{where} 'input'")
    cached = _rate(value["cached_input"], f"{where} 'cached_input'") if "cached_input" in value else input_rate
    return Rates(input_rate, cached, _rate(value["output"], f"{where} 'output'"))


def _rate(value: Any, where: str) -> int:
    """Dollars per million tokens → integer micro-dollars per million tokens."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal) or not Decimal(value).is_finite() or value < 0:
        raise SettingsError(f"{where} must be a number of dollars per million tokens, 0 or more; got {value!r}.")
    micros = Decimal(value) * MICROS
    if micros != micros.to_integral_value():
        raise SettingsError(f"{where} must not be finer than a millionth of a dollar; got {value}.")
    return int(micros)


_FIELD_PARSERS = {
    "kind": _choice(KINDS),
    "token_param": _choice(TOKEN_PARAMS, optional=True),
    "sampling": _choice(SAMPLING),
    "reasoning_efforts": _efforts,
    "default_effort": _choice(EFFORTS, optional=True),
    "images": _flag,
    "image_tokens": _image_rule,
    "context_window": _count(1),
    "max_output": _count(0),
    "prices": _prices,
    "shutdown": _day,
    "replacement": _text(optional=True),
    "source": _text(optional=False),
}


@cache
def shipped_specs() -> dict[str, ModelSpec]:
    """The shipped table from models.json (read on first use, not at import); every field is required there."""
    entries = parse_entries(SHIPPED.read_text(encoding="utf-8"), SHIPPED.name)
    return {name: build_spec(name, fields, SHIPPED.name) for name, fields in entries.items()}


def load_table(override: str | None = None, *, openai_upstream: bool = True, setting: str = SETTING) -> ModelTable:
    """The shipped table with `override` (JSON text or a file path) replacing fields of entries or adding entries."""
    entries = parse_entries(read_override(override, setting), setting) if override and override.strip() else {}
    return _table(entries, openai_upstream, setting)


def _table(entries: Mapping[str, Mapping[str, Any]], openai_upstream: bool, setting: str) -> ModelTable:
    """The shipped table with parsed override `entries` applied."""
    specs = dict(shipped_specs())
    default = _unknown_spec(specs.values(), openai_upstream)
    for name, fields in entries.items():
        specs[name] = build_spec(name, fields, setting, base=specs.get(name) or default)
    return ModelTable(specs, openai_upstream=openai_upstream)


# --- the app's table, and what start-up checks -----------------------------------------------------------------

RETIRING_DAYS = 30  # a configured model this close to its shutdown is warned about (and named by /readyz)
REASONING_MIN_TOKENS = 4096  # below this cap a reasoning model may spend it all on hidden reasoning


def openai_upstream(settings: Settings) -> bool:
    """Whether calls go to OpenAI (or Azure OpenAI), whose prices the table knows; else an OpenAI-compatible server."""
    if settings.azure_endpoint or not settings.openai_base_url:
        return True
    return urlsplit(settings.openai_base_url).hostname == "api.openai.com"


def load_models(settings: Settings) -> ModelTable:
    """The shipped table with CHATPROXY_PRICES (prices only) and CHATPROXY_MODEL_TABLE applied, in that order."""
    entries: dict[str, dict[str, Any]] = {}
    if settings.prices:
        for name, prices in parse_entries_of_prices(settings.prices).items():
            entries[name] = {"prices": prices}
    if settings.model_table:
        for name, fields in parse_entries(read_override(settings.model_table, SETTING), SETTING).items():
            entries.setdefault(name, {}).update(fields)
    return _table(entries, openai_upstream(settings), SETTING)


def parse_entries_of_prices(text: str, setting: str = "CHATPROXY_PRICES") -> dict[str, Any]:
    """CHATPROXY_PRICES: {"model": {"input", "cached_input", "output"}}, each checked as a table entry's prices."""
    try:
        data = json.loads(text, parse_float=Decimal, object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        raise SettingsError(
            f"{setting} must be a JSON object of models to prices; it is not valid JSON ({exc})."
        ) from None
    if not isinstance(data, dict) or not data:
        raise SettingsError(
            f"{setting} must be a non-empty JSON object such as "
            '{"gpt-4o": {"input": 2.5, "cached_input": 1.25, "output": 10}}.'
        )
    for name, prices in data.items():
        if not name.strip():
            raise SettingsError(f"{setting} has an empty model name.")
        _prices(prices, f"{setting} entry {name!r}")
    return data


@dataclass(frozen=True)
class Startup:
    """What start-up found about the configured models: warnings to log, and the ones about to retire."""

    settings: Settings  # with retired default models replaced by their replacements (see configured_models)
    warnings: tuple[str, ...]
    retiring: tuple[Retirement, ...]


def configured(settings: Settings) -> tuple[str, ...]:
    """Every model the settings name: the allowlist, the default, the fallback chain, the classifier's."""
    names = [*settings.models, settings.default_model, *settings.fallback_chain, settings.classify_model]
    return tuple(dict.fromkeys(names))


def check_configured(settings: Settings, table: ModelTable, today: date) -> Startup:
    """Refuse a configured model past its shutdown (naming its date and replacement); warn about one within
    RETIRING_DAYS, about models the table does not know, and about reasoning models given a small cap.

    The models a new user gets by default follow their announced replacements once their shutdown date
    has come; models someone configured are never changed behind their back.
    """
    settings = _default_successors(settings, table, today)
    warnings: list[str] = []
    retiring: list[Retirement] = []
    for name in configured(settings):
        retirement = table.retirement(name, today)
        if retirement is not None and retirement.retired:
            replacement = (
                f"; OpenAI names {retirement.replacement} as its replacement" if retirement.replacement else ""
            )
            raise SettingsError(
                f"{name} was shut down by OpenAI on {retirement.shutdown}{replacement or ''}. Remove it from "
                f"CHATPROXY_MODELS, CHATPROXY_DEFAULT_MODEL, CHATPROXY_FALLBACK_CHAIN and CHATPROXY_CLASSIFY_MODEL "
                f"(README: 'Models of 2027')."
            )
        if retirement is not None and retirement.days_left <= RETIRING_DAYS:
            retiring.append(retirement)
            warnings.append(
                f"{name} shuts down on {retirement.shutdown} ({retirement.days_left} days): move to "
                f"{retirement.replacement or 'another model'} before then (README: 'Models of 2027')."
            )
        if not table.known(name):
            priced = "the highest known prices" if table.openai_upstream else "0 (not OpenAI: set its prices)"
            warnings.append(
                f"{name} is not in the model table: it gets the conservative defaults (docs/models.md) and is priced "
                f"at {priced}; describe it in CHATPROXY_MODEL_TABLE."
            )
        elif table.spec(name).reasons and settings.max_tokens < REASONING_MIN_TOKENS:
            warnings.append(
                f"{name} reasons: its hidden reasoning counts against CHATPROXY_MAX_TOKENS={settings.max_tokens}, "
                f"which may leave no room for the answer; {REASONING_MIN_TOKENS} or more is safer."
            )
    for name in settings.embedding_models:
        if not table.known(name) or table.spec(name).kind != "embedding":
            raise SettingsError(
                f"CHATPROXY_EMBEDDING_MODELS must name embedding models of the model table; {name!r} is not one "
                '(describe it in CHATPROXY_MODEL_TABLE with "kind": "embedding").'
            )
    return Startup(settings, tuple(warnings), tuple(retiring))


MODEL_SETTINGS = ("CHATPROXY_MODELS", "CHATPROXY_DEFAULT_MODEL", "CHATPROXY_FALLBACK_CHAIN", "CHATPROXY_CLASSIFY_MODEL")
# What a new user gets once the default models are shut down (2027-01-14): OpenAI's named replacement, and a
# stronger model that falls back to it, as gpt-4o did to gpt-4o-mini (README: "Models of 2027"). Both reason,
# so their hidden reasoning needs a larger output cap than the old default 1024.
NEXT_DEFAULTS = {
    "models": ("gpt-6-luna", "gpt-6.1-terra"),
    "default_model": "gpt-6-luna",
    "fallback_chain": ("gpt-6.1-terra", "gpt-6-luna"),
    "classify_model": "gpt-6-luna",
}
NEXT_MAX_TOKENS = 8192


def _default_successors(settings: Settings, table: ModelTable, today: date) -> Settings:
    """The settings with NEXT_DEFAULTS once the default models are retired, if the models are the defaults."""
    defaults = {s.name: s.parse(s.default) for s in SETTINGS if s.name in (*MODEL_SETTINGS, "CHATPROXY_MAX_TOKENS")}
    chosen = {
        "CHATPROXY_MODELS": settings.models,
        "CHATPROXY_DEFAULT_MODEL": settings.default_model,
        "CHATPROXY_FALLBACK_CHAIN": settings.fallback_chain,
        "CHATPROXY_CLASSIFY_MODEL": settings.classify_model,
    }
    defaults["CHATPROXY_CLASSIFY_MODEL"] = defaults["CHATPROXY_CLASSIFY_MODEL"] or defaults["CHATPROXY_DEFAULT_MODEL"]
    retired = any((r := table.retirement(name, today)) is not None and r.retired for name in settings.models)
    if not retired or any(chosen[name] != defaults[name] for name in MODEL_SETTINGS):
        return settings
    log.warning(
        "the default models %s are shut down: using %s instead (README: 'Models of 2027')",
        ", ".join(settings.models),
        ", ".join(NEXT_DEFAULTS["models"]),
    )
    cap = NEXT_MAX_TOKENS if settings.max_tokens == defaults["CHATPROXY_MAX_TOKENS"] else settings.max_tokens
    return replace(settings, **NEXT_DEFAULTS, max_tokens=cap)


def prepare(settings: Settings, today: date | None = None) -> tuple[ModelTable, Startup]:
    """The app's table and the start-up check of its models (today: the UTC date); raises SettingsError."""
    table = load_models(settings)
    return table, check_configured(settings, table, today or datetime.now(UTC).date())
