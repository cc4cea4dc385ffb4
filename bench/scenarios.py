"""The measurements: each one a bounded async function over the load client, returning plain dicts of numbers."""

from __future__ import annotations

import asyncio
import json
import math
import resource
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from load import Path, Result, Slot
from stack import busy_fraction, core_times, cpu_seconds, memory
from upstream import DELTAS, PACE, expected_text

MS = 1000.0
STALL = 2 * PACE  # a gap longer than this is a stall
BATCHED = 0.001  # gaps shorter than this, while the upstream paces at PACE, mean something buffers


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def median(values: list[float]) -> float | None:
    """The median (the mean of the middle two for an even count), or None."""
    if not values:
        return None
    ordered, mid = sorted(values), len(values) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ms(value: float | None, digits: int = 3) -> float | None:
    """Seconds as milliseconds, rounded."""
    return None if value is None else round(value * MS, digits)


@dataclass
class Target:
    """One path under test and the processes whose CPU and memory count for it."""

    path: Path
    server_pids: Callable[[], list[int]] = list  # the serving workers (gunicorn's, nginx's)


@dataclass
class Upstream:
    """The bench upstream's stats endpoint and process."""

    port: int
    pid: int

    def stats(self, prefix: str, drop: bool = True) -> dict[str, Any]:
        """Records of requests whose id starts with `prefix` (forgotten afterwards when `drop`)."""
        url = f"http://127.0.0.1:{self.port}/_bench/stats?prefix={prefix}&drop={int(drop)}"
        with urllib.request.urlopen(url, timeout=10) as answer:  # loopback only
            return json.loads(answer.read())

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(connections accepted, requests answered) per path letter, so far."""
        stats = self.stats("~", drop=False)  # no bench id starts with "~"
        return stats["connections"], stats["request_counts"]


def check(result: Result, n: int, stream: bool = True) -> str | None:
    """Why a finished call is wrong (error, missing end, content not byte-identical, chunk count), or None."""
    if result.error:
        return result.error
    if result.status != 200:
        return f"HTTP {result.status}"
    if not result.done:
        return "no proper end"
    if stream and len(result.pieces) != n:
        return f"{len(result.pieces)} chunks, not {n}"
    if result.content != expected_text(n):
        return "content differs"
    return None


def gaps(result: Result) -> list[float]:
    """Seconds between consecutive deltas, as the client saw them."""
    return [b - a for a, b in zip(result.times, result.times[1:])]


@dataclass
class Meter:
    """CPU of the client (this process), the upstream and the servers, and how busy each core was."""

    upstream_pid: int
    server_pids: list[int]
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.client0 = _self_cpu()
        self.upstream0 = cpu_seconds([self.upstream_pid])
        self.server0 = cpu_seconds(self.server_pids)
        self.cores0 = core_times()

    def read(self) -> dict[str, Any]:
        """CPU seconds used since the start, and the cores' busy fractions."""
        wall = time.monotonic() - self.started
        return {
            "wall_s": round(wall, 3),
            "client_cpu_s": round(_self_cpu() - self.client0, 3),
            "upstream_cpu_s": round(cpu_seconds([self.upstream_pid]) - self.upstream0, 3),
            "server_cpu_s": round(cpu_seconds(self.server_pids) - self.server0, 3),
            "core_busy": busy_fraction(self.cores0, core_times()),
        }


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_stream_round(
    target: Target, upstream: Upstream, tag: str, short: int, json_calls: int, full_stream: bool = True
) -> dict[str, Any]:
    """At one client: a full stream (gaps), `short` 4-delta streams (TTFT), `json_calls` whole replies (latency)."""
    path, slot = target.path, Slot(target.path)
    full = await slot.call(f"{path.letter}-{tag}-full", DELTAS if full_stream else 4, True)
    shorts = [await slot.call(f"{path.letter}-{tag}-s{i}", 4, True) for i in range(short)]
    whole = [await slot.call(f"{path.letter}-{tag}-j{i}", 16, False) for i in range(json_calls)]
    slot.close()
    records = upstream.stats(f"{path.letter}-{tag}-")["requests"]
    sent = records.get(f"{path.letter}-{tag}-full", {}).get("sent", [])
    lags = [r - s for r, s in zip(full.times, sent)] if len(sent) == len(full.times) else []
    lateness = [s - d for rec in records.values() for s, d in zip(rec["sent"], rec["due"])]
    streams = [(full, DELTAS if full_stream else 4), *((r, 4) for r in shorts)]
    return {
        "ttft": [r.first - r.started for r, _ in streams if r.first is not None],
        "gaps": gaps(full),
        "lags": lags,
        "latency": [r.ended - r.started for r in whole if r.ended is not None and not r.error],
        "errors": [
            f"{r.bench_id}: {why}"
            for r, n, stream in [*((r, n, True) for r, n in streams), *((r, 16, False) for r in whole)]
            if (why := check(r, n, stream))
        ],
        "chunks": len(full.pieces),
        "identical": full.content == expected_text(DELTAS),
        "upstream_lateness": lateness,
    }


async def aborts(target: Target, upstream: Upstream, count: int, after: int) -> dict[str, Any]:
    """`count` streams the client hangs up on after `after` deltas: how many chunks did the upstream still send?"""
    path, results = target.path, []
    for i in range(count):
        slot = Slot(path)
        results.append(await slot.call(f"{path.letter}-abort-{i}", DELTAS, True, abort_after=after))
        slot.close()
        await asyncio.sleep(0.05)
    # The upstream stops when the proxy hangs up, or at the end of the stream (1.3 s): wait for one of them.
    deadline = time.monotonic() + (DELTAS + 2) * PACE + 1
    while True:
        records = upstream.stats(f"{path.letter}-abort-", drop=False)["requests"]
        if all(r["finished"] or r["closed_at"] for r in records.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    upstream.stats(f"{path.letter}-abort-")
    after_abort, stop_delay, errors = [], [], []
    for result in results:
        record = records.get(result.bench_id)
        if record is None or result.aborted_at is None:
            errors.append(f"{result.bench_id}: {result.error or 'not aborted'}")
            continue
        after_abort.append(sum(1 for t in record["sent"] if t > result.aborted_at))
        if record["closed_at"]:
            stop_delay.append(record["closed_at"] - result.aborted_at)
    return {
        "chunks_after_abort": after_abort,
        "upstream_closed_after_s": [round(d, 4) for d in stop_delay],
        "ran_to_the_end": sum(1 for r in records.values() if r["finished"]),
        "errors": errors,
    }


async def json_rate(target: Target, upstream: Upstream, clients: int, seconds: float, cap: int) -> dict[str, Any]:
    """Whole (non-streaming) replies from `clients` closed-loop clients for `seconds` (at most `cap` calls)."""
    path = target.path
    latencies: list[float] = []
    errors: list[str] = []
    meter = Meter(upstream.pid, target.server_pids())
    stop = time.monotonic() + seconds

    async def client(k: int) -> None:
        slot = Slot(path)
        i = 0
        while time.monotonic() < stop and len(latencies) + len(errors) < cap:
            result = await slot.call(f"{path.letter}-q{clients}-{k}-{i}", 16, False)
            i += 1
            if (why := check(result, 16, stream=False)) is not None:
                errors.append(why)
                await asyncio.sleep(0.01)
            else:
                latencies.append(result.ended - result.started)
        slot.close()

    began = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(clients))), timeout=seconds + 30)
    elapsed = time.monotonic() - began
    upstream.stats(f"{path.letter}-q{clients}-")
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "error_sample": errors[:3],
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": ms(pct(latencies, 0.5)),
        "p99_ms": ms(pct(latencies, 0.99)),
        **meter.read(),
    }


async def sustained(
    target: Target, upstream: Upstream, level: int, ramp: float, hold: float, memory_pids: list[int]
) -> dict[str, Any]:
    """`level` clients each streaming back to back: starts spread over `ramp`, new streams until ramp + hold.

    Halfway through the hold it reads the resident memory and threads of `memory_pids` (the serving workers).
    """
    path = target.path
    results: list[Result] = []
    in_flight = 0
    meter = Meter(upstream.pid, target.server_pids())
    began = time.monotonic()
    stop = began + ramp + hold
    sample: dict[str, Any] = {}

    async def client(k: int) -> None:
        nonlocal in_flight
        await asyncio.sleep(ramp * k / level)
        slot = Slot(path)
        i = 0
        while time.monotonic() < stop and i < 50:
            in_flight += 1
            result = await slot.call(f"{path.letter}-L{level}-{k}-{i}", DELTAS, True)
            in_flight -= 1
            results.append(result)
            i += 1
            if result.error:
                await asyncio.sleep(0.05)
        slot.close()

    async def sampler() -> None:
        await asyncio.sleep(ramp + hold / 2)
        rss, threads = memory(memory_pids)
        sample.update(open_streams=in_flight, rss=rss, threads=threads)

    await asyncio.wait_for(asyncio.gather(sampler(), *(client(k) for k in range(level))), timeout=ramp + hold + 30)
    usage = meter.read()
    records = upstream.stats(f"{path.letter}-L{level}-")["requests"]
    lateness = [s - d for rec in records.values() for s, d in zip(rec["sent"], rec["due"])]
    problems = [why for r in results if (why := check(r, DELTAS))]
    all_gaps = [g for r in results for g in gaps(r)]
    ttft = [r.first - r.started for r in results if r.first is not None]
    chunks = sum(len(r.pieces) for r in results)
    return {
        "level": level,
        "streams": len(results),
        "errors": len(problems),
        "error_sample": sorted(set(problems))[:3],
        "chunks": chunks,
        "ttft_p50_ms": ms(pct(ttft, 0.5)),
        "ttft_p99_ms": ms(pct(ttft, 0.99)),
        "gap_p50_ms": ms(pct(all_gaps, 0.5)),
        "gap_p99_ms": ms(pct(all_gaps, 0.99)),
        "gap_max_ms": ms(max(all_gaps, default=None)),
        "stalls": sum(1 for g in all_gaps if g > STALL),
        "batched": sum(1 for g in all_gaps if g < BATCHED),
        "upstream_lateness_p99_ms": ms(pct(lateness, 0.99)),
        "upstream_lateness_max_ms": ms(max(lateness, default=None)),
        "open_streams_sampled": sample.get("open_streams"),
        "rss_bytes": sample.get("rss"),
        "threads": sample.get("threads"),
        "server_cpu_ms_per_1000_chunks": round(usage["server_cpu_s"] * MS * 1000 / chunks, 2) if chunks else None,
        **usage,
    }
