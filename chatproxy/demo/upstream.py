"""A loopback fake of the OpenAI API (Chat Completions, Responses, embeddings), with scriptable faults.

One implementation serves the tests, the offline demo (`make run` and the command
line without a key) and the soak. It is a real HTTP server: the `openai` SDK talks
to it over TCP exactly as it talks to api.openai.com. Its Files and Batch endpoints
are in batches.py; what its answers say is in answers.py (responses.py: Responses and embeddings).

    fake = FakeOpenAI().start()
    fake.script(Reply(status=429, headers={"retry-after-ms": "10"}), Reply())
    ...  # point OPENAI_BASE_URL at fake.base_url
    fake.calls  # every request received, in order
    fake.stop()
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import responses as wire
from .answers import (
    answer_for,
    completion,
    count_tokens,
    parameter_error,
    prompt_tokens,
    reasoning_tokens,
    tool_calls_for,
    usage,
)
from .batches import FakeBatchAPI, Route, batch_routes


@dataclass
class Reply:
    """How the fake answers one call; every field has a harmless default."""

    status: int = 200
    content: str | None = None  # default: an echo of the last user message
    chunks: list[str] | None = None  # stream deltas; default: `content` split into words
    # (Responses: finish_reason "length" or "content_filter" ends `incomplete`, "failed" ends `response.failed`)
    headers: dict[str, str] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # error body for status >= 400
    delay: float = 0.0  # seconds before the status line
    pace: float = 0.0  # seconds between stream chunks
    first_chunk_delay: float = 0.0  # seconds before the first delta
    drop_after: int | None = None  # stream: close the connection after N deltas
    malformed_after: int | None = None  # stream: send a broken data line after N deltas
    malformed: bytes = b"{not json"  # what that line carries (also valid JSON of the wrong shape)
    error_after: int | None = None  # stream: send a `data: {"error": ...}` event (from `error`) after N deltas
    stall_after: int | None = None  # stream: stop sending for `stall` seconds after N deltas
    stall: float = 0.0
    reset: bool = False  # close the connection without any response
    finish_reason: str = "stop"
    model: str | None = None  # answer as this model (default: the one asked for)
    refusal: str | None = None  # a structured-output refusal instead of content
    tool_calls: list[dict[str, Any]] | None = None  # answer with these; default: call a tool when `tools` are offered
    cached_tokens: int = 0  # report this many of the prompt's tokens as cached (billed at the cached rate)
    omit_usage: bool = False  # stream: no usage chunk even when asked (llama.cpp's server ignores include_usage)


@dataclass
class Call:
    """One request the fake received, and what happened to it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    received_at: float
    chunk_times: list[float] = field(default_factory=list)  # when each delta was written
    finished: bool = False
    disconnected_at: float | None = None  # when the fake saw the client close mid-stream
    prompt_tokens: int = 0
    completion_tokens: int = 0  # the answer's; reasoning tokens are on top
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    @property
    def model(self) -> str | None:
        """The model the caller asked for."""
        return self.body.get("model") if isinstance(self.body, dict) else None

    @property
    def deployment(self) -> str | None:
        """The Azure deployment in the path (/openai/deployments/{name}/...), None for OpenAI paths."""
        match = AZURE_PATH.match(self.path)
        return match.group(1) if match else None

    @property
    def api_version(self) -> str | None:
        """The Azure `api-version` query parameter."""
        return (parse_qs(urlsplit(self.path).query).get("api-version") or [None])[0]

    @property
    def stream(self) -> bool:
        """Whether the caller asked for a stream."""
        return isinstance(self.body, dict) and bool(self.body.get("stream"))


AZURE_PATH = re.compile(r"^/openai/deployments/([^/?]+)/chat/completions(?:\?|$)")


class FakeOpenAI:
    """A threaded HTTP server speaking the Chat Completions wire format."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, demo: bool = False, default: Reply | None = None
    ) -> None:
        self.calls: list[Call] = []
        self.demo = demo
        self.default = default or Reply(pace=0.03 if demo else 0.0)
        self._script: list[Reply] = []
        self._per_model: dict[str, Reply] = {}
        self.stored: dict[str, dict[str, Any]] = {}  # responses created with store (the default, as OpenAI's)
        self.batch_api = FakeBatchAPI(demo)
        self.routes: list[Route] = batch_routes(self.batch_api)  # endpoints besides /chat/completions and /models
        self._lock = threading.Lock()
        self._server = _Server((host, port), _make_handler(self))
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The URL to give the SDK as `base_url`."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAI:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next calls, in order; then the default applies."""
        with self._lock:
            self._script.extend(replies)

    def for_model(self, model: str, reply: Reply | None) -> None:
        """Answer every call for `model` with `reply` (None removes the rule)."""
        with self._lock:
            if reply is None:
                self._per_model.pop(model, None)
            else:
                self._per_model[model] = reply

    def reset(self) -> None:
        """Forget calls, scripts, per-model rules, stored responses, files and batches."""
        with self._lock:
            self.calls.clear()
            self._script.clear()
            self._per_model.clear()
            self.stored.clear()
        with self.batch_api.lock:
            self.batch_api.files.clear()
            self.batch_api.batches.clear()

    def responses_calls(self) -> list[Call]:
        """The calls made to POST /responses."""
        return [c for c in self.calls if c.method == "POST" and c.path.split("?")[0].endswith("/responses")]

    def chat_calls(self) -> list[Call]:
        """The calls made to /chat/completions."""
        return [c for c in self.calls if c.path.split("?")[0].endswith("/chat/completions")]

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        """Poll until `predicate()` is true or `timeout` passes."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.01)
        return bool(predicate())

    def _next_reply(self, body: Any) -> Reply:
        with self._lock:
            model = body.get("model") if isinstance(body, dict) else None
            if model in self._per_model:
                return self._per_model[model]
            if self._script:
                return self._script.pop(0)
            return self.default


class _Server(ThreadingHTTPServer):
    """One thread per connection, and a listen backlog like a real server's (socketserver's default is 5,
    which drops connections when many arrive at once: in the soak they failed before any request)."""

    daemon_threads = True
    request_queue_size = 1024


def _make_handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK wait

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _route(self, raw: bytes) -> bool:
            path = self.path.split("?")[0]
            for method, pattern, handler in fake.routes:
                match = pattern.fullmatch(path)
                if method == self.command and match:
                    call = self._record(raw)
                    handler(self, match, raw)
                    call.finished = True
                    return True
            return False

        def do_DELETE(self) -> None:
            if self._route(b""):
                return
            call = self._record(None)
            response_id = self._stored_id()
            if response_id is not None:
                fake.stored.pop(response_id)
                self._json(200, {"id": response_id, "object": "response", "deleted": True})
            else:
                self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            call.finished = True

        def _stored_id(self) -> str | None:
            """The id of a stored response this path names (/responses/{id}), if the fake keeps it."""
            match = re.fullmatch(r".*/responses/([^/?]+)", self.path.split("?")[0])
            return match.group(1) if match and match.group(1) in fake.stored else None

        def do_GET(self) -> None:
            if self._route(b""):
                return
            call = self._record(None)
            response_id = self._stored_id()
            if response_id is not None:
                self._json(200, fake.stored[response_id])
            elif self.path.rstrip("/").endswith("/models"):
                data = [{"id": m, "object": "model", "owned_by": "fake"} for m in ("gpt-4o", "gpt-4o-mini")]
                self._json(200, {"object": "list", "data": data})
            else:
                self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            call.finished = True

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self._route(raw):
                return
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            call = self._record(body)
            path = self.path.split("?")[0]
            if isinstance(body, dict) and path.endswith(("/responses", "/embeddings")):
                self._other_api(call, body, path)
                return
            if not path.endswith("/chat/completions") or not isinstance(body, dict):
                self._json(404, {"error": {"message": "unknown route", "type": "invalid_request_error"}})
                return
            if call.deployment is not None:
                if not call.api_version:
                    self._json(404, {"error": {"code": "404", "message": "Resource not found"}})
                    call.finished = True
                    return
                body = {**body, "model": call.deployment}
            self.azure = call.deployment is not None
            reply = fake._next_reply(body)
            if reply.delay:
                time.sleep(reply.delay)
            if reply.reset:
                self._reset()
                return
            if reply.status >= 400:
                error = reply.error or {"message": f"fake error {reply.status}", "type": "server_error"}
                self._json(reply.status, {"error": error}, reply.headers)
                call.finished = True
                return
            refused = parameter_error(body)
            if refused is not None:  # as the real API does, before anything is generated (and billed)
                self._json(400, {"error": refused})
                call.finished = True
                return
            text = reply.content if reply.content is not None else answer_for(body, fake.demo)
            call.prompt_tokens = prompt_tokens(body)
            call.reasoning_tokens = reasoning_tokens(body)
            call.cached_tokens = min(reply.cached_tokens, call.prompt_tokens)
            tools = reply.tool_calls if reply.tool_calls is not None else tool_calls_for(body)
            if tools and reply.finish_reason == "stop":
                reply = dataclasses.replace(reply, finish_reason="tool_calls")
            if body.get("stream"):
                self._stream(call, body, reply, text, tools)
            else:
                call.completion_tokens = count_tokens(json.dumps(tools) if tools else text)
                answer = completion(
                    body,
                    text,
                    usage(call.prompt_tokens, call.completion_tokens, call.cached_tokens, call.reasoning_tokens),
                    model=reply.model,
                    refusal=reply.refusal,
                    finish_reason=reply.finish_reason,
                    tools=tools,
                )
                if self.azure:
                    answer["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": {}}]
                self._json(200, answer, reply.headers)
                call.finished = True

        def _other_api(self, call: Call, body: dict[str, Any], path: str) -> None:
            """POST /responses and /embeddings, with the same scripted faults as chat completions."""
            reply = fake._next_reply(body)
            if reply.delay:
                time.sleep(reply.delay)
            if reply.reset:
                self._reset()
                return
            if reply.status >= 400:
                error = reply.error or {"message": f"fake error {reply.status}", "type": "server_error"}
                self._json(reply.status, {"error": error}, reply.headers)
            elif path.endswith("/embeddings"):
                inputs = body.get("input")
                texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
                call.prompt_tokens = sum(count_tokens(str(text)) for text in texts)
                self._json(200, wire.embeddings(body, call.prompt_tokens), reply.headers)
            else:
                self._response(call, body, reply)
            call.finished = call.finished or not body.get("stream")

        def _response(self, call: Call, body: dict[str, Any], reply: Reply) -> None:
            """A Responses answer: the response object, or its stream of events."""
            refused = wire.request_error(body)
            previous = body.get("previous_response_id")
            if refused is None and previous is not None and previous not in fake.stored:
                refused = {
                    "message": f"Previous response with id '{previous}' not found.",
                    "type": "invalid_request_error",
                    "param": "previous_response_id",
                    "code": "previous_response_not_found",
                }
            if refused is not None:
                self._json(400, {"error": refused})
                return
            chat = wire.as_chat(body)
            text = reply.content if reply.content is not None else answer_for(chat, fake.demo)
            call.prompt_tokens = prompt_tokens(chat)
            if previous is not None:  # the earlier conversation is read again, and billed as input
                call.prompt_tokens += fake.stored[previous]["usage"]["total_tokens"]
            call.reasoning_tokens = reasoning_tokens(chat)
            call.cached_tokens = min(reply.cached_tokens, call.prompt_tokens)
            tools = reply.tool_calls if reply.tool_calls is not None else tool_calls_for(chat)
            response_id = wire.new_id("resp")
            if body.get("stream"):
                self._response_stream(call, body, reply, response_id, text, tools)
                return
            call.completion_tokens = count_tokens(json.dumps(tools) if tools else text)
            if tools:
                output = [wire.function_call_item(wire.new_id("fc"), tool) for tool in tools]
            else:
                output = [wire.message_item(wire.new_id("msg"), text)]
            summary = wire.summary_for(body, chat, call.reasoning_tokens)
            if summary is not None:
                output.insert(0, wire.reasoning_item(wire.new_id("rs"), summary))
            counts = wire.usage(call.prompt_tokens, call.completion_tokens, call.cached_tokens, call.reasoning_tokens)
            status = wire.status_for(reply.finish_reason)
            answer = wire.response_object(
                response_id,
                body,
                output,
                status=status,
                counts=counts,
                model=reply.model,
                finish_reason=reply.finish_reason,
            )
            if body.get("store", True):
                fake.stored[response_id] = answer
            self._json(200, answer, reply.headers)

        def _response_stream(
            self,
            call: Call,
            body: dict[str, Any],
            reply: Reply,
            response_id: str,
            text: str,
            tools: list[dict[str, Any]] | None,
        ) -> None:
            """The semantic events of one response, with the scripted faults between its deltas."""
            self._open_stream(reply, "text/event-stream; charset=utf-8")
            created = int(time.time())
            sequence = iter(range(1_000_000))

            def send(kind: str, *, count: bool = False, **fields: Any) -> None:
                payload = wire.event(kind, **fields, sequence_number=next(sequence))
                self._write(call, wire.encoded(payload))
                if count:
                    call.chunk_times.append(time.time())

            def snapshot(status: str, output: list[dict[str, Any]], counts: Any = None) -> dict[str, Any]:
                return wire.response_object(
                    response_id,
                    body,
                    output,
                    status=status,
                    counts=counts,
                    model=reply.model,
                    created_at=created,
                    finish_reason=reply.finish_reason,
                )

            if tools:
                item_id = wire.new_id("fc")
                item = wire.function_call_item(item_id, tools[0])
                arguments = item["arguments"]
                pieces: list[str] = [arguments[i : i + 8] for i in range(0, len(arguments), 8)]
                started = {**item, "arguments": "", "status": "in_progress"}
                delta_kind = "response.function_call_arguments.delta"
            else:
                item_id = wire.new_id("msg")
                pieces = reply.chunks if reply.chunks is not None else _split(text)
                item = wire.message_item(item_id, "".join(pieces))
                started = {**item, "status": "in_progress", "content": []}
                delta_kind = "response.output_text.delta"
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            summary = wire.summary_for(body, wire.as_chat(body), call.reasoning_tokens)
            index = 0 if summary is None else 1  # a reasoning summary comes first
            where: dict[str, Any] = {"item_id": item_id, "output_index": index}
            done: list[dict[str, Any]] = []
            try:
                send("response.created", response=snapshot("in_progress", []))
                send("response.in_progress", response=snapshot("in_progress", []))
                if summary is not None:
                    thought = wire.reasoning_item(wire.new_id("rs"), summary)
                    at = {"item_id": thought["id"], "output_index": 0, "summary_index": 0}
                    send("response.output_item.added", output_index=0, item={**thought, "summary": []})
                    send("response.reasoning_summary_part.added", **at, part={"type": "summary_text", "text": ""})
                    for piece in _split(summary):
                        send("response.reasoning_summary_text.delta", **at, delta=piece)
                    send("response.reasoning_summary_text.done", **at, text=summary)
                    send("response.reasoning_summary_part.done", **at, part={"type": "summary_text", "text": summary})
                    send("response.output_item.done", output_index=0, item=thought)
                    done.append(thought)
                send("response.output_item.added", output_index=index, item=started)
                if not tools:
                    where["content_index"] = 0
                    send("response.content_part.added", **where, part=part)
                if reply.first_chunk_delay:
                    time.sleep(reply.first_chunk_delay)
                for i, piece in enumerate(pieces):
                    if i and reply.pace:
                        time.sleep(reply.pace)
                    if reply.drop_after is not None and i == reply.drop_after:
                        return
                    if reply.malformed_after is not None and i == reply.malformed_after:
                        self._write(call, b"event: " + delta_kind.encode() + b"\ndata: " + reply.malformed + b"\n\n")
                        return
                    if reply.error_after is not None and i == reply.error_after:
                        error = reply.error or {"message": "fake stream error", "code": "server_error"}
                        send("error", code=error.get("code"), message=error.get("message"), param=None)
                        return
                    if reply.stall_after is not None and i == reply.stall_after:
                        self._stall(call, reply.stall)
                    extra = {} if tools else {"logprobs": []}
                    send(delta_kind, count=True, **where, delta=piece, **extra)
                    call.completion_tokens += 1
                if tools:
                    send("response.function_call_arguments.done", **where, name=item["name"], arguments=arguments)
                else:
                    done_text = item["content"][0]["text"]
                    send("response.output_text.done", **where, text=done_text, logprobs=[])
                    send("response.content_part.done", **where, part={**part, "text": done_text})
                send("response.output_item.done", output_index=index, item=item)
                status = wire.status_for(reply.finish_reason)
                counts = wire.usage(
                    call.prompt_tokens, call.completion_tokens, call.cached_tokens, call.reasoning_tokens
                )
                final = snapshot(status, [*done, item], None if reply.omit_usage else counts)
                if body.get("store", True):
                    fake.stored[response_id] = {**final, "usage": counts}
                send(f"response.{status}", response=final)
                call.finished = True
            except (BrokenPipeError, ConnectionResetError, OSError):
                return

        def _record(self, body: Any) -> Call:
            call = Call(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
            with fake._lock:
                fake.calls.append(call)
            return call

        def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _reset(self) -> None:
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.close()

        def _open_stream(self, reply: Reply, content_type: str) -> None:
            """The headers of an event stream (and the reply's scripted ones); the connection closes after it."""
            self.send_response(200)
            self.send_header("content-type", content_type)
            self.send_header("cache-control", "no-cache")
            self.send_header("connection", "close")
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.close_connection = True

        def _stream(
            self, call: Call, body: dict, reply: Reply, text: str, tools: list[dict[str, Any]] | None = None
        ) -> None:
            self._open_stream(reply, "text/event-stream")
            model = reply.model or body.get("model")
            chunks: list[Any] = reply.chunks if reply.chunks is not None else _split(text)
            if tools:
                chunks = _tool_deltas(tools)
            base = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
            }
            try:
                if self.azure:  # Azure's first chunk: prompt filter results, no choices, no model
                    self._send(
                        call,
                        {
                            "id": "",
                            "object": "",
                            "created": 0,
                            "model": "",
                            "choices": [],
                            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
                        },
                        count=False,
                    )
                self._send(
                    call,
                    {
                        **base,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                    },
                    count=False,
                )
                if reply.first_chunk_delay:
                    time.sleep(reply.first_chunk_delay)
                for i, piece in enumerate(chunks):
                    if i and reply.pace:
                        time.sleep(reply.pace)
                    if reply.drop_after is not None and i == reply.drop_after:
                        return
                    if reply.malformed_after is not None and i == reply.malformed_after:
                        self._write(call, b"data: " + reply.malformed + b"\n\n")
                        return
                    if reply.error_after is not None and i == reply.error_after:
                        error = reply.error or {"message": "fake stream error", "type": "server_error"}
                        self._write(call, b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
                        return
                    if reply.stall_after is not None and i == reply.stall_after:
                        self._stall(call, reply.stall)
                    delta = piece if isinstance(piece, dict) else {"content": piece}
                    self._send(call, {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                    call.completion_tokens += 1
                self._send(
                    call,
                    {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}]},
                    count=False,
                )
                if (body.get("stream_options") or {}).get("include_usage") and not reply.omit_usage:
                    self._send(
                        call,
                        {
                            **base,
                            "choices": [],
                            "usage": usage(
                                call.prompt_tokens, call.completion_tokens, call.cached_tokens, call.reasoning_tokens
                            ),
                        },
                        count=False,
                    )
                self._write(call, b"data: [DONE]\n\n")
                call.finished = True
            except (BrokenPipeError, ConnectionResetError, OSError):
                return

        def _stall(self, call: Call, seconds: float) -> None:
            """Send nothing for `seconds`, watching the connection as a server's TCP stack would: a client that
            closes it ends the stall (raised as the next write would)."""
            until = time.monotonic() + seconds
            while (left := until - time.monotonic()) > 0:
                time.sleep(min(left, 0.05))
                try:
                    _peer_closed(self.connection)
                except OSError:
                    call.disconnected_at = time.time()
                    raise

        def _send(self, call: Call, payload: dict, count: bool = True) -> None:
            self._write(call, b"data: " + json.dumps(payload).encode() + b"\n\n")
            if count:
                call.chunk_times.append(time.time())

        def _write(self, call: Call, data: bytes) -> None:
            try:
                self.wfile.write(data)
                self.wfile.flush()
                _peer_closed(self.connection)
            except OSError:
                call.disconnected_at = time.time()
                raise

    return Handler


class Blackhole:
    """A loopback port whose accept queue is full, so a connect hangs until the client's connect timeout.

    with Blackhole() as hole:  # OPENAI_BASE_URL=hole.base_url
        ...
    """

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)
        self._fillers = [self._fill() for _ in range(3)]  # never accepted: the kernel drops further SYNs

    def _fill(self) -> socket.socket:
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(self._listener.getsockname())
        return filler

    @property
    def base_url(self) -> str:
        """A base URL nobody will answer."""
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        """Release the port."""
        for sock in (*self._fillers, self._listener):
            sock.close()

    def __enter__(self) -> Blackhole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _peer_closed(sock: socket.socket) -> None:
    """Raise ConnectionResetError when the peer has closed its end (FIN or RST)."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return
    except OSError as exc:
        raise ConnectionResetError from exc
    if data == b"":
        raise ConnectionResetError


def _split(text: str) -> list[str]:
    """Split text into word-sized deltas that join back to the exact text."""
    pieces, start = [], 0
    for i, ch in enumerate(text):
        if ch == " " and i > start:
            pieces.append(text[start:i])
            start = i
    pieces.append(text[start:])
    return [p for p in pieces if p]


def _tool_deltas(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stream deltas for tool calls: the id and name first, then the arguments in pieces."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(tools):
        function = call["function"]
        deltas.append(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": function["name"], "arguments": ""},
                    }
                ]
            }
        )
        arguments = function["arguments"]
        deltas.extend(
            {"tool_calls": [{"index": index, "function": {"arguments": arguments[i : i + 8]}}]}
            for i in range(0, len(arguments), 8)
        )
    return deltas


def main() -> None:
    """Run the fake standalone: `python -m chatproxy.demo.upstream --port 8081`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--demo", action="store_true", help="pace the words like a real model")
    args = parser.parse_args()
    fake = FakeOpenAI(args.host, args.port, demo=args.demo)
    print(f"fake OpenAI upstream on {fake.base_url}", flush=True)
    fake._server.serve_forever()


if __name__ == "__main__":
    main()
