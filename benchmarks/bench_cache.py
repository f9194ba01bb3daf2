"""Cache benchmarks: hit latency, cache-drafter speedups, latency under a failing server.

Everything is measured side by side in one run, against a real redis-server on loopback:

1. Trusted hit latency: a repeated greedy request answered from the response cache in
   trusted mode (an HMAC-signed entry, served without a forward), timed around the
   whole `generate()` call, against a raw redis-py GET of the same stored value on the
   same server (the floor any Redis-backed cache pays), and the cache's `lookup()`
   alone. p50 / p99 over many hits, in alternating blocks.
1b. Verified hit latency (the default mode): the same request served after the one
   checking forward over prompt + response, against that forward alone (a prefill over
   the same tokens, no KV cache kept) and against full decoding without a cache.
1c. Partial hits: a near-duplicate prompt (the same request with different whitespace),
   whose normalised entry is a draft: decoding goes on from the first mismatch. Against
   the same prompt without a cache.
1d. Model fingerprint: SHA-256 over every weight, against the load time of the same
   model (bundled pair, and a ~100 MB random model built here).
2. Cache drafter, repeated greedy prompt, response cache off: tokens/s of drafter
   "cache" vs drafter "none" (baseline), alternating order, median of repeats; the
   output must equal baseline token for token.
3. Cache drafter, repeated sampled prompt (no seed, so never served whole): the same.
4. Failure: added latency per lookup when the server is paused (SIGSTOP) before the
   breaker opens (about one deadline) and after (about zero), when no server runs, and
   per call against a peer that answers one byte every 10 ms (whole-call deadline).

Model: the bundled pair's target (specdec/assets/default_pair) when it is installed,
else a small random Llama with a byte-level BPE tokenizer trained on a few standard
library files (the results say which). Writes benchmarks/results/cache_bench.{md,json}
with the machine and the command.

    python benchmarks/bench_cache.py                 # starts its own redis-server
    python benchmarks/bench_cache.py --quick         # fewer repeats
    python benchmarks/bench_cache.py --url redis://127.0.0.1:6379/0   # an existing server (hit + drafter parts)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import threading
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_HIT_P50_MS = 0.5
TARGET_HIT_P99_MS = 2.0
TARGET_VERIFIED_VS_PREFILL = 1.5
TARGET_GREEDY_SPEEDUP = 4.0


# --------------------------------------------------------------------------- redis-server


class Server:
    """A throwaway redis-server on a free loopback port (nothing persisted)."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            sys.exit("redis-server not found; install it or pass --url")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                sys.exit("redis-server did not start")
            time.sleep(0.02)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=5)


def redis_version() -> str:
    exe = shutil.which("redis-server")
    if not exe:
        return "unknown"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return next((p.split("=", 1)[1] for p in out.split() if p.startswith("v=")), out.strip())


# --------------------------------------------------------------------------- model


def bundled_target() -> Path | None:
    from importlib import resources

    path = Path(str(resources.files("specdec.assets").joinpath("default_pair", "target")))
    return path if (path / "config.json").is_file() else None


def random_llama(workdir: Path) -> Path:
    """A small random Llama (float32) with a byte-level BPE tokenizer, saved for from_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "queue.py", "bisect.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=2048, special_tokens=["<pad>", "<s>", "</s>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    path = workdir / "random-llama"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- helpers

FALLBACK_PROMPTS = [
    "def binary_search(items, target):\n",
    "class LRUCache:\n    def __init__(self, capacity):\n",
    "import os\nimport sys\n\ndef main(argv):\n",
    "# Parse a CSV file and return the rows as dictionaries.\n",
]


def bench_prompts(count: int) -> tuple[list[str], str]:
    """The first `count` built-in held-out prompts (the `specdec bench` workload), else a fixed fallback."""
    try:
        from specdec.workload import load_builtin

        prompts = [p.text for p in load_builtin(count)]
        if len(prompts) == count:
            return prompts, f"first {count} built-in held-out prompts (specdec/assets/prompts/stdlib_heldout.jsonl)"
    except (ImportError, FileNotFoundError, ValueError):
        pass
    return FALLBACK_PROMPTS[:count], f"{min(count, len(FALLBACK_PROMPTS))} fixed code prompts (built-in prompts not installed)"



def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


def summary_ms(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms), "n": len(ms)}


def run_prompts(gen, prompts, **kwargs):
    start = time.perf_counter()
    results = [gen.generate(p, **kwargs)[0] for p in prompts]
    return time.perf_counter() - start, results


# --------------------------------------------------------------------------- parts


def bench_hits(gen, url: str, prompt: str, n: int, new_tokens: int) -> dict:
    import redis

    from specdec.caching import CacheLayer

    kwargs = dict(max_new_tokens=new_tokens, ignore_eos=True, drafter="none")
    out = {}
    secret = secrets.token_hex(32)  # trusted mode; a fresh secret per run, never printed
    for label, spec in (("redis", url), ("memory", "memory://bench-" + uuid.uuid4().hex[:8])):
        # A deadline far above a loopback round trip: this part measures hits, not failures.
        layer = CacheLayer.open(spec, gen, namespace="bench-hit-" + uuid.uuid4().hex[:8], secret=secret, deadline_ms=500)
        first = gen.generate(prompt, cache=layer, **kwargs)[0]
        layer.flush()
        assert gen.generate(prompt, cache=layer, **kwargs)[0].stats.cache_kind == "trusted"
        ids = gen.tokenizer(prompt)["input_ids"]
        params = __import__("specdec.params", fromlist=["make_params"]).make_params(**kwargs)
        key = layer.responses.key(layer.request_for(ids, prompt, params), layer.namespace.fetch_epochs([layer.model_id]))
        raw_client = redis.Redis.from_url(url) if label == "redis" else None
        gen_times, lookup_times, get_times = [], [], []
        trusted_hits = 0
        block = 200
        for _ in range(max(1, n // block)):  # alternate blocks so drift hits every column alike
            for _ in range(block):
                t = time.perf_counter()
                r = gen.generate(prompt, cache=layer, **kwargs)[0]
                gen_times.append(time.perf_counter() - t)
                assert r.token_ids == first.token_ids
                trusted_hits += r.stats.cache_kind == "trusted"
            for _ in range(block):
                t = time.perf_counter()
                layer.lookup(ids, prompt, params)
                lookup_times.append(time.perf_counter() - t)
            if raw_client is not None:
                for _ in range(block):
                    t = time.perf_counter()
                    raw_client.get(key)
                    get_times.append(time.perf_counter() - t)
        out[label] = {"generate_hit": summary_ms(gen_times), "lookup": summary_ms(lookup_times), "trusted_hits": trusted_hits}
        if raw_client is not None:
            out[label]["raw_redis_get"] = summary_ms(get_times)
            out[label]["value_bytes"] = len(raw_client.get(key))
            raw_client.close()
        layer.close()
    return out


def bench_verified(gen, url: str, prompt: str, n: int, new_tokens: int) -> dict:
    """Verified hit through generate() vs one prefill forward over the same tokens vs no cache."""
    from specdec.caching import CacheLayer

    kwargs = dict(max_new_tokens=new_tokens, ignore_eos=True, drafter="none")
    layer = CacheLayer.open(url, gen, namespace="bench-verified-" + uuid.uuid4().hex[:8], deadline_ms=500)
    base = gen.generate(prompt, cache=None, **kwargs)[0]
    gen.generate(prompt, cache=layer, **kwargs)
    layer.flush()
    ids = gen.tokenizer(prompt)["input_ids"] + base.token_ids
    tokens = torch.tensor([ids], device=gen.device)  # [1, prompt + response]

    @torch.inference_mode()
    def prefill():
        return gen.target_model(input_ids=tokens, use_cache=False, logits_to_keep=new_tokens + 1).logits

    verified, forward, full, kinds = [], [], [], []
    block = 10
    for rep in range(max(1, n // block)):
        for _ in range(block):
            t = time.perf_counter()
            r = gen.generate(prompt, cache=layer, **kwargs)[0]
            verified.append(time.perf_counter() - t)
            assert r.token_ids == base.token_ids
            kinds.append(r.stats.cache_kind)
        for _ in range(block):
            t = time.perf_counter()
            prefill()
            forward.append(time.perf_counter() - t)
        if rep % 4 == 0:  # full decoding is slow: fewer samples
            t = time.perf_counter()
            gen.generate(prompt, cache=None, **kwargs)
            full.append(time.perf_counter() - t)
    layer.close()
    v, f, d = summary_ms(verified), summary_ms(forward), summary_ms(full)
    return {
        "tokens": len(ids),
        "new_tokens": new_tokens,
        "generate_verified_hit": v,
        "prefill_forward": f,
        "generate_no_cache": d,
        "verified_hits": kinds.count("verified"),  # the rest: a lookup that failed (deadline) and decoded
        "verified_over_prefill_p50": v["p50_ms"] / f["p50_ms"],
        "no_cache_over_verified_p50": d["p50_ms"] / v["p50_ms"],
    }


# Near-duplicates of a prompt: the same request as a user might resend it.
NEAR_DUPLICATES = {
    "a leading space": lambda p: " " + p,
    "two spaces after each comma": lambda p: p.replace(", ", ",  "),
}


def bench_partial(gen, url: str, prompt: str, variant: str, repeats: int, new_tokens: int) -> dict:
    """A near-duplicate prompt: the normalised entry is a draft, decoding goes on from the first mismatch."""
    from specdec.caching import CacheLayer

    kwargs = dict(max_new_tokens=new_tokens, ignore_eos=True, drafter="none")
    layer = CacheLayer.open(url, gen, namespace="bench-partial-" + uuid.uuid4().hex[:8], deadline_ms=500)
    from specdec.params import make_params

    params = make_params(**kwargs)
    prompt_ids, variant_ids = gen.tokenizer(prompt)["input_ids"], gen.tokenizer(variant)["input_ids"]
    original = gen.generate(prompt, cache=None, **kwargs)[0]
    expected = gen.generate(variant, cache=None, **kwargs)[0].token_ids
    with_cache, without, kinds, verified = [], [], [], []
    for rep in range(repeats):
        # Untimed: the state under test is "only the original prompt was seen". Each run with
        # the cache writes the variant's own answer (exact and near keys): undo that.
        layer.responses.invalidate(layer.request_for(variant_ids, variant, params))
        layer.record(prompt_ids, prompt, params, original.token_ids, original.finish_reason)
        layer.flush()
        for method in (("cache", "none") if rep % 2 == 0 else ("none", "cache")):
            t = time.perf_counter()
            r = gen.generate(variant, cache=layer if method == "cache" else None, **kwargs)[0]
            (with_cache if method == "cache" else without).append(time.perf_counter() - t)
            assert r.token_ids == expected
            if method == "cache":
                kinds.append(r.stats.cache_kind)
                verified.append(r.stats.cache_verified_tokens)
        layer.flush()
    layer.close()
    c, u = summary_ms(with_cache), summary_ms(without)
    return {
        "prompt": prompt,
        "variant": variant,
        "new_tokens": new_tokens,
        "generate_near_duplicate": c,
        "generate_no_cache": u,
        "speedup_p50": u["p50_ms"] / c["p50_ms"],
        "cache_kind": max(set(kinds), key=kinds.count),
        "prompt_tokens": len(prompt_ids),
        "variant_tokens": len(variant_ids),
        "verified_tokens": statistics.median(verified),
        "equals_no_cache": True,
    }


def bench_fingerprint(workdir: Path, paths: dict[str, Path], repeats: int) -> list[dict]:
    """Full-weight SHA-256 fingerprint time against from_pretrained time, per model."""
    from transformers import AutoModelForCausalLM

    from specdec.cache.fingerprint import weights_sha256

    rows = []
    for label, path in paths.items():
        loads, hashes = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            loads.append(time.perf_counter() - t)
            t = time.perf_counter()
            weights_sha256(model)
            hashes.append(time.perf_counter() - t)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        load, fp = statistics.median(loads), statistics.median(hashes)
        rows.append({"model": label, "weight_mb": size / 1e6, "load_ms": load * 1000, "fingerprint_ms": fp * 1000,
                     "fingerprint_over_load": fp / load, "hash_gb_per_s": size / fp / 1e9})
    return rows


def hundred_mb_model(workdir: Path) -> Path:
    """A random Llama of ~100 MB (float32) saved for from_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    path = workdir / "model-100mb"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


class DrippingPeer:
    """A loopback TCP server that answers anything with one byte every 10 ms."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.url = f"redis://127.0.0.1:{self.server.getsockname()[1]}/0"
        self.stopped = threading.Event()
        self.clients: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.clients.append(conn)
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            conn.sendall(b"$1000000\r\n")
            while not self.stopped.is_set():
                conn.sendall(b"x")
                time.sleep(0.01)
        except OSError:
            pass

    def close(self) -> None:
        self.stopped.set()
        self.server.close()
        for c in self.clients:
            c.close()


def bench_dripping(deadline_ms: float, calls: int) -> dict:
    """Per-call latency against a dripping peer, breaker kept closed: each call should cost one deadline."""
    from specdec.cache.config import parse_cache_url
    from specdec.cache.store import CacheStore

    peer = DrippingPeer()
    try:
        store = CacheStore(parse_cache_url(peer.url, deadline_ms=deadline_ms, breaker_failures=10**6))
        samples = []
        for i in range(calls):
            t = time.perf_counter()
            store.call("mget", [f"k{i}"])
            samples.append(time.perf_counter() - t)
        store.close()
    finally:
        peer.close()
    return {"deadline_ms": deadline_ms, "per_call": summary_ms(samples), "max_ms": max(samples) * 1000}


def bench_drafter(gen, url: str, prompts: list[str], *, setting: str, k: int, new_tokens: int, repeats: int,
                  temperature: float) -> dict:
    from specdec.caching import CacheLayer

    layer = CacheLayer.open(url, gen, response_cache=False, namespace="bench-draft-" + uuid.uuid4().hex[:8])
    common = dict(max_new_tokens=new_tokens, ignore_eos=True, temperature=temperature)
    base_kw = dict(common, drafter="none")
    cache_kw = dict(common, drafter="cache", num_draft_tokens=k)
    # Untimed warm-up: fills the draft store with each prompt's earlier output.
    _, warm = run_prompts(gen, prompts, cache=layer, **cache_kw)
    layer.flush()
    times = {"baseline": [], "cache": []}
    stats = []
    equal = True
    expected = None
    for rep in range(repeats):
        order = ("baseline", "cache") if rep % 2 == 0 else ("cache", "baseline")
        for method in order:
            if method == "baseline":
                wall, res = run_prompts(gen, prompts, cache=None, **base_kw)
                if setting == "greedy":
                    expected = [r.token_ids for r in res]
            else:
                wall, res = run_prompts(gen, prompts, cache=layer, **cache_kw)
                stats.extend(r.stats for r in res)
                if setting == "greedy" and expected is not None:
                    equal &= [r.token_ids for r in res] == expected
                layer.flush()
            times[method].append(sum(len(r.token_ids) for r in res) / wall)
    layer.close()
    drafted = sum(s.drafted_tokens for s in stats)
    accepted = sum(s.accepted_tokens for s in stats)
    forwards = sum(s.target_forwards for s in stats)
    new = sum(s.new_tokens for s in stats)
    base, cache = statistics.median(times["baseline"]), statistics.median(times["cache"])
    return {
        "setting": setting,
        "temperature": temperature,
        "num_draft_tokens": k,
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "baseline_tokens_per_s": base,
        "cache_tokens_per_s": cache,
        "speedup": cache / base,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "tau": new / forwards if forwards else 0.0,
        "equals_baseline": equal if setting == "greedy" else None,
        "per_repeat": times,
    }


def bench_failure(gen, workdir: Path, prompt: str, new_tokens: int, deadline_ms: float, n_open: int) -> dict:
    from specdec.caching import CacheLayer

    server = Server(workdir)
    kwargs = dict(max_new_tokens=new_tokens, ignore_eos=True, drafter="none")
    ids = gen.tokenizer(prompt)["input_ids"]
    from specdec.params import make_params

    params = make_params(**kwargs)
    out: dict = {"deadline_ms": deadline_ms, "breaker_failures": 3}
    try:
        layer = CacheLayer.open(server.url, gen, deadline_ms=deadline_ms, breaker_failures=3, breaker_cooldown_s=600)
        gen.generate(prompt, cache=layer, **kwargs)
        layer.flush()

        def lookups(count):
            samples = []
            for _ in range(count):
                t = time.perf_counter()
                layer.lookup(ids, prompt, params)
                samples.append(time.perf_counter() - t)
            return samples

        out["healthy_lookup"] = summary_ms(lookups(200))
        server.signal(signal.SIGSTOP)
        out["paused_before_breaker_opens_ms"] = [s * 1000 for s in lookups(3)]
        out["breaker_state_after"] = layer.store.breaker.state
        out["paused_breaker_open_lookup"] = summary_ms(lookups(n_open))
        base_times, paused_times = [], []
        for _ in range(5):
            t = time.perf_counter()
            a = gen.generate(prompt, cache=None, **kwargs)[0]
            base_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = gen.generate(prompt, cache=layer, **kwargs)[0]
            paused_times.append(time.perf_counter() - t)
            assert a.token_ids == b.token_ids
        out["generate_no_cache_ms"] = statistics.median(base_times) * 1000
        out["generate_paused_breaker_open_ms"] = statistics.median(paused_times) * 1000
        server.signal(signal.SIGCONT)
        layer.close()
        # No server at all: connection refused is immediate; the breaker opens after 3.
        server.stop()
        dead = CacheLayer.open(server.url, gen, deadline_ms=deadline_ms, breaker_failures=3, breaker_cooldown_s=600)
        out["dead_before_breaker_opens_ms"] = [s * 1000 for s in (lambda: [
            (lambda t0: (dead.lookup(ids, prompt, params), time.perf_counter() - t0)[1])(time.perf_counter())
            for _ in range(3)])()]
        out["dead_breaker_open_lookup"] = summary_ms(
            [(lambda t0: (dead.lookup(ids, prompt, params), time.perf_counter() - t0)[1])(time.perf_counter())
             for _ in range(n_open)])
        dead.close()
    finally:
        server.stop()
    return out


# --------------------------------------------------------------------------- report


def machine() -> dict:
    from specdec.bench.runner import machine_info

    info = machine_info(torch.device("cpu"))
    import redis

    info["redis_server"] = redis_version()
    info["redis_py"] = redis.__version__
    return info


def write_report(report: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "cache_bench.json"
    js.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    m = report["machine"]
    lines = [
        "# Cache benchmark",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}  ",
        f"Machine: {m['device_name']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"redis-server {m['redis_server']}, redis-py {m['redis_py']}  ",
        f"Model: {report['model']}  ",
        f"Prompts: {report['prompts']}",
        "",
        "## Trusted hit latency (HMAC-signed entry, no forward; loopback)",
        "",
        "| path | p50 ms | p99 ms | mean ms | n |",
        "|---|---|---|---|---|",
    ]
    hits = report["hits"]
    for backend in ("redis", "memory"):
        for name, label in (("generate_hit", f"`generate()` hit, {backend}"), ("lookup", f"`CacheLayer.lookup` only, {backend}"),
                            ("raw_redis_get", "raw redis-py GET of the same value")):
            row = hits[backend].get(name)
            if row:
                lines.append(f"| {label} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {row['mean_ms']:.3f} | {row['n']} |")
    r = hits["redis"]["generate_hit"]
    lines += [
        "",
        f"Targets: p50 <= {TARGET_HIT_P50_MS} ms ({'met' if r['p50_ms'] <= TARGET_HIT_P50_MS else 'NOT met'}), "
        f"p99 <= {TARGET_HIT_P99_MS} ms ({'met' if r['p99_ms'] <= TARGET_HIT_P99_MS else 'NOT met'}) "
        f"for a trusted Redis hit through `generate()` ({hits['redis']['trusted_hits']} of {r['n']} requests served "
        f"from the cache). Stored value: {hits['redis']['value_bytes']} bytes (32 of them the HMAC tag).",
        "",
    ]
    v = report["verified"]
    lines += [
        f"## Verified hit (default mode: one checking forward over {v['tokens']} tokens)",
        "",
        "| path | p50 ms | p99 ms | n |",
        "|---|---|---|---|",
        f"| `generate()` verified hit ({v['verified_hits']} of {v['generate_verified_hit']['n']} served from the cache) "
        f"| {v['generate_verified_hit']['p50_ms']:.2f} | {v['generate_verified_hit']['p99_ms']:.2f} "
        f"| {v['generate_verified_hit']['n']} |",
        f"| one prefill forward over the same tokens | {v['prefill_forward']['p50_ms']:.2f} | {v['prefill_forward']['p99_ms']:.2f} "
        f"| {v['prefill_forward']['n']} |",
        f"| `generate()` without a cache ({v['new_tokens']} tokens) | {v['generate_no_cache']['p50_ms']:.2f} | "
        f"{v['generate_no_cache']['p99_ms']:.2f} | {v['generate_no_cache']['n']} |",
        "",
        f"Verified hit / prefill forward: {v['verified_over_prefill_p50']:.2f}x at p50 (target <= {TARGET_VERIFIED_VS_PREFILL}x: "
        f"{'met' if v['verified_over_prefill_p50'] <= TARGET_VERIFIED_VS_PREFILL else 'NOT met'}); "
        f"no cache / verified hit: {v['no_cache_over_verified_p50']:.1f}x.",
        "",
    ]
    lines += [
        "## Partial hits (near-duplicate prompts)",
        "",
        "The first built-in prompt is cached; the request is the same text changed as a user might resend it. Its "
        "normalised entry is a draft of full length, checked by one forward; decoding goes on from the first mismatch. "
        f"{report['partial'][0]['new_tokens']} new tokens; output equal to the no-cache output in every run.",
        "",
        "| near-duplicate | kind | cached tokens confirmed | with cache p50 ms | no cache p50 ms | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for pt in report["partial"]:
        lines.append(
            f"| {pt['variant_label']} | {pt['cache_kind']} | {pt['verified_tokens']:.0f} | "
            f"{pt['generate_near_duplicate']['p50_ms']:.1f} | {pt['generate_no_cache']['p50_ms']:.1f} | "
            f"{pt['speedup_p50']:.2f}x |"
        )
    lines += [
        "",
        "## Model fingerprint (SHA-256 over every weight)",
        "",
        "| model | weights MB | from_pretrained ms | fingerprint ms | fingerprint / load | GB/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["fingerprint"]:
        lines.append(
            f"| {row['model']} | {row['weight_mb']:.1f} | {row['load_ms']:.1f} | {row['fingerprint_ms']:.1f} | "
            f"{row['fingerprint_over_load']:.2f} | {row['hash_gb_per_s']:.2f} |"
        )
    lines += [
        "",
        "Computed once per model object (16 MiB chunks hashed on a thread per core).",
        "",
        "## Cache drafter (response cache off)",
        "",
        "| setting | K | baseline tok/s | cache tok/s | speedup | accept | tau | = baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["drafter"]:
        eq = "-" if row["equals_baseline"] is None else ("yes" if row["equals_baseline"] else "NO")
        lines.append(
            f"| {row['setting']} (T={row['temperature']}) | {row['num_draft_tokens']} | {row['baseline_tokens_per_s']:.1f} | "
            f"{row['cache_tokens_per_s']:.1f} | {row['speedup']:.2f}x | {row['acceptance_rate']:.2f} | {row['tau']:.2f} | {eq} |"
        )
    if report["drafter"]:
        lines += [
            "",
            f"Target: repeated greedy prompt through the cache drafter >= {TARGET_GREEDY_SPEEDUP}x baseline. "
            f"Each row: {report['drafter'][0]['prompts']} prompts x {report['drafter'][0]['new_tokens']} new tokens, "
            "tokens/s over all prompts, median of repeats in alternating order, after one untimed pass that fills the store.",
        ]
    else:
        lines += ["", "(cache-drafter rows skipped: --skip-drafter)"]
    f = report.get("failure")
    if f:
        lines += [
            "",
            f"## Failing server (deadline {f['deadline_ms']} ms, breaker opens after {f['breaker_failures']} failures)",
            "",
            "| situation | added latency per lookup |",
            "|---|---|",
            f"| healthy server, p50 | {f['healthy_lookup']['p50_ms']:.3f} ms |",
            "| paused (SIGSTOP), before the breaker opens | "
            + ", ".join(f"{x:.1f}" for x in f["paused_before_breaker_opens_ms"]) + " ms |",
            f"| paused, breaker open, p50 / p99 | {f['paused_breaker_open_lookup']['p50_ms']:.4f} / "
            f"{f['paused_breaker_open_lookup']['p99_ms']:.4f} ms |",
            "| no server, before the breaker opens | "
            + ", ".join(f"{x:.2f}" for x in f["dead_before_breaker_opens_ms"]) + " ms |",
            f"| no server, breaker open, p50 / p99 | {f['dead_breaker_open_lookup']['p50_ms']:.4f} / "
            f"{f['dead_breaker_open_lookup']['p99_ms']:.4f} ms |",
            "",
            f"Whole request ({report['failure_new_tokens']} tokens, greedy): {f['generate_no_cache_ms']:.1f} ms without a cache, "
            f"{f['generate_paused_breaker_open_ms']:.1f} ms with the server paused and the breaker open (medians of 5; "
            "outputs identical).",
        ]
    d = report.get("dripping")
    if d:
        lines += [
            "",
            f"A peer that answers one byte every 10 ms (deadline {d['deadline_ms']} ms, breaker kept closed): "
            f"{d['per_call']['p50_ms']:.1f} ms p50, {d['max_ms']:.1f} ms max per call over {d['per_call']['n']} calls "
            "(connect and handshake included).",
        ]
    md = out_dir / "cache_bench.md"
    md.write_text("\n".join(lines) + "\n")
    return [md, js]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="use this Redis instead of starting one (hit and drafter parts)")
    parser.add_argument("--quick", action="store_true", help="fewer hits and repeats")
    parser.add_argument("--hits", type=int, default=None, help="hit-latency samples per path (default 2000, quick 400)")
    parser.add_argument("--repeats", type=int, default=None, help="drafter repeats (default 5, quick 3)")
    parser.add_argument("--num-draft-tokens", type=int, nargs="+", default=[8, 4], help="K values for the drafter rows")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.8, 0.3], help="sampled settings")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--prompts", type=int, default=4, help="prompts in the drafter workload")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip-drafter", action="store_true", help="skip the cache-drafter rows (the slowest part)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hits_n = args.hits or (400 if args.quick else 2000)
    repeats = args.repeats or (3 if args.quick else 5)

    from specdec import SpeculativeGenerator

    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        workdir = Path(tmp)
        target = bundled_target()
        model_desc = f"bundled default pair target ({target.name})" if target else None
        if target is None:
            target = random_llama(workdir)
            model_desc = ("random LlamaForCausalLM (4 layers, hidden 256, byte-level BPE vocabulary 2048, float32; "
                          "the bundled default pair was not installed)")
        gen = SpeculativeGenerator.from_pretrained(str(target), dtype=torch.float32)
        params_m = sum(p.numel() for p in gen.target_model.parameters()) / 1e6
        model_desc += f", {params_m:.1f}M parameters"
        server = None if args.url else Server(workdir)
        url = args.url or server.url
        try:
            prompts, prompt_desc = bench_prompts(args.prompts)
            print("trusted hit latency ...", flush=True)
            hits = bench_hits(gen, url, prompts[0], hits_n, new_tokens=64)
            print("verified hit latency ...", flush=True)
            verified = bench_verified(gen, url, prompts[0], 40 if args.quick else 200, new_tokens=64)
            print("partial hits ...", flush=True)
            partial = []
            for label, make in NEAR_DUPLICATES.items():
                row = bench_partial(gen, url, prompts[0], make(prompts[0]), 3 if args.quick else 7, new_tokens=64)
                partial.append({"variant_label": label, **row})
            print("fingerprint cost ...", flush=True)
            fp_paths = {"bundled target" if model_desc.startswith("bundled") else "benchmark model": target}
            draft = target.parent / "draft"
            if model_desc.startswith("bundled") and (draft / "config.json").is_file():
                fp_paths["bundled draft"] = draft
            fp_paths["random Llama, ~100 MB"] = hundred_mb_model(workdir)
            fingerprint = bench_fingerprint(workdir, fp_paths, 2 if args.quick else 5)
            drafter = []
            for k in [] if args.skip_drafter else args.num_draft_tokens:
                print(f"cache drafter, greedy, K={k} ...", flush=True)
                drafter.append(bench_drafter(gen, url, prompts, setting="greedy", k=k, new_tokens=args.new_tokens,
                                             repeats=repeats, temperature=0.0))
            for temperature in [] if args.skip_drafter else args.temperature:
                print(f"cache drafter, sampled T={temperature}, K={args.num_draft_tokens[0]} ...", flush=True)
                drafter.append(bench_drafter(gen, url, prompts, setting="sampled", k=args.num_draft_tokens[0],
                                             new_tokens=args.new_tokens, repeats=repeats, temperature=temperature))
            print("failure latency ...", flush=True)
            failure = bench_failure(gen, workdir, prompts[0], new_tokens=32, deadline_ms=50.0,
                                    n_open=400 if args.quick else 2000)
            print("dripping peer ...", flush=True)
            dripping = bench_dripping(50.0, 5 if args.quick else 20)
        finally:
            if server is not None:
                server.stop()
    from specdec.cache.config import redact_url

    shown_args = [redact_url(a) if "://" in a else a for a in (argv if argv is not None else sys.argv[1:])]
    report = {
        "command": " ".join(["python benchmarks/bench_cache.py", *shown_args]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "model": model_desc,
        "prompts": prompt_desc,
        "hits": hits,
        "verified": verified,
        "partial": partial,
        "fingerprint": fingerprint,
        "drafter": drafter,
        "failure": failure,
        "dripping": dripping,
        "failure_new_tokens": 32,
        "targets": {"hit_p50_ms": TARGET_HIT_P50_MS, "hit_p99_ms": TARGET_HIT_P99_MS,
                    "verified_over_prefill": TARGET_VERIFIED_VS_PREFILL,
                    "greedy_speedup": TARGET_GREEDY_SPEEDUP},
    }
    for path in write_report(report, args.out):
        print(f"wrote {path}")
    print((args.out / "cache_bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
