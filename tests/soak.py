"""Soak and fault drill: 4 gunicorn workers under mixed load with a flaky upstream, then Redis and PostgreSQL
stopped and restarted under load. Everything runs on loopback and stops by itself.

    make soak                      # full: schemathesis count, 200 clients for 3 minutes, the drill; writes
                                   # docs/RELIABILITY.md and artifacts/soak.json
    python tests/soak.py --quick   # CI: 50 clients for 40 s and a short drill; writes artifacts/soak-quick.json

PostgreSQL and Redis are private instances started here (initdb in a temporary directory, redis-server on a
free port), so stopping them disturbs nobody else's tests; they are stopped in `finally` whatever happens.
`--shared-services` uses the machine's PostgreSQL (127.0.0.1:5432) and Redis (6379) instead, stopping and
restarting them with pg_ctlcluster and redis-cli/redis-server (always restarted, also on failure).

Exit status 0 when every check holds; the report lists each check with its figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from chatproxy.callers import hash_token  # noqa: E402
from chatproxy.demo.upstream import FakeOpenAI, Reply  # noqa: E402
from chatproxy.metering import ROW_HEADER  # noqa: E402
from tests.helpers import free_port  # noqa: E402

KEY = "sk-soak-" + "k" * 40  # the upstream key: it must appear in no response
FAILURE_RATE = 0.05
FAILURES = ("429", "500", "503", "reset", "drop", "malformed")
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "and",
    "keeps",
    "on",
    "running",
    "through",
    "the",
    "field",
]


# --- the flaky upstream ------------------------------------------------------------------------------------------


class FlakyUpstream(FakeOpenAI):
    """The fake upstream, failing 5% of chat calls in the ways the resilience tests know (seeded, so repeatable)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.outage_calls: list[tuple[float, int]] = []

    def _next_reply(self, body: Any) -> Reply:
        with self._lock:
            roll, kind = self.rng.random(), self.rng.choice(FAILURES)
            words = self.rng.randint(8, 24)
        stream = isinstance(body, dict) and bool(body.get("stream"))
        content = " ".join(WORDS[i % len(WORDS)] for i in range(words))
        pace = 0.02 if stream else 0.0
        if roll >= FAILURE_RATE:
            return Reply(content=content, pace=pace)
        if not stream and kind in ("drop", "malformed"):
            kind = "reset" if kind == "drop" else "500"
        with self._lock:
            self.injected[kind] += 1
        if kind == "429":
            return Reply(
                status=429,
                headers={"retry-after": "1"},
                error={"message": "rate limited", "type": "requests", "code": "rate_limit_exceeded"},
            )
        if kind in ("500", "503"):
            return Reply(status=int(kind))
        if kind == "reset":
            return Reply(reset=True)
        if kind == "drop":
            return Reply(content=content, pace=pace, drop_after=2)
        return Reply(content=content, pace=pace, malformed_after=2)


# --- PostgreSQL and Redis that may be stopped ----------------------------------------------------------------------


def run(*command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=timeout)


class PrivatePostgres:
    """A throwaway cluster: initdb in a temporary directory, on a free loopback port, trust auth."""

    def __init__(self) -> None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not versions:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql (postgresql package)")
        self.bin = versions[-1].parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="chatproxy-soak-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        run(
            *self.as_user,
            str(self.bin / "initdb"),
            "-D",
            str(self.dir / "data"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            timeout=120,
        )
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        if (
            run(*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "status", check=False).returncode
            == 0
        ):
            return
        run(
            *self.as_user,
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.dir / "data"),
            "-l",
            str(self.dir / "log"),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off",
            "-w",
            "start",
            timeout=60,
        )

    def stop(self) -> None:
        run(
            *self.as_user,
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.dir / "data"),
            "-m",
            "fast",
            "-w",
            "stop",
            check=False,
            timeout=60,
        )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SharedPostgres:
    """The machine's cluster (127.0.0.1:5432, db test), stopped and started with pg_ctlcluster."""

    def __init__(self) -> None:
        self.version = sorted(os.listdir("/etc/postgresql"))[-1]
        self.url = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

    def start(self) -> None:
        run("pg_ctlcluster", "--skip-systemctl-redirect", self.version, "main", "start", check=False)

    def stop(self) -> None:
        run("pg_ctlcluster", "--skip-systemctl-redirect", self.version, "main", "stop", check=False)

    def remove(self) -> None:
        self.start()  # always leave it running


class PrivateRedis:
    """redis-server on a free loopback port, no persistence."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="chatproxy-soak-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 20)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SharedRedis:
    """The machine's Redis on 6379, stopped with redis-cli and started with the CI command line."""

    url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

    def start(self) -> None:
        run(
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
            check=False,
        )
        wait_for_port(6379, 20)

    def stop(self) -> None:
        run("redis-cli", "-p", "6379", "shutdown", "nosave", check=False)

    def remove(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", 6379), timeout=1):
                return
        except OSError:
            self.start()


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


# --- gunicorn ----------------------------------------------------------------------------------------------------


class Gunicorn:
    """gunicorn -c gunicorn.conf.py (CHATPROXY_WORKER_CLASS from the environment), its output in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path, workers: int, threads: int) -> None:
        self.port = free_port()
        self.log_path = log_path
        environ = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        environ.update(
            env, CHATPROXY_BIND=f"127.0.0.1:{self.port}", CHATPROXY_WORKERS=str(workers), CHATPROXY_THREADS=str(threads)
        )
        self.log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--access-logfile", "/dev/null"],
            cwd=ROOT,
            env=environ,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while len(self.workers()) < workers or not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not start:\n" + log_path.read_text(errors="replace")[-4000:])
            time.sleep(0.2)

    def ready(self) -> bool:
        try:
            return request("GET", self.port, "/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    def workers(self) -> set[int]:
        found = run("pgrep", "-P", str(self.process.pid), check=False).stdout.split()
        return {int(pid) for pid in found}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


def rss_kib(pid: int) -> int:
    """Resident memory of one process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


# --- clients -------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One request as a client saw it."""

    started: float
    ended: float
    kind: str  # json, stream, abort, probe
    status: int
    code: str | None = None  # error code (JSON error, or a stream's error event)
    problem: str | None = None  # a broken contract: stack trace, key, malformed body or stream


def request(
    method: str, port: int, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def body_problem(raw: bytes) -> str | None:
    text = raw.decode("utf-8", "replace")
    if "Traceback" in text or 'File "/' in text:
        return "stack trace in a response body"
    if KEY in text or KEY[:12] in text:
        return "the upstream key in a response body"
    return None


def chat_call(port: int, auth: dict[str, str], kind: str, rng: random.Random) -> Result:
    """One /api/chat call: a JSON answer, a whole stream, or a stream the client hangs up on."""
    started = time.time()
    body = {
        "message": f"soak {rng.randint(0, 10**9)} " + "word " * rng.randint(1, 30),
        "max_tokens": 200,
        "stream": kind != "json",
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/api/chat", body=json.dumps(body), headers={"Content-Type": "application/json", **auth})
        response = conn.getresponse()
        status = response.status
        if not response.getheader("Content-Type", "").startswith("text/event-stream"):
            raw = response.read()
            result = Result(started, time.time(), kind, status, problem=body_problem(raw))
            try:
                parsed = json.loads(raw)
                if status >= 400:
                    error = parsed["error"]
                    result.code = error["code"]
                    if set(error) - {"code", "message", "request_id"} or not error["message"]:
                        result.problem = f"error body off contract: {raw[:200]!r}"
                elif not isinstance(parsed.get("content"), str):
                    result.problem = f"reply without content: {raw[:200]!r}"
            except (ValueError, KeyError, TypeError):
                result.problem = f"not the JSON contract: {raw[:200]!r}"
            return result
        deltas, last, raw = 0, None, b""
        stop_after = rng.randint(1, 3) if kind == "abort" else None
        while True:
            line = response.readline()
            if not line:
                break
            raw += line
            if line.startswith(b"data: "):
                last = json.loads(line[6:])
                deltas += last.get("type") == "delta"
                if stop_after is not None and deltas >= stop_after:
                    break  # hang up mid-answer
        result = Result(started, time.time(), kind, status, problem=body_problem(raw))
        if stop_after is None or deltas < stop_after:  # read to the end: it must end with done or error
            if last is None or last.get("type") not in ("done", "error"):
                result.problem = f"stream without a final event: {raw[-200:]!r}"
            elif last["type"] == "error":
                result.code = last["code"]
        return result
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return Result(started, time.time(), kind, 0, problem=f"client error {type(exc).__name__}: {exc}")
    finally:
        conn.close()


class Load:
    """N client threads, each looping JSON calls, streams and aborted streams until stopped or out of budget."""

    MIX = (("json", 0.5), ("stream", 0.35), ("abort", 0.15))

    def __init__(self, port: int, auth: dict[str, str], clients: int, seed: int, max_requests: int) -> None:
        self.port, self.auth, self.max_requests = port, auth, max_requests
        self.results: list[Result] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(random.Random(seed + i),), daemon=True) for i in range(clients)
        ]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
            time.sleep(0.005)  # ramp up over about a second
        return self

    def _client(self, rng: random.Random) -> None:
        for _ in range(self.max_requests):
            if self.stopping.is_set():
                return
            kind = rng.choices([k for k, _ in self.MIX], [w for _, w in self.MIX])[0]
            result = chat_call(self.port, self.auth, kind, rng)
            with self.lock:
                self.results.append(result)
            self.stopping.wait(rng.uniform(0.3, 1.2))  # think time

    def stop(self, timeout: float = 90) -> None:
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))

    def between(self, start: float, end: float) -> list[Result]:
        with self.lock:
            return [r for r in self.results if start <= r.started < end]


# --- the run -------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Figures and checks, in the order they were made."""

    mode: str
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, bool(ok), detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)


class Ledger:
    """Direct reads of the soak's ledger schema."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, pool_pre_ping=True)

    def rows(self) -> dict[int, dict[str, Any]]:
        with self.engine.connect() as conn:
            return {row.id: dict(row._mapping) for row in conn.execute(sa.text("SELECT * FROM ledger ORDER BY id"))}

    def open_rows(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM ledger WHERE closed_at IS NULL")).scalar_one()


def wait_until(predicate, timeout: float, step: float = 0.25) -> float | None:
    """Seconds until predicate() held, or None if it never did within `timeout`."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if predicate():
                return time.monotonic() - began
        except Exception:  # noqa: BLE001, S110 - a probe that fails is a "not yet"
            pass
        time.sleep(step)
    return None


def statuses(results: list[Result]) -> dict[str, int]:
    counts = Counter(f"{r.status} {r.code}" if r.code else str(r.status) for r in results)
    return dict(sorted(counts.items()))


def reconcile(report: Report, fake: FlakyUpstream, ledger: Ledger, label: str) -> dict[int, dict[str, Any]]:
    """Every upstream call has exactly one ledger row and every row one call; exact rows carry the call's tokens."""
    rows = ledger.rows()
    calls = fake.chat_calls()
    ids = [int(call.headers.get(ROW_HEADER.lower(), -1)) for call in calls]
    by_id = dict(zip(ids, calls, strict=True))
    lost = [i for i in ids if i not in rows]
    duplicated = [i for i, n in Counter(ids).items() if n > 1]
    # A row whose request never reached the upstream (connection refused or reset before the fake read it,
    # e.g. a pooled connection the server had just closed) has no call to match: it must say so and cost nothing.
    unsent = [
        i
        for i in rows
        if i not in by_id
        and rows[i]["outcome"] == "upstream_unreachable"
        and not rows[i]["prompt_tokens"]
        and not rows[i]["completion_tokens"]
        and not rows[i]["cost_micros"]
    ]
    phantom = [i for i in rows if i not in by_id and i not in unsent]
    report.figures.setdefault("unsent_rows", {})[label] = len(unsent)
    report.check(
        f"{label}: one ledger row per upstream call",
        not lost and not duplicated and not phantom,
        f"{len(calls)} upstream calls, {len(rows)} rows; lost {len(lost)}, duplicated {len(duplicated)}, "
        f"rows without a call {len(phantom)} (outcomes {dict(Counter(rows[i]['outcome'] for i in phantom))}); "
        f"attempts that never reached the upstream {len(unsent)} (upstream_unreachable, no tokens, no cost)",
    )
    exact = [(rows[i], by_id[i]) for i in ids if i in rows and rows[i]["tokens_exact"]]
    sums = {
        name: (sum(r[name] for r, _ in exact), sum(getattr(c, name) for _, c in exact))
        for name in ("prompt_tokens", "completion_tokens")
    }
    mismatched = [
        r["id"]
        for r, c in exact
        if (r["prompt_tokens"], r["completion_tokens"]) != (c.prompt_tokens, c.completion_tokens)
    ]
    report.check(
        f"{label}: token sums equal for exact rows",
        not mismatched and all(a == b for a, b in sums.values()),
        f"{len(exact)} exact rows; prompt {sums['prompt_tokens'][0]} = {sums['prompt_tokens'][1]}, "
        f"completion {sums['completion_tokens'][0]} = {sums['completion_tokens'][1]}; "
        f"rows that differ: {len(mismatched)}",
    )
    return rows


def load_phase(
    args, report: Report, server: Gunicorn, fake: FlakyUpstream, ledger: Ledger, auth: dict[str, str]
) -> None:
    """Phase 1: steady mixed load; memory sampled; then the ledger reconciled and the workers checked."""
    pids = server.workers()
    load = Load(server.port, auth, args.clients, args.seed, max_requests=100_000).start()
    began = time.monotonic()
    samples: list[tuple[float, int]] = []
    while time.monotonic() - began < args.duration:
        time.sleep(2)
        if time.monotonic() - began >= args.warmup:
            samples.append((time.monotonic() - began, sum(rss_kib(pid) for pid in pids)))
    load.stop()
    results = load.results
    window = args.rss_window
    first = [kib for t, kib in samples if t < args.warmup + window]
    last = [kib for t, kib in samples if t >= args.duration - window]
    growth = (sum(last) / len(last)) / (sum(first) / len(first)) - 1 if first and last else float("nan")
    elapsed = time.monotonic() - began
    problems = [r.problem for r in results if r.problem]
    ok = [r for r in results if 200 <= r.status < 300 and not r.code]
    report.figures["load"] = {
        "clients": args.clients,
        "seconds": round(elapsed),
        "requests": len(results),
        "requests_per_second": round(len(results) / elapsed, 1),
        "answered_ok": len(ok),
        "by_kind": dict(Counter(r.kind for r in results)),
        "statuses": statuses(results),
        "injected_upstream_failures": dict(fake.injected),
        "upstream_calls": len(fake.chat_calls()),
        "rss_first_window_mib": round(sum(first) / max(1, len(first)) / 1024, 1),
        "rss_last_window_mib": round(sum(last) / max(1, len(last)) / 1024, 1),
        "rss_growth_percent": round(growth * 100, 2),
        "rss_window_seconds": window,
        "warmup_seconds": args.warmup,
        "latency_p50_ms": percentile([r.ended - r.started for r in results if r.kind == "json"], 50),
        "latency_p99_ms": percentile([r.ended - r.started for r in results if r.kind == "json"], 99),
        "load_average_1min": round(os.getloadavg()[0], 1),
    }
    report.check(
        "load: every answer kept the contract (no stack trace, no key, JSON errors, streams end)",
        not problems,
        f"{len(results)} requests, {len(problems)} broken" + (f"; first: {problems[0]}" if problems else ""),
    )
    server_errors = [r for r in results if r.status >= 500 and r.code not in ("upstream_unavailable",)]
    report.check(
        "load: no 5xx except upstream_unavailable when every retry of a call failed",
        not server_errors,
        f"statuses {statuses(results)}",
    )
    report.check(
        "load: most calls answered",
        len(ok) >= 0.9 * len(results),
        f"{len(ok)} of {len(results)} answered ({100 * len(ok) / max(1, len(results)):.1f}%)",
    )
    settled = wait_until(lambda: ledger.open_rows() == 0, 30)
    report.check("load: every ledger row closed", settled is not None, f"open rows: {ledger.open_rows()}")
    reconcile(report, fake, ledger, "load")
    report.check(
        "load: resident memory growth under 10% (first vs last window)",
        growth < 0.10,
        f"{report.figures['load']['rss_first_window_mib']} MiB -> "
        f"{report.figures['load']['rss_last_window_mib']} MiB ({growth * 100:+.1f}%), 4 workers summed",
    )


def percentile(values: list[float], p: int) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] * 1000)


def drill_phase(
    args, report: Report, server: Gunicorn, fake: FlakyUpstream, ledger: Ledger, auth: dict[str, str], pg, rds
) -> None:
    """Phase 2: Redis, then PostgreSQL, stopped and restarted while clients keep calling."""
    load = Load(server.port, auth, args.drill_clients, args.seed + 10_000, max_requests=100_000).start()
    drill: dict[str, Any] = {"clients": args.drill_clients, "outage_seconds": args.outage}
    calls: list[Any] = []
    try:
        time.sleep(3)
        before = ledger.rows()

        # Redis down: limits fall back to in-process counters, cooldowns fail open, the proxy keeps serving.
        start = time.time()
        rds.stop()
        time.sleep(0.5)
        ready = request("GET", server.port, "/readyz", timeout=10)
        time.sleep(args.outage)
        end = time.time()
        rds.start()
        recovered = wait_until(
            lambda: json.loads(request("GET", server.port, "/readyz", timeout=5)[1]).get("status") == "ready", 30
        )
        during = load.between(start + 0.5, end)
        served = [r for r in during if r.status == 200 and not r.code]
        ready_body = json.loads(ready[1])
        drill["redis"] = {
            "requests_during_outage": len(during),
            "answered_ok": len(served),
            "statuses": statuses(during),
            "readyz_during": ready[0],
            "readyz_body": ready_body.get("status") or ready_body.get("error", {}).get("message"),
            "ready_again_after_restart_s": None if recovered is None else round(recovered, 1),
        }
        report.check(
            "drill: with Redis down the proxy keeps serving",
            during and len(served) >= 0.9 * len(during),
            f"{len(served)} of {len(during)} answered during {args.outage} s without Redis; "
            f"statuses {statuses(during)}",
        )
        # Redis degrades readiness without failing it (the host still serves); CHATPROXY_READY_REQUIRES_REDIS not set.
        report.check(
            "drill: /readyz says Redis is down (degraded, still ready), then ready again",
            ready[0] == 200 and ready_body.get("checks", {}).get("redis") == "unreachable" and recovered is not None,
            f'/readyz {ready[0]} {ready_body} during the outage; "ready" again '
            f"{drill['redis']['ready_again_after_restart_s']} s after the restart",
        )
        time.sleep(3)

        # PostgreSQL down: no call may go upstream unrecorded; callers get 503 budget_unavailable/ledger_unavailable.
        calls_before = len(fake.chat_calls())
        start = time.time()
        pg.stop()
        stopped = time.time()
        probe = request("POST", server.port, "/api/chat", {"message": "probe during the outage"}, auth, timeout=20)
        time.sleep(args.outage)
        calls = fake.chat_calls()[calls_before:]
        end = time.time()
        pg.start()
        recovered = wait_until(
            lambda: request("POST", server.port, "/api/chat", {"message": "probe"}, auth, timeout=20)[0] == 200,
            60,
            step=0.5,
        )
        # Started and answered while it was down: a call still waiting (for a pooled connection, say) when it
        # came back may rightly be answered.
        during = [r for r in load.between(stopped + 0.5, end) if r.ended <= end]
        refused = Counter(r.code for r in during if r.status == 503)
        probe_code = json.loads(probe[1]).get("error", {}).get("code") if probe[0] != 200 else None
        drill["postgresql"] = {
            "requests_during_outage": len(during),
            "statuses": statuses(during),
            "probe": f"{probe[0]} {probe_code}",
            "upstream_calls_during_outage": len(calls),
            "answering_again_after_restart_s": None if recovered is None else round(recovered, 1),
        }
        report.check(
            "drill: with PostgreSQL down calls are refused with 503",
            probe[0] == 503
            and probe_code in ("budget_unavailable", "ledger_unavailable")
            and all(
                r.status == 503 and r.code in ("budget_unavailable", "ledger_unavailable")
                for r in during
                if r.kind == "json"
            ),
            f"probe {probe[0]} {probe_code}; {len(during)} requests during the outage: {statuses(during)}",
        )
        report.check(
            "drill: calls are answered again once PostgreSQL is back",
            recovered is not None,
            f"first 200 {drill['postgresql']['answering_again_after_restart_s']} s after the restart",
        )
        time.sleep(3)
        drill["refused_codes"] = dict(refused)
    finally:
        load.stop()
    results = load.results
    problems = [r.problem for r in results if r.problem]
    report.check(
        "drill: every answer kept the contract",
        not problems,
        f"{len(results)} requests, {len(problems)} broken" + (f"; first: {problems[0]}" if problems else ""),
    )
    wait_until(lambda: ledger.open_rows() == 0, 20)
    after = ledger.rows()
    lost = [i for i in before if i not in after]
    changed = [i for i, row in before.items() if row["closed_at"] is not None and after.get(i) != row]
    report.check(
        "drill: nothing recorded before the outages was lost or changed",
        not lost and not changed,
        f"{len(before)} rows before, all {len(before) - len(lost)} still there; changed {len(changed)}",
    )
    # No row can be written while PostgreSQL is down, so a call made then whose row exists had it opened before.
    unrecorded = [c for c in calls if int(c.headers.get(ROW_HEADER.lower(), -1)) not in after]
    drill["postgresql"]["unrecorded_upstream_calls"] = len(unrecorded)
    report.check(
        "drill: no upstream call during the PostgreSQL outage went unrecorded",
        not unrecorded,
        f"{len(calls)} upstream calls during the outage (attempts already running), "
        f"{len(calls) - len(unrecorded)} with a ledger row opened before it, {len(unrecorded)} without",
    )
    stuck = [row for row in after.values() if row["closed_at"] is None]
    drill["rows_left_interrupted"] = len(stuck)
    drill["requests"] = len(results)
    drill["statuses"] = statuses(results)
    report.figures["drill"] = drill
    rows = reconcile(report, fake, ledger, "whole run")
    report.figures["ledger_rows"] = len(rows)
    report.figures["outcomes"] = dict(Counter(row["outcome"] for row in rows.values()).most_common())


def schemathesis_cases(args, report: Report) -> None:
    """Phase 0 (full mode): run tests/test_schemathesis.py and take its count of generated cases."""
    path = ROOT / "artifacts" / "schemathesis.json"
    if not args.quick:
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_schemathesis.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        report.check(
            "schemathesis: every generated case got a documented answer and no 5xx",
            done.returncode == 0,
            (done.stdout.strip().splitlines() or ["no output"])[-1] + f" in {time.monotonic() - began:.0f} s",
        )
    if path.exists():
        report.figures["schemathesis"] = json.loads(path.read_text())


def check_workers(report: Report, server: Gunicorn, pids: set[int]) -> None:
    log = server.log_path.read_text(errors="replace")
    timeouts = log.count("WORKER TIMEOUT")
    exited = len(re.findall(r"Worker \(pid:\d+\) (?:exited|was sent)", log))
    booted = log.count("Booting worker")
    now = server.workers()
    report.figures["workers"] = {
        "pids_at_start": sorted(pids),
        "pids_at_end": sorted(now),
        "booted": booted,
        "worker_timeouts": timeouts,
        "exits": exited,
        "error_log_lines": sum('"level": "ERROR"' in line for line in log.splitlines()),
    }
    report.check(
        "no worker died",
        now == pids and timeouts == 0 and exited == 0 and booted == len(pids),
        f"worker PIDs unchanged ({len(now)}), {booted} booted, {timeouts} WORKER TIMEOUT, {exited} exited",
    )


def write_reliability(report: Report, command: str) -> None:
    """docs/RELIABILITY.md from this run's figures."""
    f = report.figures
    load, drill, st = f["load"], f.get("drill", {}), f.get("schemathesis", {})
    lines = [
        "# Reliability",
        "",
        f"Figures from the last real run of `{command}` on {f['when']} ({f['machine']}); this file is written by "
        "tests/soak.py, not by hand. Everything ran on loopback: gunicorn with 4 "
        f"{os.environ.get('CHATPROXY_WORKER_CLASS', 'gevent')} workers (gunicorn.conf.py), "
        "PostgreSQL ledger, Redis limits and cooldowns, and the fake upstream from chatproxy/demo/upstream.py in the "
        "soak process.",
        "",
        f"**Result: {'every check passed' if report.ok else 'SOME CHECKS FAILED'}.**",
        "",
        "## Load held",
        "",
        f"- {load['clients']} concurrent clients for {load['seconds']} s: {load['requests']} requests "
        f"({load['requests_per_second']}/s), mixed {load['by_kind']} (JSON answers, whole streams, streams the client "
        "hung up on).",
        f"- The upstream failed {sum(load['injected_upstream_failures'].values())} of {load['upstream_calls']} calls "
        f"on purpose (5%): {load['injected_upstream_failures']} (429 with Retry-After, 500, 503, connection reset, "
        "stream cut mid-answer, malformed chunk).",
        f"- Answers: {load['answered_ok']} OK; statuses {load['statuses']}. JSON p50 {load['latency_p50_ms']} ms, "
        f"p99 {load['latency_p99_ms']} ms, with the clients, the fake upstream and the 4 workers sharing "
        f"{os.cpu_count()} cores (1-minute load average {load['load_average_1min']} at the end), and a Retry-After "
        "of 1 s on every injected 429: these latencies describe a saturated test machine, not the proxy's overhead.",
        f"- Worker memory (RSS, 4 workers summed): {load['rss_first_window_mib']} MiB in the first "
        f"{load['rss_window_seconds']} s after a {load['warmup_seconds']} s warm-up, {load['rss_last_window_mib']} MiB "
        f"in the last {load['rss_window_seconds']} s: {load['rss_growth_percent']:+.2f}%.",
        f"- Workers: PIDs unchanged, {f['workers']['worker_timeouts']} WORKER TIMEOUT, {f['workers']['exits']} exits.",
        "",
        "## Faults survived",
        "",
    ]
    if drill:
        r, p = drill["redis"], drill["postgresql"]
        lines += [
            f"With {drill['clients']} clients calling throughout, each dependency was stopped for "
            f"{drill['outage_seconds']} s and started again:",
            "",
            f"- **Redis down**: {r['answered_ok']} of {r['requests_during_outage']} requests during the outage were "
            f"answered ({r['statuses']}); rate limits fell back to in-process counters and cooldowns failed open, as "
            f'documented. `/readyz` answered {r["readyz_during"]} ("{r["readyz_body"]}") and was ready again '
            f"{r['ready_again_after_restart_s']} s after Redis restarted.",
            f"- **PostgreSQL down**: requests were refused with 503 ({p['statuses']}; a probe got {p['probe']}): the "
            "budget reservation, which lives in the ledger's database, fails first, so callers see "
            "`budget_unavailable`; `ledger_unavailable` is what an attempt gets when only the ledger write fails. "
            f"{p['upstream_calls_during_outage']} upstream calls happened during the outage, every one with a ledger "
            f"row opened before it ({p['unrecorded_upstream_calls']} without). Calls were answered again "
            f"{p['answering_again_after_restart_s']} s after PostgreSQL restarted.",
            f"- Rows left `interrupted` after the drill: {drill['rows_left_interrupted']}. A call that was already "
            "running when PostgreSQL went away cannot close its row (the close is logged and not retried), so the "
            "row stays `interrupted` with no token counts: the call is on record, its cost is not.",
            "",
        ]
    lines += [
        "## Bad inputs tried",
        "",
        f"- Schemathesis generated {st.get('cases', 'n/a')} requests across {st.get('operations', 'n/a')} operations "
        "of docs/openapi.json (valid and deliberately invalid: wrong types, missing and unknown fields, out-of-range "
        "numbers, odd strings and dates, undocumented methods). Checks: no 5xx, status code, content type, headers "
        "and body documented, SSE events against their schema, schema-violating requests rejected, every error body "
        "the contract's. Per operation: " + ", ".join(f"{k} {v}" for k, v in st.get("by_operation", {}).items()) + ".",
        "- Property tests (tests/test_properties.py): any text through the SSE framing and back; any body "
        "/api/chat's request model accepts is within the caps.",
        "",
        "## Nothing lost",
        "",
        f"- {f['ledger_rows']} ledger rows, reconciled one for one with the fake upstream's record of calls through "
        "the X-Chatproxy-Row header each upstream call carries: no call without a row, no row without a call, "
        "none twice; "
        f"prompt and completion tokens equal for every row with exact counts. Outcomes: {f['outcomes']}. "
        f"Rows for attempts that never reached the upstream (the connection failed before the fake read the "
        f"request; recorded as upstream_unreachable with no tokens and no cost): "
        f"{f.get('unsent_rows', {}).get('whole run', 0)}.",
        "- Every row recorded before the outages was still there, unchanged, after them.",
        "",
        "## Checks",
        "",
        "| Check | Result | Figures |",
        "|---|---|---|",
        *[
            f"| {name} | {'pass' if ok else '**FAIL**'} | {detail.replace('|', '/')} |"
            for name, ok, detail in report.checks
        ],
        "",
    ]
    (ROOT / "docs" / "RELIABILITY.md").write_text("\n".join(lines), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size: 50 clients, 40 s, short outages")
    parser.add_argument(
        "--shared-services",
        action="store_true",
        help="drill the machine's PostgreSQL and Redis instead of private instances",
    )
    parser.add_argument("--seed", type=int, default=20261124)
    parser.add_argument("--output", type=Path, help="the JSON report (default: artifacts/soak[-quick].json)")
    args = parser.parse_args()
    args.clients = 50 if args.quick else 200
    args.duration = 40 if args.quick else 180
    args.warmup = 10 if args.quick else 20
    args.rss_window = 10 if args.quick else 60
    args.drill_clients = 30 if args.quick else 60
    args.outage = 4 if args.quick else 10
    command = "python tests/soak.py --quick" if args.quick else "make soak"
    report = Report("quick" if args.quick else "full")
    report.figures["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report.figures["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"

    def out_of_time(*_: object) -> None:
        raise TimeoutError("the soak ran past its 15-minute limit")

    signal.signal(signal.SIGALRM, out_of_time)  # raised in the main thread, so `finally` still cleans up
    signal.alarm(900)

    schemathesis_cases(args, report)
    work = Path(tempfile.mkdtemp(prefix="chatproxy-soak-"))
    pg = SharedPostgres() if args.shared_services else PrivatePostgres()
    rds = SharedRedis() if args.shared_services else PrivateRedis()
    fake = FlakyUpstream(args.seed).start()
    server = None
    schema = f"chatproxy_soak_{uuid.uuid4().hex[:10]}"
    admin = None
    try:
        pg.start()
        rds.start()
        admin = sa.create_engine(pg.url, pool_pre_ping=True)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        url = (
            sa.make_url(pg.url)
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )
        token, name = f"cpx_{uuid.uuid4().hex}", f"soak-{uuid.uuid4().hex[:8]}"
        server = Gunicorn(
            {
                "OPENAI_API_KEY": KEY,
                "OPENAI_BASE_URL": fake.base_url,
                "CHATPROXY_SECRET_KEY": "soak",
                "CHATPROXY_API_TOKENS": f"{name}={hash_token(token)}",
                "CHATPROXY_DATABASE_URL": url,
                "CHATPROXY_REDIS_URL": rds.url,
                "CHATPROXY_RATE_LIMIT_TOKEN": "1000000/minute",
                "CHATPROXY_MAX_STREAMS": "10000",
                "CHATPROXY_MAX_CONCURRENT": "100000",
                "CHATPROXY_DAILY_BUDGET_USD": "1000000",
                "CHATPROXY_IDENTITY_DAILY_BUDGET_USD": "1000000",
                "CHATPROXY_MAX_RETRIES": "2",
                "CHATPROXY_RETRY_MAX_WAIT": "2",
                "CHATPROXY_READ_TIMEOUT": "10",
                "CHATPROXY_TOTAL_TIMEOUT": "30",
                # Failures here are retried, never cooled down, whatever the drill's bursts do to the failure rate
                # (tests/test_resilience.py covers cooldowns).
                "CHATPROXY_COOLDOWN_MIN_CALLS": "1000000",
                "CHATPROXY_GRACEFUL_TIMEOUT": "15",
            },
            work / "gunicorn.log",
            workers=4,
            threads=64,
        )
        pids = server.workers()
        ledger = Ledger(url)
        auth = {"Authorization": f"Bearer {token}"}
        print(
            f"gunicorn on :{server.port} (workers {sorted(pids)}), PostgreSQL schema {schema}, Redis {rds.url}",
            flush=True,
        )
        load_phase(args, report, server, fake, ledger, auth)
        drill_phase(args, report, server, fake, ledger, auth, pg, rds)
        check_workers(report, server, pids)
        ledger.engine.dispose()
    except Exception as exc:
        report.check("the soak ran to the end", False, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if server is not None:
            server.stop()
        fake.stop()
        try:
            pg.start()  # up again whatever happened (a no-op when running), then drop our schema
            if admin is not None:
                with admin.begin() as conn:
                    conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                admin.dispose()
        except Exception as exc:  # noqa: BLE001 - cleanup goes on; the schema name is in the output
            print(f"could not drop schema {schema}: {type(exc).__name__}: {exc}", flush=True)
        finally:
            pg.remove()
            rds.remove()
            shutil.rmtree(work, ignore_errors=True)
        signal.alarm(0)
        output = args.output or ROOT / "artifacts" / f"soak{'-quick' if args.quick else ''}.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(
            json.dumps(
                {"ok": report.ok, "mode": report.mode, "figures": report.figures, "checks": report.checks},
                indent=2,
                default=str,
            )
            + "\n",
            encoding="utf-8",
        )
    if not args.quick:
        write_reliability(report, command)
    print(f"{sum(ok for _, ok, _ in report.checks)} passed, {sum(not ok for _, ok, _ in report.checks)} failed")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
