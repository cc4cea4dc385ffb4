"""The one stream loop: open a stream up to its first output, then relay it with pings, a deadline and metering."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any, Protocol

import openai

from .cooldowns import Cooldowns
from .dialects import Dialect, Tally
from .errors import ApiError
from .metering import Meter
from .router import Routed
from .sse import PING, ClientGone, Event, EventStream, PastDeadline, cancel, with_keepalive
from .upstream import AttemptFailed, UnreadableAnswer, stream_failure

log = logging.getLogger(__name__)


class Upstream:
    """An open upstream stream and the events already read from it (up to and including the first output)."""

    def __init__(self, stream: EventStream, head: list[Event]) -> None:
        self.stream = stream
        self.head = head

    def events(self) -> Iterator[Event]:
        """The events read so far, then the rest of the stream (closing this generator leaves the stream open)."""
        yield from self.head
        self.head = []
        stream = self.stream
        while True:
            event = next(stream, None)
            if event is None:
                return
            yield event

    def close(self) -> None:
        """Cancel the upstream stream (safe to call more than once)."""
        cancel(self.stream)


def read_to_first(stream: EventStream, dialect: Dialect, check: Callable[[Event], None]) -> Upstream:
    """Read until the first output, which `check` may refuse (raising the contract's error); the stream is
    cancelled if anything fails (the router may then fall back)."""
    head: list[Event] = []
    try:
        while True:
            event = next(stream, None)
            if event is None:
                raise AttemptFailed("the stream ended before its first output")
            head.append(event)
            if dialect.begun(event):
                check(event)
                return Upstream(stream, head)
    except BaseException:
        cancel(stream)
        raise


class StreamWriter(Protocol):
    """What a wire adapter writes for a stream: its first bytes, each upstream event, the end, an error."""

    def start(self, routed: Routed[Upstream]) -> bytes:
        """Bytes before the first event (may be empty)."""

    def event(self, event: Event, text: str, routed: Routed[Upstream]) -> bytes:
        """The bytes for one upstream event whose text is `text` (may be empty)."""

    def opened(self, first: Event) -> None:
        """Check the first output before the stream is committed to (raise the contract's error to refuse it)."""

    def done(self, tally: Tally, routed: Routed[Upstream]) -> bytes:
        """The last bytes of an answer the upstream finished (also one it finished as content-filtered)."""

    def error(self, error: ApiError) -> bytes:
        """The last bytes of a stream that could not finish."""


def relay(
    routed: Routed[Upstream],
    dialect: Dialect,
    writer: StreamWriter,
    meter: Meter,
    cooldowns: Cooldowns,
    keepalive: float,
    deadline: float,
    gone: Callable[[], bool] = lambda: False,
    release: Callable[[], None] = lambda: None,
    environ: Mapping[str, Any] | None = None,
) -> Iterator[bytes]:
    """Relay a committed stream through `writer`; it ends complete or with an error, and is always closed and metered.

    A client that goes away is noticed at the next upstream event (`gone`, sse.hangup_probe), or raises
    GeneratorExit at the next yield: the upstream stream is cancelled in `finally` and the attempt is
    recorded as aborted with what it cost so far. The answer is recorded and the request's slots given back
    (`release`) before its last bytes, so a client that asks again as soon as it has them finds them free.
    `environ` lets a threaded server's pings be written from inside the upstream read (sse.with_keepalive).
    """
    upstream, model = routed.value, routed.model
    tally = Tally()
    outcome, last = "aborted", b""  # unless the stream reaches its last event: the client went away
    try:
        outcome, last = yield from _relay(routed, dialect, writer, tally, cooldowns, keepalive, deadline, gone, environ)
    finally:
        upstream.close()
        meter.finish(model, tally.usage, tally.text, outcome, meter.ttft, tally.response_id)
        release()
    if last:
        yield last


def _relay(
    routed: Routed[Upstream],
    dialect: Dialect,
    writer: StreamWriter,
    tally: Tally,
    cooldowns: Cooldowns,
    keepalive: float,
    deadline: float,
    gone: Callable[[], bool],
    environ: Mapping[str, Any] | None,
) -> Generator[bytes, None, tuple[str, bytes]]:
    """Yield all but the last bytes; returns the outcome and the last bytes (the end or an error)."""
    upstream, model = routed.value, routed.model
    events = with_keepalive(upstream.events(), keepalive, upstream.stream, environ, deadline)
    try:
        first = writer.start(routed)
        if first:
            yield first
        for event in events:
            if time.monotonic() > deadline:
                return _past_deadline(model, writer)
            if event is PING:
                yield PING
                continue
            text = dialect.observe(event, tally) or ""  # counted first: the upstream bills it, relayed or not
            if gone():
                return "aborted", b""  # the client hung up
            out = writer.event(event, text, routed)
            if out:
                yield out
        error = dialect.truncated(tally)
        if error is not None:
            log.warning("upstream stream from %s ended without a finish", model)
            cooldowns.failure(model, counted=True)  # the attempt was counted as answered at its first output
            return error.code, writer.error(error)
        outcome = "content_filtered" if tally.finish_reason == "content_filter" else "ok"
        return outcome, writer.done(tally, routed)  # a filtered answer: the writer says so as its format does
    except (openai.APIError, UnreadableAnswer) as exc:
        error = stream_failure(exc) if isinstance(exc, openai.APIError) else _unreadable()
        if error.code != "content_filtered":
            cooldowns.failure(model, counted=True)
        return error.code, writer.error(error)
    except ClientGone:
        return "aborted", b""  # a ping written while the upstream was silent failed
    except PastDeadline:
        return _past_deadline(model, writer)
    finally:
        events.close()  # gives the upstream connection its own read back (sse.IdlePings) before it is closed


def _past_deadline(model: str, writer: StreamWriter) -> tuple[str, bytes]:
    """The end of a stream cut at the request's deadline."""
    log.warning("stream from %s cut at CHATPROXY_TOTAL_TIMEOUT", model)
    error = ApiError(504, "upstream_timeout", "The answer took too long and was cut short. Try again.")
    return error.code, writer.error(error)


def _unreadable() -> ApiError:
    """The error for an event we cannot read (not JSON, or JSON of the wrong shape)."""
    log.warning("upstream sent a malformed stream event")
    return ApiError(502, "upstream_bad_response", "The model provider sent an answer we could not read.")
