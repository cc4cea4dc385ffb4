"""Test helpers: read an SSE response from a live server the way a frontend would."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Received:
    """What a streaming client saw: status, headers, events with arrival times, and comment lines."""

    status: int
    headers: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    raw: bytes = b""

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        """The events whose `type` is `kind`."""
        return [e for e in self.events if e.get("type") == kind]

    def text(self) -> str:
        """The answer the deltas add up to."""
        return "".join(e["content"] for e in self.of_type("delta"))


def parse_sse(raw: bytes) -> tuple[list[dict[str, Any]], list[str]]:
    """Split raw SSE bytes into JSON events and comment lines."""
    events, comments = [], []
    for block in raw.decode("utf-8").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
            elif line.startswith(":"):
                comments.append(line)
    return events, comments


def post_stream(
    base_url: str,
    body: dict[str, Any],
    *,
    stop_after_deltas: int | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[Received, float | None]:
    """POST and read the SSE body line by line; optionally hang up after N deltas (returns when it hung up)."""
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    conn.request(
        "POST", "/api/chat", body=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})}
    )
    response = conn.getresponse()
    received = Received(response.status, {k.lower(): v for k, v in response.getheaders()})
    hung_up_at = None
    try:
        if not received.headers.get("content-type", "").startswith("text/event-stream"):
            received.raw = response.read()
            return received, None
        while True:
            line = response.readline()
            if not line:
                break
            received.raw += line
            text = line.decode("utf-8").rstrip("\n")
            if text.startswith("data: "):
                received.events.append(json.loads(text[6:]))
                received.times.append(time.time())
                if stop_after_deltas is not None and len(received.of_type("delta")) >= stop_after_deltas:
                    hung_up_at = time.time()
                    break
            elif text.startswith(":"):
                received.comments.append(text)
    finally:
        response.close()
        conn.close()
    return received, hung_up_at
