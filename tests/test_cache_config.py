"""Cache URLs and options: every supported form parses, anything unknown fails clearly."""

from __future__ import annotations

import pytest

from specdec.cache.config import ENV_URL, default_url, parse_cache_url


def test_redis_urls():
    c = parse_cache_url("redis://127.0.0.1:6379/2?namespace=prod&ttl_s=60&deadline_ms=20&casefold=true")
    assert (c.backend, c.cluster, c.namespace, c.ttl_s, c.deadline_ms, c.casefold) == (
        "redis", False, "prod", 60.0, 20.0, True,
    )
    assert c.url == "redis://127.0.0.1:6379/2"
    t = parse_cache_url("rediss://user:secret@cache.example:6380/0?ssl_cert_reqs=none")
    assert t.url.startswith("rediss://user:secret@cache.example:6380/0") and t.redis_options == {"ssl_cert_reqs": "none"}
    assert "secret" not in t.describe()
    u = parse_cache_url("unix:///run/redis.sock?db=1")
    assert u.backend == "redis" and u.url == "unix:///run/redis.sock?db=1"


def test_cluster_forms():
    assert parse_cache_url("redis+cluster://10.0.0.1:7000").cluster
    a = parse_cache_url("redis://10.0.0.1:7000?cluster=true")
    assert a.cluster and a.url == "redis://10.0.0.1:7000"
    assert parse_cache_url("rediss+cluster://10.0.0.1:7000").url.startswith("rediss://")
    with pytest.raises(ValueError, match="unix"):
        parse_cache_url("unix:///x.sock?cluster=true")


def test_memory_urls_and_keyword_overrides():
    assert parse_cache_url("memory://").url == "memory://"
    named = parse_cache_url("memory://side?ns=x", ttl_s=5, response_cache=False, draft_contexts="4,16")
    assert (named.url, named.namespace, named.ttl_s, named.response_cache, named.draft_contexts) == (
        "memory://side", "x", 5.0, False, (16, 4),
    )
    assert parse_cache_url("memory://", ttl=7).ttl_s == 7.0  # alias


@pytest.mark.parametrize(
    "url, kwargs, error, match",
    [
        ("http://x", {}, ValueError, "unsupported cache URL"),
        ("redis://h:1?bogus=1", {}, ValueError, "unknown cache URL option 'bogus'"),
        ("redis://h:1?socket_timeout=1", {}, ValueError, "deadline_ms"),
        ("redis://h:1?retry_on_timeout=true", {}, ValueError, "never retries"),
        ("redis://h:1?casefold=maybe", {}, ValueError, "boolean"),
        ("redis://h:1?deadline_ms=-5", {}, ValueError, "must be > 0"),
        ("redis://h:1?ttl_s=-1", {}, ValueError, ">= 0"),
        ("redis://h:1?namespace=a:b", {}, ValueError, "invalid cache namespace"),
        ("redis://h:1?whitespace=squash", {}, ValueError, "whitespace"),
        ("redis://h:1", {"ttl_seconds": 3}, TypeError, "unknown cache option"),
        ("redis:///0", {}, ValueError, "no host"),
        ("memory://?cluster=true", {}, ValueError, "cluster"),
        ("redis://h:1?max_value_bytes=64", {}, ValueError, "draft continuation"),
    ],
)
def test_bad_configuration_is_rejected(url, kwargs, error, match):
    with pytest.raises(error, match=match):
        parse_cache_url(url, **kwargs)


def test_environment_default(monkeypatch):
    monkeypatch.delenv(ENV_URL, raising=False)
    assert default_url() is None
    monkeypatch.setenv(ENV_URL, " redis://127.0.0.1:6379/0 ")
    assert default_url() == "redis://127.0.0.1:6379/0"
