"""Where the CPU goes: chatproxy in one process, served by Flask's test client, against the bench's paced upstream.

    python bench/cost.py                 # 30 streams of each kind; prints the figures as JSON
    python bench/cost.py --reps 3        # a few seconds (what `bench/run.py --quick` runs)

The app is built by `chatproxy.create_app()` from the bench's own settings (bench/stack.py `app_settings`,
the gthread worker class, a SQLite ledger in a temporary folder); the upstream is bench/upstream.py in its
own process (on the load client's core; this process on the servers' core when there are two). No WSGI
server: the test client hands the request to the app and reads the response iterator, so these figures
are chatproxy's own work per request and per chunk, without gunicorn's socket I/O.

1. CPU: process time (every thread) of `reps` streams of 1 delta one after another (before and after the
   long ones: their mean), and of `reps` streams of 64 deltas, `concurrency` at a time (their starts spread
   so that no two streams' work overlaps). CPU per request = a 1-delta stream; per extra chunk =
   (64-delta - 1-delta) / 63. The same again in a second app with CHATPROXY_KEEPALIVE_SECONDS=0 (no
   keep-alive timeout: by default the stream's thread reads the upstream with one and pings on it, as under
   gunicorn's gthread worker; the test client marks its environ as a real server's for that).
2. Where it goes: the kernel's CPU (system time, measured in step 1) as a layer of its own, and the user CPU
   split by a cProfile of the default app's streams (every thread the app starts is profiled too) on the
   wall clock, with the calls that wait (socket reads, polls, queue gets, locks, sleeps) left out, grouped
   by the layer each Python function belongs to; C functions count in the layer of the Python function
   that called them (sqlite3's in SQLAlchemy's). The profiler's cost per call is not taken off
   (layer_table). Python function calls are counted exactly.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import pstats
import re
import resource
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench/profile.py would stand in for the standard library's `profile`, which cProfile imports: not on the path yet.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import cProfile  # noqa: E402

sys.path[:0] = [str(HERE), str(ROOT)]

import stack  # noqa: E402
from upstream import DELTAS, PACE  # noqa: E402

LONG = DELTAS  # deltas of the long stream; the short one has 1
LAYERS = (  # (layer, what it is): the order of the report's table
    ("flask", "Flask: routing, request context, hooks"),
    ("werkzeug", "werkzeug: request and response objects, headers"),
    ("sqlalchemy", "SQLAlchemy and sqlite3's C calls: the ledger and budget transactions"),
    ("openai", "openai SDK: client, request building"),
    ("http", "httpx2 / httpcore2 / h11: the SDK's HTTP stack, reading the upstream"),
    ("pydantic", "pydantic: request models"),
    ("limits", "flask_limiter / limits: rate limits"),
    ("prometheus", "prometheus_client: metrics"),
    ("chatproxy", "chatproxy: our own code"),
    ("stdlib", "Python's standard library (threading, queue, json, logging, ...)"),
    ("socket_waits", "the kernel: system calls (socket reads and writes, polls) and wake-ups (system CPU, measured)"),
    ("harness", "the test client: stands in for the WSGI server (environ in, iterator out)"),
    ("other", "other packages and generated code"),
)
PACKAGES = {
    "flask": "flask",
    "werkzeug": "werkzeug",
    "sqlalchemy": "sqlalchemy",
    "openai": "openai",
    "httpx2": "http",
    "httpcore2": "http",
    "httpx": "http",
    "httpcore": "http",
    "h11": "http",
    "anyio": "http",
    "sniffio": "http",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic",
    "flask_limiter": "limits",
    "limits": "limits",
    "prometheus_client": "prometheus",
}
# C functions that wait: a socket read until the upstream's next chunk, polls, queues, locks, sleeps. On the
# profile's wall clock their time is the wait itself, so it is left out; the kernel's CPU is measured instead.
SOCKET_WAITS = re.compile(
    r"<method '(recv|recv_into|poll|select)' of '(_socket\.socket|select\.poll|select\.epoll)' objects>"
    r"|<built-in method select\.select>"
)
THREAD_WAITS = re.compile(
    r"<method '(get|acquire)' of '(_queue\.SimpleQueue|_thread\.lock|_thread\.RLock)' objects>"
    r"|<built-in method time\.sleep>"  # the SQLite checkpoint thread's wait (chatproxy/wal.py)
)
STDLIB = sysconfig.get_paths()["stdlib"]
CHATPROXY_DIR = str(ROOT / "chatproxy") + os.sep


def layer_of(filename: str) -> str | None:
    """The layer of a Python function's file; None for a C function (file "~")."""
    if filename == "~":
        return None
    found = re.search(r"[/\\]site-packages[/\\]([^/\\]+)", filename)
    if found:
        package = found.group(1).removesuffix(".py")
        if package == "werkzeug" and filename.endswith(("test.py", "testapp.py")):
            return "harness"
        return PACKAGES.get(package, "other")
    if filename.startswith(CHATPROXY_DIR):
        return "chatproxy"
    if filename == __file__ or filename.startswith(str(HERE) + os.sep):
        return "harness"
    if filename.startswith(STDLIB) or filename.startswith("<frozen "):
        return "stdlib"
    return "other"


def group(stats: pstats.Stats) -> dict[str, Any]:
    """Per layer: the profile's own time (seconds of thread CPU), profiler events, and Python function calls.

    A C function's time and events go to the layers of the Python functions that called it, edge by edge
    (sqlite3's to SQLAlchemy). Events are the calls a function receives plus the calls it makes: each one
    costs the profiler about the same, which `layer_table` takes off again.
    """
    entries = stats.stats  # type: ignore[attr-defined]
    seconds: collections.Counter[str] = collections.Counter()
    events: collections.Counter[str] = collections.Counter()
    calls_by_layer: collections.Counter[str] = collections.Counter()
    made: collections.Counter[tuple[str, int, str]] = collections.Counter()  # calls each function made
    waits = 0.0
    for _cc, _nc, _tt, _ct, callers in entries.values():
        for caller, edge in (callers or {}).items():
            made[caller] += edge[1]

    def caller_layer(func: tuple[str, int, str], depth: int = 0) -> str:
        layer = layer_of(func[0])
        if layer is not None:
            return layer
        if "sqlite3" in func[2]:
            return "sqlalchemy"
        callers = entries.get(func, (0, 0, 0, 0, {}))[4]
        if not callers or depth > 3:
            return "other"
        top = max(callers.items(), key=lambda item: item[1][2])[0]
        return caller_layer(top, depth + 1)

    for func, (_cc, calls, own, _cum, callers) in entries.items():
        filename, _line, name = func
        count = calls + made[func]
        if filename != "~":
            layer = layer_of(filename) or "other"
            calls_by_layer[layer] += calls
            seconds[layer] += own
            events[layer] += count
            continue
        wait = "socket_waits" if SOCKET_WAITS.fullmatch(name) else ""
        wait = wait or ("thread_waits" if THREAD_WAITS.fullmatch(name) else "")
        if wait:  # on the profile's wall clock this is the wait itself: left out (the kernel's CPU is measured)
            waits += own
            events[wait] += count
            continue
        if "sqlite3" in name:
            seconds["sqlalchemy"] += own
            events["sqlalchemy"] += count
            continue
        edges = {caller: edge[1] for caller, edge in callers.items()} if callers else {}
        spread = sum(edges.values())
        if spread <= 0:
            seconds["other"] += own
            events["other"] += count
            continue
        for caller, part in edges.items():
            seconds[caller_layer(caller)] += own * part / spread
            events[caller_layer(caller)] += count * part / spread
    return {
        "seconds": dict(seconds),
        "events": dict(events),
        "calls": dict(calls_by_layer),
        "waits_s": waits,
        "python_calls": sum(calls_by_layer.values()),
    }


# The environ key a real server sets (werkzeug's; gunicorn's is gunicorn.socket): with it, keep-alive pings are
# written by the stream's own thread on a read timeout (sse.IdlePings), as under gunicorn, not by a pump thread.
SERVED = {"werkzeug.socket": None}


class App:
    """One app and its test client, with a stream runner."""

    def __init__(self, name: str, settings: dict[str, str]) -> None:
        from chatproxy import create_app

        self.name = name
        config = {k: v.replace("{name}", name) for k, v in settings.items()}
        self.app = create_app(config)
        self.client = self.app.test_client()
        self.headers = {"Authorization": f"Bearer {stack.TOKEN}", "Accept": "text/event-stream"}
        self.count = 0
        self.lock = threading.Lock()

    def stream(self, deltas: int) -> None:
        """One /api/chat stream of `deltas` deltas, read to its end."""
        with self.lock:
            self.count += 1
            bench_id = f"Z{self.name}-{deltas}-{self.count}"
        body = {"messages": [{"role": "user", "content": f"bench:{bench_id}"}], "max_tokens": deltas, "stream": True}
        response = self.client.post("/api/chat", json=body, headers=self.headers, buffered=False, environ_base=SERVED)
        try:
            seen = sum(piece.count(b'"delta"') for piece in response.response)
        finally:
            response.close()
        if response.status_code != 200 or seen != deltas:
            raise RuntimeError(f"{bench_id}: HTTP {response.status_code}, {seen} of {deltas} deltas")

    def batch(self, deltas: int, reps: int, concurrency: int) -> dict[str, float]:
        """`reps` streams, `concurrency` at a time, and their CPU (every thread) and wall time.

        Concurrent streams start a stream's length apart, plus a fifth of the pace for each (their chunks
        arrive at different moments): one stream's request work and chunks do not wait on another's, so
        neither the process time nor the profile's clock counts a wait for the GIL.
        """
        errors: list[BaseException] = []
        shares = [reps // concurrency + (1 if i < reps % concurrency else 0) for i in range(concurrency)]
        step = -(-(deltas + 1) // concurrency) * PACE + PACE / concurrency

        def worker(index: int, count: int) -> None:
            time.sleep(index * step)
            try:
                for _ in range(count):
                    self.stream(deltas)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller below
                errors.append(exc)

        before, usage, wall = time.process_time(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i, n), name=f"cost-{i}") for i, n in enumerate(shares) if n]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cpu, after = time.process_time() - before, resource.getrusage(resource.RUSAGE_SELF)
        if errors:
            raise errors[0]
        return {
            "cpu_s": cpu,
            "user_s": after.ru_utime - usage.ru_utime,
            "system_s": after.ru_stime - usage.ru_stime,
            "wall_s": time.perf_counter() - wall,
            "context_switches": (after.ru_nvcsw - usage.ru_nvcsw) + (after.ru_nivcsw - usage.ru_nivcsw),
        }


def profiled(app: App, deltas: int, reps: int, concurrency: int) -> pstats.Stats:
    """A cProfile of a batch over every thread started meanwhile (the batch's workers, the SQLite checkpoint thread)."""
    profiles: list[cProfile.Profile] = []
    original = threading.Thread.run

    def run(thread: threading.Thread) -> None:
        profile = cProfile.Profile()  # perf_counter: the thread CPU clock is a system call, ~1.5 us per event here
        profiles.append(profile)
        profile.runcall(original, thread)

    threading.Thread.run = run  # type: ignore[method-assign]
    try:
        app.batch(deltas, reps, concurrency)
    finally:
        threading.Thread.run = original  # type: ignore[method-assign]
    stats = pstats.Stats(profiles[0])
    for profile in profiles[1:]:
        stats.add(profile)
    return stats


def _per_stream(runs: list[dict[str, float]]) -> dict[str, float]:
    """Batches of the same streams pooled: each figure per stream."""
    streams = sum(r["reps"] for r in runs)
    keys = ("cpu_s", "user_s", "system_s", "wall_s", "context_switches")
    return {key: sum(r[key] for r in runs) / streams for key in keys}


def cpu_figures(short: dict[str, float], long: dict[str, float]) -> dict[str, float]:
    """CPU per request (a 1-delta stream), per long stream and per extra chunk, ms; the kernel's share; context
    switches per extra chunk. `short` and `long` are per-stream figures."""
    per_request, per_stream = short["cpu_s"] * 1000, long["cpu_s"] * 1000
    return {
        "request_system_ms": round(short["system_s"] * 1000, 3),
        "stream_system_ms": round(long["system_s"] * 1000, 3),
        "request_ms": round(per_request, 3),
        "stream_ms": round(per_stream, 3),
        "chunk_ms": round((per_stream - per_request) / (LONG - 1), 4),
        "system_share": round(long["system_s"] / max(1e-9, long["cpu_s"]), 3),
        "context_switches_per_chunk": round((long["context_switches"] - short["context_switches"]) / (LONG - 1), 2),
    }


def measure(reps: int, concurrency: int, keepalive_variant: bool = True) -> dict[str, Any]:
    """Everything cost.py measures, as a JSON-able dict."""
    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="chatproxy-cost-"))
    pin = stack.can_pin()
    upstream = stack.start_upstream(tmp, 0 if pin else None)
    if pin:
        os.sched_setaffinity(0, {1})
    for key in [k for k in os.environ if k.startswith(("CHATPROXY_", "OPENAI_", "AZURE_OPENAI_"))]:
        del os.environ[key]  # create_app reads the environment too: only the bench's settings count
    try:
        from chatproxy.callers import hash_token

        settings = stack.app_settings(tmp, upstream.port, hash_token(stack.TOKEN), CHATPROXY_WORKER_CLASS="gthread")
        variants = {"default": settings}
        if keepalive_variant:
            variants["no_keepalive"] = {**settings, "CHATPROXY_KEEPALIVE_SECONDS": "0"}
        apps = {key: App(key[0].upper(), value) for key, value in variants.items()}
        gc.freeze()  # as gunicorn.conf.py's post_worker_init does once the app is loaded
        for app in apps.values():  # warm-up: imports, the connection pool, the ledger's tables, first requests
            app.batch(4, 4, 2)
            app.batch(LONG, 2, 2)
        idle_before = time.process_time()
        time.sleep(1.0)
        idle_ms_per_s = (time.process_time() - idle_before) * 1000
        out: dict[str, Any] = {
            "reps": reps,
            "concurrency": concurrency,
            "deltas": LONG,
            "pace_ms": PACE * 1000,
            "pinned": pin,
            "idle_cpu_ms_per_s": round(idle_ms_per_s, 3),
            "python": sys.version.split()[0],
            "keepalive_seconds": {"default": 10.0, "no_keepalive": 0.0},
            "cpu": {},
        }
        # The apps take turns (1-delta streams, half the long ones, the other half, 1-delta streams again), so
        # that a drift in the machine's speed falls on both alike.
        halves = (reps - reps // 2, reps // 2) if reps > 1 else (reps,)
        runs: dict[str, list[dict[str, float]]] = {key: [] for key in apps}
        for deltas, count, width in ((1, reps, 1), *((LONG, n, concurrency) for n in halves), (1, reps, 1)):
            for key, app in apps.items():
                runs[key].append({"deltas": deltas, "reps": count, **app.batch(deltas, count, width)})
        for key, done in runs.items():
            short = _per_stream([r for r in done if r["deltas"] == 1])
            long = _per_stream([r for r in done if r["deltas"] == LONG])
            out["cpu"][key] = {**cpu_figures(short, long), "batches": done}
        app = apps["default"]
        profile: dict[str, Any] = {}
        for deltas in (1, LONG):
            grouped = group(profiled(app, deltas, reps, 1 if deltas == 1 else concurrency))
            grouped["seconds"] = {k: v / reps for k, v in grouped["seconds"].items()}
            grouped["calls"] = {k: v / reps for k, v in grouped["calls"].items()}
            grouped["events"] = {k: v / reps for k, v in grouped["events"].items()}
            grouped["waits_s"] /= reps
            grouped["python_calls"] /= reps
            profile[str(deltas)] = grouped
        out["profile"] = profile
        out["layers"] = layer_table(out)
        out["elapsed_s"] = round(time.monotonic() - began, 1)
        return out
    finally:
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def layer_table(out: dict[str, Any]) -> dict[str, Any]:
    """Per layer: ms of real CPU per request and per extra chunk, and %.

    The kernel's CPU (system time, measured: system calls, wake-ups) is a layer of its own; the user CPU is
    split by each layer's share of the profile, whose clock is the wall clock (the thread CPU clock is a
    system call per event, which skewed it), with waiting calls (socket reads, polls, queue gets, locks)
    left out. The profiler's cost per call is not taken off (it falls partly on the caller's layer, partly
    on the callee's), so layers of many small calls look heavier than they are."""
    cpu = out["cpu"]["default"]
    measured = {"1": cpu["request_ms"] / 1000, str(LONG): cpu["stream_ms"] / 1000}
    net: dict[str, dict[str, float]] = {}
    overhead: dict[str, float] = {}
    kernel = {"1": cpu["request_system_ms"] / 1000, str(LONG): cpu["stream_system_ms"] / 1000}
    for key, profile in out["profile"].items():
        total = sum(profile["seconds"].values()) or 1e-9
        user = max(0.0, measured[key] - kernel[key])
        net[key] = {layer: 1000 * user * profile["seconds"].get(layer, 0.0) / total for layer, _text in LAYERS}
        net[key]["socket_waits"] = 1000 * kernel[key]
        overhead[key] = max(0.0, total - user) / (sum(profile["events"].values()) or 1) * 1e6
    short, long = out["profile"]["1"], out["profile"][str(LONG)]
    rows = {}
    for layer, _text in LAYERS:
        request_ms = net["1"][layer]
        rows[layer] = {
            "request_ms": request_ms,
            "chunk_ms": (net[str(LONG)][layer] - request_ms) / (LONG - 1),
            "request_calls": short["calls"].get(layer, 0.0),
            "chunk_calls": (long["calls"].get(layer, 0.0) - short["calls"].get(layer, 0.0)) / (LONG - 1),
        }
    for row in rows.values():
        row["request_pct"] = 100 * row["request_ms"] / cpu["request_ms"] if cpu["request_ms"] else None
        row["chunk_pct"] = 100 * row["chunk_ms"] / cpu["chunk_ms"] if cpu["chunk_ms"] else None
    return {
        "names": [list(pair) for pair in LAYERS],
        "rows": {k: {x: round(v, 4) if v is not None else None for x, v in row.items()} for k, row in rows.items()},
        "python_calls_per_request": round(short["python_calls"]),
        "python_calls_per_chunk": round((long["python_calls"] - short["python_calls"]) / (LONG - 1), 1),
        "profiled_ms_per_request": round(sum(short["seconds"].values()) * 1000, 3),
        "profiled_ms_per_stream": round(sum(long["seconds"].values()) * 1000, 3),
        "profiler_us_per_event": {k: round(v, 3) for k, v in overhead.items()},
        "wait_calls_ms_per_chunk": round((long["waits_s"] - short["waits_s"]) / (LONG - 1) * 1000, 4),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print (or write) the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="streams of each kind (default 30)")
    parser.add_argument("--concurrency", type=int, default=5, help="streams at a time (default 5)")
    parser.add_argument("--no-keepalive-variant", action="store_true", help="skip the KEEPALIVE_SECONDS=0 app")
    parser.add_argument("--out", type=Path, help="write the JSON here instead of printing it")
    args = parser.parse_args(argv)
    result = measure(args.reps, args.concurrency, not args.no_keepalive_variant)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
