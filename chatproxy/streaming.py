"""SSE framing and the generator that relays one upstream stream to one client."""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import openai

from .router import upstream_error, usage_dict

log = logging.getLogger(__name__)

PING = b": ping\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_END = object()


def sse(event: dict[str, Any]) -> bytes:
    """One `data:` line; json.dumps escapes every control character, so model text cannot break framing."""
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def error_event(code: str, message: str) -> bytes:
    """The final `error` event of a stream that could not finish."""
    return sse({"type": "error", "code": code, "message": message})


def relay(stream: Any, model: str, keepalive: float) -> Iterator[bytes]:
    """Yield start, deltas and done (or a final error) for an open SDK stream; always close it."""
    finish_reason = usage = None
    try:
        yield sse({"type": "start", "model": model})
        for chunk in with_keepalive(stream, keepalive):
            if chunk is PING:
                yield PING
                continue
            if chunk.usage is not None:
                usage = usage_dict(chunk.usage)
            if chunk.choices:
                choice = chunk.choices[0]
                if choice.delta is not None and choice.delta.content:
                    yield sse({"type": "delta", "content": choice.delta.content})
                if choice.finish_reason:
                    finish_reason = choice.finish_reason
        if finish_reason is None:
            log.warning("upstream stream ended without a finish reason")
            yield error_event("upstream_truncated", "The model provider cut the answer short. Try again.")
        else:
            yield sse({"type": "done", "finish_reason": finish_reason, "usage": usage, "model": model})
    except openai.APIError as exc:
        error = upstream_error(exc)
        yield error_event(error.code, error.message)
    except ValueError:
        log.warning("upstream sent a malformed stream chunk")
        yield error_event("upstream_bad_response", "The model provider sent an answer we could not read.")
    finally:
        cancel(stream)


def cancel(stream: Any) -> None:
    """Close an SDK stream now: shut the socket down so a reader blocked in recv wakes and the upstream sees FIN."""
    try:
        network = stream.response.extensions.get("network_stream")
        sock = network.get_extra_info("socket") if network is not None else None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - closing a half-dead connection may raise anything; it is closed either way
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
