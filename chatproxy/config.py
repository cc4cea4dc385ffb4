"""Settings: defaults, then `.env`, then the real environment, then test config; validated once."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parent.parent  # the project: .env, templates/, static/, instance/


class SettingsError(RuntimeError):
    """A setting is missing or has a value that is not allowed."""


def _text(value: str) -> str:
    return value.strip()


def _optional_text(value: str) -> str | None:
    return value.strip() or None


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(str(value).strip())
        if not low <= number <= high:
            raise ValueError(f"an integer from {low} to {high}")
        return number

    parse.allowed = f"an integer from {low} to {high}"  # type: ignore[attr-defined]
    return parse


def _float_range(low: float, high: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = float(str(value).strip())
        if not low <= number <= high:  # also refuses NaN
            raise ValueError
        return number

    parse.allowed = f"a number from {low:g} to {high:g}"  # type: ignore[attr-defined]
    return parse


def _bool(value: str) -> bool:
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError


_bool.allowed = "true or false"  # type: ignore[attr-defined]


def _optional_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in str(value).split(",") if item.strip())


_optional_list.allowed = "a comma-separated list"  # type: ignore[attr-defined]


def _dollars(value: str) -> int:
    """Dollars as integer micro-dollars (no floats for money); 0 means no cap."""
    amount = Decimal(str(value).strip())
    if not amount.is_finite() or amount < 0:
        raise ValueError
    return int(amount * 1_000_000)


_dollars.allowed = "an amount in dollars, 0 or more (0: no cap)"  # type: ignore[attr-defined]


def _rate(value: str) -> str:
    text = str(value).strip()
    try:
        from limits import parse_many

        parse_many(text)
    except ValueError:
        raise ValueError from None
    return text


_rate.allowed = "a rate limit such as '30/minute' or '5/second;100/hour'"  # type: ignore[attr-defined]


def _list(value: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in str(value).split(",") if item.strip())
    if not items:
        raise ValueError
    return items


_list.allowed = "a comma-separated list with at least one item"  # type: ignore[attr-defined]


def _bind(value: str) -> str:
    text = str(value).strip()
    if text.startswith("unix:") and len(text) > len("unix:"):
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError
    return text


_bind.allowed = "HOST:PORT such as 127.0.0.1:8000 or [::1]:8000, or unix:/path/to.sock"  # type: ignore[attr-defined]


def _redis_prefix(value: str) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", text):
        raise ValueError
    return text if text.endswith(":") else text + ":"


_redis_prefix.allowed = "1-64 letters, digits, '_', '.', ':' or '-', such as chatproxy:"  # type: ignore[attr-defined]


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item) for item in _optional_list(value))


_networks.allowed = "a comma-separated list of networks such as 127.0.0.1/32,10.0.0.0/8"  # type: ignore[attr-defined]


def _choice(*options: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise ValueError
        return text

    parse.allowed = " or ".join(repr(o) for o in options)  # type: ignore[attr-defined]
    return parse


_DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _deployments(value: str) -> tuple[tuple[str, str], ...]:
    """`alias=deployment,...` as ((alias, deployment), ...); deployment names are URL-path safe."""
    pairs: dict[str, str] = {}
    for item in _optional_list(value):
        alias, sep, deployment = (part.strip() for part in item.partition("="))
        if not sep or not alias or alias in pairs or not _DEPLOYMENT.fullmatch(deployment):
            raise ValueError
        pairs[alias] = deployment
    return tuple(pairs.items())


_deployments.allowed = "a comma-separated list of alias=deployment (deployment names: letters, digits, '.', '_', '-')"  # type: ignore[attr-defined]


def _api_version(value: str) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}(-preview)?", text):
        raise ValueError
    return text


_api_version.allowed = "an Azure OpenAI API version such as 2024-10-21"  # type: ignore[attr-defined]


# In app.config when a command made up CHATPROXY_SECRET_KEY for itself: what it derives from it is of no use.
EPHEMERAL_SECRET = "CHATPROXY_EPHEMERAL_SECRET_KEY"  # noqa: S105 - a config flag's name


@dataclass(frozen=True)
class Setting:
    """One environment variable: its default, its parser and what it means."""

    name: str
    default: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False
    field: str = ""  # its Settings attribute, when not the name without CHATPROXY_, in lower case

    @property
    def attribute(self) -> str:
        """The Settings attribute holding the parsed value."""
        return self.field or self.name.removeprefix("CHATPROXY_").lower()


SETTINGS: tuple[Setting, ...] = (
    Setting("OPENAI_API_KEY", "", _text, "OpenAI API key. Required; stays on the server.", secret=True),
    Setting(
        "OPENAI_BASE_URL",
        "",
        _optional_text,
        "Any OpenAI-compatible server, e.g. http://127.0.0.1:11434/v1 for Ollama. Empty: api.openai.com.",
    ),
    Setting("CHATPROXY_MODELS", "gpt-4o-mini,gpt-4o", _list, "Models a client may ask for (allowlist)."),
    Setting("CHATPROXY_DEFAULT_MODEL", "gpt-4o-mini", _text, "Model used when the client names none."),
    Setting(
        "CHATPROXY_SYSTEM_PROMPT",
        "You are a helpful assistant.",
        _text,
        "System prompt the server puts first in every conversation.",
    ),
    Setting("CHATPROXY_SYSTEM_PROMPT_FILE", "", _optional_text, "File whose text replaces CHATPROXY_SYSTEM_PROMPT."),
    Setting(
        "CHATPROXY_MAX_TOKENS",
        "1024",
        _int_range(1, 128_000),
        "Server cap on completion tokens; larger client values are clamped.",
    ),
    Setting("CHATPROXY_MAX_MESSAGES", "40", _int_range(1, 1000), "Most messages in one request."),
    Setting("CHATPROXY_MAX_MESSAGE_CHARS", "8000", _int_range(1, 1_000_000), "Most characters in one message."),
    Setting(
        "CHATPROXY_MAX_TOTAL_CHARS",
        "32000",
        _int_range(1, 10_000_000),
        "Most characters of prompt in one request: all messages, plus the JSON of /v1 tools and of a "
        "response_format schema.",
    ),
    Setting(
        "CHATPROXY_MAX_BODY_BYTES",
        "1048576",
        _int_range(1024, 100_000_000),
        "Largest request body accepted, in bytes (images travel inside it, base64: a third larger); "
        "behind nginx, client_max_body_size must allow it too.",
    ),
    Setting(
        "CHATPROXY_MAX_IMAGE_BYTES",
        "786432",
        _int_range(1, 100_000_000),
        "Largest image accepted (PNG, JPEG, WebP or GIF, decoded), in bytes.",
    ),
    Setting(
        "CHATPROXY_MAX_IMAGE_SIDE",
        "4096",
        _int_range(1, 65535),
        "Most pixels on either side of an image, read from its header (a larger one is refused undecoded).",
    ),
    Setting("CHATPROXY_MAX_IMAGES_PER_MESSAGE", "4", _int_range(0, 100), "Most images in one message."),
    Setting("CHATPROXY_MAX_IMAGES", "8", _int_range(0, 500), "Most images in one request, all messages together."),
    Setting("CHATPROXY_CONNECT_TIMEOUT", "5", _float_range(0.1, 60), "Seconds to connect to the upstream."),
    Setting(
        "CHATPROXY_READ_TIMEOUT",
        "60",
        _float_range(0.1, 3600),
        "Seconds to wait for upstream bytes (between stream chunks).",
    ),
    Setting(
        "CHATPROXY_MAX_RETRIES",
        "2",
        _int_range(0, 10),
        "Retries per model of a failed upstream call (408, 409, 429, 5xx, timeouts, connection errors), "
        "done by chatproxy's router (the SDK's own retries are off).",
    ),
    Setting(
        "CHATPROXY_KEEPALIVE_SECONDS",
        "10",
        _float_range(0, 300),
        "Send an SSE `: ping` comment when the upstream is silent this long (0: never).",
    ),
    Setting(
        "CHATPROXY_DEMO",
        "false",
        _bool,
        "Set by `make run` when it serves the offline demo upstream; shown on the page.",
    ),
    # Access control (guards.py)
    Setting(
        "CHATPROXY_SECRET_KEY",
        "",
        _text,
        "Signs the page's session cookie. Set the same long random value on every worker and host; "
        "empty: a random key per process (sessions do not survive restarts or span workers).",
        secret=True,
    ),
    Setting(
        "CHATPROXY_ALLOWED_ORIGINS",
        "",
        _optional_list,
        "Browser origins (scheme://host[:port]) allowed to call /api/* with CORS. Empty: none.",
    ),
    Setting(
        "CHATPROXY_API_TOKENS",
        "",
        _optional_list,
        "Bearer tokens for server-side clients: one comma-separated list of name=sha256:HEX "
        "(`python -m chatproxy new-token NAME` prints the whole line with a new token added).",
    ),
    Setting(
        "CHATPROXY_ADMIN_TOKENS",
        "",
        _optional_list,
        "CHATPROXY_API_TOKENS names that may read /api/usage and /metrics and manage API keys (/api/admin/keys).",
    ),
    Setting(
        "CHATPROXY_TOKEN_AUDIENCE",
        "chatproxy",
        _text,
        "The `aud` every signed end-user token must carry (README: End-user tokens).",
    ),
    Setting(
        "CHATPROXY_KEY_CACHE_SECONDS",
        "5",
        _float_range(0, 60),
        "How long a worker trusts an API key it looked up in the database: a revoked, disabled or changed key "
        "takes effect on every worker within this many seconds.",
    ),
    Setting(
        "CHATPROXY_ALLOW_ANONYMOUS",
        "false",
        _bool,
        "Let requests with no session, origin or token call the API (limited per client IP).",
    ),
    Setting(
        "CHATPROXY_TRUSTED_PROXIES",
        "0",
        _int_range(0, 10),
        "Reverse proxies in front of the app (nginx: 1). X-Forwarded-For is ignored when 0.",
    ),
    Setting("CHATPROXY_RATE_LIMIT_PAGE", "20/minute", _rate, "Rate limit per chat-page session."),
    Setting("CHATPROXY_RATE_LIMIT_ORIGIN", "60/minute", _rate, "Rate limit per client IP for allowed origins."),
    Setting("CHATPROXY_RATE_LIMIT_TOKEN", "120/minute", _rate, "Rate limit per bearer-token name."),
    Setting(
        "CHATPROXY_RATE_LIMIT_ANONYMOUS", "10/minute", _rate, "Rate limit per client IP when anonymous access is on."
    ),
    Setting(
        "CHATPROXY_MAX_STREAMS",
        "3",
        _int_range(1, 10_000),
        "Simultaneous streams per caller (per client IP for an allowed origin).",
    ),
    Setting(
        "CHATPROXY_MAX_CONCURRENT",
        "10",
        _int_range(1, 100_000),
        "Requests of any kind (JSON and streams) one caller may have in flight at once; more get 429.",
    ),
    Setting(
        "CHATPROXY_MAX_CONCURRENT_PER_IP",
        "20",
        _int_range(1, 100_000),
        "Requests one client IP may have in flight at once over all its page sessions, origin and anonymous "
        "calls (bearer tokens are capped per token only); more get 429.",
    ),
    Setting(
        "CHATPROXY_RATE_LIMIT_SESSIONS",
        "20/hour",
        _rate,
        "New chat-page sessions one client IP may start (each page load without a session cookie starts one).",
    ),
    Setting(
        "CHATPROXY_REDIS_URL",
        "",
        _optional_text,
        "redis://host:6379/0 to share rate limits, stream slots and cooldowns across workers and hosts. "
        "Empty: in-process (one worker).",
    ),
    Setting(
        "CHATPROXY_REDIS_PREFIX",
        "chatproxy:",
        _redis_prefix,
        "Prefix of every key chatproxy writes in Redis (rate limits, slots, cooldowns), so several deployments "
        "can share one Redis database.",
    ),
    # Cost control (usage.py)
    Setting(
        "CHATPROXY_DATABASE_URL",
        "",
        _optional_text,
        "Ledger database (SQLAlchemy URL). Empty: sqlite:///instance/chatproxy.db. "
        "PostgreSQL: postgresql+psycopg://user@host/db.",
    ),
    Setting(
        "CHATPROXY_MODEL_TABLE",
        "",
        _optional_text,
        "Entries added to or replacing fields of the model table (chatproxy/models.json; docs/models.md): JSON "
        'text or the path of a JSON file, e.g. {"llama3.1:8b": {"max_output": 8192, "prices": {"input": 0, '
        '"output": 0}}}.',
    ),
    Setting(
        "CHATPROXY_PRICES",
        "",
        _optional_text,
        'Prices only, the older form of CHATPROXY_MODEL_TABLE: {"gpt-4o": {"input": 2.5, "cached_input": 1.25, '
        '"output": 10}} (dollars per million tokens).',
    ),
    Setting(
        "CHATPROXY_UNSUPPORTED_PARAMS",
        "refuse",
        _choice("refuse", "drop"),
        "A temperature, top_p or penalty the requested model does not accept: 'refuse' answers 400 naming the "
        "model and the parameter; 'drop' sends the request without it. Fallback models never get one they refuse.",
    ),
    Setting(
        "CHATPROXY_DAILY_BUDGET_USD",
        "10",
        _dollars,
        "Spend cap for all callers per UTC day (0: none).",
        field="daily_budget_micros",
    ),
    Setting(
        "CHATPROXY_IDENTITY_DAILY_BUDGET_USD",
        "1",
        _dollars,
        "Spend cap per identity per UTC day (0: none).",
        field="identity_daily_budget_micros",
    ),
    Setting("CHATPROXY_DAILY_TOKEN_BUDGET", "0", _int_range(0, 10**12), "Token cap for all callers per day (0: none)."),
    Setting(
        "CHATPROXY_IDENTITY_DAILY_TOKEN_BUDGET", "0", _int_range(0, 10**12), "Token cap per identity per day (0: none)."
    ),
    Setting(
        "CHATPROXY_PUBLIC_DAILY_BUDGET_USD",
        "5",
        _dollars,
        "Spend cap per UTC day for all callers without a bearer token together (chat-page sessions, allowed "
        "origins, anonymous), so they cannot spend what token holders need (0: none).",
        field="public_daily_budget_micros",
    ),
    Setting(
        "CHATPROXY_PUBLIC_IP_DAILY_BUDGET_USD",
        "2",
        _dollars,
        "Spend cap per client IP per UTC day for callers without a bearer token, over all their page "
        "sessions and calls (0: none).",
        field="public_ip_daily_budget_micros",
    ),
    # Resilience (router.py)
    Setting(
        "CHATPROXY_FALLBACK_CHAIN",
        "gpt-4o,gpt-4o-mini",
        _optional_list,
        "Models in fallback order: a request for one falls back to the allowlisted models after it "
        "when it keeps failing (408, 409, 429, 5xx, timeouts, connection errors; never other 4xx).",
    ),
    Setting(
        "CHATPROXY_RETRY_MAX_WAIT",
        "5",
        _float_range(0, 600),
        "Longest wait before a retry (Retry-After or backoff), in seconds; a longer Retry-After falls back at once.",
    ),
    Setting(
        "CHATPROXY_TOTAL_TIMEOUT",
        "120",
        _float_range(1, 3600),
        "Deadline for one request across all retries and fallbacks, in seconds; a stream still running "
        "then ends with an error event.",
    ),
    Setting(
        "CHATPROXY_COOLDOWN_FAILURE_RATE",
        "0.5",
        _float_range(0.01, 1),
        "Failure rate that puts a model in cooldown: failed calls / all calls in the window (each attempt "
        "is a call; answers count too).",
    ),
    Setting(
        "CHATPROXY_COOLDOWN_MIN_CALLS",
        "10",
        _int_range(1, 1_000_000),
        "Calls a model must have had within the window before its failure rate can put it in cooldown.",
    ),
    Setting(
        "CHATPROXY_COOLDOWN_WINDOW",
        "60",
        _float_range(1, 86400),
        "Sliding window for counting a model's calls and failures, in seconds.",
    ),
    Setting(
        "CHATPROXY_COOLDOWN_SECONDS",
        "30",
        _float_range(1, 86400),
        "How long a failing model is skipped (at least the upstream's Retry-After); "
        "then one probe request decides whether it is back.",
    ),
    # Structured outputs (classify.py)
    Setting(
        "CHATPROXY_CLASSIFY_LABELS",
        "billing,technical,sales,account,other",
        _list,
        "Labels /api/classify may choose from; a request may narrow them to a subset.",
    ),
    Setting(
        "CHATPROXY_CLASSIFY_MODEL",
        "",
        _optional_text,
        "Model /api/classify uses (one of CHATPROXY_MODELS). Empty: CHATPROXY_DEFAULT_MODEL.",
    ),
    # Deployment (gunicorn.conf.py, ops.py)
    Setting(
        "CHATPROXY_WORKERS",
        "2",
        _int_range(1, 256),
        "gunicorn worker processes (gunicorn.conf.py). More than one needs CHATPROXY_REDIS_URL for exact limits.",
    ),
    Setting(
        "CHATPROXY_WORKER_CLASS",
        "gthread",
        _choice("gevent", "gthread"),
        "How a gunicorn worker serves requests at once: gthread (an OS thread each) or gevent (a greenlet "
        "each: less memory per open stream; use it with PostgreSQL). docs/deploy.md says which to choose.",
    ),
    Setting(
        "CHATPROXY_THREADS",
        "32",
        _int_range(1, 1000),
        "Requests one gunicorn worker serves at once (gthread: its threads; gevent: its greenlets), each open "
        "stream holding one for its whole life; API requests get all but 2, kept for /healthz, /readyz and "
        "/metrics (more in flight: 503 server_busy).",
    ),
    Setting(
        "CHATPROXY_BIND",
        "127.0.0.1:8000",
        _bind,
        "Where gunicorn listens: HOST:PORT or unix:/path. Keep it on loopback behind nginx.",
    ),
    Setting(
        "CHATPROXY_GRACEFUL_TIMEOUT",
        "120",
        _int_range(1, 3600),
        "Seconds a stopping worker lets in-flight answers (streams) finish before it is killed.",
    ),
    Setting(
        "CHATPROXY_METRICS_NETWORKS",
        "127.0.0.1/32,::1/128",
        _networks,
        "Client networks (CIDR) that may read /metrics without a token; admin tokens may read it from anywhere.",
    ),
    Setting(
        "CHATPROXY_READY_REQUIRES_REDIS",
        "false",
        _bool,
        "true: /readyz answers 503 while Redis is unreachable. Default: 200 with status 'degraded' "
        "(limits then count per process), so a Redis outage does not take every host out of the load balancer.",
    ),
    # Batch API (batch.py)
    Setting(
        "CHATPROXY_BATCH_MAX_REQUESTS",
        "1000",
        _int_range(1, 50_000),
        "Most requests in one batch (POST /api/batches, `python -m chatproxy batch submit`); OpenAI allows 50,000.",
    ),
    Setting(
        "CHATPROXY_BATCH_MAX_BODY_BYTES",
        "1048576",
        _int_range(1024, 200_000_000),
        "Largest POST /api/batches body, in bytes (other routes keep CHATPROXY_MAX_BODY_BYTES); "
        "behind nginx, client_max_body_size must allow it too.",
    ),
    # OpenAI-compatible endpoint (compat.py)
    Setting(
        "CHATPROXY_COMPAT_SYSTEM_PROMPT",
        "prepend",
        _choice("prepend", "replace"),
        "System messages on /v1/chat/completions: 'prepend' puts ours first and keeps the client's after it; "
        "'replace' drops the client's.",
    ),
    # The Responses API and embeddings (api/responses.py, api/embeddings.py)
    Setting(
        "CHATPROXY_RESPONSES_STORE",
        "false",
        _bool,
        "true: a /v1/responses client may ask for 'store': true (its response is kept upstream and only it may "
        "continue, read or delete it). false: every response is sent with 'store': false and 'store': true is a 400.",
    ),
    Setting(
        "CHATPROXY_RESPONSES_HOSTED_TOOLS",
        "",
        _optional_list,
        "Hosted tools /v1/responses may use (web_search, file_search, code_interpreter, image_generation, mcp, "
        "computer_use_preview...); they cost extra and reach data. Empty: function tools only.",
    ),
    Setting(
        "CHATPROXY_EMBEDDING_MODELS",
        "text-embedding-3-small",
        _optional_list,
        "Embedding models /v1/embeddings may use (allowlist; each in the model table). Empty: no embeddings.",
    ),
    Setting(
        "CHATPROXY_EMBEDDING_MAX_INPUTS",
        "64",
        _int_range(1, 2048),
        "Most inputs in one /v1/embeddings request (each at most CHATPROXY_MAX_MESSAGE_CHARS characters, "
        "all together at most CHATPROXY_MAX_TOTAL_CHARS).",
    ),
    # Azure OpenAI (router.py)
    Setting(
        "AZURE_OPENAI_ENDPOINT",
        "",
        _optional_text,
        "Azure OpenAI resource, e.g. https://my-resource.openai.azure.com. Set: Azure mode "
        "(AZURE_OPENAI_API_KEY and CHATPROXY_AZURE_DEPLOYMENTS are needed, OPENAI_API_KEY is not). Empty: OpenAI.",
        field="azure_endpoint",
    ),
    Setting(
        "AZURE_OPENAI_API_KEY",
        "",
        _text,
        "Azure OpenAI key (Azure mode only); stays on the server.",
        secret=True,
        field="azure_api_key",
    ),
    Setting(
        "AZURE_OPENAI_API_VERSION",
        "2024-10-21",
        _api_version,
        "Azure OpenAI API version (the api-version query).",
        field="azure_api_version",
    ),
    Setting(
        "CHATPROXY_AZURE_DEPLOYMENTS",
        "",
        _deployments,
        "Azure deployment of each model in CHATPROXY_MODELS, as alias=deployment,alias2=deployment2. "
        "Clients, the ledger and responses keep the alias.",
    ),
)


@dataclass(frozen=True)
class Settings:
    """Validated settings of one application: one attribute per entry of SETTINGS (Setting.attribute)."""

    openai_api_key: str
    openai_base_url: str | None
    models: tuple[str, ...]
    default_model: str
    system_prompt: str  # CHATPROXY_SYSTEM_PROMPT_FILE's text when that is set
    system_prompt_file: str | None
    max_tokens: int
    max_messages: int
    max_message_chars: int
    max_total_chars: int
    max_body_bytes: int
    max_image_bytes: int
    max_image_side: int
    max_images_per_message: int
    max_images: int
    connect_timeout: float
    read_timeout: float
    max_retries: int
    keepalive_seconds: float
    demo: bool
    secret_key: str
    allowed_origins: tuple[str, ...]
    api_tokens: tuple[str, ...]
    admin_tokens: tuple[str, ...]
    token_audience: str
    key_cache_seconds: float
    allow_anonymous: bool
    trusted_proxies: int
    rate_limit_page: str
    rate_limit_origin: str
    rate_limit_token: str
    rate_limit_anonymous: str
    max_streams: int
    max_concurrent: int
    max_concurrent_per_ip: int
    rate_limit_sessions: str
    redis_url: str | None
    redis_prefix: str  # ends with ":"
    database_url: str | None
    model_table: str | None
    prices: str | None
    unsupported_params: str  # refuse or drop
    daily_budget_micros: int
    identity_daily_budget_micros: int
    daily_token_budget: int
    identity_daily_token_budget: int
    public_daily_budget_micros: int
    public_ip_daily_budget_micros: int
    fallback_chain: tuple[str, ...]
    retry_max_wait: float
    total_timeout: float
    cooldown_failure_rate: float
    cooldown_min_calls: int
    cooldown_window: float
    cooldown_seconds: float
    classify_labels: tuple[str, ...]
    classify_model: str  # the default model when CHATPROXY_CLASSIFY_MODEL is empty
    workers: int
    worker_class: str  # gevent or gthread
    threads: int  # gunicorn threads per worker: guarded requests leave a few for /healthz
    bind: str
    graceful_timeout: int
    metrics_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    ready_requires_redis: bool
    batch_max_requests: int
    batch_max_body_bytes: int
    compat_system_prompt: str
    responses_store: bool
    responses_hosted_tools: tuple[str, ...]
    embedding_models: tuple[str, ...]
    embedding_max_inputs: int
    azure_endpoint: str | None
    azure_api_key: str
    azure_api_version: str
    azure_deployments: tuple[tuple[str, str], ...]  # (alias, deployment) pairs; empty outside Azure mode

    @property
    def every_model(self) -> tuple[str, ...]:
        """Every allowlisted model: the chat models, then the embedding models."""
        return tuple(dict.fromkeys((*self.models, *self.embedding_models)))


# Settings that were replaced. Set anywhere, they stop start-up saying what replaced them: silently ignoring
# a safety setting someone chose is worse than one clear error.
RETIRED = {
    "CHATPROXY_COOLDOWN_FAILURES": "CHATPROXY_COOLDOWN_FAILURE_RATE and CHATPROXY_COOLDOWN_MIN_CALLS: a model now "
    "cools down on a failure rate, not a count (README: 'Retries, fallback and "
    "cooldowns')",
}


def raw_settings(
    env_file: str | os.PathLike[str] | None = ".env", environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Defaults, overlaid by `.env`, overlaid by the real environment (which wins); retired names kept for validate."""
    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    known = values.keys() | RETIRED.keys()
    if env_file and Path(env_file).is_file():
        values.update({k: v for k, v in dotenv_values(env_file).items() if k in known and v is not None})
    environ = os.environ if environ is None else environ
    values.update({k: environ[k] for k in known if k in environ})
    return values


def validate(config: Mapping[str, Any]) -> Settings:
    """Parse every setting, or raise SettingsError naming the variable and what is allowed."""
    for name, replacement in RETIRED.items():
        if name in config:
            raise SettingsError(
                f"{name} is no longer used; it was replaced by {replacement}. Remove it from .env or the environment."
            )
    parsed: dict[str, Any] = {}
    for setting in SETTINGS:
        value = config.get(setting.name, setting.default)
        try:
            parsed[setting.name] = setting.parse(value) if isinstance(value, str) else _coerce(setting, value)
        except (TypeError, ValueError, InvalidOperation):
            allowed = getattr(setting.parse, "allowed", "a valid value")
            raise SettingsError(f"{setting.name} must be {allowed}; got {_show(setting, value)}.") from None
    if not parsed["OPENAI_API_KEY"] and not parsed["AZURE_OPENAI_ENDPOINT"]:
        raise SettingsError(
            "OPENAI_API_KEY is not set. Put it in the environment or in .env "
            "(see .env.example); `make run` without a key serves the offline demo."
        )
    if parsed["CHATPROXY_DEFAULT_MODEL"] not in parsed["CHATPROXY_MODELS"]:
        raise SettingsError(
            f"CHATPROXY_DEFAULT_MODEL must be one of CHATPROXY_MODELS "
            f"({', '.join(parsed['CHATPROXY_MODELS'])}); got {parsed['CHATPROXY_DEFAULT_MODEL']!r}."
        )
    parsed["CHATPROXY_CLASSIFY_MODEL"] = parsed["CHATPROXY_CLASSIFY_MODEL"] or parsed["CHATPROXY_DEFAULT_MODEL"]
    if parsed["CHATPROXY_CLASSIFY_MODEL"] not in parsed["CHATPROXY_MODELS"]:
        raise SettingsError(
            f"CHATPROXY_CLASSIFY_MODEL must be one of CHATPROXY_MODELS "
            f"({', '.join(parsed['CHATPROXY_MODELS'])}); got {parsed['CHATPROXY_CLASSIFY_MODEL']!r}."
        )
    for origin in parsed["CHATPROXY_ALLOWED_ORIGINS"]:
        if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", origin):
            raise SettingsError(
                f"CHATPROXY_ALLOWED_ORIGINS must list exact origins like https://app.example.com "
                f"(no '*', no path); got {origin!r}."
            )
    base_url = parsed["OPENAI_BASE_URL"]
    if base_url and not base_url.startswith(("http://", "https://")):
        raise SettingsError(f"OPENAI_BASE_URL must start with http:// or https://; got {base_url!r}.")
    if parsed["AZURE_OPENAI_ENDPOINT"]:
        _check_azure(parsed)
    parse_tokens(parsed["CHATPROXY_API_TOKENS"])  # parsed again by create_app; here it stops a bad value early
    parsed["CHATPROXY_SYSTEM_PROMPT"] = _system_prompt(
        parsed["CHATPROXY_SYSTEM_PROMPT"], parsed["CHATPROXY_SYSTEM_PROMPT_FILE"]
    )
    if not parsed["AZURE_OPENAI_ENDPOINT"]:
        parsed["CHATPROXY_AZURE_DEPLOYMENTS"] = ()
    return Settings(**{setting.attribute: parsed[setting.name] for setting in SETTINGS})


def _check_azure(parsed: dict[str, Any]) -> None:
    """Azure mode needs an https endpoint, its key, and a deployment for every allowlisted model."""
    endpoint = parsed["AZURE_OPENAI_ENDPOINT"]
    if not endpoint.startswith(("http://", "https://")):
        raise SettingsError(
            f"AZURE_OPENAI_ENDPOINT must start with https:// "
            f"(e.g. https://my-resource.openai.azure.com); got {endpoint!r}."
        )
    if parsed["OPENAI_BASE_URL"]:
        raise SettingsError(
            "OPENAI_BASE_URL and AZURE_OPENAI_ENDPOINT are both set: unset one of them "
            "(AZURE_OPENAI_ENDPOINT selects Azure OpenAI)."
        )
    if not parsed["AZURE_OPENAI_API_KEY"]:
        raise SettingsError("AZURE_OPENAI_API_KEY is not set; Azure mode (AZURE_OPENAI_ENDPOINT is set) needs it.")
    mapped = dict(parsed["CHATPROXY_AZURE_DEPLOYMENTS"])
    missing = [model for model in parsed["CHATPROXY_MODELS"] if model not in mapped]
    if missing:
        raise SettingsError(
            f"CHATPROXY_AZURE_DEPLOYMENTS must name an Azure deployment for every model in "
            f"CHATPROXY_MODELS, as alias=deployment; missing: {', '.join(missing)}."
        )


def _coerce(setting: Setting, value: Any) -> Any:
    """Accept already-typed values from test_config by round-tripping them through the parser."""
    if isinstance(value, bool):
        return setting.parse("true" if value else "false")
    if isinstance(value, (list, tuple)):
        return setting.parse(",".join(map(str, value)))
    if value is None:
        return setting.parse("")
    return setting.parse(str(value))


def _show(setting: Setting, value: Any) -> str:
    return "a hidden value" if setting.secret else repr(value)


def _system_prompt(text: str, path: str | None) -> str:
    if not path:
        return text
    try:
        prompt = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SettingsError(
            f"CHATPROXY_SYSTEM_PROMPT_FILE must name a readable file; cannot read {path!r} ({exc.strerror})."
        ) from None
    if not prompt:
        raise SettingsError(f"CHATPROXY_SYSTEM_PROMPT_FILE must name a non-empty file; {path!r} is empty.")
    return prompt


def parse_tokens(specs: Iterable[str]) -> dict[str, bytes]:
    """CHATPROXY_API_TOKENS entries `name=sha256:HEX` → {name: digest}; a malformed entry is a SettingsError."""
    tokens: dict[str, bytes] = {}
    for spec in specs:
        name, _, hashed = spec.partition("=")
        scheme, _, hexdigest = hashed.partition(":")
        try:
            digest = bytes.fromhex(hexdigest)
        except ValueError:
            digest = b""
        if not name.strip() or scheme != "sha256" or len(digest) != 32:
            raise SettingsError(
                "CHATPROXY_API_TOKENS must be a comma-separated list of name=sha256:HEX "
                "(make one with `flask --app chatproxy new-token NAME`)."
            )
        tokens[name.strip()] = digest
    return tokens
