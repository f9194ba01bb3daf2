"""Redis backend (redis-py): standalone over TCP, TLS or a unix socket, or Redis Cluster.

Failure behaviour is set here once: socket connect and read/write timeouts equal the
deadline, connections are deadline-aware (specdec.cache.deadline: the store bounds
each whole call, handshake included), and redis-py's own retries are switched off
(its default retries ten times with backoff, which would turn one dead server into
seconds of latency). The client
is created on first use, so an unreachable server fails a call rather than the
constructor. Callers share one instance per process and URL (specdec.cache.store),
hence one connection pool per process.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator, Mapping, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from urllib.parse import urlsplit

from .backend import Backend, Write
from .config import CacheConfig
from .deadline import connection_class


class RedisBackend(Backend):
    """Backend over redis-py with deadline-sized socket timeouts and no retries."""

    kind = "redis"

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.cluster = config.cluster
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The redis-py client (Redis or RedisCluster), created on first use."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._connect()
                client = self._client
        return client

    def _connect(self) -> Any:
        timeout = self.config.deadline_ms / 1000.0
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            "connection_class": connection_class(urlsplit(self.config.url).scheme),
        }
        if self.cluster:
            # Cluster discovery runs here; a failure propagates and the next call tries again.
            return redis.RedisCluster.from_url(self.config.url, **kwargs)
        pool = redis.ConnectionPool.from_url(self.config.url, **kwargs)
        return redis.Redis(connection_pool=pool)

    def get(self, key: str) -> bytes | None:
        return self.client.get(key)

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        if self.cluster:  # keys of different slots: one request per node
            return self.client.mget_nonatomic(list(keys))
        return self.client.mget(list(keys))

    def set_many(self, writes: Sequence[Write]) -> None:
        if not writes:
            return
        pipe = self.client.pipeline(transaction=False)
        for key, value, ttl in writes:
            if ttl:
                pipe.set(key, value, px=max(1, int(ttl * 1000)))
            else:
                pipe.set(key, value)
        pipe.execute()

    def set_if_absent(self, key: str, value: bytes) -> bool:
        return bool(self.client.set(key, value, nx=True))

    def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        # UNLINK frees memory off the server's main thread.
        return int(self.client.unlink(*keys))

    def incr(self, key: str) -> int:
        return int(self.client.incr(key))

    def hincrby_many(self, key: str, amounts: Mapping[str, int]) -> None:
        if not amounts:
            return
        pipe = self.client.pipeline(transaction=False)
        for name, amount in amounts.items():
            pipe.hincrby(key, name, int(amount))
        pipe.execute()

    def hset_many(self, key: str, mapping: Mapping[str, bytes]) -> None:
        if mapping:
            self.client.hset(key, mapping=dict(mapping))

    def hgetall(self, key: str) -> dict[str, bytes]:
        raw = self.client.hgetall(key)
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}

    def scan(self, pattern: str, count: int = 1000) -> Iterator[str]:
        for key in self.client.scan_iter(match=pattern, count=count):
            yield key.decode() if isinstance(key, bytes) else key

    def ttl(self, key: str) -> float | None:
        ms = int(self.client.pttl(key))
        return None if ms < 0 else ms / 1000.0

    def ping(self) -> bool:
        return bool(self.client.ping())

    def server_info(self) -> dict[str, object]:
        info = self.client.info()
        if self.cluster:  # {node: info}; report the first node and the node count
            nodes = list(info.values()) if info and isinstance(next(iter(info.values())), dict) else [info]
            first = nodes[0] if nodes else {}
            return {
                "backend": "redis-cluster",
                "nodes": len(nodes),
                "redis_version": first.get("redis_version"),
                "used_memory_human": first.get("used_memory_human"),
            }
        return {
            "backend": "redis",
            "redis_version": info.get("redis_version"),
            "used_memory_human": info.get("used_memory_human"),
            "maxmemory_policy": info.get("maxmemory_policy"),
            "db_keys": {k: v for k, v in info.items() if k.startswith("db") and isinstance(v, dict)},
        }

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken connection must not raise
                pass
