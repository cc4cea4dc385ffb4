"""Server-sent events: the one reader of upstream streams (bytes, orjson), framing, keep-alive pings, hang-ups."""

from __future__ import annotations

import _socket
import json
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import httpcore2
import httpx2
import openai
import orjson

from .upstream import UnreadableAnswer

log = logging.getLogger(__name__)

PING = b": ping\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_END = object()


def data(event: Any) -> bytes:
    """One `data:` event. JSON escapes every control character, so model text cannot break the framing.

    orjson encodes a delta event in about a tenth of json.dumps's time (0.6 against 5.6 us; decoding an upstream
    chunk: 2 against 7 us). What it refuses (a lone surrogate an upstream may send, an integer past 64 bits)
    goes through json.dumps's ASCII-only output instead, which always encodes.
    """
    try:
        encoded = orjson.dumps(event)
    except TypeError:
        encoded = json.dumps(event, separators=(",", ":")).encode()
    return b"data: " + encoded + b"\n\n"


def named(name: str, event: Any) -> bytes:
    """One event with an `event:` line, as the Responses API sends them."""
    return b"event: " + name.encode() + b"\n" + data(event)


class Event(dict):
    """A decoded event: the JSON object of its `data:` lines, and its `event:` name (None when it has none)."""

    __slots__ = ("name",)

    def __init__(self, name: str | None, fields: dict[str, Any]) -> None:
        super().__init__(fields)
        self.name = name


class EventStream:
    """An upstream SSE body read as bytes and decoded by orjson alone: no SDK model per event.

    The SDK's Stream builds a pydantic object per chunk, the largest per-chunk cost of a stream
    (BENCHMARKS.md), and httpx's iter_lines adds four generator layers and a text decoder per network read.
    This reads the response's byte stream itself (content-decoded by httpx only when the upstream compressed
    it), splits lines in bytes and hands orjson bytes. It keeps the SDK's auth, base URL, timeouts and HTTP
    errors, and raises what the SDK raises: APITimeoutError / APIConnectionError for a broken read; an event
    that is not a JSON object is an UnreadableAnswer. The stream ends at `data: [DONE]` or at the body's end.
    After a complete read, close() drains the body so the connection goes back to the pool (the SDK's
    sync Stream drops it: a new upstream connection for every stream).
    """

    def __init__(self, response: httpx2.Response) -> None:
        self.response = response
        self.ended = False  # read to [DONE] or to the body's end
        plain = response.headers.get("content-encoding", "identity").strip().lower() in ("", "identity")
        self._pieces = iter(response.stream) if plain else response.iter_bytes()
        self._events = self._read()

    def __iter__(self) -> Iterator[Event]:
        return self._events

    def __next__(self) -> Event:
        return next(self._events)

    def _read(self) -> Iterator[Event]:
        name: str | None = None
        lines: list[bytes] = []
        rest = b""
        pieces = self._pieces
        while True:
            try:
                piece = next(pieces, None)
            except httpx2.TimeoutException as exc:
                raise openai.APITimeoutError(request=self.response.request) from exc
            except (httpx2.RequestError, ssl.SSLError) as exc:
                raise openai.APIConnectionError(request=self.response.request) from exc
            if piece is None:
                complete, rest = [rest, b""] if rest else [], b""
            else:
                rest += piece
                if b"\r" in rest:  # CRLF or CR line ends; a CR at the end may be half of a CRLF still to come
                    held = rest.endswith(b"\r")
                    rest = rest[:-1] if held else rest
                    rest = rest.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if held else b"")
                *complete, rest = rest.split(b"\n")
            for line in complete:
                if line:
                    if line.startswith(b"data:"):
                        lines.append(line[6:] if line.startswith(b"data: ") else line[5:])
                    elif line.startswith(b"event:"):
                        name = line[6:].strip().decode("utf-8", "replace")
                    continue  # comments (": ping") and other fields are skipped
                if lines:  # a blank line completes an event
                    payload, lines = b"\n".join(lines), []
                    if payload.startswith(b"[DONE]"):
                        self.ended = True
                        return
                    yield Event(name, _decode(payload))
                    name = None
            if piece is None:
                if lines:  # the body's end completes an event too
                    payload = b"\n".join(lines)
                    if not payload.startswith(b"[DONE]"):
                        yield Event(name, _decode(payload))
                self.ended = True
                return

    def close(self) -> None:
        """Close the response; a stream read to its end has the rest of its body read, to keep the connection."""
        if self.ended and not self.response.is_closed:
            try:
                for _ in self._pieces:
                    pass
            except Exception:
                log.debug("reading the end of a finished upstream stream failed", exc_info=True)
        self.response.close()


def _decode(payload: bytes) -> dict[str, Any]:
    try:
        fields = orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:  # what orjson refuses but Python reads (a lone surrogate escape, NaN, bad UTF-8), as the SDK reads it
            fields = json.loads(payload.decode("utf-8", "replace"))
        except ValueError as exc:
            raise UnreadableAnswer("a malformed stream event") from exc
    if not isinstance(fields, dict):
        raise UnreadableAnswer("a stream event that is not a JSON object")
    return fields


def cancel(stream: EventStream) -> None:
    """Close a stream now: shut the socket down so a reader blocked in recv wakes and the upstream sees FIN."""
    if stream.response.is_closed:  # read to the end (or failed): its connection may already serve another call
        return
    if stream.ended:  # read to its end: drain the body instead, to reuse the connection
        stream.close()
        return
    try:
        network = stream.response.extensions.get("network_stream")
        sock = network.get_extra_info("socket") if network is not None else None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass
    try:
        stream.close()
    except Exception:
        log.debug("closing the upstream stream raised", exc_info=True)


def hangup_probe(environ: Mapping[str, Any]) -> Callable[[], bool]:
    """A check whether the client has hung up: its socket reads as end-of-file (one peek that never waits).

    Without it a hang-up shows only when a write fails, and the first write after it still succeeds (the
    kernel buffers it): two more upstream chunks read and paid for. With it, at most one. gunicorn hands the
    client socket over as `gunicorn.socket`; gevent's wraps the OS one (`_sock`), whose peek fails at once
    instead of waiting. Elsewhere (TLS in gunicorn, another server) nothing is checked: writes still notice.
    A client that shuts down its sending side while it still reads counts as gone; HTTP clients and nginx
    keep both sides open until they are done.
    """
    sock = environ.get("gunicorn.socket")
    sock = getattr(sock, "_sock", sock)
    if not isinstance(sock, _socket.socket) or isinstance(sock, ssl.SSLSocket):  # the OS socket (gevent patches socket)
        return _never
    peek = sock.recv
    flags = socket.MSG_PEEK | socket.MSG_DONTWAIT

    def gone() -> bool:
        try:
            return not peek(1, flags)  # b"": the client closed; a byte: its next request, pipelined
        except BlockingIOError:
            return False  # nothing to read: still there
        except OSError:
            return True  # reset

    return gone


def _never() -> bool:
    return False


WRITE = "chatproxy.write"  # environ key: the server's write callable (PEP 3333), kept by expose_write


def expose_write(wsgi_app: Callable[..., Any]) -> Callable[..., Any]:
    """WSGI middleware that keeps start_response's write callable in the environ, for pings written mid-read."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        def keep(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], Any]:
            write = start_response(status, headers, exc_info)
            environ[WRITE] = write
            return write

        return wsgi_app(environ, keep)

    return app


class ClientGone(Exception):
    """Raised from inside an upstream read (IdlePings): a ping could not be written, the client hung up."""


class PastDeadline(Exception):
    """Raised from inside an upstream read (IdlePings): the upstream stayed silent past the request's deadline."""


def with_keepalive(
    items: Iterable[Any],
    interval: float,
    stream: EventStream | None = None,
    environ: Mapping[str, Any] | None = None,
    deadline: float = float("inf"),
) -> Iterator[Any]:
    """Yield items, and ping whenever none arrives for `interval` seconds (0: no pings, no thread).

    Under a server that gave us its write callable (gunicorn's gthread and gevent workers, werkzeug's server)
    the ping is written from inside the upstream read itself (idle_pings: no thread or greenlet per stream);
    elsewhere (the test client, TLS through a proxy) a pump thread (a greenlet under gevent) and a queue.
    """
    if interval <= 0:
        yield from items
        return
    pings = idle_pings(stream, interval, environ, deadline) if stream is not None and environ is not None else None
    if pings is not None:
        try:
            yield from items
        finally:
            pings.remove()
        return
    yield from _threaded_keepalive(items, interval)


def idle_pings(stream: EventStream, interval: float, environ: Mapping[str, Any], deadline: float) -> IdlePings | None:
    """IdlePings on this stream's upstream connection, where the server's write works mid-answer (gunicorn,
    werkzeug's server; not the test client) and the connection is a socket's stream (not TLS in TLS)."""
    write = environ.get(WRITE)
    network = stream.response.extensions.get("network_stream")
    served = "gunicorn.socket" in environ or "werkzeug.socket" in environ
    if write is None or not served or type(network).__name__ != "SyncStream":
        return None
    return IdlePings(network, interval, write, deadline)


class IdlePings:
    """Ping from inside the upstream read: read with a timeout of `interval`, write a ping on each timeout.

    The handler thread (or greenlet) is the one blocked in the read and the one that writes the answer, so a
    ping written there through the server's write callable cannot interleave with a chunk. A socket read
    that times out has consumed nothing, so the read is simply tried again; it costs nothing per chunk that
    a read with the connection's own timeout does not (CPython polls the socket before each timed read).
    The read keeps its own timeout overall; a write that fails raises ClientGone, a silence past `deadline`
    PastDeadline (both end the read).
    """

    def __init__(self, network: Any, interval: float, write: Callable[[bytes], Any], deadline: float) -> None:
        self.network, self.interval, self.write, self.deadline = network, interval, write, deadline
        self.read = network.read
        network.read = self._read  # this connection's reads, until remove()

    def _read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        limit = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if limit is None else limit - time.monotonic()
            if left is not None and left <= self.interval:
                return self.read(max_bytes, max(left, 0.001))  # the connection's own timeout, as it was
            try:
                return self.read(max_bytes, self.interval)
            except httpcore2.ReadTimeout:
                pass
            if time.monotonic() > self.deadline:
                raise PastDeadline
            try:
                self.write(PING)
            except OSError as exc:
                raise ClientGone from exc

    def remove(self) -> None:
        """Give the connection its own read back (before it returns to the pool)."""
        self.network.__dict__.pop("read", None)


def _threaded_keepalive(items: Iterable[Any], interval: float) -> Iterator[Any]:
    """with_keepalive with a pump thread reading `items` and a queue the consumer waits on with a timeout."""
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    stopped = threading.Event()

    def pump() -> None:
        try:
            for item in items:
                if stopped.is_set():
                    return
                inbox.put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
            inbox.put(_Raised(exc))
        finally:
            inbox.put(_END)

    threading.Thread(target=pump, name="sse-pump", daemon=True).start()
    try:
        while True:
            try:
                item = inbox.get(timeout=interval)
            except queue.Empty:
                yield PING
                continue
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stopped.set()


class _Raised:
    """An exception carried from the pump thread to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
