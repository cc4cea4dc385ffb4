"""A paced fake OpenAI upstream for the benchmarks: asyncio, HTTP/1.1 keep-alive, chunks on an absolute schedule.

    python bench/upstream.py --port 0 --ready-file PATH   # writes the port it listens on to PATH

POST /v1/chat/completions with `"stream": true` answers like api.openai.com: a role chunk at once, the
first delta PACE seconds after the request arrived, then one `chat.completion.chunk` delta every PACE
seconds (delta i is due at t0 + (i + 1) * PACE, whatever happened to the ones before: no drift), then
the finish chunk, the usage chunk and `[DONE]`, chunked transfer encoding, connection kept alive.
Without `stream` it answers the whole completion at once. `max_tokens` caps the deltas (at most DELTAS).

It records, per request, when each delta was due and when it was written, and when the connection
went away; per connection, the request that opened it. The last user message names the request
(`bench:<id>`), so a request can be followed through any proxy. GET /_bench/stats?prefix=P&drop=1
returns (and forgets) the records of requests whose id starts with P, and how many connections
the upstream accepted, by the path letter of their first request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

PACE = 0.020  # seconds to the first delta, then between deltas
DELTAS = 64
# Deltas that exercise JSON escaping on the way through: quotes, backslashes, newlines, non-ASCII,
# astral characters, U+2028 and markup. The same list on both sides: the client checks byte-identity.
_SPECIAL = [
    '"quoted"',
    "back\\slash",
    "new\nline",
    "tab\t",
    " café",
    " 日本語",
    " 😀",
    "\u2028",
    " </script>",
    " {json}",
    " 100%",
    " a+b=c",
]
TOKENS = tuple(_SPECIAL[i // 5] if i % 5 == 4 and i // 5 < len(_SPECIAL) else f" tok{i}" for i in range(DELTAS))
BENCH_ID = re.compile(r"bench:(\S+)")


def expected_text(n: int) -> str:
    """The content a stream of `n` deltas carries."""
    return "".join(TOKENS[:n])


class Stats:
    """What the upstream did: connections accepted, and one record per request."""

    def __init__(self) -> None:
        self.connections: dict[str, int] = {}  # path letter of a connection's first request -> count
        self.request_counts: dict[str, int] = {}  # path letter -> requests answered
        self.requests: dict[str, dict[str, Any]] = {}


STATS = Stats()
_FRAMES: dict[tuple[str, bool], list[bytes]] = {}


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload: dict[str, Any]) -> bytes:
    return _chunked(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


def _frames(model: str, usage_field: bool) -> list[bytes]:
    """The encoded role chunk, DELTAS delta chunks and finish chunk for `model` (cached: the upstream stays cheap)."""
    key = (model, usage_field)
    if key not in _FRAMES:
        base: dict[str, Any] = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_bench",
        }
        extra = {"usage": None} if usage_field else {}

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            return _event(
                {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            )

        _FRAMES[key] = [
            chunk({"role": "assistant", "content": "", "refusal": None}, None),
            *(chunk({"content": token}, None) for token in TOKENS),
            chunk({}, "stop"),
        ]
    return _FRAMES[key]


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


class Upstream(asyncio.Protocol):
    """One client connection: HTTP/1.1 requests one after another, streams paced by loop.call_at."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.first: str | None = None  # id of the first request on this connection
        self.record: dict[str, Any] | None = None  # the stream in progress
        self.timers: list[asyncio.TimerHandle] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.record is None:  # one request at a time; a pipelined one waits for the stream to end
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
            length = int(headers.get("content-length") or 0)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            method, target = head[0].split(" ")[:2]
            self.handle(method, target, body)

    def eof_received(self) -> bool:
        return False  # close: a proxy that hangs up mid-stream has cancelled it

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self.timers:
            timer.cancel()
        if self.record is not None:
            self.record["closed_at"] = time.monotonic()
            self.record = None

    def handle(self, method: str, target: str, body: bytes) -> None:
        """Answer one request."""
        url = urlsplit(target)
        if method == "GET" and url.path == "/_bench/stats":
            self.reply(200, json.dumps(_stats(parse_qs(url.query))).encode())
        elif method == "POST" and url.path.endswith("/chat/completions"):
            self.completion(json.loads(body))
        else:
            self.reply(404, b'{"error": {"message": "not found", "type": "invalid_request_error"}}')

    def reply(self, status: int, data: bytes) -> None:
        """A whole JSON answer, connection kept alive."""
        assert self.transport is not None
        reason = {200: "OK", 404: "Not Found"}.get(status, "OK")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, reason.encode(), len(data), data)
        )

    def completion(self, body: dict[str, Any]) -> None:
        """A chat completion, streamed or whole."""
        now = time.monotonic()
        last = next((m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
        found = BENCH_ID.search(last if isinstance(last, str) else "")
        request_id = found.group(1) if found else f"?{now}"
        if self.first is None:
            self.first = request_id
            STATS.connections[request_id[:1]] = STATS.connections.get(request_id[:1], 0) + 1
        STATS.request_counts[request_id[:1]] = STATS.request_counts.get(request_id[:1], 0) + 1
        n = max(1, min(DELTAS, int(body.get("max_tokens") or body.get("max_completion_tokens") or DELTAS)))
        model = str(body.get("model") or "gpt-4o-mini")
        prompt = sum(len(str(m.get("content", ""))) // 4 + 4 for m in body.get("messages", [])) + 3
        record: dict[str, Any] = {
            "t0": now,
            "n": n,
            "stream": bool(body.get("stream")),
            "due": [],
            "sent": [],
            "closed_at": None,
            "finished": False,
        }
        STATS.requests[request_id] = record
        if not body.get("stream"):
            text = expected_text(n)
            completion = {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": "fp_bench",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": _usage(prompt, n),
            }
            self.reply(200, json.dumps(completion).encode())
            record["finished"] = True
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        frames = _frames(model, include_usage)
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n" + frames[0]
        )
        self.record = record
        loop = asyncio.get_running_loop()
        self.timers = [
            loop.call_at(now + (i + 1) * PACE, self.delta, record, frames[i + 1], now + (i + 1) * PACE)
            for i in range(n)
        ]
        tail = frames[-1]
        if include_usage:
            tail += _event(
                {
                    "id": "chatcmpl-bench",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "system_fingerprint": "fp_bench",
                    "choices": [],
                    "usage": _usage(prompt, n),
                }
            )
        tail += _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        self.timers.append(loop.call_at(now + (n + 1) * PACE, self.finish, record, tail))

    def delta(self, record: dict[str, Any], frame: bytes, due: float) -> None:
        """Write one delta (its time is recorded only if the connection is still there)."""
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(frame)
        record["due"].append(due)
        record["sent"].append(time.monotonic())

    def finish(self, record: dict[str, Any], tail: bytes) -> None:
        """The finish and usage chunks, [DONE], the end of the body; the connection may serve the next request."""
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(tail)
        record["finished"] = True
        self.record = None
        self.timers = []
        if self.buffer:
            self.data_received(b"")


def _stats(query: dict[str, list[str]]) -> dict[str, Any]:
    prefix = query.get("prefix", [""])[0]
    chosen = {k: v for k, v in STATS.requests.items() if k.startswith(prefix)}
    if query.get("drop", ["0"])[0] == "1":
        for key in chosen:
            del STATS.requests[key]
    times = os.times()
    return {
        "connections": STATS.connections,
        "request_counts": STATS.request_counts,
        "requests": chosen,
        "cpu_seconds": times.user + times.system,
    }


async def serve(host: str, port: int, ready_file: str | None) -> None:
    """Listen until killed."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, host, port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    if ready_file:
        with open(ready_file + ".tmp", "w", encoding="ascii") as out:
            out.write(str(bound))
        os.replace(ready_file + ".tmp", ready_file)
    print(f"bench upstream on http://{host}:{bound}/v1", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Parse arguments and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.ready_file))


if __name__ == "__main__":
    main()
