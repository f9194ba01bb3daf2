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
import math
import os
import re
import ssl
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


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_bool(name: str, value: Any) -> bool:
    """A bool, or one of the words true/false, yes/no, on/off, 1/0 (in a URL); anything else is an error."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(
        f"cache option {name}={value!r} is not a boolean; it must be true or false (also 1/0, yes/no, on/off)"
    )


def _parse_int(name: str, value: Any, allowed: str) -> int:
    """An int from an int or its decimal text; floats, bools and other text are errors."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError(f"cache option {name}={value!r} is not an integer; it must be {allowed}")


def _parse_float(name: str, value: Any, allowed: str) -> float:
    """A finite float from a number or its text; nan, inf, bools and other text are errors."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"cache option {name}={value!r} is not a number; it must be {allowed}") from None
    else:
        raise ValueError(f"cache option {name}={value!r} is not a number; it must be {allowed}")
    if not math.isfinite(number):
        raise ValueError(f"cache option {name}={value!r} is not a finite number; it must be {allowed}")
    return number


def _parse_ints(name: str, value: Any) -> tuple[int, ...]:
    problem = f"cache option {name}={value!r} is not a list of context lengths; it must be {_CONTEXTS_ALLOWED}"
    if isinstance(value, str):
        items: list[Any] = [v for v in value.replace(" ", "").split(",") if v]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    else:
        raise ValueError(problem)
    try:
        out = tuple(sorted({_parse_int(name, v, "") for v in items}, reverse=True))
    except ValueError:
        raise ValueError(problem) from None
    if not out or out[-1] < 1 or out[0] > MAX_DRAFT_CONTEXT or len(out) > MAX_DRAFT_CONTEXTS:
        raise ValueError(f"cache option {name}={value!r} is out of range; it must be {_CONTEXTS_ALLOWED}")
    return out


@dataclass(frozen=True)
class _Range:
    """The allowed values of one numeric option: its type, bounds and what it means."""

    kind: type  # int or float
    low: float
    high: float | None = None
    low_open: bool = False  # True: the value must be > low, else >= low
    unit: str = ""

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        bounds = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.high is not None:
            bounds += f" and <= {_number(self.high)}"
        return f"{bounds}, {what}" + (f" ({self.unit})" if self.unit else "")

    def check(self, name: str, value: Any) -> int | float:
        allowed = self.describe()
        number = _parse_int(name, value, allowed) if self.kind is int else _parse_float(name, value, allowed)
        too_low = number <= self.low if self.low_open else number < self.low
        if too_low or (self.high is not None and number > self.high):
            raise ValueError(f"cache option {name}={value!r} is out of range; it must be {allowed}")
        return number


def _number(value: float) -> str:
    """600000 rather than 600000.0 or 6e+05."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# A Redis call that may take longer than this is no cache (and socket timeouts must stay finite).
MAX_DEADLINE_MS = 600_000.0
# Longer TTLs are almost certainly a unit mistake; 0 means no expiry.
MAX_TTL_S = 10 * 365 * 86400.0
MAX_BREAKER_COOLDOWN_S = 86400.0
MAX_VALUE_BYTES = 512 << 20  # Redis's largest string
# Every context length costs one key per indexed position: a few lengths, each a few thousand tokens at most.
MAX_DRAFT_CONTEXTS = 16
MAX_DRAFT_CONTEXT = 4096
_CONTEXTS_ALLOWED = (
    f"1 to {MAX_DRAFT_CONTEXTS} comma-separated context lengths, each an integer >= 1 and <= {MAX_DRAFT_CONTEXT}"
)
_RANGES = {
    "ttl_s": _Range(float, 0, MAX_TTL_S, unit="seconds; 0 = no expiry"),
    "draft_ttl_s": _Range(float, 0, MAX_TTL_S, unit="seconds; 0 = no expiry"),
    "deadline_ms": _Range(float, 0, MAX_DEADLINE_MS, low_open=True, unit="milliseconds for a whole Redis call"),
    "breaker_failures": _Range(int, 1, 1_000_000, unit="consecutive failures that open the breaker"),
    "breaker_cooldown_s": _Range(float, 0, MAX_BREAKER_COOLDOWN_S, unit="seconds"),
    "max_value_bytes": _Range(int, 1, MAX_VALUE_BYTES, unit="bytes"),
    "queue_size": _Range(int, 1, 10_000_000, unit="write-behind jobs"),
    "draft_continuation": _Range(int, 1, 65536, unit="tokens"),
    "draft_max_positions": _Range(int, 1, 1 << 20, unit="positions"),
    "memory_max_entries": _Range(int, 1, 1 << 40, unit="entries"),
    "memory_max_bytes": _Range(int, 1, 1 << 50, unit="bytes"),
}
_BOOL_FIELDS = ("cluster", "casefold", "response_cache", "draft_store")


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
        # Every field checked here too, so a CacheConfig built directly is held to the same
        # ranges as one parsed from a URL (floats normalised, ints kept exact).
        for name, spec in _RANGES.items():
            object.__setattr__(self, name, spec.kind(spec.check(name, getattr(self, name))))
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise ValueError(f"cache option {name}={value!r} is not a boolean; it must be True or False")
        object.__setattr__(self, "draft_contexts", _parse_ints("draft_contexts", self.draft_contexts))
        if self.unicode_form not in UNICODE_FORMS:
            raise ValueError(f"unicode_form={self.unicode_form!r}; allowed: {', '.join(UNICODE_FORMS)}")
        if self.whitespace not in WHITESPACE_MODES:
            raise ValueError(f"whitespace={self.whitespace!r}; allowed: {', '.join(WHITESPACE_MODES)}")
        NormalizationOptions(self.unicode_form, self.whitespace, self.casefold)
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
    """One cache option from URL text or a keyword value, checked against its allowed values."""
    if name in _RANGES:
        return _RANGES[name].check(name, value)
    if name in _BOOL_FIELDS:
        return _parse_bool(name, value)
    if name == "draft_contexts":
        return _parse_ints(name, value)
    if name == "unicode_form" and value not in UNICODE_FORMS:
        raise ValueError(f"unicode_form={value!r}; allowed: {', '.join(UNICODE_FORMS)}")
    if name == "whitespace" and value not in WHITESPACE_MODES:
        raise ValueError(f"whitespace={value!r}; allowed: {', '.join(WHITESPACE_MODES)}")
    return value


_TLS_VERSIONS = {v.name: int(v) for v in ssl.TLSVersion if int(v) > 0}
_CERT_REQS = ("none", "optional", "required")
_SSL_FILES = {"ssl_ca_certs": "file", "ssl_certfile": "file", "ssl_keyfile": "file", "ssl_ca_path": "folder"}


def _redis_option(name: str, value: str, *, tls: bool, cluster: bool) -> str:
    """A redis-py connection option from the URL, checked and spelt the way redis-py parses it.

    redis-py reads these only when it connects, and the cache turns a failed connect into
    a skipped call: a bad value here would be a cache that silently never does anything.
    """

    def bad(allowed: str) -> ValueError:
        return ValueError(f"cache URL option {name}={value!r} is not allowed; it must be {allowed}")

    def integer(low: int, high: int) -> str:
        allowed = f"an integer >= {low} and <= {high}"
        if not re.fullmatch(r"\d+", value.strip()) or not low <= int(value) <= high:
            raise bad(allowed)
        return str(int(value))

    if name.startswith("ssl_") and not tls:
        raise ValueError(f"cache URL option {name} needs TLS: use a rediss:// URL (or drop {name})")
    if name == "db":
        if cluster and value.strip() not in ("0",):
            raise bad("0 (Redis Cluster has only database 0)")
        return integer(0, 2**31 - 1)
    if name == "protocol":
        if value.strip() not in ("2", "3"):
            raise bad("2 (RESP2) or 3 (RESP3)")
        return value.strip()
    if name == "max_connections":
        return integer(1, 2**31 - 1)
    if name == "health_check_interval":
        return integer(0, 86400)
    if name in ("socket_keepalive", "ssl_check_hostname"):
        text = value.strip().lower()
        if text not in _TRUE + _FALSE:
            raise bad("true or false (also 1/0, yes/no, on/off)")
        return "true" if text in _TRUE else "false"
    if name == "ssl_cert_reqs":
        if value.strip().lower() not in _CERT_REQS:
            raise bad(", ".join(_CERT_REQS))
        return value.strip().lower()
    if name == "ssl_min_version":
        text = value.strip()
        if text in _TLS_VERSIONS:
            return str(_TLS_VERSIONS[text])
        if text.isdigit() and int(text) in _TLS_VERSIONS.values():
            return text
        raise bad(", ".join(f"{n} ({v})" for n, v in _TLS_VERSIONS.items()))
    if name in _SSL_FILES:
        kind = _SSL_FILES[name]
        exists = os.path.isdir(value) if kind == "folder" else os.path.isfile(value)
        if not value or not exists:
            raise ValueError(f"cache URL option {name}={value!r}: no such {kind}; pass the path of an existing {kind}")
        return value
    if name == "client_name":
        # Redis refuses names with spaces, newlines or other characters outside '!'..'~'.
        if not value or len(value) > 256 or any(not 33 <= ord(c) <= 126 for c in value):
            raise bad("1 to 256 printable ASCII characters without spaces")
        return value
    return value


def _path_db(path: str, url: str, *, cluster: bool) -> int | None:
    """The database number in a redis:// URL's path ("/2"), None when there is none."""
    text = path.strip("/")
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(
            f"cache URL {redact_url(url)!r}: the path {path!r} is not a database number; "
            "e.g. redis://127.0.0.1:6379/0 (database 0)"
        )
    if cluster and int(text) != 0:
        raise ValueError(f"cache URL {redact_url(url)!r}: Redis Cluster has only database 0, not {int(text)}")
    return int(text)


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
    seen: dict[str, str] = {}
    for raw_name, value in parse_qsl(parts.query, keep_blank_values=True):
        name = _ALIASES.get(raw_name, raw_name)
        if name in seen:
            # redis-py would read the first, a dict the last: one meaning per URL.
            raise ValueError(f"cache URL option {raw_name!r} is given twice (also as {seen[name]!r}); give it once")
        seen[name] = raw_name
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
        if passthrough:
            raise ValueError(
                f"cache URL option {next(iter(passthrough))!r} is a Redis connection option; memory:// has no "
                "connection: drop it or use a redis:// URL"
            )
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
    if base_scheme != "unix" and parts.port == 0:
        raise ValueError(f"cache URL {redact_url(url)!r} has port 0; allowed: 1 to 65535 (Redis: 6379)")
    for name, value in passthrough.items():
        passthrough[name] = _redis_option(name, value, tls=base_scheme == "rediss", cluster=cluster)
    if base_scheme != "unix":
        path_db = _path_db(parts.path, url, cluster=cluster)
        if path_db is not None and "db" in passthrough and int(passthrough["db"]) != path_db:
            raise ValueError(
                f"cache URL {redact_url(url)!r} names database {path_db} in its path and db={passthrough['db']} "
                "in its options; give one"
            )
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
