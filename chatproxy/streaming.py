"""SSE framing, opening a stream up to its first delta (so the router can still fall back), and the relay."""

from __future__ import annotations

import json
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx2
import openai
from openai import OpenAI

from .config import Settings
from .cooldowns import Cooldowns
from .errors import ApiError
from .router import (
    Routed,
    Transient,
    UnreadableAnswer,
    content_filtered,
    route,
    upstream_error,
    upstream_params,
    usage_dict,
)
from .schemas import ChatRequest

log = logging.getLogger(__name__)

PING = b": ping\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_END = object()


class Upstream:
    """An open SDK stream and the chunks already read from it (up to and including the first delta)."""

    def __init__(self, stream: Any, head: list[Any]) -> None:
        self.stream = stream
        self.head = head

    def chunks(self) -> Iterator[Any]:
        """The chunks read so far, then the rest of the stream."""
        yield from self.head
        self.head = []
        yield from readable(self.stream)

    def close(self) -> None:
        """Cancel the upstream stream (safe to call more than once)."""
        cancel(self.stream)


def readable(stream: Iterable[Any]) -> Iterator[Any]:
    """A stream's chunks; a chunk the SDK's Stream cannot decode (its json.loads fails) is an UnreadableAnswer.

    Not `yield from`: closing this generator must not close the stream's own iterator.
    """
    chunks = iter(stream)
    while True:
        chunk = next_chunk(chunks)
        if chunk is None:
            return
        yield chunk


def next_chunk(chunks: Iterator[Any]) -> Any | None:
    """The next chunk, None at the end; a chunk that cannot be decoded raises UnreadableAnswer."""
    try:
        return next(chunks, None)
    except ValueError as exc:  # the SDK's Stream decodes each event with json.loads
        raise UnreadableAnswer("a malformed stream chunk") from exc


class Fields(dict):
    """A decoded JSON object whose keys also read as attributes (None when missing), as on the SDK's models."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)


class RawStream:
    """A streamed completion read as raw SSE lines and decoded by json.loads alone, with the SDK's Stream interface.

    The SDK's Stream builds a pydantic object per chunk, the largest per-chunk cost of a stream (see
    BENCHMARKS.md); `with_streaming_response` still gives the SDK's auth, base URL, timeouts and HTTP
    errors. Chunks keep the SDK's names (`chunk.choices[0].delta.content`, `chunk.usage.prompt_tokens`),
    an `error` event raises openai.APIError and a broken read APITimeoutError / APIConnectionError,
    as the SDK does. After `[DONE]`, close() reads the end of the body so the connection goes back to
    the pool (the SDK's sync Stream drops it: a new upstream connection for every stream).
    """

    def __init__(self, response: httpx2.Response) -> None:
        self.response = response
        self.ended = False  # [DONE] was read
        self._lines = response.iter_lines()
        self._chunks = self._read()

    @classmethod
    def open(
        cls, client: OpenAI, params: dict[str, Any], timeout: openai.Timeout, headers: dict[str, str]
    ) -> RawStream:
        """Send the request (an HTTP error raises as with `create`) and return its unread stream."""
        manager = client.chat.completions.with_streaming_response.create(
            **params, timeout=timeout, extra_headers=headers
        )
        return cls(manager.__enter__().http_response)  # closed by close(), as the manager's __exit__ would

    def __iter__(self) -> Iterator[Fields]:
        return self._chunks

    def __next__(self) -> Fields:
        return next(self._chunks)

    def _read(self) -> Iterator[Fields]:
        data: list[str] = []
        while True:
            try:
                line = next(self._lines, None)
            except httpx2.TimeoutException as exc:
                raise openai.APITimeoutError(request=self.response.request) from exc
            except (httpx2.RequestError, ssl.SSLError) as exc:
                raise openai.APIConnectionError(request=self.response.request) from exc
            if line is not None and line.startswith("data:"):
                data.append(line[6:] if line.startswith("data: ") else line[5:])
                continue
            if data and (line is None or not line):  # a blank line (or the body's end) completes an event
                payload, data = "\n".join(data), []
                if payload.startswith("[DONE]"):
                    self.ended = True
                    return
                try:
                    chunk = json.loads(payload, object_hook=Fields)
                except ValueError as exc:
                    raise UnreadableAnswer("a malformed stream chunk") from exc
                if isinstance(chunk, dict) and chunk.get("error"):
                    raise _error_event(chunk["error"], self.response.request)
                if not well_formed(chunk):
                    raise UnreadableAnswer("a stream chunk of the wrong shape")
                yield chunk
            if line is None:
                return

    def close(self) -> None:
        """Close the response; one read to [DONE] first has the rest of its body read, to keep the connection."""
        if self.ended and not self.response.is_closed:
            try:
                for _ in self._lines:
                    pass
            except Exception:
                log.debug("reading the end of a finished upstream stream failed", exc_info=True)
        self.response.close()


def well_formed(chunk: Any) -> bool:
    """Whether a decoded chunk has the shape the relay reads (valid JSON of another shape is an unreadable answer)."""
    if not isinstance(chunk, dict):
        return False
    choices = chunk.get("choices")
    if choices is not None:
        if not isinstance(choices, list):
            return False
        for choice in choices:
            if not isinstance(choice, dict) or not isinstance(choice.get("finish_reason") or "", str):
                return False
            delta = choice.get("delta")
            if delta is not None and not (isinstance(delta, dict) and isinstance(delta.get("content") or "", str)):
                return False
    usage = chunk.get("usage")
    return usage is None or (
        isinstance(usage, dict)
        and isinstance(usage.get("prompt_tokens"), int)
        and isinstance(usage.get("completion_tokens"), int)
    )


def _error_event(error: Any, request: httpx2.Request) -> openai.APIError:
    """The SDK's exception for an `error` event inside a stream."""
    message = error.get("message") if isinstance(error, dict) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return openai.APIError(message=message, request=request, body=error)


def sse(event: dict[str, Any]) -> bytes:
    """One `data:` line; json.dumps escapes every control character, so model text cannot break framing."""
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def error_event(code: str, message: str) -> bytes:
    """The final `error` event of a stream that could not finish."""
    return sse({"type": "error", "code": code, "message": message})


def open_stream(
    client: OpenAI, chat: ChatRequest, settings: Settings, cooldowns: Cooldowns, deadline: float, meter: Any
) -> Routed[Upstream]:
    """Open a stream for the model or a fallback, read up to its first delta, and only then commit to it."""
    once = meter.attempt(
        lambda model: upstream_params(chat, settings, model),
        lambda params, timeout, headers: _open_once(client, params, timeout, headers),
    )
    return route(once, chat.model, settings, cooldowns, deadline)


def _open_once(client: OpenAI, params: dict[str, Any], timeout: openai.Timeout, headers: dict[str, str]) -> Upstream:
    """One attempt: open the stream and read until a chunk carries content or a finish reason."""

    def begun(chunk: Any) -> bool:
        choice = chunk.choices[0] if chunk.choices else None
        if choice is not None and choice.finish_reason == "content_filter":
            raise content_filtered()
        return choice is not None and bool((choice.delta is not None and choice.delta.content) or choice.finish_reason)

    return read_to_first(RawStream.open(client, params, timeout, headers), begun)


def read_to_first(stream: Any, begun: Callable[[Any], bool]) -> Upstream:
    """Read chunks until `begun(chunk)`; the stream is cancelled if that fails (the router may then fall back)."""
    head: list[Any] = []
    try:
        while True:
            chunk = next_chunk(stream)
            if chunk is None:
                raise Transient("the stream ended before the first delta")
            head.append(chunk)
            if begun(chunk):
                return Upstream(stream, head)
    except BaseException:
        cancel(stream)
        raise


def relay(
    routed: Routed[Upstream], keepalive: float, deadline: float, cooldowns: Cooldowns, meter: Any
) -> Iterator[bytes]:
    """Yield start, deltas and done (or a final error) for a committed stream; always close it and meter it."""
    upstream = routed.value
    finish_reason = usage = None
    outcome = "aborted"  # unless the stream reaches its last event: the client went away
    pieces: list[str] = []  # kept only to estimate tokens when the usage chunk never comes
    try:
        yield sse({"type": "start", "model": routed.model, "degraded": routed.degraded})
        for chunk in with_keepalive(upstream.chunks(), keepalive):
            if time.monotonic() > deadline:
                log.warning("stream from %s cut at CHATPROXY_TOTAL_TIMEOUT", routed.model)
                outcome = "upstream_timeout"
                yield error_event("upstream_timeout", "The answer took too long and was cut short. Try again.")
                return
            if chunk is PING:
                yield PING
                continue
            if chunk.usage is not None:
                usage = usage_dict(chunk.usage)
            if chunk.choices:
                choice = chunk.choices[0]
                if choice.delta is not None and choice.delta.content:
                    pieces.append(choice.delta.content)
                    yield sse({"type": "delta", "content": choice.delta.content})
                if choice.finish_reason:
                    finish_reason = choice.finish_reason
        outcome, last = _last_event(finish_reason, usage, routed, cooldowns)
        yield last
    except (openai.APIError, UnreadableAnswer) as exc:
        error = upstream_error(exc) if isinstance(exc, openai.APIError) else _unreadable()
        if error.code != "content_filtered":
            cooldowns.failure(routed.model, counted=True)  # the attempt was counted as answered at its first delta
        outcome = error.code
        yield error_event(error.code, error.message)
    finally:
        upstream.close()
        meter.finish(routed.model, usage, "".join(pieces), outcome, meter.ttft)


def _last_event(
    finish_reason: str | None, usage: dict[str, int] | None, routed: Routed[Upstream], cooldowns: Cooldowns
) -> tuple[str, bytes]:
    """The ledger outcome and `done`, or the `error` that says why the answer is not complete."""
    if finish_reason is None:
        log.warning("upstream stream from %s ended without a finish reason", routed.model)
        cooldowns.failure(routed.model, counted=True)
        return "upstream_truncated", error_event(
            "upstream_truncated", "The model provider cut the answer short. Try again."
        )
    if finish_reason == "content_filter":
        error = content_filtered()
        return error.code, error_event(error.code, error.message)
    return "ok", sse(
        {
            "type": "done",
            "finish_reason": finish_reason,
            "usage": usage,
            "model": routed.model,
            "degraded": routed.degraded,
        }
    )


def _unreadable() -> ApiError:
    """The error for a chunk we cannot read (not JSON, or JSON of the wrong shape)."""
    log.warning("upstream sent a malformed stream chunk")
    return ApiError(502, "upstream_bad_response", "The model provider sent an answer we could not read.")


def cancel(stream: Any) -> None:
    """Close an SDK stream now: shut the socket down so a reader blocked in recv wakes and the upstream sees FIN."""
    if stream.response.is_closed:  # read to the end (or failed): its connection may already serve another call
        return
    if getattr(stream, "ended", False):  # a RawStream read to [DONE]: it reads the body's end, to reuse the connection
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


def with_keepalive(items: Iterable[Any], interval: float) -> Iterator[Any]:
    """Yield items, and PING whenever none arrives for `interval` seconds (0: no pings, no thread)."""
    if interval <= 0:
        yield from items
        return
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
