"""The model table (chatproxy/models.py + models.json): name resolution, conservative defaults, costs, overrides."""

from __future__ import annotations

import inspect
import json
import logging
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
from openai.types.shared import chat_model

from chatproxy import models
from chatproxy.config import SettingsError
from chatproxy.models import FIELDS, SETTING, load_table

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def table() -> models.ModelTable:
    return load_table()


# --- resolution ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "entry"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),  # a dated snapshot is its base entry
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # unless the snapshot has an entry of its own (other prices)
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # the longest name wins: not gpt-4o
        ("gpt-6.1-terra", "gpt-6.1-terra"),
        ("text-embedding-3-small", "text-embedding-3-small"),
    ],
)
def test_names_and_dated_snapshots_resolve_to_their_entry(table: models.ModelTable, name: str, entry: str) -> None:
    assert table.known(name)
    assert table.spec(name).name == entry


@pytest.mark.parametrize("name", ["gpt-5.5-pro", "gpt-4o-audio-preview", "gpt-6.2-astra", "llama3.1:8b", "gpt-4o-x"])
def test_a_longer_name_is_not_its_shorter_neighbour(table: models.ModelTable, name: str) -> None:
    # gpt-5.5-pro costs 6x gpt-5.5: bare prefix matching would under-charge it, so only "name*" keys are prefixes.
    assert not table.known(name)
    assert table.spec(name).known is False


def test_the_longest_family_prefix_wins() -> None:
    override = {"acme-*": {"prices": {"input": 1, "output": 2}}, "acme-large-*": {"prices": {"input": 3, "output": 4}}}
    table = load_table(json.dumps(override))
    assert table.spec("acme-small-v2").name == "acme-*"
    assert table.spec("acme-large-v2").name == "acme-large-*"
    assert table.spec("acme-large-v2").prices.base == models.Rates(3_000_000, 3_000_000, 4_000_000)
    assert not table.known("acm")
    catch_all = load_table('{"*": {"prices": {"input": 0, "output": 0}}}')  # "*": every name not otherwise known
    assert catch_all.spec("llama3.1:8b").name == "*" and catch_all.spec("gpt-4o").name == "gpt-4o"


# --- unknown models ------------------------------------------------------------------------------------------


def test_an_unknown_model_on_openai_gets_the_conservative_default_and_one_warning(caplog) -> None:
    table = load_table()
    with caplog.at_level(logging.WARNING, logger="chatproxy.models"):
        spec = table.spec("gpt-9-nova")
        table.spec("gpt-9-nova")
    assert [r.getMessage() for r in caplog.records] == [
        "model 'gpt-9-nova' is not in the model table: using the conservative default (highest known prices)"
    ]
    assert (spec.name, spec.known, spec.kind, spec.token_param, spec.sampling) == (
        "gpt-9-nova",
        False,
        "chat",
        "max_completion_tokens",
        "fixed",
    )
    assert (spec.reasoning_efforts, spec.images, spec.shutdown) == ((), False, None)
    assert spec.max_output == max(s.max_output for s in models.shipped_specs().values())
    # Never cheaper than any known model, whatever the call, long prompts and batch included.
    for prompt, output, cached in [(1000, 1000, 0), (500_000, 128_000, 400_000), (1, 0, 0), (0, 5, 0)]:
        for batch in (False, True):
            unknown = table.cost_micros("gpt-9-nova", prompt, output, cached, batch)
            assert all(unknown >= table.cost_micros(name, prompt, output, cached, batch) for name in table.names)


def test_an_unknown_model_behind_another_upstream_is_free_and_takes_max_tokens_and_temperature() -> None:
    table = load_table(openai_upstream=False)
    spec = table.spec("llama3.1:8b")
    assert (spec.token_param, spec.sampling, spec.known) == ("max_tokens", "any", False)
    assert spec.allows_sampling("temperature", 0.3)
    assert table.cost_micros("llama3.1:8b", 10**6, 10**6) == 0
    assert table.worst_case_micros(["llama3.1:8b"], 10**6) == 0
    # Known models keep their prices (a gateway serving gpt-4o still bills gpt-4o).
    assert table.cost_micros("gpt-4o", 10**6, 0) == 2_500_000


def test_an_unknown_model_takes_prices_from_an_override() -> None:
    table = load_table('{"llama3.1:8b": {"prices": {"input": 0.05, "output": 0.1}}}', openai_upstream=False)
    assert table.known("llama3.1:8b")
    assert table.cost_micros("llama3.1:8b", 1_000_000, 1_000_000) == 150_000
    assert table.spec("llama3.1:8b").token_param == "max_tokens"  # the rest comes from the unknown default


# --- costs ---------------------------------------------------------------------------------------------------


def test_cached_prompt_tokens_are_billed_at_the_cached_rate(table: models.ModelTable) -> None:
    # gpt-4o: $2.50 input, $1.25 cached input, $10.00 output per 1M tokens.
    #   uncached   200,000 x $2.50 / 1M = $0.50 =   500,000 micro-dollars
    #   cached     800,000 x $1.25 / 1M = $1.00 = 1,000,000
    #   output       1,000 x $10.00 / 1M = $0.01 =    10,000
    #   total                               $1.51 = 1,510,000  (all at the input rate it would be $2.51: 1.66x)
    assert table.cost_micros("gpt-4o", 1_000_000, 1_000, cached_tokens=800_000) == 1_510_000
    assert table.cost_micros("gpt-4o", 1_000_000, 1_000) == 2_510_000


def test_batch_is_half_and_the_cost_is_rounded_up_once(table: models.ModelTable) -> None:
    assert table.cost_micros("gpt-4o", 1_000_000, 1_000, 800_000, batch=True) == 755_000
    # gpt-4o-mini: 1 prompt token = $0.15 / 1M = 0.15 micro-dollars, rounded up to 1; 7 tokens = 1.05 -> 2.
    assert table.cost_micros("gpt-4o-mini", 1, 0) == 1
    assert table.cost_micros("gpt-4o-mini", 7, 0) == 2
    # Rounded once over the sum, not per part: 3 x 0.15 + 1 x 0.60 = 1.05 -> 2 (per part: 1 + 1 = 2, 4 tokens: 1).
    assert table.cost_micros("gpt-4o-mini", 3, 1) == 2
    assert table.cost_micros("gpt-4o-mini", 3, 1, batch=True) == 1  # 1.05 / 2 = 0.525 -> 1


def test_reasoning_tokens_are_billed_as_output(table: models.ModelTable) -> None:
    # OpenAI's completion_tokens includes completion_tokens_details.reasoning_tokens: a gpt-6-luna answer of
    # 200 visible tokens after 1,000 hidden reasoning tokens is 1,200 output tokens at $0.50 / 1M.
    #   prompt 1,000 x $0.10 / 1M = 100 micro-dollars; output 1,200 x $0.50 / 1M = 600; total 700 (not 200).
    assert table.cost_micros("gpt-6-luna", 1_000, 1_200) == 700


def test_a_prompt_over_the_long_context_threshold_bills_the_whole_call_at_the_long_rates(
    table: models.ModelTable,
) -> None:
    # gpt-6-luna: $0.10 / $0.01 / $0.50, and $0.20 / $0.02 / $0.75 for a call whose prompt exceeds 272,000 tokens.
    assert table.cost_micros("gpt-6-luna", 272_000, 1_000) == 27_200 + 500
    assert table.cost_micros("gpt-6-luna", 272_001, 1_000) == 54_401 + 750  # 272,001 x 0.20 = 54,400.2 -> up
    assert table.cost_micros("gpt-6-luna", 300_000, 0, cached_tokens=100_000) == 40_000 + 2_000  # 0.20 and 0.02


def test_negative_token_counts_are_refused(table: models.ModelTable) -> None:
    with pytest.raises(ValueError):
        table.cost_micros("gpt-4o", -1, 0)


def test_worst_case_uses_the_max_output_without_a_cap_and_the_dearest_model(table: models.ModelTable) -> None:
    # No cap: gpt-6-luna may write 128,000 output tokens (reasoning included): 1,000 x 0.10 + 128,000 x 0.50.
    assert table.worst_case_micros(["gpt-6-luna"], 1_000) == 100 + 64_000
    # A cap above the model's max output is clamped to it; below, it is the cap.
    assert table.worst_case_micros(["gpt-4o-mini"], 0, max_output_tokens=10**6) == 9_831  # 16,384 x 0.60 = 9,830.4
    assert table.worst_case_micros(["gpt-4o-mini"], 0, max_output_tokens=1_000) == 600
    assert table.worst_case_micros(["gpt-4o-mini", "gpt-6.1-terra"], 1_000, 1_000) == 1_000 * 1 + 1_000 * 5
    with pytest.raises(ValueError):
        table.worst_case_micros([], 1)


# --- capabilities ----------------------------------------------------------------------------------------------


def test_token_parameter_and_capabilities_per_family(table: models.ModelTable) -> None:
    assert table.spec("gpt-4o-mini").token_param == "max_tokens"  # what chatproxy sends today; accepted
    for name in ("gpt-5", "gpt-6-luna", "o3", "gpt-6.1-sol"):
        assert table.spec(name).token_param == "max_completion_tokens"
        assert table.spec(name).reasons
    assert not table.spec("gpt-4.1").reasons
    assert table.spec("o3-mini").images is False and table.spec("gpt-6-luna").images is True
    assert table.spec("text-embedding-3-large").kind == "embedding"


@pytest.mark.parametrize(
    ("model", "param", "value", "effort", "allowed"),
    [
        ("gpt-4o", "temperature", 0.3, None, True),
        ("gpt-4o", "temperature", 2.5, None, False),  # out of range everywhere
        ("gpt-4o", "top_p", 1.5, None, False),
        ("gpt-5", "temperature", 0.3, None, False),  # only the default 1
        ("gpt-5", "temperature", 1, None, True),
        ("o4-mini", "top_p", 0.9, None, False),
        ("gpt-6-luna", "temperature", 0.3, None, False),  # default effort medium
        ("gpt-6-luna", "temperature", 0.3, "none", True),
        ("gpt-6-luna", "temperature", 0.3, "low", False),
        ("gpt-5.1", "temperature", 0.3, None, True),  # gpt-5.1 defaults to effort none
        ("gpt-5.4", "temperature", 0.3, None, False),  # default effort not documented: treated as not none
        ("gpt-6.1-sol", "temperature", 0.3, None, False),  # takes no effort none at all
    ],
)
def test_sampling_values_each_model_accepts(
    table: models.ModelTable, model: str, param: str, value: float, effort: str | None, allowed: bool
) -> None:
    assert table.spec(model).allows_sampling(param, value, effort) is allowed


def test_reasoning_efforts_per_family(table: models.ModelTable) -> None:
    assert table.spec("gpt-6-luna").reasoning_efforts == ("none", "low", "medium", "high", "xhigh", "max")
    assert table.spec("gpt-5").takes_effort("minimal") and not table.spec("gpt-5").takes_effort("none")
    assert not table.spec("gpt-6.1-sol").takes_effort("none")
    assert not table.spec("gpt-4o").takes_effort("low")


def test_output_cap_clamps_to_the_server_cap_and_the_max_output(table: models.ModelTable) -> None:
    assert table.spec("gpt-4o").output_cap(None, 1024) == 1024
    assert table.spec("gpt-4o").output_cap(100, 1024) == 100
    assert table.spec("gpt-4o").output_cap(100_000, 128_000) == 16_384


# --- retirement ------------------------------------------------------------------------------------------------


def test_retirement_reports_the_date_and_replacement(table: models.ModelTable) -> None:
    soon = table.retirement("gpt-4o-mini-2024-07-18", date(2026, 12, 15))
    assert soon == models.Retirement("gpt-4o-mini-2024-07-18", date(2027, 1, 14), "gpt-6-luna", 30)
    assert not soon.retired
    assert not table.retirement("gpt-4o", date(2027, 1, 13)).retired
    assert table.retirement("gpt-4o", date(2027, 1, 14)).retired  # shut down on that day
    assert table.retirement("gpt-4.1-nano", date(2026, 12, 1)).days_left == -39
    assert table.retirement("gpt-5.1", date(2026, 12, 1)).replacement is None  # not announced in what we read
    assert table.retirement("gpt-6-luna", date(2026, 12, 1)) is None
    assert table.retirement("gpt-9-nova", date(2026, 12, 1)) is None


def test_the_documented_new_defaults_are_not_scheduled_for_shutdown(table: models.ModelTable) -> None:
    # docs/models.md proposes these for 2027-01-15, when gpt-4o and gpt-4o-mini are gone.
    for name in ("gpt-6-luna", "gpt-6.1-terra"):
        assert table.known(name) and table.retirement(name, date(2027, 1, 15)) is None


# --- the shipped table -----------------------------------------------------------------------------------------


def test_every_shipped_entry_is_well_formed() -> None:
    raw = json.loads((ROOT / "chatproxy" / "models.json").read_text(encoding="utf-8"))
    specs = models.shipped_specs()
    assert set(raw) == set(specs)
    for name, entry in raw.items():
        assert tuple(entry) == FIELDS, name  # every field present, in the documented order
        spec = specs[name]
        rates = [spec.prices.base] + ([spec.prices.long] if spec.prices.long else [])
        assert all(min(r.input, r.cached_input, r.output) >= 0 for r in rates), name
        assert spec.prices.base.cached_input <= spec.prices.base.input, name
        assert entry["source"].startswith("https://developers.openai.com/"), name
        if entry["shutdown"] is not None:
            assert spec.shutdown == date.fromisoformat(entry["shutdown"]), name
        if spec.replacement is not None:  # the replacement is in the table and outlives the model
            after = table_retirement(spec.replacement)
            assert after is None or after > spec.shutdown, name
        if spec.kind == "chat":
            assert spec.token_param in models.TOKEN_PARAMS and 0 < spec.max_output <= spec.context_window, name


def test_shutdown_dates_match_the_ones_the_openai_sdk_announces(table: models.ModelTable) -> None:
    # openai's ChatModel type lists every announced shutdown ("Deprecated values:"), generated from OpenAI's spec.
    source = Path(inspect.getfile(chat_model)).read_text(encoding="utf-8")
    announced = {}
    for item in source.split("Deprecated values:")[1].split("\n- ")[1:]:
        day = re.search(r"shutdown\s+date:\s+(\d{4}-\d{2}-\d{2})", item)
        for name in re.findall(r'"([^"]+)"', item):
            announced[name] = date.fromisoformat(day.group(1)) if day else None
    assert announced["gpt-4o-mini"] == date(2027, 1, 14)
    for name in table.names:
        assert table.spec(name).shutdown == announced.get(name), name


def table_retirement(name: str) -> date | None:
    return models.shipped_specs()[name].shutdown


def test_the_table_is_read_on_first_use_not_at_import() -> None:
    code = (
        "import chatproxy.models as m; print(m.shipped_specs.cache_info().currsize); "
        "m.load_table(); print(m.shipped_specs.cache_info().currsize)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "1"]


# --- overrides -----------------------------------------------------------------------------------------------


def test_an_override_replaces_fields_of_an_entry_and_adds_entries() -> None:
    override = {
        "gpt-4o": {"prices": {"input": 2, "cached_input": 1, "output": 8}},
        "my-reasoner": {
            "token_param": "max_completion_tokens",
            "reasoning_efforts": ["low", "high"],
            "max_output": 4096,
            "prices": {"input": 1, "output": 4},
            "shutdown": "2027-06-30",
            "replacement": "gpt-6-luna",
        },
    }
    table = load_table(json.dumps(override))
    gpt_4o = table.spec("gpt-4o")
    assert gpt_4o.prices.base == models.Rates(2_000_000, 1_000_000, 8_000_000)
    assert (gpt_4o.shutdown, gpt_4o.max_output, gpt_4o.source) == (date(2027, 1, 14), 16_384, SETTING)
    mine = table.spec("my-reasoner")
    assert (mine.known, mine.reasoning_efforts, mine.max_output) == (True, ("low", "high"), 4096)
    assert mine.prices.base.cached_input == 1_000_000  # no cached_input: the input rate
    assert table.retirement("my-reasoner", date(2027, 6, 1)).days_left == 29
    assert load_table().spec("gpt-4o").prices.base.input == 2_500_000  # the shipped table is untouched


def test_an_override_may_be_a_path_to_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text('{"gpt-6-luna": {"max_output": 1000}}', encoding="utf-8")
    assert load_table(str(path)).spec("gpt-6-luna").max_output == 1000
    with pytest.raises(SettingsError, match=f"{SETTING} must be a JSON object or the path of a readable JSON file"):
        load_table(str(tmp_path / "missing.json"))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            '{"gpt-4o": {"prices": {"input": 2.5,}}}',
            f"{SETTING} must be a JSON object of models to entries; it is not valid JSON",
        ),
        ('["gpt-4o"]', f"{SETTING} must be a JSON object such as"),
        ('{"gpt-4o": {"price": {"input": 1, "output": 2}}}', f"{SETTING} entry 'gpt-4o' has unknown field(s) 'price'"),
        (
            '{"gpt-4o": {"prices": {"input": 1, "output": 2, "batch": 1}}}',
            f"{SETTING} entry 'gpt-4o' 'prices' has unknown key(s) 'batch'",
        ),
        (
            '{"gpt-4o": {"shutdown": "2027-02-30"}}',
            f"{SETTING} entry 'gpt-4o' 'shutdown' must be null or a date written YYYY-MM-DD; got '2027-02-30'",
        ),
        ('{"gpt-4o": {"shutdown": "14/01/2027"}}', f"{SETTING} entry 'gpt-4o' 'shutdown' must be null or a date"),
        ('{"gpt-4o": {"sampling": "sometimes"}}', f"{SETTING} entry 'gpt-4o' 'sampling' must be one of"),
        (
            '{"gpt-4o": {"reasoning_efforts": ["turbo"]}}',
            f"{SETTING} entry 'gpt-4o' 'reasoning_efforts' must be a list",
        ),
        ('{"gpt-4o": {"default_effort": "low"}}', f"{SETTING} entry 'gpt-4o': default_effort 'low' is not one of"),
        ('{"gpt-4o": {"sampling": "effort_none"}}', "sampling 'effort_none' needs 'none'"),
        ('{"gpt-4o": {"max_output": 200000}}', "max_output 200000 exceeds context_window 128000"),
        ('{"gpt-4o": {"context_window": 1.5}}', f"{SETTING} entry 'gpt-4o' 'context_window' must be a whole number"),
        ('{"gpt-4o": {"images": "yes"}}', f"{SETTING} entry 'gpt-4o' 'images' must be true or false"),
        (
            '{"gpt-4o": {"prices": {"input": -1, "output": 2}}}',
            "'input' must be a number of dollars per million tokens",
        ),
        ('{"gpt-4o": {"prices": {"input": 0.0000001, "output": 2}}}', "must not be finer than a millionth of a dollar"),
        (
            '{"gpt-4o": {"prices": {"input": 1, "output": 2, "long_context": {"input": 2, "output": 4}}}}',
            "long_context 'above' must be a whole number",
        ),
        ('{"gpt-4o": {}, "gpt-4o": {}}', "duplicate key(s) 'gpt-4o'"),
        ('{"gpt-*-mini": {}}', f"{SETTING} entry 'gpt-*-mini': a name must be a model name or a prefix ending in"),
        ('{"new-model": {"token_param": null}}', f"{SETTING} entry 'new-model': a chat model needs a token_param"),
    ],
)
def test_a_bad_override_names_the_setting_and_the_entry(text: str, says: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_table(text)
    assert says in str(caught.value)


def test_the_setting_name_in_messages_is_the_one_given() -> None:
    with pytest.raises(SettingsError, match=r"^CHATPROXY_PRICES entry 'gpt-4o'"):
        load_table('{"gpt-4o": {"bogus": 1}}', setting="CHATPROXY_PRICES")


def test_an_empty_override_is_the_shipped_table() -> None:
    assert load_table("").names == load_table(None).names == load_table("  ").names == load_table("{}").names
