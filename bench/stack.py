"""The processes under test, on loopback and pinned to a core: the bench upstream, gunicorn with the app, nginx.

Also what /proc says about them: CPU seconds, resident memory and threads of a process tree, and the
busy time of each core.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests import nginx_site  # the deploy tests' nginx: bench/run.py puts the project root on sys.path

ROOT = Path(__file__).resolve().parent.parent
NGINX = nginx_site.NGINX
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# The bench token (a throwaway: it exists only in this run's settings) and the app's settings.
TOKEN = "cpx_bench_" + os.urandom(12).hex()


def can_pin() -> bool:
    """True when this machine has two cores we may pin to."""
    try:
        return {0, 1} <= os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return False


def raise_priority() -> bool:
    """nice -10 for this process and its children (root only), so other work on the machine disturbs less."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
        return True
    except (OSError, AttributeError):
        return False


def pinned(cpu: int | None):
    """A preexec_fn that pins the child (and so everything it forks) to one core."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    """Until something listens on the port; fails with the process's log if it died or never listened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"did not listen on {port}:\n{log.read_text(errors='replace')[-3000:]}")


@dataclass
class Proc:
    """A started server: its process (the master, for gunicorn and nginx), port and log file."""

    name: str
    process: subprocess.Popen
    port: int
    log: Path

    def pids(self) -> list[int]:
        """The process and all its descendants (gunicorn's and nginx's workers)."""
        return tree(self.process.pid)

    def worker_pids(self) -> list[int]:
        """The descendants only (the workers), or the process itself when it has none."""
        return tree(self.process.pid)[1:] or [self.process.pid]

    def stop(self) -> None:
        """SIGTERM (nginx: SIGQUIT lets it finish; TERM is fast), then SIGKILL after 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _spawn(
    name: str, argv: list[str], log: Path, cpu: int | None, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.Popen:
    out = log.open("wb")
    try:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=pinned(cpu),  # noqa: PLW1509 - sched_setaffinity only; the bench forks before its threads
            start_new_session=True,
        )
    finally:
        out.close()


def start_upstream(tmp: Path, cpu: int | None) -> Proc:
    """bench/upstream.py on a free port."""
    ready, log = tmp / "upstream.port", tmp / "upstream.log"
    process = _spawn(
        "upstream", [sys.executable, str(ROOT / "bench" / "upstream.py"), "--ready-file", str(ready)], log, cpu
    )
    deadline = time.monotonic() + 20
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the bench upstream did not start:\n" + log.read_text(errors="replace"))
        time.sleep(0.02)
    port = int(ready.read_text())
    return Proc("upstream", process, port, log)


def app_settings(tmp: Path, upstream_port: int, token_hash: str, **overrides: str) -> dict[str, str]:
    """The app's settings for the benchmark; everything not named here keeps its shipped default."""
    settings = {
        "OPENAI_API_KEY": "sk-bench-not-a-real-key-0000000000",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
        "CHATPROXY_SECRET_KEY": "bench-secret",
        "CHATPROXY_API_TOKENS": f"bench={token_hash}",
        "CHATPROXY_RATE_LIMIT_TOKEN": "10000000/minute",
        "CHATPROXY_MAX_STREAMS": "10000",
        "CHATPROXY_MAX_CONCURRENT": "100000",
        "CHATPROXY_DAILY_BUDGET_USD": "1000000",
        "CHATPROXY_IDENTITY_DAILY_BUDGET_USD": "1000000",
        "CHATPROXY_DATABASE_URL": f"sqlite:///{tmp}/ledger-{{name}}.db",
        "CHATPROXY_REDIS_URL": "",
        "CHATPROXY_TRUSTED_PROXIES": "1",
        "CHATPROXY_WORKERS": "2",
        "CHATPROXY_WORKER_CLASS": "gevent",
        "CHATPROXY_THREADS": "512",
    }
    settings.update(overrides)
    return settings


def start_gunicorn(tmp: Path, name: str, settings: dict[str, str], cpu: int | None, cwd: Path = ROOT) -> Proc:
    """gunicorn -c gunicorn.conf.py (the shipped configuration, from `cwd`) with `settings` in its environment."""
    port = free_port()
    log = tmp / f"gunicorn-{name}.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHATPROXY_", "OPENAI_", "AZURE_OPENAI_")) and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update({k: v.replace("{name}", name) for k, v in settings.items()})
    env["CHATPROXY_BIND"] = f"127.0.0.1:{port}"
    process = _spawn(name, [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], log, cpu, env, cwd)
    wait_for_port(port, process, log)
    wait_for_health(port, process, log)
    return Proc(name, process, port, log)


def start_plain_proxy(tmp: Path, upstream_port: int, cpu: int | None) -> Proc:
    """bench/plain_proxy.py under gunicorn: gthread, 2 workers, 512 threads each, as chatproxy's G path gets."""
    port = free_port()
    log = tmp / "gunicorn-F.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATPROXY_", "OPENAI_", "AZURE_OPENAI_"))}
    env.update(OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1")
    argv = [sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", "2", "--threads", "512"]
    argv += ["-b", f"127.0.0.1:{port}", "--access-logfile", "/dev/null", "plain_proxy:app"]
    process = _spawn("F", argv, log, cpu, env, ROOT / "bench")  # bench/ has no gunicorn.conf.py to pick up
    wait_for_port(port, process, log)
    return Proc("F", process, port, log)


def wait_for_health(port: int, process: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    """Until GET /healthz answers 200 (a worker that fails its start-up keeps the port open but never answers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return
            conn.close()
        except OSError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"gunicorn on {port} never became healthy:\n{log.read_text(errors='replace')[-3000:]}")


def start_nginx(tmp: Path, name: str, backend_port: int, cpu: int | None) -> Proc:
    """nginx with deploy/nginx.conf's upstream and proxy directives (the regions the deploy tests run), no TLS."""
    prefix = tmp / f"nginx-{name}"
    port = free_port()
    conf = nginx_site.write_conf(
        prefix, backend_port, port, connections=8192, backlog=4096, error_level="warn", open_files=16384
    )
    log = prefix / "stdout.log"
    process = _spawn(name, nginx_site.argv(prefix, conf), log, cpu)
    wait_for_port(port, process, log)
    return Proc(name, process, port, log)


def nginx_version() -> str | None:
    """`nginx -v`, or None without nginx."""
    if not os.path.exists(NGINX):
        return None
    out = subprocess.run([NGINX, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


# /proc readings --------------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def tree(pid: int) -> list[int]:
    """`pid` and its descendants, parents first."""
    kids, found, todo = _children(), [], [pid]
    while todo:
        current = todo.pop(0)
        found.append(current)
        todo.extend(sorted(kids.get(current, [])))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (all their threads) so far."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / TICK


def memory(pids: list[int]) -> tuple[int, int]:
    """(resident bytes, threads) summed over these processes."""
    rss = threads = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Threads:"):
                        threads += int(line.split()[1])
        except OSError:
            continue
    return rss, threads


def core_times() -> dict[str, tuple[float, float]]:
    """Per core (and "all"): (busy seconds, total seconds) since boot, from /proc/stat."""
    times: dict[str, tuple[float, float]] = {}
    with open("/proc/stat", encoding="ascii") as stat:
        for line in stat:
            if not line.startswith("cpu"):
                break
            name, *values = line.split()
            numbers = [int(v) for v in values[:8]]
            idle = numbers[3] + numbers[4]
            total = sum(numbers)
            times["all" if name == "cpu" else name[3:]] = ((total - idle) / TICK, total / TICK)
    return times


def busy_fraction(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """How busy each core was between two core_times() readings (0..1)."""
    out = {}
    for name, (busy, total) in after.items():
        b0, t0 = before.get(name, (busy, total))
        out[name] = round((busy - b0) / (total - t0), 3) if total > t0 else 0.0
    return out
