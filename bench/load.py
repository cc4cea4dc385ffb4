"""The load client: HTTP/1.1 over asyncio protocols, a timestamp on every read, SSE parsed as it arrives.

One client for every path, so the only thing that changes between paths is what sits between it and
the upstream. A path speaks either the OpenAI wire format (direct, nginx alone) or chatproxy's
(`/api/chat`, `{"type": "delta"}` events). Every request has a timeout; every loop a count and a deadline.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

OPENAI, CHATPROXY = "openai", "chatproxy"
REQUEST_TIMEOUT = 15.0  # seconds for one whole request (a paced stream takes ~1.3 s)


@dataclass(frozen=True)
class Path:
    """Where the load goes and which wire format comes back."""

    letter: str  # also the first character of every bench id sent along it
    name: str
    port: int
    kind: str  # OPENAI or CHATPROXY
    token: str = ""  # the bearer token (OPENAI paths without one send a dummy key)

    def request(self, bench_id: str, n: int, stream: bool) -> bytes:
        """The raw HTTP request for one chat call of `n` deltas."""
        if self.kind == OPENAI:
            body: dict[str, Any] = {
                "model": "gpt-4o-mini",
                "max_tokens": n,
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"bench:{bench_id}"},
                ],
            }
            if stream:
                body.update(stream=True, stream_options={"include_usage": True})
            target, auth = "/v1/chat/completions", f"Bearer {self.token or 'sk-bench'}"
        else:
            body = {"messages": [{"role": "user", "content": f"bench:{bench_id}"}], "max_tokens": n, "stream": stream}
            target, auth = "/api/chat", f"Bearer {self.token}"
        data = json.dumps(body).encode()
        return (
            f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
            f"Authorization: {auth}\r\nAccept: text/event-stream\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode() + data


@dataclass
class Result:
    """What the client saw of one request."""

    bench_id: str
    started: float
    status: int = 0
    first: float | None = None  # time of the first delta
    times: list[float] = field(default_factory=list)  # arrival of each delta
    pieces: list[str] = field(default_factory=list)
    done: bool = False  # the stream's proper end ([DONE] / a `done` event), or a whole JSON reply
    ended: float | None = None
    error: str | None = None
    pings: int = 0
    aborted_at: float | None = None
    body: bytes = b""

    @property
    def content(self) -> str:
        """The deltas joined."""
        return "".join(self.pieces)


class _Exchange:
    """One response being parsed: head, then a chunked / sized / until-close body, then SSE events."""

    def __init__(
        self, kind: str, stream: bool, result: Result, future: asyncio.Future, abort_after: int | None, conn: Connection
    ) -> None:
        self.kind, self.stream, self.result, self.future = kind, stream, result, future
        self.abort_after, self.conn = abort_after, conn
        self.buffer = b""
        self.state = "head"
        self.remaining = 0
        self.sse = b""
        self.keep_alive = True

    def feed(self, data: bytes, now: float) -> None:
        self.buffer += data
        while not self.future.done():
            if self.state == "head":
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = self.buffer[:end].decode("latin-1").split("\r\n")
                self.buffer = self.buffer[end + 4 :]
                self.result.status = int(lines[0].split(" ")[1])
                headers = {k.strip().lower(): v.strip().lower() for k, _, v in (x.partition(":") for x in lines[1:])}
                self.keep_alive = headers.get("connection") != "close"
                if headers.get("transfer-encoding") == "chunked":
                    self.state = "size"
                elif "content-length" in headers:
                    self.state, self.remaining = "sized", int(headers["content-length"])
                    if self.remaining == 0:
                        return self.finish(now)
                else:
                    self.state, self.keep_alive = "eof", False
            elif self.state == "size":
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(self.buffer[:end].split(b";")[0], 16)
                self.buffer = self.buffer[end + 2 :]
                if size == 0:
                    return self.finish(now)
                self.state, self.remaining = "chunk", size
            elif self.state == "chunk":
                if len(self.buffer) < self.remaining + 2:
                    return
                body, self.buffer = self.buffer[: self.remaining], self.buffer[self.remaining + 2 :]
                self.state = "size"
                self.body(body, now)
            elif self.state == "sized":
                body, self.buffer = self.buffer[: self.remaining], self.buffer[self.remaining :]
                self.remaining -= len(body)
                self.body(body, now)
                if self.remaining == 0:
                    return self.finish(now)
                return
            else:  # eof: everything until the connection closes
                body, self.buffer = self.buffer, b""
                self.body(body, now)
                return

    def body(self, data: bytes, now: float) -> None:
        if not self.stream or self.result.status != 200:
            self.result.body += data
            return
        self.sse += data
        while not self.future.done():
            end = self.sse.find(b"\n\n")
            if end < 0:
                return
            event, self.sse = self.sse[:end], self.sse[end + 2 :]
            self.event(event, now)

    def event(self, event: bytes, now: float) -> None:
        result = self.result
        for line in event.split(b"\n"):
            if line.startswith(b":"):
                result.pings += 1
                continue
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if self.kind == OPENAI:
                if data == b"[DONE]":
                    result.done = True
                    continue
                choices = json.loads(data).get("choices") or [{}]
                piece = (choices[0].get("delta") or {}).get("content")
            else:
                payload = json.loads(data)
                kind = payload.get("type")
                if kind == "done":
                    result.done = True
                elif kind == "error":
                    result.error = f"error event: {payload.get('code')}"
                piece = payload.get("content") if kind == "delta" else None
            if piece:
                if result.first is None:
                    result.first = now
                result.times.append(now)
                result.pieces.append(piece)
                if self.abort_after is not None and len(result.times) >= self.abort_after:
                    result.aborted_at = time.monotonic()
                    self.conn.close()
                    self.future.set_result(result)
                    return

    def finish(self, now: float) -> None:
        if self.future.done():
            return
        self.result.ended = now
        if not self.stream and self.result.status == 200:
            reply = json.loads(self.result.body)
            content = reply["choices"][0]["message"]["content"] if self.kind == OPENAI else reply["content"]
            self.result.pieces.append(content)
            self.result.done = True
        if self.result.status != 200 and self.result.error is None:
            self.result.error = f"HTTP {self.result.status}: {self.result.body[:200]!r}"
        if not self.keep_alive:
            self.conn.close()
        self.future.set_result(self.result)

    def eof(self, now: float) -> None:
        if self.future.done():
            return
        if self.state == "eof":
            self.keep_alive = False
            self.finish(now)
            return
        self.result.error = self.result.error or "connection closed mid-response"
        self.result.ended = now
        self.future.set_result(self.result)


class Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    connects = 0  # connections this client opened (all paths)

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.closed = False

    @classmethod
    async def open(cls, port: int) -> Connection:
        """Connect to 127.0.0.1:port."""
        cls.connects += 1
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(cls, "127.0.0.1", port), timeout=5)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.feed(data, time.monotonic())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.exchange is not None:
            self.exchange.eof(time.monotonic())

    def close(self) -> None:
        """Hang up (a FIN, as a browser's stop button would)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def call(self, path: Path, bench_id: str, n: int, stream: bool, abort_after: int | None = None) -> Result:
        """Send one request and wait (bounded) for its whole response, or for `abort_after` deltas."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        result = Result(bench_id, time.monotonic())
        self.exchange = _Exchange(path.kind, stream, result, future, abort_after, self)
        assert self.transport is not None
        self.transport.write(path.request(bench_id, n, stream))
        try:
            return await asyncio.wait_for(future, timeout=REQUEST_TIMEOUT)
        except TimeoutError:
            result.error = "timed out"
            self.close()
            return result
        finally:
            self.exchange = None


class Slot:
    """A client that reuses its connection, reconnecting when the server closed it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: Connection | None = None

    async def call(self, bench_id: str, n: int, stream: bool, abort_after: int | None = None) -> Result:
        """One request over the slot's connection."""
        if self.conn is None or self.conn.closed:
            try:
                self.conn = await Connection.open(self.path.port)
            except (TimeoutError, OSError) as exc:
                return Result(bench_id, time.monotonic(), error=f"connect failed: {type(exc).__name__}")
        return await self.conn.call(self.path, bench_id, n, stream, abort_after)

    def close(self) -> None:
        """Hang up."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
