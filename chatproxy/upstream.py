"""The upstream: the app's one OpenAI (or Azure OpenAI) client, and what its failures mean for us.

A failed attempt is either AttemptFailed (the router may retry it, then fall back: timeouts, connection
errors, 408/409/429/5xx, an answer we cannot read) or final, raised as the client-safe ApiError
(401/403 from the upstream, other 4xx, content filtered, context too long). A request that fails before
it is sent (NotSent) says nothing about the model at all.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import httpx2
import openai
from openai import AzureOpenAI, OpenAI

from .config import Settings
from .errors import ApiError
from .strict import json_problem

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx
DEFAULT_RETRY_AFTER = 5  # seconds, told to the client when nothing better is known


class AttemptFailed(Exception):
    """An attempt that failed for a reason another attempt may not meet: retry the model (if `retryable`), then
    fall back to the next one."""

    def __init__(self, reason: str, *, retry_after: float | None = None, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.retryable = retryable


class UnreadableAnswer(AttemptFailed):
    """The upstream answered, but not in a form we can read (invalid JSON, a chunk of the wrong shape)."""


class NotSent(Exception):
    """An attempt that failed before its request went out (it could not be built or recorded).

    It says nothing about the model: never retried, never a fallback, never counted by the cooldowns.
    The router raises `error`, the client's answer (400/503, or 500 for our own bug).
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(type(error).__name__)
        self.error = error


def make_client(settings: Settings) -> OpenAI:
    """Create the app's one client (Azure OpenAI when configured): explicit timeouts, no SDK retries."""
    timeout = openai.Timeout(settings.read_timeout, connect=settings.connect_timeout)
    if settings.azure_endpoint:
        return AzureOpenAI(
            azure_endpoint=settings.azure_endpoint,
            api_key=settings.azure_api_key,
            api_version=settings.azure_api_version,
            timeout=timeout,
            max_retries=0,
        )
    return OpenAI(api_key=settings.openai_api_key, base_url=settings.openai_base_url, timeout=timeout, max_retries=0)


def upstream_model(model: str, settings: Settings) -> str:
    """The name to send upstream for an allowlisted model: its Azure deployment in Azure mode, else itself."""
    return dict(settings.azure_deployments).get(model, model)


def key_setting(settings: Settings) -> tuple[str, str]:
    """The variable holding the upstream key in use, and the key."""
    if settings.azure_endpoint:
        return "AZURE_OPENAI_API_KEY", settings.azure_api_key
    return "OPENAI_API_KEY", settings.openai_api_key


def encode(params: dict[str, Any]) -> bytes:
    """The request body as strict JSON in UTF-8; what fails is our bug, as the edge admits only strict JSON:
    a 500 before any ledger row, never an upstream failure."""
    try:
        return json.dumps(params, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:
        log.error(
            "cannot encode the upstream request (%s): %s",
            type(exc).__name__,
            json_problem(params) or "a value JSON cannot carry",
        )
        raise ApiError(500, "internal_error", "Something went wrong on our side. Try again.") from exc


def send(
    client: OpenAI,
    path: str,
    body: bytes,
    *,
    deployment: str | None,
    stream: bool,
    timeout: openai.Timeout,
    headers: dict[str, str],
) -> httpx2.Response:
    """POST an encoded body through the SDK's client (its auth, base URL, timeouts and error types), unparsed.

    The body is encoded once by us (`encode`), so the SDK's per-request transform is skipped. A stream's body
    is left unread; an HTTP error raises the SDK's APIStatusError, a broken connection APIConnectionError.
    In Azure mode the deployment goes into the path, as the SDK would put it (/openai/deployments/{name}/...).
    """
    if deployment is not None:
        path = f"/deployments/{deployment}{path}"
    return client.post(
        path,
        cast_to=httpx2.Response,
        content=body,
        options={"headers": {"Content-Type": "application/json", **headers}, "timeout": timeout},
        stream=stream,
    )


def as_failure(exc: Exception, settings: Settings) -> AttemptFailed:
    """A retryable failure as AttemptFailed; anything final raises the client-safe ApiError."""
    if isinstance(exc, AttemptFailed):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return AttemptFailed("timed out")
    if isinstance(exc, openai.APIConnectionError):
        return AttemptFailed(f"connection failed ({type(exc.__cause__ or exc).__name__})")
    if isinstance(exc, openai.APIStatusError):
        return _status_failure(exc, settings)
    if isinstance(exc, openai.APIError):  # an `error` event inside a stream
        if exc.code == "content_filter":
            raise content_filtered()
        return AttemptFailed(f"error event in the stream (code {exc.code})")
    raise exc  # our own bug, not the upstream's: no retry, no cooldown


def _status_failure(exc: openai.APIStatusError, settings: Settings) -> AttemptFailed:
    status, code = exc.status_code, exc.code
    if status < 500 and code == "context_length_exceeded":
        raise ApiError(
            400, "context_length_exceeded", "The conversation is too long for the model. Shorten it or start a new one."
        )
    if status < 500 and code == "content_filter":
        raise content_filtered()
    if status in (401, 403):
        name, key = key_setting(settings)
        log.error(
            "UPSTREAM REJECTED OUR API KEY %s (HTTP %s, upstream request id %s): check %s",
            mask_key(key),
            status,
            exc.request_id,
            name,
        )
        raise ApiError(502, "upstream_auth_failed", "The proxy is misconfigured. The operator has been told.")
    should_retry = exc.response.headers.get("x-should-retry")
    if status in RETRY_STATUSES or status >= 500 or should_retry == "true":
        return AttemptFailed(
            f"HTTP {status} (upstream request id {exc.request_id})",
            retry_after=retry_after(exc.response.headers),
            retryable=should_retry != "false",
        )
    log.warning("upstream refused the request: HTTP %s, code %s (upstream request id %s)", status, code, exc.request_id)
    raise ApiError(502, "upstream_rejected", "The model provider refused the request.")


def content_filtered() -> ApiError:
    """The error for an answer or prompt the provider's content filter stopped."""
    return ApiError(400, "content_filtered", "The model provider's content filter blocked this conversation.")


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the upstream asks us to wait: `retry-after-ms`, then `Retry-After` (seconds or an HTTP date)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            parsed = email.utils.parsedate_tz(value) if name == "retry-after" else None
            if parsed is None:
                continue
            seconds = email.utils.mktime_tz(parsed) - time.time()
        return max(0.0, seconds) if math.isfinite(seconds) else None
    return None


def mask_key(key: str) -> str:
    """Enough of a key to tell which one it is, never enough to use it."""
    return f"{key[:3]}...{key[-4:]}" if len(key) >= 20 else "(hidden)"


def stream_failure(exc: Exception) -> ApiError:
    """Map a failure after a stream has started to a client-safe error; details are only logged."""
    if isinstance(exc, openai.APITimeoutError):
        log.warning("upstream stream timed out")
        return ApiError(504, "upstream_timeout", "The model provider took too long to answer. Try again.")
    if isinstance(exc, openai.APIConnectionError):
        log.warning("upstream stream broke: %s", type(exc.__cause__ or exc).__name__)
        return ApiError(502, "upstream_unreachable", "The model provider could not be reached. Try again later.")
    if isinstance(exc, openai.APIError) and exc.code == "content_filter":
        return content_filtered()
    log.warning("upstream stream failed: %s (code %s)", type(exc).__name__, getattr(exc, "code", None))
    return ApiError(502, "upstream_error", "The model provider failed to answer. Try again.")
