"""Redis connections with short timeouts and a circuit breaker, one pool per server and process.

Everything chatproxy keeps in Redis degrades without it (rate limits and stream slots count per process,
cooldowns fail open), so a Redis that is down or hangs must cost a request little: each command waits
at most TIMEOUT seconds, and after a connection error or a timeout the pool refuses at once, without
touching the network, for RETRY_SECONDS; then the next command tries again. The rate limiter, stream
slots, cooldowns and /readyz share the pool, so a request waits for a failing Redis at most once.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

TIMEOUT = 0.25  # seconds to connect, and to wait for each reply
RETRY_SECONDS = 5.0  # after a failure, commands fail at once for this long
MAX_CONNECTIONS = 1000  # CHATPROXY_THREADS' maximum: each thread may hold one connection

# Per process, like a database engine's pool (workers build theirs after gunicorn forks), and shared by every
# app in it that names the same server: what the breaker learnt about a server holds for all its users.
_pools: dict[str, redis.ConnectionPool] = {}
_pools_lock = threading.Lock()


class Breaker:
    """Whether a server failed moments ago."""

    def __init__(self) -> None:
        self._closed_until = 0.0

    def check(self) -> None:
        """Raise ConnectionError at once while the server is taken as down."""
        if time.monotonic() < self._closed_until:
            raise redis.ConnectionError("Redis failed moments ago; not tried again yet")

    def failed(self) -> None:
        """The server failed: refuse commands for RETRY_SECONDS."""
        self._closed_until = time.monotonic() + RETRY_SECONDS

    def answered(self) -> None:
        """The server answered."""
        self._closed_until = 0.0


class _Guarded:
    """Mixed into the pool's connection class: the breaker sees every connect and every reply."""

    breaker: Breaker

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        self.breaker.check()  # also for a connected socket: the pool calls connect() before each command
        try:
            return super().connect(*args, **kwargs)  # type: ignore[misc]
        except (redis.ConnectionError, redis.TimeoutError):
            self.breaker.failed()
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            response = super().read_response(*args, **kwargs)  # type: ignore[misc]
        except (redis.ConnectionError, redis.TimeoutError):
            self.breaker.failed()
            raise
        self.breaker.answered()
        return response


def pool(url: str) -> redis.ConnectionPool:
    """This process's pool for `url` (made on first use), for redis.Redis(connection_pool=...) or Flask-Limiter."""
    with _pools_lock:
        found = _pools.get(url)
        if found is None:
            found = redis.ConnectionPool.from_url(
                url, socket_connect_timeout=TIMEOUT, socket_timeout=TIMEOUT, max_connections=MAX_CONNECTIONS
            )
            base = found.connection_class  # Connection, SSLConnection or UnixDomainSocketConnection, by scheme
            found.connection_class = type(f"Guarded{base.__name__}", (_Guarded, base), {"breaker": Breaker()})
            _pools[url] = found
        return found


def client(url: str) -> redis.Redis:
    """A client on this process's pool for `url`."""
    return redis.Redis(connection_pool=pool(url))
