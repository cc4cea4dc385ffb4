"""The upstream side: one OpenAI client per app, and the router that retries, falls back and honours cooldowns.

Retries live here and only here: the SDK client is built with max_retries=0. The router sees
every attempt, so it can keep one deadline per request (CHATPROXY_TOTAL_TIMEOUT), refuse to sleep
through a long Retry-After (it falls back to the next model instead), count failures per model
for the cooldowns, and tell the client which model answered. Two retry layers would multiply
(SDK retries x router retries x models) and hide attempts from all of that.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import openai
from openai import AzureOpenAI, OpenAI

from . import metrics
from .config import Settings
from .cooldowns import Cooldowns, Gate
from .errors import ApiError
from .schemas import ChatRequest, json_problem

log = logging.getLogger(__name__)

T = TypeVar("T")
MODEL_HEADER = "X-Chatproxy-Model"
RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx
BACKOFF_BASE = 0.5  # seconds before the first retry (then doubling, capped by CHATPROXY_RETRY_MAX_WAIT)
DEFAULT_RETRY_AFTER = 5  # seconds, told to the client when nothing better is known


@dataclass(frozen=True)
class Routed(Generic[T]):
    """What an attempt returned, the model that answered, and whether it was a fallback."""

    value: T
    model: str
    degraded: bool


class Transient(Exception):
    """A failed attempt that another attempt may not repeat: retry it, then fall back."""

    def __init__(self, reason: str, *, retry_after: float | None = None, retry: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.retry = retry


class UnreadableAnswer(Transient):
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
        # The SDK puts each call's `model` (our deployment name) into /openai/deployments/{model}/... itself.
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


def upstream_params(chat: ChatRequest, settings: Settings, model: str | None = None) -> dict[str, Any]:
    """The Chat Completions arguments: our system prompt first, then the client's turns."""
    params: dict[str, Any] = {
        "model": upstream_model(model or chat.model, settings),
        "messages": [{"role": "system", "content": chat.system_prompt or settings.system_prompt}, *chat.messages],
        "max_tokens": chat.max_tokens,
    }
    if chat.temperature is not None:
        params["temperature"] = chat.temperature
    if chat.response_format is not None:
        params["response_format"] = chat.response_format
        if chat.response_format["type"] == "json_object" and not _mentions_json(params["messages"]):
            # OpenAI refuses JSON mode unless a message asks for JSON; say it in our system message.
            system = params["messages"][0]["content"]
            params["messages"][0] = {"role": "system", "content": f"{system}\n\nReply with a JSON object."}
    if chat.stream:
        params["stream"] = True
        params["stream_options"] = {"include_usage": True}
    return params


def _mentions_json(messages: list[dict[str, str]]) -> bool:
    return any("json" in message["content"].lower() for message in messages)


def check_sendable(params: dict[str, Any]) -> None:
    """Encode the request as the SDK will (strict JSON, UTF-8); what fails is our bug, as the edge admits only
    strict JSON: a 500 before any ledger row, never an upstream failure."""
    try:
        json.dumps(params, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:
        log.error(
            "cannot encode the upstream request (%s): %s",
            type(exc).__name__,
            json_problem(params) or "a value JSON cannot carry",
        )
        raise ApiError(500, "internal_error", "Something went wrong on our side. Try again.") from exc


_FAILED: Any = object()  # _attempts gave up on a model


def candidates(model: str, settings: Settings) -> list[str]:
    """The requested model, then the models after it in the fallback chain that are also allowlisted."""
    chain = settings.fallback_chain
    if model not in chain:
        return [model]
    return [model, *(m for m in chain[chain.index(model) + 1 :] if m in settings.models and m != model)]


def route(
    attempt: Callable[[str, openai.Timeout], T], model: str, settings: Settings, cooldowns: Cooldowns, deadline: float
) -> Routed[T]:
    """Call `attempt(model, timeout)` for the model and its fallbacks until one answers, or raise our error."""
    chain = candidates(model, settings)
    hints: dict[str, float] = {}
    for name in chain:
        gate = cooldowns.acquire(name)
        if gate is Gate.CLOSED:
            log.info("skipping %s: cooling down", name)
            continue
        try:
            value = _attempts(attempt, name, settings, cooldowns, deadline, hints)
        except NotSent as exc:
            raise exc.error from exc.error.__cause__
        except ApiError:
            cooldowns.success(name, probe=gate is Gate.PROBE)  # the model answered, if only to refuse
            raise
        if value is not _FAILED:
            cooldowns.success(name, probe=gate is Gate.PROBE)
            if gate is Gate.PROBE:
                metrics.set_cooldown(name, False)
            if name != model:
                log.warning("answered by fallback model %s instead of %s", name, model)
            return Routed(value, name, name != model)
        if time.monotonic() >= deadline:
            log.warning("no answer within CHATPROXY_TOTAL_TIMEOUT (%g s)", settings.total_timeout)
            raise ApiError(504, "upstream_timeout", "The model provider took too long to answer. Try again.")
    raise _unavailable(chain, cooldowns, hints)


def _attempts(
    attempt: Callable[[str, openai.Timeout], T],
    model: str,
    settings: Settings,
    cooldowns: Cooldowns,
    deadline: float,
    hints: dict[str, float],
) -> T:
    """Try one model up to 1 + max_retries times; _FAILED when it should be given up for the next one."""
    tries = settings.max_retries + 1
    for number in range(tries):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _FAILED
        try:
            return attempt(model, _timeout(settings, remaining))
        except (ApiError, NotSent):
            raise
        except Exception as exc:  # noqa: BLE001 - classify() re-raises what it does not know
            failure = classify(exc, settings)
        log.warning("upstream attempt %d/%d on %s failed: %s", number + 1, tries, model, failure.reason)
        if failure.retry_after is not None:
            hints[model] = max(hints.get(model, 0.0), failure.retry_after)
        cooling = cooldowns.failure(model, failure.retry_after)
        metrics.set_cooldown(model, cooling)
        wait = retry_wait(failure, number, settings.retry_max_wait)
        if cooling or wait is None or number + 1 == tries or time.monotonic() + wait >= deadline:
            return _FAILED
        time.sleep(wait)
    return _FAILED


def retry_wait(failure: Transient, number: int, max_wait: float) -> float | None:
    """Seconds to wait before retrying the same model, or None to fall back now."""
    if not failure.retry:
        return None
    if failure.retry_after is not None:
        return failure.retry_after if failure.retry_after <= max_wait else None
    step = min(max_wait, BACKOFF_BASE * 2**number)
    return step / 2 + random.uniform(0, step / 2)  # exponential backoff, "equal jitter"


def _timeout(settings: Settings, remaining: float) -> openai.Timeout:
    """This attempt's timeouts: the configured ones, cut to what is left of the request's deadline."""
    return openai.Timeout(min(settings.read_timeout, remaining), connect=min(settings.connect_timeout, remaining))


def classify(exc: Exception, settings: Settings) -> Transient:
    """A retryable failure as Transient; anything final raises the client-safe ApiError."""
    if isinstance(exc, Transient):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return Transient("timed out")
    if isinstance(exc, openai.APIConnectionError):
        return Transient(f"connection failed ({type(exc.__cause__ or exc).__name__})")
    if isinstance(exc, openai.APIStatusError):
        return _status_failure(exc, settings)
    if isinstance(exc, openai.APIError):  # an `error` event inside a stream
        if exc.code == "content_filter":
            raise content_filtered()
        return Transient(f"error event in the stream (code {exc.code})")
    raise exc  # our own bug, not the upstream's: no retry, no cooldown


def _status_failure(exc: openai.APIStatusError, settings: Settings) -> Transient:
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
            redact(key),
            status,
            exc.request_id,
            name,
        )
        raise ApiError(502, "upstream_auth_failed", "The proxy is misconfigured. The operator has been told.")
    should_retry = exc.response.headers.get("x-should-retry")
    if status in RETRY_STATUSES or status >= 500 or should_retry == "true":
        return Transient(
            f"HTTP {status} (upstream request id {exc.request_id})",
            retry_after=retry_after(exc.response.headers),
            retry=should_retry != "false",
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


def redact(key: str) -> str:
    """Enough of a key to tell which one it is, never enough to use it."""
    return f"{key[:3]}...{key[-4:]}" if len(key) >= 20 else "(hidden)"


def _unavailable(chain: list[str], cooldowns: Cooldowns, hints: dict[str, float]) -> ApiError:
    """503 when no model in the chain answered; Retry-After is when the first of them may be back."""
    waits = [w for w in (max(cooldowns.remaining(m), hints.get(m, 0.0)) for m in chain) if w > 0]
    retry = max(1, math.ceil(min(waits))) if waits else DEFAULT_RETRY_AFTER
    log.warning("no model could answer (chain %s); Retry-After %d s", ", ".join(chain), retry)
    return ApiError(
        503, "upstream_unavailable", "No model is available right now. Try again shortly.", retry_after=retry
    )


def complete(
    client: OpenAI, chat: ChatRequest, settings: Settings, cooldowns: Cooldowns, deadline: float, meter: Any
) -> dict[str, Any]:
    """Ask for a whole answer (with retries and fallback), record it on `meter`, and shape it per the contract."""
    once = meter.attempt(
        lambda model: upstream_params(chat, settings, model),
        lambda params, timeout, headers: create_completion(client, params, timeout, headers),
    )
    routed = route(once, chat.model, settings, cooldowns, deadline)
    choice, usage = routed.value.choices[0], routed.value.usage
    content = choice.message.content or ""
    if choice.finish_reason == "content_filter":  # billed by the upstream: recorded with its tokens, then refused
        meter.finish(routed.model, usage_dict(usage), content, "content_filtered")
        raise content_filtered()
    meter.finish(routed.model, usage_dict(usage), content, "ok")
    reply = {
        "role": "assistant",
        "content": content,
        "model": routed.model,
        "degraded": routed.degraded,
        "finish_reason": choice.finish_reason,
        "usage": usage_dict(usage),
    }
    if chat.response_format is not None:
        reply["parsed"] = structured(choice)
    return reply


def structured(choice: Any) -> Any:
    """The decoded JSON of a structured answer, or a clear error for a refusal, a cut-off or invalid JSON."""
    refusal = getattr(choice.message, "refusal", None)
    if refusal:
        raise ApiError(422, "model_refused", f"The model declined to answer: {refusal[:500]}")
    if choice.finish_reason == "length":
        raise ApiError(
            502,
            "invalid_model_output",
            "The answer reached max_tokens before its JSON was complete. Allow more tokens.",
        )
    try:
        return json.loads(choice.message.content or "")
    except ValueError:
        log.warning("the model's structured answer is not valid JSON")
        raise ApiError(502, "invalid_model_output", "The model's answer was not valid JSON. Try again.") from None


def create_completion(client: OpenAI, params: dict[str, Any], timeout: openai.Timeout, headers: dict[str, str]) -> Any:
    """One non-streaming call; an answer that is not a completion with choices raises UnreadableAnswer."""
    raw = client.chat.completions.with_raw_response.create(**params, timeout=timeout, extra_headers=headers)
    try:
        completion = raw.parse()  # reading the answer: json.loads, then the SDK's models (built, not validated)
        choices = completion.choices
        if not isinstance(choices, list) or not choices or not hasattr(choices[0], "message"):
            raise UnreadableAnswer("answer without choices")
    except (ValueError, *SHAPE_ERRORS) as exc:
        raise UnreadableAnswer(f"unreadable answer ({type(exc).__name__})") from exc
    return completion


# The SDK builds answers without validating them: valid JSON of another shape fails on first use.
SHAPE_ERRORS = (AttributeError, TypeError, IndexError, KeyError)


def usage_dict(usage: Any) -> dict[str, int] | None:
    """Token counts as a plain dict (None when the upstream sent none)."""
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def upstream_error(exc: Exception) -> ApiError:
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
