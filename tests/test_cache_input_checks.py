"""Bad input is refused with one clear error before any work: cache URL options, seeds,
prompt sizes, the cache and bench command lines.

Every check names the option and the value given and says what is allowed; nothing that
was accepted may turn into a cache that silently does nothing, a seed that samples what
another seed samples, or a run that fails only at its end.
"""

from __future__ import annotations

import argparse
import json
import math
import threading

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.bench import Bench, BenchConfig
from specdec.cache import get_store, parse_cache_url, release_store
from specdec.cache.cli import add_arguments, run
from specdec.cache.config import MAX_DEADLINE_MS, CacheConfig
from specdec.cache.deadline import WATCHDOG
from specdec.cli import main
from specdec.params import MAX_SEED, GenerationParams, make_params

# ---------------------------------------------------------------------- cache URL options


@pytest.mark.parametrize(
    "url, names",
    [
        # the option, the value given and the allowed range all appear in the message
        ("redis://h:1?deadline_ms=inf", ("deadline_ms", "'inf'", "> 0 and <= 600000")),
        ("redis://h:1?deadline_ms=nan", ("deadline_ms", "'nan'", "finite")),
        ("redis://h:1?deadline_ms=1e300", ("deadline_ms", "'1e300'", "<= 600000")),
        ("redis://h:1?deadline_ms=0", ("deadline_ms", "'0'", "> 0")),
        ("redis://h:1?ttl_s=nan", ("ttl_s", "'nan'", ">= 0")),
        ("redis://h:1?ttl_s=inf", ("ttl_s", "'inf'", "0 = no expiry")),
        ("redis://h:1?draft_ttl_s=-1", ("draft_ttl_s", "'-1'", ">= 0")),
        ("redis://h:1?breaker_cooldown_s=inf", ("breaker_cooldown_s", "'inf'", ">= 0")),
        ("redis://h:1?breaker_failures=0", ("breaker_failures", "'0'", ">= 1")),
        ("redis://h:1?breaker_failures=2.5", ("breaker_failures", "'2.5'", "an integer")),
        ("redis://h:1?queue_size=abc", ("queue_size", "'abc'", "an integer")),
        ("redis://h:1?max_value_bytes=1e9", ("max_value_bytes", "'1e9'", "an integer")),
        ("redis://h:1?draft_continuation=0", ("draft_continuation", "'0'", ">= 1")),
        ("redis://h:1?draft_max_positions=-4", ("draft_max_positions", "'-4'", ">= 1")),
        ("redis://h:1?memory_max_entries=0", ("memory_max_entries", "'0'", ">= 1")),
        ("redis://h:1?draft_contexts=0,4", ("draft_contexts", "'0,4'", "each an integer >= 1")),
        ("redis://h:1?draft_contexts=4.5", ("draft_contexts", "'4.5'", "each an integer >= 1")),
        ("redis://h:1?casefold=maybe", ("casefold", "'maybe'", "true or false")),
        ("redis://h:1?response_cache=2", ("response_cache", "'2'", "true or false")),
        ("redis://h:1?db=abc", ("db", "'abc'", "an integer >= 0")),
        ("redis://h:1?db=-1", ("db", "'-1'", "an integer >= 0")),
        ("redis://h:1?max_connections=0", ("max_connections", "'0'", ">= 1")),
        ("redis://h:1?protocol=5", ("protocol", "'5'", "2 (RESP2) or 3 (RESP3)")),
        ("redis://h:1?health_check_interval=1.5", ("health_check_interval", "'1.5'", "an integer >= 0")),
        ("redis://h:1?socket_keepalive=maybe", ("socket_keepalive", "'maybe'", "true or false")),
        ("redis://h:1?client_name=two%20words", ("client_name", "'two words'", "without spaces")),
        ("rediss://h:1?ssl_cert_reqs=sometimes", ("ssl_cert_reqs", "'sometimes'", "none, optional, required")),
        ("rediss://h:1?ssl_check_hostname=perhaps", ("ssl_check_hostname", "'perhaps'", "true or false")),
        ("rediss://h:1?ssl_min_version=9", ("ssl_min_version", "'9'", "TLSv1_2")),
        ("rediss://h:1?ssl_ca_certs=/no/such/ca.pem", ("ssl_ca_certs", "/no/such/ca.pem", "no such file")),
        ("redis://h:1?ssl_cert_reqs=none", ("ssl_cert_reqs", "rediss://")),
        ("redis+cluster://h:1?db=2", ("db", "'2'", "only database 0")),
        ("redis://h:1/abc", ("'/abc'", "not a database number")),
        ("redis://h:1/1?db=2", ("database 1", "db=2")),
        ("redis://h:1?db=1&db=2", ("'db'", "twice")),
        ("redis://h:1?ttl=5&ttl_s=6", ("'ttl_s'", "twice")),
        ("redis://h:0/0", ("port 0", "1 to 65535")),
        ("memory://?db=1", ("'db'", "memory://")),
    ],
)
def test_every_url_option_is_checked(url, names):
    with pytest.raises(ValueError) as err:
        parse_cache_url(url)
    message = str(err.value)
    for part in names:
        assert part in message, (part, message)
    assert "\n" not in message


@pytest.mark.parametrize(
    "options, names",
    [
        (dict(deadline_ms=math.inf), ("deadline_ms", "inf", "finite")),
        (dict(ttl_s=math.nan), ("ttl_s", "nan", "finite")),
        (dict(casefold=1), ("casefold", "1", "true or false")),  # booleans are strict: not ints
        (dict(draft_store="sometimes"), ("draft_store", "'sometimes'", "true or false")),
        (dict(queue_size=True), ("queue_size", "True", "an integer")),
        (dict(breaker_failures=2.7), ("breaker_failures", "2.7", "an integer")),  # never silently 2
        (dict(draft_contexts=[8, 4.5]), ("draft_contexts", "4.5", "each an integer")),
        (dict(draft_contexts=[]), ("draft_contexts", "[]", "1 to 16")),
        (dict(draft_contexts=list(range(1, 40))), ("draft_contexts", "1 to 16")),
    ],
)
def test_keyword_options_are_checked_the_same_way(options, names):
    with pytest.raises(ValueError) as err:
        parse_cache_url("memory://", **options)
    for part in names:
        assert part in str(err.value), (part, str(err.value))


def test_a_config_built_directly_is_checked_too():
    with pytest.raises(ValueError, match="deadline_ms=inf is not a finite number"):
        CacheConfig(deadline_ms=math.inf)
    with pytest.raises(ValueError, match="ttl_s=nan"):
        CacheConfig(ttl_s=math.nan)
    with pytest.raises(ValueError, match="casefold='yes' is not a boolean"):
        CacheConfig(casefold="yes")
    assert CacheConfig(ttl_s=60).ttl_s == 60.0 and isinstance(CacheConfig(ttl_s=60).ttl_s, float)


def test_accepted_values_still_parse():
    c = parse_cache_url(
        "redis://h:6379/3?protocol=3&max_connections=8&socket_keepalive=off&health_check_interval=0"
        f"&deadline_ms={MAX_DEADLINE_MS:g}&ttl_s=0&casefold=YES&draft_contexts=16,4&client_name=specdec-1"
    )
    assert (c.deadline_ms, c.ttl_s, c.casefold, c.draft_contexts) == (MAX_DEADLINE_MS, 0.0, True, (16, 4))
    # redis-py reads "off" as true: the option reaches it spelt the way it parses
    assert c.redis_options == {"protocol": "3", "max_connections": "8", "socket_keepalive": "false",
                               "health_check_interval": "0", "client_name": "specdec-1"}
    assert parse_cache_url("rediss://h:1?ssl_min_version=TLSv1_2").redis_options == {"ssl_min_version": "771"}
    assert parse_cache_url("redis+cluster://h:1/0?db=0").cluster
    assert parse_cache_url("unix:///run/redis.sock?db=2").url == "unix:///run/redis.sock?db=2"


def test_watchdog_never_dies_on_an_accepted_deadline(redis_server, monkeypatch):
    """The longest accepted deadline runs a call normally, and the watchdog thread stays alive
    (an infinite one, accepted before, killed it with an OverflowError traceback)."""
    errors: list = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    with pytest.raises(ValueError, match="deadline_ms"):
        parse_cache_url(redis_server.url, deadline_ms=math.inf)
    with pytest.raises(ValueError, match="finite number of seconds"):
        WATCHDOG.watch(math.inf)
    store = get_store(parse_cache_url(redis_server.url, deadline_ms=MAX_DEADLINE_MS))
    try:
        assert store.call("ping") is True
        assert store.call("ping") is True
        assert WATCHDOG._thread is not None and WATCHDOG._thread.is_alive()
        assert errors == []
        assert store.counts().get("failures", 0) == 0
    finally:
        release_store(store)


# ---------------------------------------------------------------------- seeds


def test_seeds_outside_the_noise_range_are_refused_however_params_are_made():
    for seed in (2**63, 2**64 - 1, -1):
        with pytest.raises(ValueError, match=r"seed must be (<=|>=)"):
            GenerationParams(temperature=1.0, seed=seed)
        with pytest.raises(ValueError, match=r"seed must be (<=|>=)"):
            GenerationParams(temperature=1.0, seed=(0, seed))  # per-row seeds
        with pytest.raises(ValueError, match=r"seed must be (<=|>=)"):
            make_params(temperature=1.0, seed=[3, seed])
    with pytest.raises(TypeError, match="seed must be an int"):
        GenerationParams(seed=True)
    assert GenerationParams(temperature=1.0, seed=MAX_SEED).seed == MAX_SEED


def test_accepted_seeds_never_collide(cache_models):
    """The noise and the response-cache key both take the seed as given: the largest accepted
    seed is neither the same noise nor the same key as any other seed."""
    from specdec.caching import CacheLayer
    from specdec.noise import request_seeds

    seeds = [0, 1, MAX_SEED - 1, MAX_SEED]
    assert request_seeds(seeds, len(seeds), torch.device("cpu")).tolist() == seeds
    gen = SpeculativeGenerator.from_pretrained(str(cache_models.target), dtype=torch.float64)
    layer = CacheLayer.open("memory://seed-keys", gen, secret="s" * 32)
    try:
        keys = set()
        for seed in seeds:
            request = layer.request_for([5, 6, 7], None, make_params(temperature=1.0, seed=seed))
            assert request.seed == seed
            keys.add(layer.responses.key(request, ["e" * 32, "m" * 32]))
        assert len(keys) == len(seeds)
    finally:
        layer.close()


# ---------------------------------------------------------------------- prompt size


class CountingTokenizer:
    """Wraps a tokenizer and counts the calls that tokenize text."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer(*args, **kwargs)

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer.encode(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture
def counted(tiny_tokenizer):
    from fixtures_models import make_model

    tokenizer = CountingTokenizer(tiny_tokenizer)
    return SpeculativeGenerator(make_model("llama", len(tiny_tokenizer), seed=0), tokenizer), tokenizer


def test_a_huge_text_prompt_is_refused_before_tokenization(counted):
    gen, tokenizer = counted
    huge = "a" * 10_000_000  # 10 MB
    for call in (lambda: gen.generate(huge, max_new_tokens=8),
                 lambda: gen.generate(["ok", huge], max_new_tokens=8),
                 lambda: next(gen.stream(huge, max_new_tokens=8)),
                 lambda: gen.generate([{"role": "user", "content": huge}], max_new_tokens=8)):
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        assert "characters" in message and f"the model supports {gen.max_positions}" in message
        assert "shorten the prompt or lower max_new_tokens" in message
        assert tokenizer.calls == 0
    # a prompt that fits is tokenized as before
    assert gen.generate("def add(a, b):", max_new_tokens=2)[0].token_ids
    assert tokenizer.calls == 1


def test_the_character_bound_is_sound(counted):
    """A text of n characters has at least n / (longest vocabulary entry) tokens, so the bound
    never refuses a prompt that would fit: checked on code, multi-byte text and whitespace runs."""
    from fixtures_models import CORPUS

    gen, tokenizer = counted
    longest = gen._longest_token_chars()
    texts = CORPUS + ["".join(CORPUS) * 3, " " * 300, "\n\n\t  " * 40, "Ünïcödé café naïve " * 20,
                      "日本語のテキスト、絵文字 🙂🚀 " * 10, "return a + b" * 50, "ĠĠĠ <s></s><pad>" * 30]
    for text in texts:
        tokens = len(tokenizer(text)["input_ids"])
        assert tokens * longest >= len(text), (text[:40], tokens, longest)
    # At the bound exactly, the character check lets the prompt through to the token check.
    room = gen.max_positions - 8
    with pytest.raises(ValueError) as err:
        gen.generate("x" * (room * longest), max_new_tokens=8)
    assert "characters" not in str(err.value) and "tokens and max_new_tokens=8" in str(err.value)
    with pytest.raises(ValueError, match="characters"):
        gen.generate("x" * (room * longest + 1), max_new_tokens=8)


def test_a_huge_id_prompt_is_refused_before_any_pass_over_it(counted, monkeypatch):
    gen, _ = counted

    class CountingList(list):
        passes = 0

        def __iter__(self):
            CountingList.passes += 1
            return super().__iter__()

    row = CountingList([5] * 1_000_000)
    with pytest.raises(ValueError, match=r"prompt 0 has 1000000 tokens and max_new_tokens=8: 1000008 positions"):
        gen.generate_ids(row, max_new_tokens=8)
    with pytest.raises(ValueError, match=r"prompt 1 has 1000000 tokens"):
        gen.generate_ids([[5, 6], row], max_new_tokens=8)
    assert CountingList.passes == 0

    def no_conversion(self):
        raise AssertionError("a tensor too long for the model was converted to lists")

    monkeypatch.setattr(torch.Tensor, "tolist", no_conversion)
    with pytest.raises(ValueError, match=r"prompt 0 has 100000 tokens"):
        gen.generate_ids(torch.ones(2, 100_000, dtype=torch.long), max_new_tokens=8)


# ---------------------------------------------------------------------- the cache command line


def cache_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="specdec cache")
    add_arguments(parser)
    return run(parser.parse_args(list(argv)))


@pytest.mark.parametrize(
    "argv, option",
    [
        (("invalidate", "--model", ""), "--model"),
        (("invalidate", "--model", "  "), "--model"),
        (("invalidate", "--key", ""), "--key"),
        (("stats", "--namespace", ""), "--namespace"),
    ],
)
def test_empty_cache_cli_options_give_one_line(argv, option, redis_server, capsys):
    assert cache_cli(*argv, "--url", redis_server.url) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {option} is empty") and "\n" not in err
    assert "Error" not in err  # no Python exception text


def test_empty_model_through_the_specdec_command(redis_server, capsys):
    assert main(["cache", "invalidate", "--url", redis_server.url, "--model", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model is empty") and "\n" not in err


def test_bad_url_option_in_the_cache_cli(capsys):
    assert cache_cli("stats", "--url", "redis://127.0.0.1:1/0?protocol=5") == 2
    err = capsys.readouterr().err.strip()
    assert "protocol='5'" in err and "2 (RESP2) or 3 (RESP3)" in err and "\n" not in err
    assert cache_cli("stats", "--url", "redis://127.0.0.1:1/0", "--deadline-ms", "inf") == 2
    assert "deadline_ms" in capsys.readouterr().err


def test_stats_reports_the_rest_when_a_key_has_the_wrong_type(redis_server, cache_namespace, capsys):
    import redis

    prefix = f"specdec:{cache_namespace}:"
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.rpush(prefix + "models", "a list where a hash belongs")
        client.hset(prefix + "stats", mapping={"hits": 3, "misses": 1})
        client.set(prefix + "resp:" + "0" * 64, b"x")
        client.hset(prefix + "epoch", mapping={"not": "a string"})
    finally:
        client.close()
    base = ("--url", redis_server.url, "--namespace", cache_namespace)
    assert cache_cli("stats", *base) == 0
    out = capsys.readouterr()
    assert "hits=3" in out.out and "resp=1" in out.out and "models=1" in out.out
    assert f"{prefix}models" in out.err and f"{prefix}epoch" in out.err and "wrong type" in out.err
    assert "cache server failed" not in out.err
    assert cache_cli("stats", *base, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counters"] == {"hits": 3, "misses": 1} and report["models"] == {}
    assert report["skipped_keys"] == sorted([f"{prefix}models", f"{prefix}epoch"])


# ---------------------------------------------------------------------- bench flags


def test_bench_out_that_cannot_be_written_fails_before_the_run(tmp_path, cli_pair, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker / "results", blocker / "deeper" / "results"):
        with pytest.raises(ValueError, match="is not a folder"):
            BenchConfig(target="unused", draft=None, out=out, progress=False).validate()
    rc = main(["bench", "--target", cli_pair.target, "--out", str(blocker / "results"), "--quick",
               "--no-warmup", "--repeats", "1", "--num-prompts", "1", "--methods", "baseline", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "is not a folder" in err and "\n" not in err
    assert not (tmp_path / "results").exists()
    # a folder that does not exist yet is fine, and checking it creates nothing
    fresh = tmp_path / "new" / "out"
    BenchConfig(target="unused", draft=None, out=fresh, progress=False).validate()
    assert not (tmp_path / "new").exists()


def test_bench_out_on_a_read_only_filesystem():
    """Not writable even for root (permission bits would not stop it): /proc takes no new files."""
    from pathlib import Path

    from specdec.bench.config import check_out

    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    with pytest.raises(ValueError, match="is not writable"):
        check_out(Path("/proc/specdec-bench-results"))


def test_bench_cache_url_is_checked_even_without_cache_rows(tmp_path, cli_pair, capsys):
    config = BenchConfig(target="unused", draft=None, out=tmp_path, progress=False, cache_url="nosuch://x",
                         methods=("baseline", "ngram"))
    with pytest.raises(ValueError, match="unsupported cache URL 'nosuch://x'"):
        config.validate()
    with pytest.raises(ValueError, match="deadline_ms"):
        BenchConfig(target="unused", draft=None, out=tmp_path, cache_url="redis://h:1?deadline_ms=inf").validate()
    assert main(["bench", "--target", cli_pair.target, "--cache", "nosuch://", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unsupported cache URL 'nosuch://'" in err and "\n" not in err


def test_bench_seed_leaves_room_for_the_run(tmp_path):
    with pytest.raises(ValueError, match="--seed must be >= 0 and leave room"):
        BenchConfig(target="unused", draft=None, out=tmp_path, seed=MAX_SEED).validate()
    BenchConfig(target="unused", draft=None, out=tmp_path, seed=MAX_SEED - 10**6).validate()


def test_bench_checks_happen_before_models_load(tmp_path, monkeypatch):
    """Bench() validates every flag and reads the prompts; the models load only in run()."""
    import specdec

    monkeypatch.setattr(specdec.SpeculativeGenerator, "from_pretrained",
                        classmethod(lambda cls, *a, **k: pytest.fail("a model loaded before the flags were checked")))
    with pytest.raises(ValueError, match="unsupported cache URL"):
        Bench(BenchConfig(target="unused", draft=None, out=tmp_path, cache_url="nosuch://", progress=False))
