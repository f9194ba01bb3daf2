"""`specdec cache stats | invalidate | flush` against a real server."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from specdec.cache import (
    DraftStore,
    Namespace,
    NormalizationOptions,
    ResponseCache,
    ResponseRequest,
    get_store,
    parse_cache_url,
    release_store,
)
from specdec.cache.cli import add_arguments, run


def request_for(prompt=(1, 2, 3), model="m" * 32) -> ResponseRequest:
    return ResponseRequest(
        model=model,
        tokenizer="t" * 32,
        normalization=NormalizationOptions().spec(),
        prompt_ids=tuple(prompt),
        sampling={"mode": "greedy", "ignore_eos": False},
        seed=None,
        max_new_tokens=8,
    )


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="specdec cache")
    add_arguments(parser)
    return run(parser.parse_args(list(argv)))


@pytest.fixture
def filled(redis_server, cache_namespace):
    """A namespace with 5 responses (two models) and some draft entries."""
    store = get_store(parse_cache_url(redis_server.url, namespace=cache_namespace, deadline_ms=2000))
    ns = Namespace(store, cache_namespace)
    rc = ResponseCache(store, ns, ttl_s=60, max_value_bytes=1 << 20)
    for i in range(4):
        rc.lookup(request_for(prompt=(i,)))
        rc.put(request_for(prompt=(i,)), [i], "stop")
    rc.lookup(request_for(prompt=(9,), model="b" * 32))
    rc.put(request_for(prompt=(9,), model="b" * 32), [9], "stop")
    ns.register_model("m" * 32, {"role": "target", "name_or_path": "org/model-a", "revision": None})
    DraftStore(store, ns, vocab="v" * 32, contexts=(2,), continuation=4).add([1, 2, 3, 4, 5])
    store.flush(5)
    yield store, ns, rc
    release_store(store)


def test_stats(filled, redis_server, cache_namespace, capsys):
    assert cli("stats", "--url", redis_server.url, "--namespace", cache_namespace, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["namespace"] == cache_namespace
    assert report["keys"]["resp"] == 5 and report["keys"]["draft"] == 3
    assert report["models"]["m" * 32]["name_or_path"] == "org/model-a"
    assert report["server"]["redis_version"]
    assert cli("stats", "--url", redis_server.url, "--namespace", cache_namespace) == 0
    text = capsys.readouterr().out
    assert f"namespace   {cache_namespace}" in text and "resp=5" in text and "org/model-a" in text


def test_invalidate_all_model_and_key(filled, redis_server, cache_namespace, capsys):
    store, ns, rc = filled
    base = ["--url", redis_server.url, "--namespace", cache_namespace]
    assert rc.lookup(request_for(prompt=(0,))) is not None
    # by model name (resolved through the registered models)
    assert cli("invalidate", *base, "--model", "org/model-a") == 0
    assert rc.lookup(request_for(prompt=(0,))) is None
    assert rc.lookup(request_for(prompt=(9,), model="b" * 32)) is not None
    assert cli("invalidate", *base, "--model", "no/such-model") == 1
    # one key, by digest
    key = rc.key(request_for(prompt=(9,), model="b" * 32), ns.fetch_epochs(["b" * 32]))
    assert cli("invalidate", *base, "--key", key.rsplit(":", 1)[1]) == 0
    assert "deleted" in capsys.readouterr().out
    assert rc.lookup(request_for(prompt=(9,), model="b" * 32)) is None
    assert cli("invalidate", *base, "--key", "not-hex") == 2
    # everything, O(1)
    rc.put(request_for(prompt=(5,), model="b" * 32), [5], "stop")
    store.flush(5)
    assert rc.lookup(request_for(prompt=(5,), model="b" * 32)) is not None
    assert cli("invalidate", *base, "--all") == 0
    assert rc.lookup(request_for(prompt=(5,), model="b" * 32)) is None


def test_flush_uses_the_environment_url(filled, redis_server, cache_namespace, monkeypatch, capsys):
    store, ns, rc = filled
    monkeypatch.setenv("SPECDEC_REDIS_URL", redis_server.url)
    assert cli("flush", "--namespace", cache_namespace, "--dry-run") == 0
    assert "would delete" in capsys.readouterr().out
    assert cli("flush", "--namespace", cache_namespace) == 0
    out = capsys.readouterr().out
    assert "deleted" in out
    assert ns.stats()["keys"].get("resp", 0) == 0 and ns.stats()["keys"].get("draft", 0) == 0
    # the server itself was not flushed: another namespace's key survives
    assert redis_server.command("SET", "unrelated-key", "1").startswith(b"+OK")
    assert cli("flush", "--namespace", cache_namespace) == 0
    assert redis_server.command("GET", "unrelated-key") == b"$1\r\n1\r\n"


def test_errors(monkeypatch, dead_redis_url, capsys):
    monkeypatch.delenv("SPECDEC_REDIS_URL", raising=False)
    assert cli("stats") == 2
    assert "SPECDEC_REDIS_URL" in capsys.readouterr().err
    assert cli("stats", "--url", dead_redis_url, "--deadline-ms", "200") == 1
    assert "cache server failed" in capsys.readouterr().err
    assert cli("flush", "--url", "redis://127.0.0.1:1/0", "--namespace", "bad:ns") == 2


def test_module_entry_point(redis_server, cache_namespace):
    env = {**os.environ, "SPECDEC_REDIS_URL": redis_server.url}
    out = subprocess.run(
        [sys.executable, "-m", "specdec.cache.cli", "stats", "--namespace", cache_namespace, "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["namespace"] == cache_namespace


def test_admin_commands_never_flush_or_reconfigure_the_server(redis_process):
    # The server's own command statistics show what the client sent.
    url = redis_process.url
    for argv in (("stats",), ("invalidate", "--all"), ("invalidate", "--key", "0" * 64), ("flush",)):
        assert cli(argv[0], "--url", url, *argv[1:]) == 0
    import redis

    client = redis.Redis.from_url(url)
    used = {name.removeprefix("cmdstat_") for name in client.info("commandstats")}
    client.close()
    assert {"scan", "set", "unlink"} <= used
    assert not used & {"flushdb", "flushall", "config"}, used


def test_junk_from_the_server_is_escaped_never_printed_raw(filled, redis_server, cache_namespace, capsys):
    # Anyone who can write to the server can put terminal escape sequences in what the CLI reads.
    import redis

    esc = "\x1b]0;owned\x07\x1b[2J"
    client = redis.Redis.from_url(redis_server.url)
    prefix = f"specdec:{cache_namespace}:"
    client.set(prefix + "epoch", esc)
    client.hset(prefix + "models", mapping={"x" * 32 + esc: esc, "y" * 32: json.dumps([esc]), "z" * 32: b"\xff\xfe"})
    client.hset(prefix + "stats", mapping={"hits" + esc: 3, "misses": "not a number"})
    client.set(prefix + "resp" + esc + ":k", b"junk")
    client.close()
    for argv in (("stats",), ("stats", "--json"), ("invalidate", "--model", "org/none"), ("flush", "--dry-run")):
        code = cli(argv[0], "--url", redis_server.url, "--namespace", cache_namespace, *argv[1:])
        out = capsys.readouterr()
        assert code in (0, 1), argv
        for text in (out.out, out.err):
            assert "\x1b" not in text and "\x07" not in text, (argv, text)
    assert cli("stats", "--url", redis_server.url, "--namespace", cache_namespace) == 0
    assert "\\x1b" in capsys.readouterr().out  # shown escaped, not dropped
