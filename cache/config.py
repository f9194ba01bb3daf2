"""Cache settings from a URL and keyword arguments.

    redis://host:6379/0?namespace=prod&ttl_s=3600&deadline_ms=20
    rediss://user:pass@host:6380          TLS
    unix:///run/redis.sock?db=1
    redis+cluster://host:7000             Redis Cluster (also: redis://host:7000?cluster=true)
    memory://                             in-process LRU + TTL (memory://name: a separate store)

Query parameters named like CacheConfig fields set those fields; keyword arguments
override them. Connection parameters redis-py understands (db, protocol, client_name,
ssl_*, max_connections, ...) pass through to redis-py; anything else is an error, so
a misspelt option never silently turns into a cache that does something else.

Secrets: the Redis password may sit in the URL (redis-py reads it from there), but it
never leaves this module in clear: `repr(config)`, `describe()` and every error
message go through `redact_url`. The HMAC secret of trusted mode is never accepted
in a URL (URLs end up in shell history, process lists and benchmark reports); it
comes from `secret=` or the SPECDEC_CACHE_SECRET environment variable.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .keys import validate_namespace
from .normalize import UNICODE_FORMS, WHITESPACE_MODES, NormalizationOptions

ENV_URL = "SPECDEC_REDIS_URL"
ENV_SECRET = "SPECDEC_CACHE_SECRET"
MIN_SECRET_BYTES = 16
# Query options whose values are credentials: removed by redact_url.
_SECRET_QUERY = re.compile(r"(pass|secret|token|auth|key|credential|hmac)", re.IGNORECASE)
# Query options that look like an attempt to put the HMAC secret into the URL.
_URL_SECRET_OPTIONS = frozenset({"secret", "cache_secret", "hmac_secret", "hmac_key", "signing_key"})
SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster", "memory")
# Connection options passed through to redis-py unchanged.
REDIS_PASSTHROUGH = frozenset(
    {
        "db",
        "protocol",
        "client_name",
        "username",
        "password",
        "max_connections",
        "health_check_interval",
        "socket_keepalive",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "ssl_min_version",
    }
)
# Options this package owns; setting them through redis-py would undo the failure handling.
_OWNED_REDIS = {
    "socket_timeout": "deadline_ms",
    "socket_connect_timeout": "deadline_ms",
    "timeout": "deadline_ms",
    "retry_on_timeout": "deadline_ms (the cache never retries on the hot path)",
    "retry_on_error": "deadline_ms (the cache never retries on the hot path)",
}
_ALIASES = {"ttl": "ttl_s", "deadline": "deadline_ms", "ns": "namespace"}


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"cache option {name}={value!r} is not a boolean; use true/false")


def _parse_ints(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        items = [v for v in value.replace(" ", "").split(",") if v]
    else:
        items = list(value)
    try:
        out = tuple(sorted({int(v) for v in items}, reverse=True))
    except (TypeError, ValueError):
        raise ValueError(f"cache option {name}={value!r} must be a comma-separated list of ints") from None
    return out


@dataclass(frozen=True)
class CacheConfig:
    """Everything that decides how the cache connects, keys and fails."""

    url: str = "memory://"  # connection URL, cache options removed
    backend: str = "memory"  # "memory" | "redis"
    cluster: bool = False
    namespace: str = "default"
    ttl_s: float = 86400.0  # response entries; 0 = no expiry
    draft_ttl_s: float = 86400.0  # draft-store entries; 0 = no expiry
    deadline_ms: float = 50.0  # per Redis call (connect and each socket read/write)
    breaker_failures: int = 3  # consecutive connection failures that open the breaker
    breaker_cooldown_s: float = 5.0  # how long an open breaker skips Redis
    unicode_form: str = "NFKC"
    whitespace: str = "collapse"
    casefold: bool = False
    max_value_bytes: int = 1 << 20
    queue_size: int = 1024  # write-behind jobs waiting; more are dropped (and counted)
    response_cache: bool = True  # serve/store whole responses
    draft_store: bool = True  # feed/read the draft-token store
    draft_contexts: tuple[int, ...] = (32, 8, 3)  # context lengths indexed, longest first
    draft_continuation: int = 32  # tokens stored after each context
    draft_max_positions: int = 2048  # positions indexed per finished sequence (the last ones)
    memory_max_entries: int = 200_000
    memory_max_bytes: int = 256 << 20
    redis_options: dict[str, str] = field(default_factory=dict, repr=False)  # passed to redis-py
    # HMAC-SHA256 key of trusted mode (None: verified mode). Never printed, never in a URL.
    secret: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)
        if self.secret is not None:
            secret = self.secret.encode("utf-8") if isinstance(self.secret, str) else self.secret
            if not isinstance(secret, bytes):
                raise TypeError(f"cache secret must be str or bytes, got {type(self.secret).__name__}")
            if len(secret) < MIN_SECRET_BYTES:
                raise ValueError(
                    f"cache secret is {len(secret)} bytes; use at least {MIN_SECRET_BYTES} random bytes "
                    "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
                )
            object.__setattr__(self, "secret", secret)
        NormalizationOptions(self.unicode_form, self.whitespace, self.casefold)
        positive = {
            "deadline_ms": self.deadline_ms,
            "breaker_failures": self.breaker_failures,
            "max_value_bytes": self.max_value_bytes,
            "queue_size": self.queue_size,
            "draft_continuation": self.draft_continuation,
            "draft_max_positions": self.draft_max_positions,
            "memory_max_entries": self.memory_max_entries,
            "memory_max_bytes": self.memory_max_bytes,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"cache option {name}={value!r} must be > 0")
        for name in ("ttl_s", "draft_ttl_s", "breaker_cooldown_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"cache option {name}={getattr(self, name)!r} must be >= 0 (0 = off)")
        if not self.draft_contexts or min(self.draft_contexts) < 1:
            raise ValueError(f"draft_contexts={self.draft_contexts!r} must be non-empty positive lengths")
        if self.max_value_bytes < 16 + 4 * self.draft_continuation:
            raise ValueError(
                f"max_value_bytes={self.max_value_bytes} cannot hold a draft continuation of "
                f"{self.draft_continuation} tokens; raise it or lower draft_continuation"
            )

    def __repr__(self) -> str:
        # Field by field, with the URL redacted: the dataclass repr would print the password.
        shown = []
        for f in dataclasses.fields(self):
            if f.name in ("redis_options", "secret"):
                continue
            value = redact_url(self.url) if f.name == "url" else getattr(self, f.name)
            shown.append(f"{f.name}={value!r}")
        shown.append(f"trusted={self.trusted!r}")
        return f"CacheConfig({', '.join(shown)})"

    @property
    def trusted(self) -> bool:
        """Trusted mode: entries are signed, and authenticated entries are served without a forward."""
        return self.secret is not None

    @property
    def normalization(self) -> NormalizationOptions:
        """The prompt normalisation rules."""
        return NormalizationOptions(self.unicode_form, self.whitespace, self.casefold)

    @property
    def connection_id(self) -> tuple:
        """What identifies a shared connection (pool, breaker, write queue) in a process."""
        return (
            self.backend,
            self.url,
            self.cluster,
            self.deadline_ms,
            self.breaker_failures,
            self.breaker_cooldown_s,
            self.queue_size,
            self.memory_max_entries,
            self.memory_max_bytes,
            tuple(sorted(self.redis_options.items())),
        )

    def describe(self) -> str:
        """The connection URL without credentials or options, for messages."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))


_FIELDS = {f.name: f for f in dataclasses.fields(CacheConfig)}
_USER_FIELDS = set(_FIELDS) - {"url", "backend", "redis_options", "secret"}


def redact_url(url: str) -> str:
    """`url` with credentials removed: user name, password and secret-like query options.

    For messages, logs, reports and command lines: `redis://u:pw@h:6379/0?password=x&db=1`
    becomes `redis://***@h:6379/0?password=***&db=1`. Anything that does not parse as a
    URL is replaced whole (it may be a secret pasted in the wrong place).
    """
    if not isinstance(url, str):
        return "<not a URL>"
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    if not parts.scheme:
        return "<unparseable URL>"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{port}" if port else "")
    if "@" in parts.netloc:
        netloc = "***@" + netloc
    query = "&".join(
        f"{name}=***" if _SECRET_QUERY.search(name) else f"{name}={value}"
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    out = f"{parts.scheme}://{netloc}{parts.path}"
    return out + (f"?{query}" if query else "")


def secret_from_env() -> bytes | None:
    """The trusted-mode secret from SPECDEC_CACHE_SECRET, or None when unset or empty."""
    value = os.environ.get(ENV_SECRET, "")
    return value.encode("utf-8") if value else None


def _coerce(name: str, value: Any) -> Any:
    default = _FIELDS[name].default
    if isinstance(default, bool):
        return _parse_bool(name, value)
    if isinstance(default, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"cache option {name}={value!r} must be an integer") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"cache option {name}={value!r} must be a number") from None
    if isinstance(default, tuple):
        return _parse_ints(name, value)
    if name == "unicode_form" and value not in UNICODE_FORMS:
        raise ValueError(f"unicode_form={value!r}; allowed: {', '.join(UNICODE_FORMS)}")
    if name == "whitespace" and value not in WHITESPACE_MODES:
        raise ValueError(f"whitespace={value!r}; allowed: {', '.join(WHITESPACE_MODES)}")
    return value


def parse_cache_url(url: str, **options: Any) -> CacheConfig:
    """Parse a cache URL plus keyword options into a CacheConfig (ValueError on anything unknown)."""
    if not isinstance(url, str):
        raise TypeError(f"cache URL must be a str, got {type(url).__name__}")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ValueError(
            f"cache URL {redact_url(url)!r} does not parse; e.g. redis://127.0.0.1:6379/0 or memory://"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"unsupported cache URL {redact_url(url)!r}; use one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
            + " (e.g. redis://127.0.0.1:6379/0 or memory://)"
        )
    values: dict[str, Any] = {}
    passthrough: dict[str, str] = {}
    for raw_name, value in parse_qsl(parts.query, keep_blank_values=True):
        name = _ALIASES.get(raw_name, raw_name)
        if name.lower() in _URL_SECRET_OPTIONS:
            raise ValueError(
                f"cache URL option {raw_name!r} is refused: the trusted-mode secret must not be put in a URL "
                f"(URLs are logged and printed); pass secret=... to CacheLayer.open/parse_cache_url or set {ENV_SECRET}"
            )
        if name in _USER_FIELDS:
            values[name] = _coerce(name, value)
        elif name in REDIS_PASSTHROUGH:
            passthrough[name] = value
        elif name in _OWNED_REDIS:
            raise ValueError(f"cache URL option {raw_name!r} is not allowed; set {_OWNED_REDIS[name]} instead")
        else:
            raise ValueError(
                f"unknown cache URL option {raw_name!r}; cache options: {', '.join(sorted(_USER_FIELDS))}; "
                f"redis options: {', '.join(sorted(REDIS_PASSTHROUGH))}"
            )
    secret = options.pop("secret", None)
    if secret is None:
        secret = secret_from_env()
    for raw_name, value in options.items():
        name = _ALIASES.get(raw_name, raw_name)
        if name not in _USER_FIELDS:
            raise TypeError(
                f"unknown cache option {raw_name!r}; allowed: {', '.join(sorted(_USER_FIELDS))}"
            )
        values[name] = _coerce(name, value)

    if scheme == "memory":
        if values.pop("cluster", False):
            raise ValueError("cluster=true needs a Redis URL, not memory://")
        # memory://name selects a named in-process store; memory:// is the default one.
        name = (parts.netloc + parts.path).strip("/")
        return CacheConfig(url=f"memory://{name}", backend="memory", secret=secret, **values)

    cluster = scheme.endswith("+cluster") or bool(values.pop("cluster", False))
    base_scheme = scheme.split("+", 1)[0]
    if base_scheme == "unix" and cluster:
        raise ValueError("Redis Cluster needs TCP addresses; unix:// cannot be combined with cluster")
    if base_scheme != "unix" and not parts.hostname:
        raise ValueError(f"cache URL {redact_url(url)!r} has no host; e.g. redis://127.0.0.1:6379/0")
    if base_scheme == "unix" and not parts.path:
        raise ValueError(f"cache URL {redact_url(url)!r} has no socket path; e.g. unix:///run/redis/redis.sock")
    # Built by hand: urlunsplit drops the "//" of unix:///path, which redis-py requires.
    query = urlencode(passthrough)
    clean = f"{base_scheme}://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")
    return CacheConfig(
        url=clean, backend="redis", cluster=cluster, redis_options=passthrough, secret=secret, **values
    )


def default_url() -> str | None:
    """The cache URL from the SPECDEC_REDIS_URL environment variable, or None."""
    value = os.environ.get(ENV_URL, "").strip()
    return value or None
