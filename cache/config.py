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
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .keys import validate_namespace
from .normalize import UNICODE_FORMS, WHITESPACE_MODES, NormalizationOptions

ENV_URL = "SPECDEC_REDIS_URL"
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
    redis_options: dict[str, str] = field(default_factory=dict)  # passed to redis-py

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)
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
        """The connection URL without credentials, for messages."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))


_FIELDS = {f.name: f for f in dataclasses.fields(CacheConfig)}
_USER_FIELDS = set(_FIELDS) - {"url", "backend", "redis_options"}


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
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"unsupported cache URL {url!r}; use one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
            + " (e.g. redis://127.0.0.1:6379/0 or memory://)"
        )
    values: dict[str, Any] = {}
    passthrough: dict[str, str] = {}
    for raw_name, value in parse_qsl(parts.query, keep_blank_values=True):
        name = _ALIASES.get(raw_name, raw_name)
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
        return CacheConfig(url=f"memory://{name}", backend="memory", **values)

    cluster = scheme.endswith("+cluster") or bool(values.pop("cluster", False))
    base_scheme = scheme.split("+", 1)[0]
    if base_scheme == "unix" and cluster:
        raise ValueError("Redis Cluster needs TCP addresses; unix:// cannot be combined with cluster")
    if base_scheme != "unix" and not parts.hostname:
        raise ValueError(f"cache URL {url!r} has no host; e.g. redis://127.0.0.1:6379/0")
    if base_scheme == "unix" and not parts.path:
        raise ValueError(f"cache URL {url!r} has no socket path; e.g. unix:///run/redis/redis.sock")
    # Built by hand: urlunsplit drops the "//" of unix:///path, which redis-py requires.
    query = urlencode(passthrough)
    clean = f"{base_scheme}://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")
    return CacheConfig(url=clean, backend="redis", cluster=cluster, redis_options=passthrough, **values)


def default_url() -> str | None:
    """The cache URL from the SPECDEC_REDIS_URL environment variable, or None."""
    value = os.environ.get(ENV_URL, "").strip()
    return value or None


# Query options whose value is a credential: never written to logs or result files.
_SECRET_WORDS = ("password", "passwd", "secret", "token", "key", "auth", "credential")


def redact_url(url: str) -> str:
    """`url` with its username, password and credential-like query values replaced by ***.

    For logs and result files: the host, port, path and harmless options stay readable.
    """
    if not isinstance(url, str):
        return repr(url)
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = "&".join(
        f"{name}={'***' if any(w in name.lower() for w in _SECRET_WORDS) else value}" for name, value in pairs
    )
    # Built by hand, like parse_cache_url: urlunsplit drops the "//" of unix:///path.
    out = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else f"{netloc}{parts.path}"
    return out + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
