"""BENCHMARKS.md, the plot and README's Performance figures, all from one run's results (nothing typed by hand)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
ORDER = "ABCGVDFKPE"
OURS = "CGV"  # chatproxy's own paths: the ratios section compares them with the others
GOALS = (  # (figure key, goal text, test): issue 19's goals
    ("added_ttft_p50_ms", "added TTFT p50 ≤ 1.5 ms", lambda v: v is not None and v <= 1.5),
    ("added_gap_p99_ms", "added inter-chunk gap p99 ≤ 1 ms at 1 stream", lambda v: v is not None and v <= 1),
    ("batched_gaps", "no batching (gaps < 1 ms) at 1 stream", lambda v: v == 0),
    ("sustained_streams", "≥ 256 sustained streams", lambda v: v is not None and v >= 256),
    ("kib_per_stream", "≤ 64 KiB per open stream{at}", lambda v: v is not None and v <= 64),
    ("cpu_ms_per_1000_chunks", "≤ 80 ms CPU per 1,000 chunks{at}", lambda v: v is not None and v <= 80),
    ("reuse_pct", "≥ 99 % upstream connection reuse", lambda v: v is not None and v >= 99),
    ("chunks_after_abort_max", "≤ 1 chunk after a hang-up", lambda v: v is not None and v <= 1),
)
RATIOS = (  # (figure key, what it is, lower is better)
    ("added_ttft_p50_ms", "added TTFT p50", True),
    ("added_ttft_p99_ms", "added TTFT p99", True),
    ("added_gap_p99_ms", "added gap p99", True),
    ("sustained_streams", "sustained streams", False),
    ("cpu_ms_per_1000_chunks", "CPU per 1,000 chunks{at}", True),
    ("kib_per_stream", "memory per open stream{at}", True),
    ("rps_p99_under_10ms", "whole replies/s (p99 < 10 ms)", False),
)


def write(results: dict[str, Any], markdown: Path, plot: Path, readme: Path | None) -> None:
    """Write the report, the plot (if matplotlib is there) and, for a full run, README's figures."""
    plotted = draw(results, plot)
    image = _relative(plot, markdown.parent) if plotted else None
    markdown.write_text(render(results, image), encoding="utf-8")
    print(f"report: {markdown}" + (f", plot: {plot}" if plotted else " (no plot: matplotlib is not installed)"))
    if readme is not None and readme.exists():
        update_readme(results, readme)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _v(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _x(value: Any) -> str:
    return "–" if value is None else f"×{value:g}"


def _letters(results: dict[str, Any]) -> list[str]:
    return [k for k in ORDER if k in results["figures"]]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def common_level(results: dict[str, Any]) -> int | None:
    """The one sustained level at which every path's CPU and memory figures were taken (bench/run.py
    `common_level`), or None if they were taken at different levels (no level measured by all)."""
    found = {f["cpu_level"] for k, f in results["figures"].items() if k != "A" and f.get("cpu_level") is not None}
    return found.pop() if len(found) == 1 else None


def _at(results: dict[str, Any]) -> str:
    """ " at N streams", the suffix of the CPU and memory labels, or "" without a common level."""
    level = common_level(results)
    return "" if level is None else f" at {level} stream" + ("" if level == 1 else "s")


def reuse_pct(f: dict[str, Any]) -> float | None:
    """Upstream connection reuse in the one-client and whole-reply phases: 100 - new connections per 100 calls."""
    values = [v for k, v in f["conn_per_1000"].items() if k in ("one_client", "json_rate") and v is not None]
    return round(100 - max(values) / 10, 1) if values else None


def render(results: dict[str, Any], image: str | None) -> str:
    """The whole BENCHMARKS.md."""
    figures, paths, machine = results["figures"], results["paths"], results["machine"]
    letters = _letters(results)
    name = {k: f"{k} ({paths[k]['name']})" for k in letters}
    quiet = results["quiet_wait"]
    whole = results["whole_run"]
    ours = whole["client_cpu_s"] + whole["upstream_cpu_s"] + whole["server_cpu_s"]
    busy = whole["core_busy"].get("all", 0) * whole["wall_s"] * (machine["cores"] or 1)
    out = [
        "# Benchmarks",
        "",
        (
            "What chatproxy adds over calling the upstream directly, next to nginx alone doing the same hop. "
            "Written by `bench/run.py` from one run; every number below comes from that run "
            "(raw data: `bench/results/full/results.json`, not committed). Run it again with `make bench`."
        ),
        "",
        "## Machine and run",
        "",
        _table(
            ["", ""],
            [
                ["Command", f"`{results['command']}`"],
                ["Started (UTC)", results.get("started_utc") or "not recorded"],
                ["CPU", f"{machine['cpu']}, {machine['cores']} cores"],
                ["Kernel", machine["kernel"]],
                [
                    "Python / gunicorn / openai SDK",
                    f"{machine['python']} / {machine['gunicorn']} / {machine['openai']}",
                ],
                ["nginx", _v(machine["nginx"])],
                ["Pinning", results["pinning"]],
                [
                    "Load average (1, 5, 15 min) at start / end",
                    f"{', '.join(map(str, quiet['loadavg_at_start']))} / "
                    f"{', '.join(map(str, machine['loadavg_at_end']))}",
                ],
                [
                    "Waited for a quiet machine",
                    (
                        f"{quiet['waited_s']} s (both cores {_v(quiet['busy_before'], 2)} busy "
                        f"when it started; quiet means < {quiet['threshold']})"
                    ),
                ],
                [
                    "CPU used by other processes during the run",
                    f"{max(0.0, busy - ours):.1f} s of {whole['wall_s'] * (machine['cores'] or 1):.0f} core-seconds",
                ],
                ["Ledger", f"temporary SQLite file on {machine['tmp_filesystem']}"],
                ["Run time", f"{results['elapsed_s']} s"],
            ],
        ),
        "",
        "## What runs",
        "",
        (
            "A paced fake upstream (`bench/upstream.py`, asyncio): the first delta 20 ms after the request, then "
            "64 deltas 20 ms apart on an absolute schedule, in the real `chat.completion.chunk` shape (with JSON "
            "escapes, non-ASCII and emoji in the text), a usage chunk and `[DONE]`, chunked HTTP/1.1 kept alive; "
            "whole replies at once. One asyncio load client (`bench/load.py`) timestamps every read. Paths:"
        ),
        "",
        *[f"- **{name[k]}**" for k in letters],
        "",
        "gunicorn runs the shipped `gunicorn.conf.py` (2 workers; the gevent worker class for C, V and D, "
        "gthread for G) with `CHATPROXY_THREADS=512` so that threads or greenlets are not the limit; the plain "
        "proxy F runs under gunicorn's gthread worker with 2 workers and 512 threads too; nginx runs "
        "`deploy/nginx.conf`'s upstream and proxy directives without TLS. App settings: "
        + ", ".join(f"`{k}={v}`" for k, v in results["app_settings"].items())
        + "; every other setting keeps its shipped default (`CHATPROXY_KEEPALIVE_SECONDS=10`; `--paths` with K "
        "turns it off to show what the pinger costs).",
        "",
        (
            f"One-client figures: {results['plan']['rounds']} rounds after a warm-up, paths interleaved in a rotated "
            "order each round; p50 is the median of the round medians, p99 and max are over all samples of all "
            "rounds. *Added* is the path's figure minus the direct path's (A); *× B* is that added part divided by "
            "nginx's added part (or, for capacities and resources, the path's value divided by B's)."
        ),
    ]
    if image:
        out += ["", f"![Added TTFT and sustained streams per path]({image})"]
    out += ["", "## Goals", "", _goals(results, letters, name)]
    ratios = _ratios(results, letters)
    if ratios:
        out += [
            "",
            "## Ratios",
            "",
            (
                "Each of chatproxy's paths divided by another path of the same run (added figures: the added parts; "
                "below 1 is better for times, CPU and memory, above 1 for streams and replies per second). "
                "Issue 19 asks for C's added TTFT below F's (ratio < 1) and V within 10 % of C on every figure."
            ),
            "",
            ratios,
        ]
    out += [
        "",
        "## 1. Time to first token, one stream",
        "",
        _table(
            [
                "Path",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "added p50 ms",
                "added p99 ms",
                "× B p50",
                "× B p99",
                "round medians ms",
                "samples",
            ],
            [
                [
                    name[k],
                    _v(f["ttft_p50_ms"]),
                    _v(f["ttft_p99_ms"]),
                    _v(f.get("added_ttft_p50_ms")),
                    _v(f.get("added_ttft_p99_ms")),
                    _x(f.get("x_b_ttft_p50_ms")),
                    _x(f.get("x_b_ttft_p99_ms")),
                    ", ".join(_v(v, 1) for v in f["ttft_round_medians_ms"]),
                    str(f["samples"]["ttft"]),
                ]
                for k, f in ((k, figures[k]) for k in letters)
            ],
        ),
    ]
    out += [
        "",
        "## 2. Between chunks, one stream",
        "",
        (
            "Gap: time between two deltas at the client (the upstream sends one every 20 ms). Lag: a delta's arrival "
            "at the client minus the moment the upstream wrote it (same clock). A gap under 1 ms while the upstream "
            "paces at 20 ms would mean something buffers (batching)."
        ),
        "",
        _table(
            [
                "Path",
                "gap p50 ms",
                "gap p99 ms",
                "gap max ms",
                "added gap p50 / p99 / max ms",
                "× B p99",
                "lag p50 ms",
                "lag p99 ms",
                "added lag p99 ms",
                "batched gaps",
                "content identical",
                "chunks per stream",
            ],
            [
                [
                    name[k],
                    _v(f["gap_p50_ms"]),
                    _v(f["gap_p99_ms"]),
                    _v(f["gap_max_ms"]),
                    " / ".join(_v(f.get(x)) for x in ("added_gap_p50_ms", "added_gap_p99_ms", "added_gap_max_ms")),
                    _x(f.get("x_b_gap_p99_ms")),
                    _v(f["lag_p50_ms"]),
                    _v(f["lag_p99_ms"]),
                    _v(f.get("added_lag_p99_ms")),
                    f"{f['batched_gaps']} of {f['gaps_measured']}",
                    _v(f["identical"]),
                    ", ".join(map(str, f["chunks"])),
                ]
                for k, f in ((k, figures[k]) for k in letters)
            ],
        ),
    ]
    out += [
        "",
        "## 3. Sustained streams",
        "",
        (
            "Concurrent clients each streaming back to back (starts spread over one stream's length, then "
            f"{results['plan']['hold']} s more). A level passes with no failed stream, no gap over 40 ms (2× the pace) "
            "and an added TTFT p99 (over A at the same level) under 50 ms; a path stops climbing at its first failure. "
            "*Client-limited*: the load generator's core was over 90 % busy or the upstream wrote chunks over 5 ms "
            "late, so the figure may be the client's limit, not the path's."
        ),
        "",
        _table(
            ["Path", "sustained streams", "first failing level", "why", "× B", "client-limited level seen"],
            [
                [
                    name[k],
                    str(f["sustained_streams"]),
                    _v(f["sustained_failed_at"]),
                    "; ".join(f["sustained_failed_because"]) or "–",
                    _x(f.get("x_b_sustained_streams")),
                    _v(f["sustained_client_limited"]),
                ]
                for k, f in ((k, figures[k]) for k in letters)
            ],
        ),
        "",
        "Every level measured:",
        "",
        _levels(results, letters),
    ]
    out += [
        "",
        "## 4. Whole (non-streaming) replies",
        "",
        _table(
            [
                "Path",
                "latency p50 ms",
                "latency p99 ms",
                "added p50 ms",
                "added p99 ms",
                "× B p50",
                "req/s with p99 < 10 ms",
                "at clients",
                "× B",
                "client core > 90 %",
            ],
            [
                [
                    name[k],
                    _v(f["json_p50_ms"]),
                    _v(f["json_p99_ms"]),
                    _v(f.get("added_json_p50_ms")),
                    _v(f.get("added_json_p99_ms")),
                    _x(f.get("x_b_json_p50_ms")),
                    _v(f["rps_p99_under_10ms"]),
                    _v(f["rps_clients"]),
                    _x(f.get("x_b_rps")),
                    _v(f["rps_client_limited"]),
                ]
                for k, f in ((k, figures[k]) for k in letters)
            ],
        ),
        "",
        "Every concurrency measured:",
        "",
        _rates(results, letters),
    ]
    out += [
        "",
        "## 5. Memory, CPU and threads",
        "",
        (
            "Memory: resident memory of the serving workers (gunicorn's workers; nginx's worker) halfway through "
            "a level, minus their memory before the sustained-stream climb, per open stream. CPU: user + system "
            "time of those workers (from /proc) during a level, per 1,000 deltas delivered; it includes each "
            "stream's per-request work (guards, ledger rows, budget, the upstream request), spread over its 64 "
            "deltas. Both change with the level (fixed costs amortise over more streams), so the Goals, the Ratios "
            "and README compare every path at one level: "
            + (
                f"{common_level(results)} streams, the highest level every path measured (a path's first failing "
                "level is measured too)."
                if common_level(results) is not None
                else "none here: no level was measured by every path, so each path's figure is at its own level."
            )
            + " The same figures at each path's highest passing level are beside them; every level is in section 3."
        ),
        "",
        _table(
            [
                "Path",
                "KiB per open stream",
                "at level",
                "× B",
                "CPU ms per 1,000 chunks",
                "at level",
                "× B",
                "KiB / CPU ms at the highest passing level",
                "that level",
                "threads idle",
                "threads at level",
            ],
            [
                [
                    name[k],
                    _v(f.get("kib_per_stream"), 1),
                    _v(f.get("memory_level")),
                    _x(f.get("x_b_kib_per_stream")),
                    _v(f.get("cpu_ms_per_1000_chunks"), 1),
                    _v(f.get("cpu_level")),
                    _x(f.get("x_b_cpu_ms_per_1000_chunks")),
                    f"{_v(f.get('kib_per_stream_top'), 1)} / {_v(f.get('cpu_ms_per_1000_chunks_top'), 1)}",
                    _v(f.get("top_level")),
                    _v(f.get("threads_idle")),
                    _v(f.get("threads_at_level")),
                ]
                for k, f in ((k, figures[k]) for k in letters if k != "A")
            ],
        ),
    ]
    out += [
        "",
        "## 6. Upstream connections and hang-ups",
        "",
        (
            "New upstream connections per 1,000 upstream requests, counted by the upstream (a connection belongs to "
            "the path of its first request); A's count is the load client's own pattern (one connection per round "
            "or per client). With the paths interleaved, each one idles longer between its rounds than the SDK's "
            "5 s keep-alive expiry (httpx's default), so a chatproxy path opens about one new connection per round "
            "even when every stream hands its connection back. Hang-ups: the client closes the connection after 8 "
            "deltas; chunks the upstream still "
            "wrote after that moment (the proxy must notice and close its upstream stream)."
        ),
        "",
        _table(
            [
                "Path",
                "conns / 1,000 (one client)",
                "conns / 1,000 (whole replies)",
                "conns / 1,000 (sustained)",
                "reuse %",
                "chunks after abort (median / max)",
                "upstream closed after (median ms)",
                "ran to the end",
            ],
            [
                [
                    name[k],
                    _v(f["conn_per_1000"].get("one_client"), 1),
                    _v(f["conn_per_1000"].get("json_rate"), 1),
                    _v(f["conn_per_1000"].get("sustained"), 1),
                    _v(reuse_pct(f), 1),
                    f"{_v(f['chunks_after_abort_median'], 0)} / {_v(f['chunks_after_abort_max'])}",
                    _v(_median_ms(results["aborts"].get(k, {}).get("upstream_closed_after_s", [])), 1),
                    _v(results["aborts"].get(k, {}).get("ran_to_the_end")),
                ]
                for k, f in ((k, figures[k]) for k in letters)
            ],
        ),
    ]
    cost = results.get("cost")
    if cost:
        out += ["", "## 7. Where the CPU goes", "", *_cost(cost)]
    out += [
        "",
        "## Where the time goes",
        "",
        "Section 7 measures it in-process; `bench/profile.py streams|replies` records the gunicorn workers under this"
        " load with py-spy (install it by hand; it is no dependency) and prints the top functions. Per request, the "
        "work before the first token is identifying and limiting the caller, validating the body (the pydantic "
        "request models: about 20 us for /api/chat, about 100 us for a /v1 body with tools), one database transaction"
        " that reserves the budget and opens the ledger row, and building the upstream request; after the last token,"
        " one transaction settles the budget and closes the row. Per chunk: httpcore/h11 reading the chunked body, "
        "decoding the event (orjson), the wire adapter's bytes, and the worker class's socket I/O (gevent's hub, or "
        "the keep-alive timeout on each upstream read). Every streaming route reads the upstream with "
        "the same raw SSE reader (`relay.py`, `sse.py`), not the SDK's `Stream`. With SQLite and more than one worker, "
        "writers wait on SQLite's file lock; under gevent that wait blocks the whole worker (docs/deploy.md): "
        "PostgreSQL is the ledger for concurrency.",
    ]
    notes = [*results["notes"], *results["level_notes"]]
    if results["server_log_problems"]:
        notes += [f"{proc} logged: {'; '.join(lines)[:400]}" for proc, lines in results["server_log_problems"].items()]
    errors = {k: f["errors"] for k, f in figures.items() if f["errors"]}
    notes += [f"{k}: {len(e)} one-client errors, e.g. {e[0]}" for k, e in errors.items()]
    out += ["", "## Notes", "", *([f"- {n}" for n in notes] or ["- none: no errors, no server log problems."])]
    return "\n".join(out) + "\n"


GOAL_CPU_MS = 80.0  # issue 19: ms of CPU per 1,000 chunks on 64-chunk streams, per-request work included
PARAGRAPH_GROUPS = (  # the floor paragraph names layers in these groups
    ("Flask/werkzeug's request handling", ("flask", "werkzeug")),
    ("SQLAlchemy and sqlite3 (the ledger and budget transactions)", ("sqlalchemy",)),
    ("the SDK's HTTP stack (httpx2/httpcore2/h11)", ("http",)),
    ("the openai SDK", ("openai",)),
    ("pydantic", ("pydantic",)),
    ("flask_limiter/limits", ("limits",)),
    ("prometheus_client", ("prometheus",)),
    ("chatproxy's own code", ("chatproxy",)),
    ("the standard library", ("stdlib",)),
    ("the kernel (system calls, wake-ups)", ("socket_waits",)),
    ("the test client (in place of the WSGI server)", ("harness",)),
    ("other packages", ("other",)),
)


def _cost(cost: dict[str, Any]) -> list[str]:
    """Section 7 from bench/cost.py's figures: CPU per request and per chunk, the profile by layer, the floor."""
    cpu, table = cost["cpu"], cost["layers"]
    default, off = cpu["default"], cpu.get("no_keepalive")
    deltas, reps = cost["deltas"], cost["reps"]
    request, chunk = default["request_ms"], default["chunk_ms"]
    lines = [
        (
            "`bench/cost.py`, run after every server above has stopped: the app built by `chatproxy.create_app()` "
            "with the settings above (the gthread worker class, a SQLite ledger in a temporary folder), in one "
            "process, served by Flask's test client: no gunicorn, no socket between client and app, so these are "
            "chatproxy's own figures per request and per chunk, without the WSGI server's. The upstream is the same "
            "paced one, in a process of its own"
            + ("; it runs on core 0, the app's process on core 1. " if cost["pinned"] else ". ")
            + f"{reps} streams of 1 delta one after another, then {reps} of {deltas} deltas, "
            f"{cost['concurrency']} at a time, their starts spread so that no two streams' work overlaps; the two "
            "apps below take turns (1-delta streams, half the long ones, the other half, 1-delta streams again). "
            "CPU is the process's user + system time (every thread): per request = a 1-delta stream, per extra "
            f"chunk = (a {deltas}-delta stream − a 1-delta stream) / {deltas - 1}. With the app idle the process "
            f"used {cost['idle_cpu_ms_per_s']:.2f} ms of CPU per second."
        ),
        "",
    ]
    rows = []
    for label, c in (
        ("default (`CHATPROXY_KEEPALIVE_SECONDS=10`: the stream's thread pings on a read timeout)", default),
        ("`CHATPROXY_KEEPALIVE_SECONDS=0` (no keep-alive check)", off),
    ):
        if c:
            rows.append(
                [
                    label,
                    f"{c['request_ms']:.2f} ({_batches(c, 1)})",
                    f"{c['stream_ms']:.2f} ({_batches(c, deltas)})",
                    f"{c['chunk_ms'] * 1000:.0f}",
                    f"{c['stream_ms'] / deltas * 1000:.0f}",
                    f"{c['system_share']:.0%}",
                    f"{c['context_switches_per_chunk']:.2f}",
                ]
            )
    lines += [
        _table(
            [
                "App",
                "CPU per request (1-delta stream), ms (each batch)",
                f"CPU per {deltas}-delta stream, ms (each batch)",
                "CPU per extra chunk, µs",
                f"ms per 1,000 chunks on {deltas}-chunk streams (per-request work included)",
                "kernel share",
                "context switches per extra chunk",
            ],
            rows,
        ),
        "",
        (
            "The kernel's CPU (system time, measured above: system calls, wake-ups) is a layer of its own; the "
            "user CPU is split by a cProfile of the same streams in the default app (every thread the app starts "
            "is profiled), on the wall clock with the calls that wait (socket reads, polls, queue gets, locks) "
            "left out, grouped by the layer each Python function belongs to; a C function counts in the layer of "
            "the Python function that called it (sqlite3's in SQLAlchemy's). cProfile adds a cost to every call it "
            f"sees (here {table['profiler_us_per_event'][str(deltas)]:.2f} µs per call: the profile's excess over "
            "the user CPU, over the calls), which is not taken off: it falls partly on the caller's layer, partly "
            "on the callee's. So layers of many small calls look heavier than they are; times are estimates. "
            "Python calls are counted exactly."
        ),
        "",
    ]
    names = dict(table["names"])
    layer_rows = [
        [
            names[key],
            f"{row['request_ms']:.2f}",
            f"{row['request_pct']:.1f}",
            f"{row['request_calls']:.0f}",
            f"{row['chunk_ms'] * 1000:.1f}",
            f"{row['chunk_pct']:.1f}",
            f"{row['chunk_calls']:.1f}",
        ]
        for key, row in table["rows"].items()
    ]
    layer_rows.append(
        [
            "**all (measured CPU)**",
            f"**{request:.2f}**",
            "100",
            f"{table['python_calls_per_request']:.0f}",
            f"**{chunk * 1000:.1f}**",
            "100",
            f"{table['python_calls_per_chunk']:.1f}",
        ]
    )
    lines += [
        _table(
            [
                "Layer",
                "per request, ms",
                "%",
                "Python calls per request",
                "per extra chunk, µs",
                "%",
                "Python calls per chunk",
            ],
            layer_rows,
        ),
        "",
        _floor(cost),
        "",
        _irreducible(cost),
    ]
    return lines


def _batches(c: dict[str, Any], deltas: int) -> str:
    """CPU per stream of each batch of `deltas`-delta streams, ms: the spread between batches."""
    return ", ".join(f"{b['cpu_s'] / b['reps'] * 1000:.2f}" for b in c.get("batches", []) if b["deltas"] == deltas)


def _shares(rows: dict[str, dict[str, float]], key: str) -> str:
    """'a % in X, b % in Y, ...' over PARAGRAPH_GROUPS, largest first; groups under 1 % summed at the end."""
    parts = [(sum(rows[k][key] for k in keys if k in rows), text) for text, keys in PARAGRAPH_GROUPS]
    parts.sort(key=lambda item: -item[0])
    named = [f"{pct:.0f} % in {text}" for pct, text in parts if pct >= 1]
    rest = [pct for pct, _text in parts if pct < 1]
    if rest:
        named.append(f"under 1 % each in the {len(rest)} other layers")
    return ", ".join(named[:-1]) + " and " + named[-1] if len(named) > 1 else "".join(named)


def _floor(cost: dict[str, Any]) -> str:
    """The generated paragraph: where a request's and a chunk's CPU goes, and what that means for the goal."""
    default, rows = cost["cpu"]["default"], cost["layers"]["rows"]
    deltas = cost["deltas"]
    request, chunk = default["request_ms"], default["chunk_ms"]
    fixed = request / deltas * 1000  # ms per 1,000 chunks from the per-request work alone
    per_chunk = chunk * 1000  # ms per 1,000 chunks from the per-chunk work alone
    ours_request = rows["chatproxy"]["request_ms"]
    ours_chunk = rows["chatproxy"]["chunk_ms"] * 1000
    if fixed > GOAL_CPU_MS and per_chunk > GOAL_CPU_MS:
        verdict = f"each on its own is over the goal of {GOAL_CPU_MS:.0f} ms"
    elif fixed > GOAL_CPU_MS:
        verdict = f"the per-request work alone is over the goal of {GOAL_CPU_MS:.0f} ms"
    elif per_chunk > GOAL_CPU_MS:
        verdict = f"the per-chunk work alone is over the goal of {GOAL_CPU_MS:.0f} ms"
    else:
        verdict = f"together {fixed + per_chunk:.0f} ms against the goal of {GOAL_CPU_MS:.0f} ms"
    return (
        f"**The floor.** Of {request:.1f} ms per request, {_shares(rows, 'request_pct')}. Of {chunk * 1000:.0f} µs "
        f"per extra chunk, {_shares(rows, 'chunk_pct')}. On {deltas}-chunk streams the per-request work alone is "
        f"{fixed:.0f} ms per 1,000 chunks and the per-chunk work {per_chunk:.0f} ms per 1,000 chunks: {verdict}, "
        f"in-process, before any WSGI server's work; chatproxy's own code is {ours_request:.2f} ms of the request "
        f"and {ours_chunk:.0f} µs of the chunk."
    )


def _irreducible(cost: dict[str, Any]) -> str:
    """The generated line: what cannot be removed in Python per chunk, as far as these figures show it."""
    default, off = cost["cpu"]["default"], cost["cpu"].get("no_keepalive")
    rows = cost["layers"]["rows"]
    http, kernel = rows["http"], rows["socket_waits"]
    line = (
        "**What cannot be removed in Python**, as far as these figures show: per chunk, a pure-Python HTTP/1.1 "
        f"client's work on each read of the upstream's chunked body (httpcore2's read, h11's parse): about "
        f"{http['chunk_ms'] * 1000:.0f} µs and {http['chunk_calls']:.0f} Python calls ({http['chunk_pct']:.0f} % "
        "of a chunk's CPU); and the kernel's work for each chunk (the system calls and the wake-up of the thread "
        f"that sleeps until it arrives): about {kernel['chunk_ms'] * 1000:.0f} µs ({kernel['chunk_pct']:.0f} %). "
        "The WSGI server's write of each chunk to the client's socket is not in these figures (the test client "
        "has no socket): in gunicorn it comes on top."
    )
    if off:
        handoff = (default["chunk_ms"] - off["chunk_ms"]) * 1000
        switches = round(default["context_switches_per_chunk"] - off["context_switches_per_chunk"], 1) + 0.0
        line += (
            " Keep-alive pings as gunicorn's workers send them (the stream's own thread reads the upstream with "
            "a timeout of CHATPROXY_KEEPALIVE_SECONDS and writes a ping itself on each timeout; no pump thread) "
            "measured "
            f"{handoff:.0f} µs of CPU and {switches:.1f} context switches per chunk against pings off."
        )
    return line


def _median_ms(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2] * 1000


def _goals(results: dict[str, Any], letters: list[str], name: dict[str, str]) -> str:
    figures = results["figures"]
    shown = [k for k in letters if k not in ("A",)]
    rows = []
    for key, text, test in GOALS:
        cells = [text.format(at=_at(results))]
        for k in shown:
            value = reuse_pct(figures[k]) if key == "reuse_pct" else figures[k].get(key)
            cells.append(f"{_v(value)} {'✓' if test(value) else '✗'}")
        rows.append(cells)
    return _table(["Goal", *[name[k] for k in shown]], rows)


def _ratios(results: dict[str, Any], letters: list[str]) -> str:
    """Rows: a figure and one of our paths; columns: that path's value divided by each other path's."""
    figures = results["figures"]
    ours = [k for k in letters if k in OURS]
    others = [k for k in letters if k != "A"]
    rows = []
    for key, label, _lower in RATIOS:
        for k in ours:
            mine = figures[k].get(key)
            cells = []
            for other in others:
                theirs = figures[other].get(key)
                ok = other != k and mine is not None and theirs is not None and abs(theirs) > 1e-9
                cells.append(f"{mine / theirs:.2f}" if ok else "")
            rows.append([f"{label.format(at=_at(results))}: {k} ÷", *cells])
    return _table(["", *others], rows) if ours and others else ""


def _levels(results: dict[str, Any], letters: list[str]) -> str:
    rows = []
    for k in letters:
        for p in results["sustained"].get(k, []):
            rows.append(
                [
                    k,
                    str(p["level"]),
                    str(p["streams"]),
                    str(p["errors"]),
                    _v(p["ttft_p50_ms"], 1),
                    _v(p["ttft_p99_ms"], 1),
                    _v(p.get("added_ttft_p99_ms"), 1),
                    _v(p["gap_p99_ms"], 1),
                    _v(p["gap_max_ms"], 1),
                    str(p["stalls"]),
                    str(p["batched"]),
                    _v(p["server_cpu_ms_per_1000_chunks"], 0),
                    _v(None if p["rss_bytes"] is None else p["rss_bytes"] / 2**20, 0),
                    _v(p["threads"]),
                    f"{p['client_cpu_s'] / p['wall_s']:.0%} / {p['upstream_cpu_s'] / p['wall_s']:.0%}",
                    f"{p['client_core_busy']:.0%}" if p.get("client_core_busy") is not None else "–",
                    _v(p["upstream_lateness_p99_ms"], 1),
                    "pass" if p["passed"] else "FAIL",
                    "client-limited" if p["client_limited"] else "",
                ]
            )
    return _table(
        [
            "Path",
            "streams",
            "total",
            "failed",
            "TTFT p50",
            "TTFT p99",
            "added p99",
            "gap p99",
            "gap max",
            "gaps > 40 ms",
            "gaps < 1 ms",
            "server CPU ms/1k chunks",
            "RSS MiB",
            "threads",
            "client / upstream CPU",
            "core 0 busy",
            "upstream late p99 ms",
            "",
            "",
        ],
        rows,
    )


def _rates(results: dict[str, Any], letters: list[str]) -> str:
    rows = [
        [
            k,
            str(p["clients"]),
            _v(p["rps"], 0),
            _v(p["p50_ms"]),
            _v(p["p99_ms"]),
            str(p["errors"]),
            f"{p['core_busy'].get('0', p['core_busy'].get('all', 0)):.0%}",
            _v(p["server_cpu_s"] * 1000 / p["requests"] if p["requests"] else None, 2),
        ]
        for k in letters
        for p in results["json_rate"].get(k, [])
    ]
    return _table(["Path", "clients", "req/s", "p50 ms", "p99 ms", "errors", "client core", "server CPU ms/req"], rows)


def draw(results: dict[str, Any], target: Path) -> bool:
    """Added TTFT (p50, p99) and sustained streams per path, and TTFT p99 per level; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    figures, letters = results["figures"], _letters(results)
    proxies = [k for k in letters if k != "A"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.6))
    width = 0.38
    xs = range(len(proxies))
    for offset, key, label in ((-width / 2, "added_ttft_p50_ms", "p50"), (width / 2, "added_ttft_p99_ms", "p99")):
        values = [figures[k].get(key) or 0 for k in proxies]
        bars = left.bar([x + offset for x in xs], values, width, label=label)
        left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.set_xticks(list(xs), proxies)
    left.set_ylabel("ms added over direct (A)")
    left.set_title("Added time to first token, 1 stream")
    left.legend()
    values = [figures[k]["sustained_streams"] for k in letters]
    bars = middle.bar(letters, [max(v, 0.5) for v in values], color="tab:green")
    middle.bar_label(bars, labels=[str(v) for v in values], fontsize=8)
    middle.set_yscale("log", base=2)
    middle.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    middle.set_title("Sustained concurrent streams (2 cores)")
    middle.set_ylabel("streams (no stall, no error, added TTFT p99 < 50 ms)")
    for k in letters:
        points = results["sustained"].get(k, [])
        if points:
            right.plot([p["level"] for p in points], [p["ttft_p99_ms"] for p in points], marker="o", label=k)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.set_xlabel("concurrent streams")
    right.set_ylabel("TTFT p99, ms")
    right.set_title("TTFT p99 by level")
    right.legend(fontsize=8)
    legend = ", ".join(f"{k} = {results['paths'][k]['name']}" for k in letters)
    fig.suptitle(
        f"chatproxy bench, {results['machine']['cpu']}, {results['machine']['cores']} cores; {legend}", fontsize=9
    )
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return True


def update_readme(results: dict[str, Any], readme: Path) -> None:
    """Replace the text between README's bench markers (only there) with this run's headline figures."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        print("README.md has no bench markers: its Performance section was not updated")
        return
    figures, paths = results["figures"], results["paths"]
    shown = [k for k in "BCGVDFE" if k in figures]
    rows = [
        (
            "Added time to first token, p50 / p99 (1 stream)",
            lambda f: f"{_v(f.get('added_ttft_p50_ms'), 1)} / {_v(f.get('added_ttft_p99_ms'), 1)} ms",
        ),
        ("Added gap between chunks, p99 (1 stream)", lambda f: f"{_v(f.get('added_gap_p99_ms'), 1)} ms"),
        ("Chunks batched together", lambda f: str(f["batched_gaps"])),
        ("Sustained concurrent streams", lambda f: str(f["sustained_streams"])),
        ("Added latency of a whole reply, p50", lambda f: f"{_v(f.get('added_json_p50_ms'), 1)} ms"),
        (f"CPU per 1,000 chunks{_at(results)}", lambda f: f"{_v(f.get('cpu_ms_per_1000_chunks'), 0)} ms"),
        (f"Memory per open stream{_at(results)}", lambda f: f"{_v(f.get('kib_per_stream'), 0)} KiB"),
        ("Upstream connection reuse", lambda f: f"{_v(reuse_pct(f), 1)} %"),
        ("Chunks the upstream sent after a hang-up (max)", lambda f: _v(f["chunks_after_abort_max"])),
    ]
    table = _table(
        ["Over going direct", *[f"{k}: {paths[k]['name']}" for k in shown]],
        [[label, *[fn(figures[k]) for k in shown]] for label, fn in rows],
    )
    machine = results["machine"]
    body = (
        f"{README_START}\n_Measured by `{results['command']}` on {machine['cpu']}, {machine['cores']} cores "
        f"(Python {machine['python']}, nginx {machine['nginx']}); load client and upstream on one core, the "
        "servers on the other. Every figure, the method and the raw levels are in "
        f"[BENCHMARKS.md](BENCHMARKS.md)._\n\n{table}\n{README_END}"
    )
    text = re.sub(re.escape(README_START) + ".*?" + re.escape(README_END), lambda _: body, text, flags=re.DOTALL)
    readme.write_text(text, encoding="utf-8")
    print(f"README: Performance figures updated in {readme}")
