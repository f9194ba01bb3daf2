"""Several processes (spawn) writing and reading one Redis at once, in two namespaces.

Workers write the SAME requests with values that differ per namespace, worker and
round, and read them back while the others overwrite them. Every value read must be
one some worker of the same namespace wrote, complete (no torn or mixed value), and
never one from the other namespace.
"""

from __future__ import annotations

import multiprocessing as mp

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
from specdec.cache.codec import KIND_DRAFT, KIND_RESPONSE, decode_value

WORKERS = 4
ROUNDS = 25
KEYS = 8
CONTEXT = [11, 12, 13, 14]


def request(j: int) -> ResponseRequest:
    return ResponseRequest(
        model="m" * 32,
        tokenizer="t" * 32,
        normalization=NormalizationOptions().spec(),
        prompt_ids=(j, j + 1),
        sampling={"mode": "greedy", "ignore_eos": False},
        seed=None,
        max_new_tokens=64,
    )


def value_for(tag: int, worker: int, j: int, r: int) -> list[int]:
    """A value whose every part can be checked: tag, writer, key, round, then a length-coded tail."""
    return [tag, worker, j, r] + [tag * 1000 + j] * (3 + (worker * 7 + r) % 37)


def valid(tokens: list[int], tag: int, j: int) -> bool:
    if len(tokens) < 4 or tokens[0] != tag or tokens[2] != j:
        return False
    return tokens == value_for(tag, tokens[1], j, tokens[3])


def worker(url: str, namespace: str, tag: int, worker_id: int) -> dict[str, int]:
    store = get_store(parse_cache_url(url, namespace=namespace, deadline_ms=2000))
    ns = Namespace(store, namespace)
    rc = ResponseCache(store, ns, ttl_s=120, max_value_bytes=1 << 20)
    ds = DraftStore(store, ns, vocab="v" * 32, contexts=(4,), continuation=16, ttl_s=120)
    out = {"reads": 0, "bad": 0, "draft_reads": 0, "draft_bad": 0}
    for r in range(ROUNDS):
        for j in range(KEYS):
            rc.put(request(j), value_for(tag, worker_id, j, r), "stop")
            got = rc.lookup(request(j))
            if got is not None:
                out["reads"] += 1
                out["bad"] += not valid(got.tokens, tag, j)
        ds.put(CONTEXT, [tag, worker_id, r] + [tag] * 5)
        cont = ds.lookup(CONTEXT)
        out["draft_reads"] += 1
        out["draft_bad"] += not (len(cont) == 8 and cont[0] == tag and cont[3:] == [tag] * 5)
    store.flush(10)
    out["corrupt"] = store.counts().get("corrupt", 0)
    out["errors"] = store.error_count()
    release_store(store)
    return out


def test_processes_share_one_redis_without_corruption(redis_server, cache_namespace):
    url = redis_server.url
    namespaces = [(cache_namespace + "-a", 1), (cache_namespace + "-b", 2)]
    jobs = [(url, ns, tag, w) for w in range(WORKERS) for ns, tag in [namespaces[w % 2]]]
    ctx = mp.get_context("spawn")
    with ctx.Pool(WORKERS) as pool:
        results = pool.starmap(worker, jobs)
    for res in results:
        # Every read after the first round finds a value (its own pending write at least; the
        # very first put of a key is queued before the epoch is known, so it has no pending copy).
        assert res["reads"] >= (ROUNDS - 1) * KEYS
        assert res["bad"] == 0 and res["draft_bad"] == 0
        assert res["corrupt"] == 0 and res["errors"] == 0
    # Afterwards every stored value decodes under its key and belongs to its namespace.
    store = get_store(parse_cache_url(url, deadline_ms=2000))
    try:
        for ns, tag in namespaces:
            keys = list(store.backend.scan(f"specdec:{ns}:resp:*"))
            assert len(keys) == KEYS
            for key in keys:
                tokens = decode_value(store.backend.get(key), key, kind=KIND_RESPONSE, max_bytes=1 << 20).tokens
                assert tokens[0] == tag and valid(tokens, tag, tokens[2])
            for key in store.backend.scan(f"specdec:{ns}:draft:*"):
                cont = decode_value(store.backend.get(key), key, kind=KIND_DRAFT, max_bytes=1 << 20).tokens
                assert cont[0] == tag
    finally:
        release_store(store)
