"""gunicorn settings for chatproxy: `gunicorn -c gunicorn.conf.py` (see docs/deploy.md).

Workers, their class and size, bind address and graceful timeout come from chatproxy's settings (the
environment, then `.env`): CHATPROXY_WORKERS, CHATPROXY_WORKER_CLASS, CHATPROXY_THREADS, CHATPROXY_BIND,
CHATPROXY_GRACEFUL_TIMEOUT.
Command-line flags still win over this file. Every setting is checked here, before gunicorn binds or
forks: a bad one stops it naming the variable; on a reload it is refused and the previous settings stay.
"""

from __future__ import annotations

import atexit
import gc
import importlib.util
import ipaddress
import json
import logging
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from gunicorn import glogging
from gunicorn.workers.gthread import ThreadWorker

ROOT = Path(__file__).resolve().parent
METRICS_TMP_PREFIX = "chatproxy-metrics-"

# Prometheus multiprocess mode: every worker writes its samples to files in this directory and /metrics
# sums them, so a scrape answered by any one worker counts the requests of all of them. It must be set
# before anything imports prometheus_client (chatproxy does), which picks its storage at import time.
# Kept across a config reload (SIGHUP re-reads this file); emptied when the master starts.
# A directory made here is removed when this process (the master) exits, even after a failed start.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=METRICS_TMP_PREFIX)
    _master = os.getpid()  # workers exit through sys.exit too: only the master may remove it
    atexit.register(
        lambda directory=os.environ["PROMETHEUS_MULTIPROC_DIR"]: (
            os.getpid() == _master and shutil.rmtree(directory, ignore_errors=True)
        )
    )

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _settings_module() -> Any:
    """chatproxy/config.py loaded on its own, under a private name.

    The master must not import the chatproxy package (nor Flask or the SDK, which it imports): workers
    fork from the master, so whatever it imported they would run, and `systemctl reload` (HUP) would
    start workers with the old code. config.py needs only the standard library and python-dotenv.
    """
    spec = importlib.util.spec_from_file_location("_chatproxy_settings", ROOT / "chatproxy" / "config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


_config = _settings_module()
SETTINGS, raw_settings = _config.SETTINGS, _config.raw_settings
SECRET_KEY_RECIPE = "python3 -c 'import secrets; print(secrets.token_hex(32))'"  # noqa: S105 - how to make a key, not a key


def _secret_key_problem(workers: int, secret_key: str) -> str | None:
    """Several workers need one shared CHATPROXY_SECRET_KEY: each would otherwise sign sessions with its own."""
    if workers <= 1 or secret_key.strip():
        return None
    return (
        f"CHATPROXY_SECRET_KEY is not set, so each of the {workers} workers would sign page sessions with "
        f"its own random key and the chat page would fail (401) whenever a message reaches another worker. "
        f"Set CHATPROXY_SECRET_KEY to a long random value, made with: {SECRET_KEY_RECIPE} "
        f"(or set CHATPROXY_WORKERS=1)."
    )


def _check(raw: dict[str, str]) -> str | None:
    """The first problem with `raw`: every setting as create_app() checks it (the model table and retired models
    included), then the deployment rules. Runs in the child process of _first_problem, which may import chatproxy."""
    from chatproxy.config import SettingsError
    from chatproxy.startup import check

    try:
        settings = check(raw)[0]
    except SettingsError as exc:
        return str(exc)
    workers = next(s for s in SETTINGS if s.name == "CHATPROXY_WORKERS").parse(raw["CHATPROXY_WORKERS"])
    return _secret_key_problem(workers, settings.secret_key)


def _first_problem(raw: dict[str, str]) -> str | None:
    """`_check(raw)` run in a short-lived child process, so that the master never forks a worker it must refuse.

    In a child because validation imports what the parsers need (`limits`, for rate strings), and what
    the master imports its workers inherit instead of loading afresh: after an upgrade, `systemctl reload`
    would give new workers old packages.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            message = _check(raw) or ""
        except BaseException as exc:  # noqa: BLE001 - whatever happens, the child reports and exits
            message = f"the settings could not be checked ({type(exc).__name__})"
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message or None


# The settings are checked before gunicorn binds or forks anything: a bad value stops gunicorn with one line
# naming the variable (exit 1), instead of workers that fail one after another while the master holds the port.
# On a reload (SIGHUP re-reads this file and .env) a bad value is refused instead: the error is logged and
# gunicorn keeps the settings it had. Workers get exactly the checked values (post_fork below), also when one
# is replaced later. This module object outlives reloads; a fresh one means gunicorn is starting.
_state = sys.modules.setdefault("_chatproxy_master", ModuleType("_chatproxy_master"))
_raw = raw_settings(ROOT / ".env")
_problem = _first_problem(_raw)
if _problem and not hasattr(_state, "raw"):
    raise SystemExit(f"chatproxy: {_problem}")
if _problem:
    logging.getLogger("gunicorn.error").error(
        "chatproxy: reload refused, still serving with the previous settings: %s", _problem
    )
    _raw = _state.raw
_state.raw = _raw


def _setting(name: str):
    """One of chatproxy's deployment settings, parsed (from values checked above)."""
    return next(s for s in SETTINGS if s.name == name).parse(_raw[name])


wsgi_app = "wsgi:app"
bind = [_setting("CHATPROXY_BIND")]


class GracefulThreadWorker(ThreadWorker):
    """gunicorn's gthread worker, which also closes its copy of the listening socket when it stops.

    On SIGTERM the master closes its copy, but each worker keeps one while it drains for up to
    graceful_timeout, so the kernel would keep accepting connections nobody serves (nginx would wait
    on them, then get a reset). Once every stopping worker has closed its copy, new connections are
    refused at once. On a reload (SIGHUP) or a worker restart the master keeps its copy: nothing changes.
    """

    def set_accept_enabled(self, enabled: bool) -> None:
        """Stop (or start) accepting; when stopping for good, let go of the listening sockets too."""
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()


# Each worker serves CHATPROXY_THREADS requests at once, and an open stream holds one of them for its whole
# life, so workers x CHATPROXY_THREADS is how many answers can stream at the same time. gthread (the default):
# each is an OS thread; gevent: each is a greenlet, a few KiB, and a chunk's bytes move without handing the GIL
# between OS threads. docs/deploy.md compares them.
WORKER_CLASS = _setting("CHATPROXY_WORKER_CLASS")
workers = _setting("CHATPROXY_WORKERS")
if WORKER_CLASS == "gevent":
    # gunicorn's gevent worker patches the standard library (gevent.monkey.patch_all) in the worker, after the
    # fork and before it loads the app, so nothing that must be patched may be imported by this file (it imports
    # neither chatproxy nor Flask nor the SDK). Once patched, psycopg 3 (3.1.14+) waits on gevent's hub by itself,
    # redis-py, httpx and the SQLAlchemy pools' locks are gevent's, and nothing needs patching beyond the standard
    # library (else: a gevent.events.GeventDidPatchBuiltinModulesEvent subscriber here, as Dify does for psycopg2
    # and gRPC). On SIGTERM the gevent worker closes its own listening sockets.
    worker_class = "gevent"
    worker_connections = _setting("CHATPROXY_THREADS")
else:
    worker_class = GracefulThreadWorker
    threads = _setting("CHATPROXY_THREADS")

# No preload: create_app() runs in each worker after the fork, so every worker builds its own OpenAI
# client (one per process, reused by all its threads) and its own Redis and database connections.
# A client created in the master and inherited through fork() would share sockets between processes.
preload_app = False


def post_fork(server, worker) -> None:
    """Give the new worker the settings the master checked: create_app() reads them from the environment."""
    os.environ.update(_raw)


def post_worker_init(worker) -> None:
    """Put what start-up built out of the cyclic garbage collector's reach (after the app is loaded)."""
    # A full collection walks every tracked object holding the GIL: with Flask, the SDK and pydantic
    # loaded (~135,000 objects) that took ~65 ms on the bench machine, a pause of every stream in the
    # worker (gaps over 2x the upstream's pace; BENCHMARKS.md). Start-up objects live as long as the
    # worker, so frozen they cost nothing; a full pass then walks ~5,000 objects (under 1 ms).
    from chatproxy.logs import JsonFormatter  # the worker's own, loaded with the app

    for name in ("", "gunicorn.error", "gunicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(JsonFormatter())
    gc.freeze()


# With gthread the worker timeout is a heartbeat, not a request deadline: the worker's main loop
# reports to the master every second while its threads serve requests, so a stream that runs for
# minutes is not killed by it (a sync worker would be). It only catches a worker that hangs as a whole.
# Long upstream calls are bounded by CHATPROXY_READ_TIMEOUT and CHATPROXY_TOTAL_TIMEOUT instead.
timeout = 30
# On SIGTERM (systemctl stop, deploys) workers stop accepting and give in-flight requests, streams
# included, this long to finish before they are killed; as long as CHATPROXY_TOTAL_TIMEOUT by default.
graceful_timeout = _setting("CHATPROXY_GRACEFUL_TIMEOUT")
# Longer than nginx's upstream keepalive_timeout (60 s), so nginx, not gunicorn, closes idle pooled
# connections: a connection gunicorn closed just as nginx reuses it would be a 502.
keepalive = 75

# Proxies whose X-Forwarded-Proto gunicorn believes (nginx on this host). The client IP the app uses
# for rate limits comes from ProxyFix, set up by CHATPROXY_TRUSTED_PROXIES.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

# No gunicornc control socket: systemd owns start, stop and reload, and several instances (tests, a
# second site) would otherwise compete for the one default path under $HOME or $XDG_RUNTIME_DIR.
control_socket_disable = True


class JsonAccessLogger(glogging.Logger):
    """gunicorn's logger, with each access line as JSON fields instead of Apache's format."""

    def access(self, resp, req, environ, request_time) -> None:
        """Log one answered request: method, path, status, bytes, duration, client, our and the client's request ids."""
        if not self.access_log_enabled:
            return
        try:
            status = str(resp.status).split(None, 1)[0]
            headers = resp.headers.items() if hasattr(resp.headers, "items") else resp.headers
            request_id = next((v for k, v in headers if k.lower() == "x-request-id"), None)
            self.access_log.info(
                "%s %s %s",
                environ.get("REQUEST_METHOD"),
                environ.get("PATH_INFO"),
                status,
                extra={
                    "method": environ.get("REQUEST_METHOD"),
                    "path": environ.get("PATH_INFO"),
                    "status": int(status) if status.isdigit() else status,
                    "bytes": getattr(resp, "sent", None),
                    "duration_ms": round(request_time.total_seconds() * 1000, 1),
                    "remote_addr": environ.get("REMOTE_ADDR"),
                    "forwarded_for": environ.get("HTTP_X_FORWARDED_FOR"),
                    "user_agent": environ.get("HTTP_USER_AGENT"),
                    "request_id": request_id,
                    "client_request_id": (environ.get("HTTP_X_REQUEST_ID") or "")[:64] or None,
                },
            )
        except Exception:  # noqa: BLE001 - a bad access line must not fail the request
            self.exception("could not write the access log line")


class MasterJsonFormatter(logging.Formatter):
    """The master's own lines, in the fields chatproxy.logs.JsonFormatter writes (workers switch to that one)."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line."""
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
            "request_id": None,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


logger_class = JsonAccessLogger
accesslog = "-"  # stdout, as JSON lines (the handler below replaces gunicorn's plain one)
loglevel = "info"
# gunicorn's error log, the app's own loggers (the root) and the access log all write JSON lines.
# Workers format with chatproxy.logs.JsonFormatter (set in post_worker_init), which redacts once more after
# chatproxy's log-record factory; the master's own lines (gunicorn's) use MasterJsonFormatter.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": MasterJsonFormatter}},
    "handlers": {
        "stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"},
        "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"},
    },
    "root": {"level": "INFO", "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["stdout"], "propagate": False},
        **{name: {"level": "WARNING"} for name in ("httpx2", "httpx", "httpcore")},
    },
}


def _clear_metrics(directory: str) -> None:
    for entry in Path(directory).glob("*.db"):
        entry.unlink(missing_ok=True)


def on_starting(server) -> None:
    """Refuse several workers without a shared secret key (`-w` may override CHATPROXY_WORKERS); empty the metrics."""
    problem = _secret_key_problem(server.cfg.workers, _raw["CHATPROXY_SECRET_KEY"])
    if problem:
        raise SystemExit(f"chatproxy: {problem}")
    _warn_if_exposed(server)
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    Path(directory).mkdir(parents=True, exist_ok=True)
    _clear_metrics(directory)


def _warn_if_exposed(server) -> None:
    """Say so when gunicorn listens beyond loopback while the app believes X-Forwarded-For."""
    if not _setting("CHATPROXY_TRUSTED_PROXIES"):
        return
    for address in server.cfg.address:
        if not isinstance(address, tuple):
            continue  # a unix socket: only local processes reach it
        try:
            loopback = ipaddress.ip_address(address[0]).is_loopback
        except ValueError:
            loopback = address[0] == "localhost"
        if not loopback:
            server.log.warning(
                "chatproxy: listening on %s with CHATPROXY_TRUSTED_PROXIES set: anyone who reaches "
                "gunicorn directly chooses the client IP that rate limits and /metrics see. Bind to "
                "127.0.0.1 behind nginx, or let only your proxy reach this port.",
                address[0],
            )


def child_exit(server, worker) -> None:
    """Let prometheus-client drop a dead worker's live gauges; its counters stay in the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """Remove the metrics directory if this file made it (also when gunicorn daemonized)."""
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if directory.parent == Path(tempfile.gettempdir()) and directory.name.startswith(METRICS_TMP_PREFIX):
        shutil.rmtree(directory, ignore_errors=True)
