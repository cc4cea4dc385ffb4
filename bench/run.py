"""`make bench`: what chatproxy costs over going direct to the upstream, side by side with nginx alone.

    python bench/run.py            # the full run (under 10 minutes): BENCHMARKS.md, docs/bench.png, README figures
    python bench/run.py --quick    # a few seconds, paths A and C, results in bench/results/quick/ only

Paths (the same load client and the same paced upstream for each):
    A  direct to the upstream                       (the reference: everything else is "added over A")
    B  nginx -> upstream                            (one HTTP hop done in C: the physical limit of a proxy)
    C  gunicorn (gunicorn.conf.py, gevent) + chatproxy's /api/chat -> upstream
    G  C with CHATPROXY_WORKER_CLASS=gthread        (the other worker class)
    V  C's server, at /v1/chat/completions          (the OpenAI-compatible endpoint, same server as C)
    D  nginx -> gunicorn + chatproxy -> upstream    (as deployed: deploy/nginx.conf's directives, no TLS)
    F  a plain Flask + SDK proxy (bench/plain_proxy.py, gunicorn gthread, 2 workers) -> upstream
    K  C with CHATPROXY_KEEPALIVE_SECONDS=0         (what the keep-alive pinger costs; --paths only)
    P  C as of git revision --baseline REF          (before / after a change, measured in the same run)
    E  a LiteLLM proxy -> upstream                  (`make bench` installs it in bench/.litellm, its own venv)

The load client and the upstream share core 0; the servers under test (nginx, gunicorn) get core 1.
After the paths, with every server stopped, bench/cost.py measures the app in one process (no WSGI server):
CPU per request and per chunk, and a profile by layer (BENCHMARKS.md section 7; `--no-cost` skips it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path as FilePath
from typing import Any

HERE = FilePath(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import scenarios  # noqa: E402
import stack  # noqa: E402
from load import CHATPROXY, OPENAI, Path  # noqa: E402
from scenarios import Target, Upstream, median, ms, pct  # noqa: E402
from upstream import DELTAS, PACE  # noqa: E402

NAMES = {
    "A": "direct",
    "B": "nginx only",
    "C": "gunicorn (gevent) + chatproxy",
    "G": "gunicorn (gthread) + chatproxy",
    "V": "C at /v1/chat/completions",
    "D": "nginx + gunicorn + chatproxy",
    "F": "plain Flask + SDK proxy",
    "K": "C, keep-alive pings off",
    "P": "C at an earlier revision",
    "E": "LiteLLM proxy",
}
TTFT_LIMIT = 0.050  # a sustained level passes only while added TTFT p99 stays under this
JSON_P99_LIMIT = 0.010  # requests per second are counted while p99 stays under this
CLIENT_BUSY = 0.90  # core 0 busier than this: the load generator may be the limit


@dataclass(frozen=True)
class Plan:
    """How much of everything: counts and seconds."""

    rounds: int = 5  # interleaved rounds of the one-client measurements
    short: int = 15  # 4-delta streams per path per round (TTFT samples)
    json_calls: int = 60  # whole replies per path per round (latency samples)
    warm: int = 3
    abort_count: int = 5
    abort_after: int = 8  # deltas the client reads before it hangs up
    rps_clients: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    rps_seconds: float = 1.5
    rps_cap: int = 20000
    levels: tuple[int, ...] = (1, 8, 32, 64, 128, 256, 512)
    ramp: float = (DELTAS + 1) * PACE  # starts spread over one stream's length
    hold: float = 2.2
    budget_s: float = 420.0  # the measurements stop starting new work after this
    cost_reps: int = 30  # bench/cost.py: streams of each kind (1 and 64 deltas), in-process
    cost_concurrency: int = 5  # its 64-delta streams at a time


QUICK = Plan(
    rounds=1,
    short=3,
    json_calls=10,
    warm=1,
    abort_count=2,
    rps_clients=(1,),
    rps_seconds=0.3,
    rps_cap=500,
    levels=(2,),
    ramp=0.2,
    hold=0.3,
    budget_s=60.0,
    cost_reps=2,
    cost_concurrency=2,
)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds; paths A and C; writes only to --out")
    parser.add_argument("--paths", help="letters to run, e.g. A,B,C,G,V,D,F,K,E (default: all but K, P; --quick: A,C)")
    parser.add_argument("--out", type=FilePath, help="folder for results.json (default bench/results[/quick])")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        help="seconds to wait at most for an idle machine first (default 90; --quick 0)",
    )
    parser.add_argument("--baseline", metavar="REF", help="also run path P: C as of this git revision")
    parser.add_argument("--no-report", action="store_true", help="write results.json only")
    parser.add_argument("--no-cost", action="store_true", help="skip bench/cost.py (where the CPU goes)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    letters = [x.strip().upper() for x in (args.paths or ("A,C" if args.quick else "A,B,C,G,V,D,F,E")).split(",")]
    if args.baseline and "P" not in letters:
        letters.append("P")
    out = args.out or (HERE / "results" / ("quick" if args.quick else "full"))
    out.mkdir(parents=True, exist_ok=True)
    quiet = wait_for_quiet(args.wait_quiet if args.wait_quiet is not None else (0 if args.quick else 90))
    started = time.monotonic()
    started_utc = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    two_cores = stack.can_pin()  # asked before run() pins this process to core 0
    results = run(plan, letters, args.baseline)
    results["cost"] = None if args.no_cost else run_cost(plan, results["notes"], two_cores)
    results["started_utc"] = started_utc
    results["quiet_wait"] = quiet
    results["command"] = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if results["command"].strip() == "python bench/run.py":
        results["command"] = "make bench"
    results["machine"] = machine_info()
    results["plan"] = asdict(plan)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["figures"] = summarize(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=False), encoding="utf-8")
    print(f"results: {out / 'results.json'} ({results['elapsed_s']} s)", flush=True)
    if not args.no_report:
        import report

        if args.quick:
            report.write(results, out / "BENCHMARKS.md", out / "bench.png", None)
        else:
            report.write(results, ROOT / "BENCHMARKS.md", ROOT / "docs" / "bench.png", ROOT / "README.md")
    return 0


def say(message: str) -> None:
    """One progress line."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def wait_for_quiet(limit: float, threshold: float = 0.15) -> dict[str, Any]:
    """Wait (at most `limit` seconds) until the machine is idle: both cores under `threshold` busy for 3 s."""
    began = time.monotonic()
    before = os.getloadavg()
    busy = None
    while True:
        first = stack.core_times()
        time.sleep(3 if limit > 0 else 0.5)
        busy = stack.busy_fraction(first, stack.core_times())["all"]
        if busy < threshold or time.monotonic() - began >= limit:
            break
        print(f"waiting for a quiet machine: {busy:.0%} busy, load {os.getloadavg()[0]:.2f}", flush=True)
    return {
        "waited_s": round(time.monotonic() - began, 1),
        "busy_before": busy,
        "threshold": threshold,
        "quiet": busy < threshold,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "loadavg_before_wait": [round(x, 2) for x in before],
    }


def machine_info() -> dict[str, Any]:
    """CPU, cores, kernel, Python, nginx, gunicorn, SDK versions, and the filesystem the ledger lived on."""
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
        model = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor()
        )
    import gunicorn
    import openai

    fs = subprocess.run(
        ["df", "-T", tempfile.gettempdir()], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": stack.nginx_version(),
        "gunicorn": gunicorn.__version__,
        "openai": openai.__version__,
        "tmp_filesystem": fs.splitlines()[-1].split()[1] if fs.strip() else None,
        "pinned": stack.can_pin(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }


LITELLM_VENV = HERE / ".litellm"  # `make bench` installs LiteLLM's proxy here (bench/litellm-requirements.txt)
LITELLM_KEY = "sk-bench-litellm-master"  # its proxy refuses to start without a master key; callers send it


def find_litellm() -> str | None:
    """A `litellm` proxy executable outside this project's venv (LITELLM_BIN, bench/.litellm, PATH), or None."""
    bundled = LITELLM_VENV / "bin" / "litellm"
    found = os.environ.get("LITELLM_BIN") or (str(bundled) if bundled.exists() else shutil.which("litellm"))
    if found and FilePath(found).resolve().is_relative_to((ROOT / ".venv").resolve()):
        return None
    return found


def start_litellm(tmp: FilePath, binary: str, upstream_port: int, cpu: int | None) -> stack.Proc:
    """LiteLLM's proxy with one model routed to the bench upstream."""
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
        f"      api_base: http://127.0.0.1:{upstream_port}/v1\n      api_key: sk-bench\n"
        f"general_settings:\n  master_key: {LITELLM_KEY}\n",
        encoding="utf-8",
    )
    port = stack.free_port()
    log = tmp / "litellm.log"
    env = {**os.environ, "LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_TELEMETRY": "False"}
    process = stack._spawn(
        "litellm",
        [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        log,
        cpu,
        env,
        cwd=tmp,
    )
    stack.wait_for_port(port, process, log, timeout=90)
    return stack.Proc("litellm", process, port, log)


def run(plan: Plan, letters: list[str], baseline: str | None = None) -> dict[str, Any]:
    """Start every server, measure, stop them all; the raw results."""
    tmp = FilePath(tempfile.mkdtemp(prefix="chatproxy-bench-"))
    notes: list[str] = []
    pin = stack.can_pin()
    client_cpu, server_cpu = (0, 1) if pin else (None, None)
    if pin:
        os.sched_setaffinity(0, {client_cpu})
    if stack.raise_priority():
        notes.append("every bench process ran at nice -10, ahead of other work on the machine")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    procs: list[stack.Proc] = []
    targets: dict[str, Target] = {}
    try:
        upstream = stack.start_upstream(tmp, client_cpu)
        procs.append(upstream)
        targets["A"] = Target(Path("A", NAMES["A"], upstream.port, OPENAI))
        have_nginx = os.path.exists(stack.NGINX)
        if not have_nginx and {"B", "D"} & set(letters):
            notes.append("B and D skipped: nginx is not installed (apt-get install nginx-light).")
        if "B" in letters and have_nginx:
            nginx_b = stack.start_nginx(tmp, "B", upstream.port, server_cpu)
            procs.append(nginx_b)
            targets["B"] = Target(Path("B", NAMES["B"], nginx_b.port, OPENAI), nginx_b.worker_pids)
        token_hash = _hash_token(stack.TOKEN)
        if {"C", "V"} & set(letters) or ("D" in letters and have_nginx):
            app = stack.start_gunicorn(tmp, "C", stack.app_settings(tmp, upstream.port, token_hash), server_cpu)
            procs.append(app)
            if "C" in letters:
                targets["C"] = Target(Path("C", NAMES["C"], app.port, CHATPROXY, stack.TOKEN), app.worker_pids)
            if "V" in letters:
                targets["V"] = Target(Path("V", NAMES["V"], app.port, OPENAI, stack.TOKEN), app.worker_pids)
            if "D" in letters and have_nginx:
                nginx_d = stack.start_nginx(tmp, "D", app.port, server_cpu)
                procs.append(nginx_d)
                targets["D"] = Target(
                    Path("D", NAMES["D"], nginx_d.port, CHATPROXY, stack.TOKEN),
                    lambda n=nginx_d, a=app: n.worker_pids() + a.worker_pids(),
                )
        if "G" in letters:
            app_g = stack.start_gunicorn(
                tmp,
                "G",
                stack.app_settings(tmp, upstream.port, token_hash, CHATPROXY_WORKER_CLASS="gthread"),
                server_cpu,
            )
            procs.append(app_g)
            targets["G"] = Target(Path("G", NAMES["G"], app_g.port, CHATPROXY, stack.TOKEN), app_g.worker_pids)
        if "F" in letters:
            plain = stack.start_plain_proxy(tmp, upstream.port, server_cpu)
            procs.append(plain)
            targets["F"] = Target(Path("F", NAMES["F"], plain.port, OPENAI), plain.worker_pids)
        if "K" in letters:
            app_k = stack.start_gunicorn(
                tmp,
                "K",
                stack.app_settings(tmp, upstream.port, token_hash, CHATPROXY_KEEPALIVE_SECONDS="0"),
                server_cpu,
            )
            procs.append(app_k)
            targets["K"] = Target(Path("K", NAMES["K"], app_k.port, CHATPROXY, stack.TOKEN), app_k.worker_pids)
        if "P" in letters and baseline:
            tree = tmp / "baseline"
            tree.mkdir()
            revision = subprocess.run(
                ["git", "rev-parse", "--short", baseline], cwd=ROOT, check=True, capture_output=True, text=True
            ).stdout.strip()
            archive = subprocess.run(["git", "archive", baseline], cwd=ROOT, check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
            app_p = stack.start_gunicorn(
                tmp, "P", stack.app_settings(tmp, upstream.port, token_hash), server_cpu, cwd=tree
            )
            procs.append(app_p)
            targets["P"] = Target(Path("P", f"C at {revision}", app_p.port, CHATPROXY, stack.TOKEN), app_p.worker_pids)
        if "E" in letters:
            binary = find_litellm()
            if binary is None:
                notes.append(
                    "E (LiteLLM proxy) skipped: no `litellm` executable outside this project's venv "
                    "(`make bench` installs one in bench/.litellm; or set LITELLM_BIN). It is not a dependency."
                )
            else:
                litellm = start_litellm(tmp, binary, upstream.port, server_cpu)
                procs.append(litellm)
                targets["E"] = Target(Path("E", NAMES["E"], litellm.port, OPENAI, LITELLM_KEY), litellm.worker_pids)
        raw = asyncio.run(measure(plan, targets, Upstream(upstream.port, upstream.process.pid), notes))
    finally:
        for proc in reversed(procs):
            proc.stop()
    raw["server_log_problems"] = _log_problems(procs)
    raw["notes"] = notes
    raw["paths"] = {k: {"name": t.path.name, "port_kind": t.path.kind} for k, t in targets.items()}
    raw["pinning"] = (
        "load client + upstream on core 0, servers under test (nginx, gunicorn) on core 1"
        if pin
        else "not pinned (fewer than two cores available)"
    )
    raw["app_settings"] = {
        k: v
        for k, v in stack.app_settings(FilePath("$TMP"), 0, "sha256:...").items()
        if k not in ("OPENAI_BASE_URL", "CHATPROXY_API_TOKENS")
    }
    shutil.rmtree(tmp, ignore_errors=True)
    return raw


def run_cost(plan: Plan, notes: list[str], two_cores: bool) -> dict[str, Any] | None:
    """bench/cost.py in a process of its own (after every server has stopped): where the CPU goes, in-process."""
    say(f"where the CPU goes: {plan.cost_reps} streams of 1 and of {DELTAS} deltas, in-process")
    with tempfile.TemporaryDirectory(prefix="chatproxy-cost-") as tmp:
        out = FilePath(tmp) / "cost.json"
        argv = [sys.executable, str(HERE / "cost.py"), "--reps", str(plan.cost_reps)]
        argv += ["--concurrency", str(plan.cost_concurrency), "--out", str(out)]
        widen = (lambda: os.sched_setaffinity(0, {0, 1})) if two_cores else None  # it pins itself and its upstream
        done = subprocess.run(
            argv,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            preexec_fn=widen,  # sched_setaffinity only: this process is pinned to core 0
        )
        if done.returncode != 0 or not out.exists():
            notes.append(f"bench/cost.py failed (exit {done.returncode}): {(done.stderr or done.stdout)[-400:]}")
            return None
        return json.loads(out.read_text(encoding="utf-8"))


def _hash_token(token: str) -> str:
    from chatproxy.callers import hash_token

    return hash_token(token)


def _log_problems(procs: list[stack.Proc]) -> dict[str, list[str]]:
    """ERROR / CRITICAL / Traceback lines the servers printed (the bench expects none)."""
    found: dict[str, list[str]] = {}
    for proc in procs:
        logs = [proc.log, *proc.log.parent.glob("error.log")] if proc.log.exists() else []
        lines = [
            line
            for path in logs
            for line in path.read_text(errors="replace").splitlines()
            if any(
                word in line
                for word in (
                    '"level": "ERROR"',
                    '"level": "CRITICAL"',
                    "Traceback",
                    "[error]",
                    "[crit]",
                    "[alert]",
                    "[emerg]",
                    "WORKER TIMEOUT",
                )
            )
        ]
        if lines:
            found[proc.name] = lines[:10]
    return found


async def measure(plan: Plan, targets: dict[str, Target], upstream: Upstream, notes: list[str]) -> dict[str, Any]:
    """Every measurement, paths interleaved; stops starting new work when the time budget is spent."""
    deadline = time.monotonic() + plan.budget_s
    letters = list(targets)
    raw: dict[str, Any] = {
        "one_client": {k: [] for k in letters},
        "aborts": {},
        "json_rate": {k: [] for k in letters},
        "sustained": {k: [] for k in letters},
        "reuse": {},
        "baseline_memory": {},
        "level_notes": [],
    }
    phase_meter = scenarios.Meter(upstream.pid, [p for t in targets.values() for p in t.server_pids()])

    # Warm-up: connections, imports, each worker's first request.
    for letter in letters:
        for i in range(2):  # two connections: likely both gunicorn workers
            await scenarios.one_stream_round(
                targets[letter], upstream, f"warm{i}", plan.warm, plan.warm * 3, full_stream=i == 0 and plan.rounds > 1
            )

    # 1, 2, 4: one client; paths interleaved in rounds, each round in a rotated order.
    say(f"one client: {plan.rounds} rounds over {', '.join(letters)}")
    counts = upstream.counts()
    for r in range(plan.rounds):
        for letter in letters[r % len(letters) :] + letters[: r % len(letters)]:
            raw["one_client"][letter].append(
                await scenarios.one_stream_round(targets[letter], upstream, f"r{r}", plan.short, plan.json_calls)
            )
    raw["reuse"]["one_client"] = _reuse(counts, upstream.counts(), letters)

    # 6: hang-ups.
    say("hang-ups")
    for letter in letters:
        raw["aborts"][letter] = await scenarios.aborts(targets[letter], upstream, plan.abort_count, plan.abort_after)

    # 4: whole replies per second, climbing concurrency until p99 passes the limit.
    counts, active = upstream.counts(), list(letters)
    for clients in plan.rps_clients:
        say(f"whole replies: {clients} clients on {', '.join(active)}")
        for letter in list(active):
            if time.monotonic() + plan.rps_seconds + 2 > deadline:
                notes.append(f"time budget: requests-per-second climb stopped before {clients} clients")
                active = []
                break
            point = await scenarios.json_rate(targets[letter], upstream, clients, plan.rps_seconds, plan.rps_cap)
            raw["json_rate"][letter].append(point)
            if point["p99_ms"] is None or point["p99_ms"] >= JSON_P99_LIMIT * 1000 or point["errors"]:
                active.remove(letter)
        if not active:
            break
    raw["reuse"]["json_rate"] = _reuse(counts, upstream.counts(), letters)

    # 3, 5: sustained streams, climbing until the first failing level.
    for letter in letters:
        raw["baseline_memory"][letter] = dict(zip(("rss", "threads"), stack.memory(targets[letter].server_pids())))
    counts, active = upstream.counts(), list(letters)
    for index, level in enumerate(plan.levels):
        need = len(active) * (plan.ramp + plan.hold + (DELTAS + 2) * PACE + 1.5)
        if time.monotonic() + need > deadline:
            notes.append(f"time budget: sustained-stream climb stopped before {level} streams")
            break
        points = {}
        say(f"sustained: {level} streams on {', '.join(active)}")
        for letter in active[index % len(active) :] + active[: index % len(active)]:
            points[letter] = await scenarios.sustained(
                targets[letter], upstream, level, plan.ramp, plan.hold, targets[letter].server_pids()
            )
            await asyncio.sleep(0.5)  # let the servers close what the level left behind
        reference = points.get("A")
        for letter, point in points.items():
            judge(point, reference if letter != "A" else None)
            raw["sustained"][letter].append(point)
        failed = [letter for letter, point in points.items() if not point["passed"]]
        for letter in failed:
            say(f"  {letter} fails at {level}: {'; '.join(points[letter]['reasons'])}")
        active = [letter for letter in active if letter not in failed]
        if "A" in failed:
            raw["level_notes"].append(
                f"the direct path (A) itself failed at {level} streams: the load generator "
                "or the upstream is the limit there; nothing above it was measured"
            )
            break
        if active == ["A"] or not active:
            break
    raw["reuse"]["sustained"] = _reuse(counts, upstream.counts(), letters)
    raw["whole_run"] = phase_meter.read()
    raw["budget_left_s"] = round(deadline - time.monotonic(), 1)
    return raw


def judge(point: dict[str, Any], reference: dict[str, Any] | None) -> None:
    """Pass: no errors, no stall (a gap over 2x the pace), added TTFT p99 under 50 ms; flag client-limited levels."""
    reasons = []
    if point["errors"]:
        reasons.append(f"{point['errors']} failed streams ({'; '.join(point['error_sample'])})")
    if point["stalls"]:
        reasons.append(f"{point['stalls']} gaps over {scenarios.STALL * 1000:.0f} ms (max {point['gap_max_ms']} ms)")
    added = None
    if reference is not None and point["ttft_p99_ms"] is not None and reference["ttft_p99_ms"] is not None:
        added = round(point["ttft_p99_ms"] - reference["ttft_p99_ms"], 3)
        if added >= TTFT_LIMIT * 1000:
            reasons.append(f"added TTFT p99 {added} ms")
    point["added_ttft_p99_ms"] = added if reference is not None else 0.0
    point["passed"] = not reasons
    point["reasons"] = reasons
    client_core = point["core_busy"].get("0") if stack.can_pin() else point["core_busy"].get("all")
    lateness = point["upstream_lateness_p99_ms"] or 0
    point["client_core_busy"] = client_core
    point["client_limited"] = bool((client_core or 0) > CLIENT_BUSY or lateness > 5)


def _reuse(
    before: tuple[dict[str, int], dict[str, int]], after: tuple[dict[str, int], dict[str, int]], letters: list[str]
) -> dict[str, dict[str, int | float | None]]:
    out = {}
    for letter in letters:
        connections = after[0].get(letter, 0) - before[0].get(letter, 0)
        requests = after[1].get(letter, 0) - before[1].get(letter, 0)
        out[letter] = {
            "connections": connections,
            "requests": requests,
            "per_1000": round(connections * 1000 / requests, 1) if requests else None,
        }
    return out


def summarize(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The figures per path: raw values, added over A, ratio of the added part to B's."""
    figures: dict[str, dict[str, Any]] = {}
    common = common_level(raw)
    for letter, rounds in raw["one_client"].items():
        if not rounds:
            continue
        pooled = {key: [v for r in rounds for v in r[key]] for key in ("ttft", "gaps", "lags", "latency")}
        round_medians = {key: [median(r[key]) for r in rounds if r[key]] for key in ("ttft", "gaps", "lags", "latency")}
        f: dict[str, Any] = {
            "ttft_p50_ms": ms(median(round_medians["ttft"])),
            "ttft_p99_ms": ms(pct(pooled["ttft"], 0.99)),
            "ttft_round_medians_ms": [ms(v) for v in round_medians["ttft"]],
            "gap_p50_ms": ms(median(round_medians["gaps"])),
            "gap_p99_ms": ms(pct(pooled["gaps"], 0.99)),
            "gap_max_ms": ms(max(pooled["gaps"], default=None)),
            "lag_p50_ms": ms(median(round_medians["lags"])),
            "lag_p99_ms": ms(pct(pooled["lags"], 0.99)),
            "batched_gaps": sum(1 for g in pooled["gaps"] if g < scenarios.BATCHED),
            "gaps_measured": len(pooled["gaps"]),
            "identical": all(r["identical"] for r in rounds),
            "chunks": sorted({r["chunks"] for r in rounds}),
            "errors": [e for r in rounds for e in r["errors"]],
            "json_p50_ms": ms(median(round_medians["latency"])),
            "json_p99_ms": ms(pct(pooled["latency"], 0.99)),
            "samples": {key: len(values) for key, values in pooled.items()},
            "upstream_lateness_p99_ms": ms(pct([v for r in rounds for v in r["upstream_lateness"]], 0.99)),
        }
        levels = raw["sustained"].get(letter, [])
        passed = [p for p in levels if p["passed"]]
        failed = next((p for p in levels if not p["passed"]), None)
        f["sustained_streams"] = max((p["level"] for p in passed), default=0)
        f["sustained_failed_at"] = failed["level"] if failed else None
        f["sustained_failed_because"] = failed["reasons"] if failed else []
        f["sustained_client_limited"] = any(p["client_limited"] for p in levels)
        f["sustained_top_measured"] = max((p["level"] for p in levels), default=0)
        rated = [
            p
            for p in raw["json_rate"].get(letter, [])
            if p["p99_ms"] is not None and p["p99_ms"] < JSON_P99_LIMIT * 1000 and not p["errors"]
        ]
        best = max(rated, key=lambda p: p["rps"], default=None)
        f["rps_p99_under_10ms"] = best["rps"] if best else 0
        f["rps_clients"] = best["clients"] if best else None
        f["rps_client_limited"] = bool(best and best["core_busy"].get("0", 0) > CLIENT_BUSY)
        if letter != "A":
            _resources(f, levels, raw["baseline_memory"].get(letter, {}), common)
        aborts = raw["aborts"].get(letter, {})
        f["chunks_after_abort_median"] = median(aborts.get("chunks_after_abort", []))
        f["chunks_after_abort_max"] = max(aborts.get("chunks_after_abort", []), default=None)
        f["conn_per_1000"] = {phase: raw["reuse"][phase][letter]["per_1000"] for phase in raw["reuse"]}
        figures[letter] = f
    _added(figures)
    return figures


def common_level(raw: dict[str, Any]) -> int | None:
    """The highest sustained level that every path but A measured (passed or not), or None if there is none.

    CPU per chunk falls as the level rises (fixed costs amortise) and memory per stream changes with it, so
    paths are compared at one level: a path's own highest level would compare different loads.
    """
    measured = [{p["level"] for p in points} for letter, points in raw["sustained"].items() if letter != "A" and points]
    shared = set.intersection(*measured) if measured else set()
    return max(shared) if shared else None


def _resources(f: dict[str, Any], levels: list[dict[str, Any]], base: dict[str, Any], common: int | None) -> None:
    """Memory per open stream and CPU per 1,000 chunks at the common level (`common`); the same at the path's
    highest passing level (or its highest measured) as `*_top` figures, for reference."""

    def kib(point: dict[str, Any]) -> float | None:
        if not point["rss_bytes"] or not point["open_streams_sampled"]:
            return None
        return round((point["rss_bytes"] - base.get("rss", 0)) / 1024 / point["open_streams_sampled"], 1)

    if not levels:
        return
    passed = [p for p in levels if p["passed"]]
    top = max(passed or levels, key=lambda p: p["level"])
    f["top_level"] = top["level"]
    f["kib_per_stream_top"] = kib(top)
    f["cpu_ms_per_1000_chunks_top"] = top["server_cpu_ms_per_1000_chunks"]
    at = next((p for p in levels if p["level"] == common), None) if common is not None else top
    if at is None:
        return
    f["cpu_level"] = f["memory_level"] = at["level"]
    f["cpu_ms_per_1000_chunks"] = at["server_cpu_ms_per_1000_chunks"]
    f["kib_per_stream"] = kib(at)
    f["threads_at_level"] = at["threads"]
    f["threads_idle"] = base.get("threads")


ADDED = (
    "ttft_p50_ms",
    "ttft_p99_ms",
    "gap_p50_ms",
    "gap_p99_ms",
    "gap_max_ms",
    "lag_p50_ms",
    "lag_p99_ms",
    "json_p50_ms",
    "json_p99_ms",
)


def _added(figures: dict[str, dict[str, Any]]) -> None:
    a, b = figures.get("A"), figures.get("B")
    for f in figures.values():
        for key in ADDED:
            if a and f.get(key) is not None and a.get(key) is not None:
                f["added_" + key] = round(f[key] - a[key], 3)
        for key in ADDED:
            mine, theirs = f.get("added_" + key), (b or {}).get("added_" + key)
            if mine is not None and theirs is not None and theirs > 0.001:
                f["x_b_" + key] = round(mine / theirs, 1)
        if b and b.get("sustained_streams"):
            f["x_b_sustained_streams"] = round(f["sustained_streams"] / b["sustained_streams"], 3)
        if b and b.get("rps_p99_under_10ms"):
            f["x_b_rps"] = round(f["rps_p99_under_10ms"] / b["rps_p99_under_10ms"], 3)
        for key in ("cpu_ms_per_1000_chunks", "kib_per_stream"):
            if b and b.get(key) and f.get(key) is not None:
                f["x_b_" + key] = round(f[key] / b[key], 1)


if __name__ == "__main__":
    sys.exit(main())
