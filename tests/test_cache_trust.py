"""Trusted mode must not undo its own invalidation: authenticated epochs and model registry.

Whoever can write to the Redis can write an old epoch back, restore a backup taken before
an invalidation, or rewrite the model registry. In each case a signed answer from before
the invalidation (here a wrong one, as from a bad deploy) must never be served without a
forward again: the output must equal uncached decoding. Against a real redis-server.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import redis
import torch

from specdec import SpeculativeGenerator
from specdec.cache import Namespace, get_store, parse_cache_url, release_store
from specdec.cache.cli import add_arguments, run
from specdec.caching import CacheLayer
from specdec.params import make_params

PROMPT = "def add(a, b):"
GREEDY = dict(max_new_tokens=20, ignore_eos=True, drafter="none")
SECRET = "trust-test-secret-0123456789"


@pytest.fixture(scope="module")
def gen(cache_models):
    return SpeculativeGenerator.from_pretrained(str(cache_models.target), dtype=torch.float64)


@pytest.fixture(autouse=True)
def watermarks(tmp_path, monkeypatch):
    """Generation watermarks of this test in a folder of its own; no secret in the environment."""
    folder = tmp_path / "state" / "epochs"
    monkeypatch.setenv("SPECDEC_EPOCH_DIR", str(folder))
    monkeypatch.delenv("SPECDEC_CACHE_SECRET", raising=False)
    return folder


@pytest.fixture
def url(redis_server, cache_namespace):
    return redis_server.url + f"?namespace={cache_namespace}&deadline_ms=1000"


@pytest.fixture
def client(redis_server):
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def base(gen):
    """The uncached greedy answer."""
    return gen.generate(PROMPT, cache=None, **GREEDY)[0].token_ids


def one(gen, layer):
    return gen.generate(PROMPT, cache=layer, **GREEDY)[0]


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="specdec cache")
    add_arguments(parser)
    return run(parser.parse_args(list(argv)))


def plant_wrong_signed_answer(gen, layer, base) -> None:
    """A wrong answer signed under the current epochs (a bad deploy), served trusted until invalidated."""
    request = layer.request_for(gen.tokenizer(PROMPT)["input_ids"], PROMPT, make_params(**GREEDY))
    layer.responses.lookup(request)  # learn the epochs
    layer.responses.put(request, [(t + 3) % gen.vocab_size for t in base], "length")
    layer.flush()
    got = one(gen, layer)
    assert got.stats.cache_kind == "trusted" and got.token_ids != base  # what invalidation must end


def assert_not_served_unchecked(got, base) -> None:
    assert got.stats.cache_kind != "trusted", got.stats.cache_kind
    assert got.token_ids == base


# ---------------------------------------------------------------- 1: an old epoch written back


@pytest.mark.parametrize("what", ["model", "namespace"])
def test_old_epoch_written_back_is_never_trusted(gen, url, client, cache_namespace, base, what):
    with CacheLayer.open(url, gen, secret=SECRET) as layer:
        plant_wrong_signed_answer(gen, layer, base)
        key = f"specdec:{cache_namespace}:" + ("epoch" if what == "namespace" else f"model-epoch:{layer.model_id}")
        old = client.get(key)
        layer.invalidate_model() if what == "model" else layer.invalidate_namespace()
        assert client.get(key) != old
        client.set(key, old)  # anyone with write access
        got = one(gen, layer)
        assert_not_served_unchecked(got, base)
        assert layer.counts().get("epoch_rollbacks", 0) >= 1
        # The checked answer was written back: that write replaced the rolled-back epoch with
        # a newer one, so the old entries are unreachable and trusted hits work again.
        layer.flush()
        assert client.get(key) not in (old, None)
        again = one(gen, layer)
        assert again.stats.cache_kind == "trusted" and again.token_ids == base


# ---------------------------------------------------------------- 2: a backup restored


def backup(client, namespace) -> dict[bytes, tuple[bytes, int]]:
    return {k: (client.dump(k), client.pttl(k)) for k in client.scan_iter(match=f"specdec:{namespace}:*")}


def restore(client, namespace, saved) -> None:
    for k in list(client.scan_iter(match=f"specdec:{namespace}:*")):
        client.delete(k)
    for k, (dumped, pttl) in saved.items():
        client.restore(k, max(pttl, 0), dumped, replace=True)


_CHILD = """
import json, sys, torch
from specdec import SpeculativeGenerator
from specdec.caching import CacheLayer
gen = SpeculativeGenerator.from_pretrained(sys.argv[1], dtype=torch.float64)
with CacheLayer.open(sys.argv[2], gen) as layer:  # the secret comes from the environment
    got = gen.generate(%r, cache=layer, **json.loads(sys.argv[3]))[0]
    print(json.dumps({"tokens": got.token_ids, "kind": got.stats.cache_kind,
                      "rollbacks": layer.counts().get("epoch_rollbacks", 0)}))
""" % PROMPT


def new_process(cache_models, url):
    env = {**os.environ, "SPECDEC_CACHE_SECRET": SECRET}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(cache_models.target), url, json.dumps(GREEDY)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("what", ["model", "namespace"])
def test_backup_from_before_an_invalidation_restored(gen, url, client, cache_namespace, base, what):
    with CacheLayer.open(url, gen, secret=SECRET) as layer:
        plant_wrong_signed_answer(gen, layer, base)
        saved = backup(client, cache_namespace)
        layer.invalidate_model() if what == "model" else layer.invalidate_namespace()
    # The layer that invalidated is closed; the server is restored (no attacker needed).
    restore(client, cache_namespace, saved)
    with CacheLayer.open(url, gen, secret=SECRET) as layer:  # a new layer, a new connection
        got = one(gen, layer)
        assert_not_served_unchecked(got, base)
        layer.flush()
        again = one(gen, layer)
        assert again.stats.cache_kind == "trusted" and again.token_ids == base


def test_backup_restored_then_a_new_process(gen, cache_models, url, client, cache_namespace, base):
    with CacheLayer.open(url, gen, secret=SECRET) as layer:
        plant_wrong_signed_answer(gen, layer, base)
        saved = backup(client, cache_namespace)
        layer.invalidate_model()
    restore(client, cache_namespace, saved)
    child = new_process(cache_models, url)  # knows the invalidation only from this machine's watermark
    assert child["kind"] != "trusted" and child["tokens"] == base, child
    assert child["rollbacks"] >= 1


def test_invalidation_from_the_command_line_is_remembered_too(gen, url, client, cache_namespace, base, monkeypatch):
    with CacheLayer.open(url, gen, secret=SECRET) as layer:
        plant_wrong_signed_answer(gen, layer, base)
        saved = backup(client, cache_namespace)
    monkeypatch.setenv("SPECDEC_CACHE_SECRET", SECRET)
    assert cli("invalidate", "--url", url.split("?")[0], "--namespace", cache_namespace, "--all") == 0
    monkeypatch.delenv("SPECDEC_CACHE_SECRET")
    restore(client, cache_namespace, saved)
    with CacheLayer.open(url, gen, secret=SECRET) as layer:
        assert_not_served_unchecked(one(gen, layer), base)


# ---------------------------------------------------------------- 3: a spoofed model registry


def registered_name(layer) -> str:
    layer.flush()  # the registry is written behind
    return layer.namespace.models()[layer.model_id]["name_or_path"]


def test_spoofed_registry_never_turns_invalidate_into_a_false_success(
    gen, url, client, cache_namespace, base, monkeypatch, capsys
):
    fake = "f" * 32
    with CacheLayer.open(url, gen, secret=SECRET) as layer:
        plant_wrong_signed_answer(gen, layer, base)
        name = registered_name(layer)
        models = f"specdec:{cache_namespace}:models"
        # The writer moves the model's name to an id of its choosing.
        client.hset(models, layer.model_id, json.dumps({"role": "target", "name_or_path": "elsewhere", "revision": None}))
        client.hset(models, fake, json.dumps({"role": "target", "name_or_path": name, "revision": None}))
        monkeypatch.setenv("SPECDEC_CACHE_SECRET", SECRET)
        base_args = ["--url", url.split("?")[0], "--namespace", cache_namespace]
        capsys.readouterr()
        code = cli("invalidate", *base_args, "--model", name)
        out = capsys.readouterr()
        got = one(gen, layer)
        # Never a reported success that left the old signed answer served without a forward.
        assert not (code == 0 and got.stats.cache_kind == "trusted"), (code, out.out)
        assert code == 1 and out.out == "" and out.err.count("\n") == 1 and "no model" in out.err, out
        assert client.exists(f"specdec:{cache_namespace}:model-epoch:{fake}") == 0
        # The operator passes the id instead (it names itself); the command prints what it bumped.
        assert cli("invalidate", *base_args, "--model", layer.model_id) == 0
        assert f"model {layer.model_id}" in capsys.readouterr().out
        assert_not_served_unchecked(one(gen, layer), base)


def test_spoofed_registry_records_are_ignored(gen, url, client, cache_namespace, base, monkeypatch, capsys):
    with CacheLayer.open(url, gen, secret=SECRET) as layer:
        plant_wrong_signed_answer(gen, layer, base)
        name = registered_name(layer)
        models = f"specdec:{cache_namespace}:models"
        real = client.hget(models, layer.model_id)
        client.hset(models, "f" * 32, json.dumps({"role": "target", "name_or_path": name, "revision": None}))
        client.hset(models, "e" * 32, real)  # a valid record copied to another id: its tag names the real id
        monkeypatch.setenv("SPECDEC_CACHE_SECRET", SECRET)
        capsys.readouterr()
        assert cli("invalidate", "--url", url.split("?")[0], "--namespace", cache_namespace, "--model", name) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"model {layer.model_id} ") and "f" * 32 not in out and "e" * 32 not in out, out
        assert_not_served_unchecked(one(gen, layer), base)
        # Two authenticated records under one name: refused, never guessed.
        other = Namespace(layer.store, cache_namespace, secret=SECRET.encode())
        other.register_model("d" * 32, {"role": "target", "name_or_path": name, "revision": None})
        layer.flush()
        assert cli("invalidate", "--url", url.split("?")[0], "--namespace", cache_namespace, "--model", name) == 1
        err = capsys.readouterr().err
        assert "ambiguous" in err and layer.model_id in err and "d" * 32 in err and err.count("\n") == 1


# ---------------------------------------------------------------- verified mode, and the pieces


def test_verified_mode_is_unchanged(gen, url, client, cache_namespace, base, capsys):
    with CacheLayer.open(url, gen) as layer:
        one(gen, layer)
        layer.flush()
        assert one(gen, layer).stats.cache_kind == "verified"
        key = f"specdec:{cache_namespace}:model-epoch:{layer.model_id}"
        old = client.get(key)
        assert len(old) == 32  # epochs stay plain random tokens
        layer.invalidate_model()
        client.set(key, old)
        got = one(gen, layer)
        assert got.token_ids == base and got.stats.cache_kind == "verified"  # a draft, checked
        name = registered_name(layer)
        assert layer.namespace.models()[layer.model_id]["authenticated"] is False
        base_args = ["--url", url.split("?")[0], "--namespace", cache_namespace]
        capsys.readouterr()
        assert cli("invalidate", *base_args, "--model", name) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"model {layer.model_id} ") and "unauthenticated" in out
        assert cli("invalidate", *base_args, "--model", layer.model_id) == 0  # an exact id
        assert not one(gen, layer).stats.cache_hit


@pytest.fixture
def signed(redis_server, cache_namespace):
    store = get_store(parse_cache_url(redis_server.url, namespace=cache_namespace, deadline_ms=2000))
    yield Namespace(store, cache_namespace, secret=SECRET.encode())
    release_store(store)


def test_epoch_records_are_bound_to_their_key_and_only_grow(signed, client, cache_namespace):
    ns = signed
    first = ns.ensure_epochs(["m" * 32])
    assert first is not None and ns.epochs_trusted(["m" * 32], first)
    generations = [int(ns.bump().split(":")[1]) for _ in range(3)]
    assert generations == sorted(set(generations))
    key, model_key = f"specdec:{cache_namespace}:epoch", f"specdec:{cache_namespace}:model-epoch:{'m' * 32}"
    record = client.get(key).decode()
    prefix, gen, token, tag = record.split(":")
    forged = [
        f"{prefix}:{int(gen) + 1}:{token}:{tag}",  # a higher generation without the secret
        f"{prefix}:{gen}:{token}:{'0' * 64}",  # a bad tag
        f"{prefix}:{gen}:{token}",  # no tag
        token,  # a plain token, as verified mode writes
    ]
    for value in forged:
        assert not ns.epochs_trusted([], [value]), value
    assert not ns.epochs_trusted(["m" * 32], [record, record])  # moved to another key
    other = Namespace(ns.store, cache_namespace + "x", secret=SECRET.encode())
    assert not other.epochs_trusted([], [record])  # or another namespace
    assert not Namespace(ns.store, cache_namespace, secret=b"another-secret-0123456789").epochs_trusted([], [record])
    assert ns.epochs_trusted(["m" * 32], [record, client.get(model_key).decode()])


def test_an_unauthenticated_epoch_is_read_untrusted_and_replaced_by_the_next_write(signed, client, cache_namespace):
    ns = signed
    key = f"specdec:{cache_namespace}:epoch"
    client.set(key, "a" * 32)  # a verified-mode writer, or anyone
    keys, _, trusted = ns.read_checked([], lambda e: ["specdec:x"])
    assert not trusted and ns.store.epochs[key] == "a" * 32
    assert ns.store.counts().get("epoch_unauthenticated", 0) >= 1
    current = ns.ensure_epochs()  # a writer
    assert current is not None and current[0] != "a" * 32 and ns.epochs_trusted([], current)
    assert client.get(key).decode() == current[0]


def test_watermark_file(signed, watermarks):
    signed.bump()
    files = list(watermarks.iterdir())
    assert [f.suffix for f in sorted(files)] == [".json", ".lock"]  # no temporary file left behind
    data = files[0].read_bytes() if files[0].suffix == ".json" else files[1].read_bytes()
    secret = SECRET.encode()
    assert secret not in data and secret.hex().encode() not in data
    gens = json.loads(data)["generations"]
    assert list(gens) == [f"specdec:{signed.name}:epoch"] and gens[f"specdec:{signed.name}:epoch"] > 0
