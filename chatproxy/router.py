"""The upstream side: one OpenAI client per app, the call parameters, and upstream errors mapped to ours."""

from __future__ import annotations

import logging
from typing import Any

import openai
from openai import OpenAI

from .config import Settings
from .errors import ApiError
from .schemas import ChatRequest

log = logging.getLogger(__name__)


def make_client(settings: Settings) -> OpenAI:
    """Create the app's one client: explicit timeouts, SDK retries per the settings."""
    return OpenAI(
        api_key=settings.openai_api_key,
        base_url=settings.openai_base_url,
        timeout=openai.Timeout(settings.read_timeout, connect=settings.connect_timeout),
        max_retries=settings.max_retries,
    )


def upstream_params(chat: ChatRequest, settings: Settings) -> dict[str, Any]:
    """The Chat Completions arguments: our system prompt first, then the client's turns."""
    params: dict[str, Any] = {
        "model": chat.model,
        "messages": [{"role": "system", "content": settings.system_prompt}, *chat.messages],
        "max_tokens": chat.max_tokens,
    }
    if chat.temperature is not None:
        params["temperature"] = chat.temperature
    if chat.stream:
        params["stream"] = True
        params["stream_options"] = {"include_usage": True}
    return params


def complete(client: OpenAI, chat: ChatRequest, settings: Settings) -> dict[str, Any]:
    """Ask for a whole answer and shape it per the JSON contract."""
    try:
        completion = client.chat.completions.create(**upstream_params(chat, settings))
    except openai.APIError as exc:
        raise upstream_error(exc) from None
    if not completion.choices:
        raise ApiError(502, "upstream_bad_response", "The model provider sent an answer we could not read.")
    choice = completion.choices[0]
    return {
        "role": "assistant",
        "content": choice.message.content or "",
        "model": completion.model or chat.model,
        "finish_reason": choice.finish_reason,
        "usage": usage_dict(completion.usage),
    }


def usage_dict(usage: Any) -> dict[str, int] | None:
    """Token counts as a plain dict (None when the upstream sent none)."""
    if usage is None:
        return None
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def upstream_error(exc: Exception) -> ApiError:
    """Map an SDK exception to a generic client-safe error; the upstream body is only logged, redacted."""
    if isinstance(exc, openai.APITimeoutError):
        log.warning("upstream timed out")
        return ApiError(504, "upstream_timeout", "The model provider took too long to answer. Try again.")
    if isinstance(exc, openai.APIConnectionError):
        log.warning("upstream unreachable: %s", type(exc.__cause__ or exc).__name__)
        return ApiError(502, "upstream_unreachable", "The model provider could not be reached. Try again later.")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        log.warning("upstream answered %s (upstream request id %s)", status, exc.request_id)
        if status in (401, 403):
            log.error("upstream rejected our credentials (%s): check OPENAI_API_KEY", status)
            return ApiError(502, "upstream_auth_failed", "The proxy is misconfigured. The operator has been told.")
        if status == 429:
            return ApiError(503, "upstream_rate_limited", "The model provider is busy. Try again shortly.",
                            retry_after=_retry_after(exc))
        if status >= 500:
            return ApiError(502, "upstream_error", "The model provider failed to answer. Try again.",
                            retry_after=_retry_after(exc))
        return ApiError(502, "upstream_rejected", "The model provider refused the request.")
    log.warning("upstream sent something we could not read: %s", type(exc).__name__)
    return ApiError(502, "upstream_bad_response", "The model provider sent an answer we could not read.")


def _retry_after(exc: openai.APIStatusError) -> int | None:
    headers = exc.response.headers
    try:
        if "retry-after-ms" in headers:
            return max(1, round(float(headers["retry-after-ms"]) / 1000))
        if "retry-after" in headers:
            return max(1, int(float(headers["retry-after"])))
    except ValueError:
        return None
    return None
