"""What the sampled tail of a step costs on CPU: eager noise + verify against specdec.fused.

Part 1, the tail alone (B = 1): the engine's eager sequence for sampled rows (noise.uniform
and noise.exponential, then kernels.verify_sampling, which runs kernels.reference on CPU)
against fused.sample_step, and eager exponential_by_position + reference.verify_by_position
against fused.sample_by_position; K = 0 and K = 4, one-hot drafts and draft probs, with and
without top-k / top-p. Calls alternate between the two paths, medians over --reps; every
pair's tokens are checked equal.

Part 2, its share of a step: the bundled target's forward over one new token (after a
--context token KV cache, transformers' DynamicCache, as specdec.bench.methods.forward_ms
times it) through torch.compile(model.forward, dynamic=False, options={"cpp_wrapper": True}),
each forward followed by the fused or the eager tail on its logits (in rotation), forward
and tail timed apart; reports their medians and (forward + tail) / forward. A tail right
after a forward runs slower than alone: the forward has evicted its code and data.

Part 3, in decoding: plain decoding (drafter "none", B = 1) of the bundled pair with
compile=True, ms per token, greedy against sampled (T = 0.7) with the fused tail and with
the eager tail put back in its place (same generator, calls in rotation, medians).

One torch thread. Compiling costs one to two minutes on a 2-core CPU with cold compile
caches (excluded from timings; seconds with warm ones).

    python -P benchmarks/fused_sampling.py --reps 3000 --forward-reps 1500 --repeats 10
    python -P benchmarks/fused_sampling.py --check    # the exactness sweep (several minutes)
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import torch


def _median_us(times: list[float]) -> float:
    return statistics.median(times) * 1e6


def _alternate(fns: list, reps: int, warm: int = 50) -> list[list[float]]:
    """Seconds of each call of each fn, the fns called in rotation (shared background load)."""
    for _ in range(warm):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return times


def _eager_step(seeds, counters, drafts, probs, logits, num_draft, temperature, top_k, top_p):
    """The engine's eager sequence for sampled rows on CPU."""
    from specdec import kernels, noise

    f32 = torch.float32
    uniforms = noise.uniform(seeds, counters, noise.UNIFORM_STREAM, drafts.shape[1], f32)
    exponentials = noise.exponential(seeds, counters, noise.BONUS_STREAM, logits.shape[-1], f32)
    return kernels.verify_sampling(drafts, probs, logits, uniforms, exponentials, temperature=temperature,
                                   top_k=top_k, top_p=top_p, num_draft=num_draft)


def _fused_step(seeds, counters, drafts, probs, logits, num_draft, temperature, top_k, top_p):
    from specdec import fused

    return fused.sample_step(seeds, counters, drafts, probs, logits, num_draft, temperature=temperature,
                             top_k=top_k, top_p=top_p, noise_dtype=torch.float32)


def tail_table(vocab: int, reps: int) -> list[tuple[str, float, float]]:
    from specdec import fused, noise
    from specdec.kernels import reference

    f32 = torch.float32
    g = torch.Generator().manual_seed(0)
    seeds = torch.tensor([12345])
    counters = torch.tensor([77])
    rows = []
    settings = [("T=0.7", 0.7, 0, 1.0), ("T=0.7 top-k 50", 0.7, 50, 1.0), ("T=0.7 top-p 0.9", 0.7, 0, 0.9)]
    for k, with_probs in [(0, False), (4, False), (4, True)]:
        logits = torch.randn(1, k + 1, vocab, generator=g) * 3
        drafts = torch.randint(0, vocab, (1, k), generator=g)
        num_draft = torch.tensor([k])
        probs = torch.softmax(torch.randn(1, k, vocab, generator=g), -1) if with_probs else None
        for name, t, top_k, top_p in settings:
            call = (seeds, counters, drafts, probs, logits, num_draft, t, top_k, top_p)
            eager, fast = functools.partial(_eager_step, *call), functools.partial(_fused_step, *call)
            a, b = eager(), fast()
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (k, name)
            te, tf = _alternate([eager, fast], reps)
            label = f"verify K={k}{' draft probs' if with_probs else ''} {name}" if k else f"no drafts {name}"
            rows.append((label, _median_us(te), _median_us(tf)))
    k = 4
    logits = torch.randn(1, k + 1, vocab, generator=g) * 3
    drafts = torch.randint(0, vocab, (1, k), generator=g)
    num_draft = torch.tensor([k])

    def eager_bp():
        e = noise.exponential_by_position(seeds, counters, k + 1, noise.BONUS_STREAM, vocab, f32)
        return reference.verify_by_position(drafts, logits, e, temperature=0.7, num_draft=num_draft)

    def fast_bp():
        return fused.sample_by_position(seeds, counters, drafts, logits, num_draft, temperature=0.7, noise_dtype=f32)

    a, b = eager_bp(), fast_bp()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    te, tf = _alternate([eager_bp, fast_bp], reps)
    rows.append((f"by position K={k} T=0.7", _median_us(te), _median_us(tf)))
    return rows


def forward_share(context: int, reps: int) -> dict:
    from transformers import DynamicCache

    from specdec import SpeculativeGenerator, fused, kernels, noise
    from specdec.kv import cache_keyword

    gen = SpeculativeGenerator.from_pretrained("bundled")
    model = gen.target_model
    vocab = model.get_input_embeddings().weight.shape[0]
    forward = torch.compile(model.forward, dynamic=False, options={"cpp_wrapper": True})
    kw = cache_keyword(model)
    ids = torch.randint(0, vocab, (1, context))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{kw: cache})
    new = ids[:, :1]
    mask = torch.ones(1, context + 1, dtype=torch.long)
    positions = torch.tensor([[context]])
    seeds, counters = torch.tensor([12345]), torch.tensor([context])
    f32 = torch.float32
    none = torch.empty(1, 0, dtype=torch.int64)
    zero = torch.zeros(1, dtype=torch.int64)

    def step() -> torch.Tensor:  # [1, 1, V]
        with torch.no_grad():
            out = forward(input_ids=new, attention_mask=mask, position_ids=positions, use_cache=True, **{kw: cache})
        cache.crop(-1)
        return out.logits

    def fused_tail(logits: torch.Tensor):
        return fused.sample_step(seeds, counters, none, None, logits, zero, temperature=0.7, noise_dtype=f32)

    def eager_tail(logits: torch.Tensor):
        e = noise.exponential(seeds, counters, noise.BONUS_STREAM, vocab, f32)
        return kernels.verify_sampling(none, None, logits, noise.uniform(seeds, counters, 0, 0, f32), e,
                                       temperature=0.7, num_draft=zero)

    start = time.perf_counter()
    logits = step()
    a, b = fused_tail(logits), eager_tail(logits)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    compile_s = time.perf_counter() - start
    tails = {"fused": fused_tail, "eager": eager_tail}
    forward_s: list[float] = []
    tail_s: dict[str, list[float]] = {name: [] for name in tails}
    for rep in range(reps + 20):
        for name, tail in tails.items():  # each forward followed by a tail, the two timed apart
            t0 = time.perf_counter()
            logits = step()
            t1 = time.perf_counter()
            tail(logits)
            t2 = time.perf_counter()
            if rep >= 20:
                forward_s.append(t1 - t0)
                tail_s[name].append(t2 - t1)
    fwd = statistics.median(forward_s) * 1e3
    after = {name: statistics.median(t) * 1e3 for name, t in tail_s.items()}
    return {"vocab": vocab, "forward_ms": fwd, "tail_ms": after,
            "ratio": {name: (fwd + t) / fwd for name, t in after.items()}, "compile_s": compile_s}


def generation_share(new_tokens: int, repeats: int) -> dict:
    """ms per token of plain decoding (drafter "none") with compile=True: greedy, sampled
    (T = 0.7, the fused tail) and sampled with the eager tail put back in its place."""
    from specdec import SpeculativeGenerator, fused, kernels, noise
    from specdec.kernels import reference

    gen = SpeculativeGenerator.from_pretrained("bundled", compile=True, compile_min_tokens=0)
    vocab = gen.target_model.get_input_embeddings().weight.shape[0]
    warm = gen.warmup() + fused.warmup(vocab, temperature=0.7, draft_probs=False)
    prompts = ["Once upon a time there was a little", "The quick brown fox", "def fibonacci(n):"]
    fused_step, fused_by_position = fused.sample_step, fused.sample_by_position

    def eager_step(seeds, counters, drafts, probs, logits, num_draft, *, temperature, top_k, top_p, noise_dtype):
        if probs is not None and probs.shape[-1] < logits.shape[-1]:
            probs = torch.nn.functional.pad(probs, (0, logits.shape[-1] - probs.shape[-1]))
        u = noise.uniform(seeds, counters, noise.UNIFORM_STREAM, drafts.shape[1], noise_dtype)
        e = noise.exponential(seeds, counters, noise.BONUS_STREAM, logits.shape[-1], noise_dtype)
        return kernels.verify_sampling(drafts, probs, logits, u, e, temperature=temperature, top_k=top_k,
                                       top_p=top_p, num_draft=num_draft)

    def eager_by_position(seeds, counters, drafts, logits, num_draft, *, temperature, top_k, top_p, noise_dtype):
        e = noise.exponential_by_position(seeds, counters, drafts.shape[1] + 1, noise.BONUS_STREAM,
                                          logits.shape[-1], noise_dtype)
        return reference.verify_by_position(drafts, logits, e, temperature=temperature, top_k=top_k, top_p=top_p,
                                            num_draft=num_draft)

    def run(prompt: str, temperature: float | None, eager_tail: bool = False) -> float:
        """ms per token of one B = 1 request."""
        fused.sample_step = eager_step if eager_tail else fused_step
        fused.sample_by_position = eager_by_position if eager_tail else fused_by_position
        kwargs = {} if temperature is None else {"temperature": temperature, "seed": 1}
        try:
            t0 = time.perf_counter()
            out = gen.generate([prompt], max_new_tokens=new_tokens, ignore_eos=True, drafter="none", **kwargs)
            seconds = time.perf_counter() - t0
        finally:
            fused.sample_step, fused.sample_by_position = fused_step, fused_by_position
        return seconds / len(out[0].token_ids) * 1e3

    methods = {"greedy": (None, False), "sampled, fused tail": (0.7, False), "sampled, eager tail": (0.7, True)}
    for temperature, eager_tail in methods.values():
        run(prompts[0], temperature, eager_tail)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):  # methods in rotation per request: they share the background load
        for prompt in prompts:
            for name, (temperature, eager_tail) in methods.items():
                times[name].append(run(prompt, temperature, eager_tail))
    return {"warmup_s": warm, "ms_per_token": {n: statistics.median(t) for n, t in times.items()},
            "stats": gen.compile_stats(), "fused": fused.compile_stats()}


def exactness_sweep() -> list[tuple[str, int, int]]:
    """Fused against eager tokens over many seeds: vocabularies 262144, 50257 (not a multiple
    of the vector width) and 4096, temperatures 0.7 / 1.3, top-k 50, top-p 0.9, draft probs
    and one-hot drafts, float32, bfloat16 and float64 logits; the draft probs put every
    accept test within an ulp of its boundary (as tests/test_fused_sampling.py does), where
    a probability off in its last bit flips the decision about half the time."""
    from specdec import fused, noise
    from specdec.kernels import reference

    def case(seed, rows, k, vocab, dtype):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(rows, k + 1, vocab, generator=g) * (torch.rand(rows, 1, 1, generator=g) * 5 + 1)
        seeds = torch.randint(0, 2**63 - 1, (rows,), generator=g)
        counters = torch.randint(0, 5000, (rows,), generator=g)
        num_draft = torch.randint(0, k + 1, (rows,), generator=g)
        guess = torch.softmax(logits[:, :k] + torch.randn(rows, k, vocab, generator=g), dim=-1)
        drafts = torch.multinomial(guess.reshape(-1, vocab), 1, generator=g).view(rows, k) if k else (
            torch.empty(rows, 0, dtype=torch.int64))
        return seeds, counters, drafts, guess.to(reference.compute_dtype(dtype)), logits.to(dtype), num_draft

    def edge(seeds, counters, drafts, q, logits, num_draft, t, top_k, top_p, noise_dtype):
        k = drafts.shape[1]
        p = reference.logits_to_probs(logits, t, top_k, top_p)
        u = noise.uniform(seeds, counters, noise.UNIFORM_STREAM, k, noise_dtype)
        safe = drafts.clamp(min=0).unsqueeze(-1)
        p_d = p[:, :k].gather(-1, safe).squeeze(-1)
        at = p_d / u
        up = torch.rand(at.shape, generator=torch.Generator().manual_seed(1)) < 0.5
        at = torch.where(up, torch.nextafter(at, torch.ones_like(at)), at)
        return q.scatter(-1, safe, torch.where(p_d > 0, at, q.gather(-1, safe).squeeze(-1)).unsqueeze(-1))

    def eager(seeds, counters, drafts, q, logits, num_draft, t, top_k, top_p, noise_dtype):
        u = noise.uniform(seeds, counters, noise.UNIFORM_STREAM, drafts.shape[1], noise_dtype)
        e = noise.exponential(seeds, counters, noise.BONUS_STREAM, logits.shape[-1], noise_dtype)
        return reference.verify_sampling(drafts, q, logits, u, e, temperature=t, top_k=top_k, top_p=top_p,
                                         num_draft=num_draft)

    results = []
    settings = [(0.7, 0, 1.0), (1.3, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.9), (0.7, 50, 0.9)]
    plans = [("float32 V=262144", 262144, 8, torch.float32), ("float32 V=50257", 50257, 16, torch.float32),
             ("float32 V=4096", 4096, 64, torch.float32), ("bfloat16 V=4096", 4096, 32, torch.bfloat16),
             ("float64 V=4096", 4096, 32, torch.float64)]
    for name, vocab, rows, dtype in plans:
        noise_dtype = reference.compute_dtype(dtype)
        calls = mismatches = 0
        for t, top_k, top_p in settings:
            for k in (0, 4):
                for seed in range(2):
                    seeds, counters, drafts, q, logits, num_draft = case(seed + vocab, rows, k, vocab, dtype)
                    variants = [None]
                    if k:
                        variants.append(edge(seeds, counters, drafts, q, logits, num_draft, t, top_k, top_p,
                                             noise_dtype))
                    for probs in variants:
                        a = eager(seeds, counters, drafts, probs, logits, num_draft, t, top_k, top_p, noise_dtype)
                        b = fused.sample_step(seeds, counters, drafts, probs, logits, num_draft, temperature=t,
                                              top_k=top_k, top_p=top_p, noise_dtype=noise_dtype)
                        calls += 1
                        mismatches += int(not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])))
        results.append((name, calls, mismatches))
        print(f"{name}: {calls} calls x {rows} rows, {mismatches} with different tokens", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3000)
    parser.add_argument("--forward-reps", type=int, default=1500)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--skip-forward", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--check", action="store_true", help="run the exactness sweep instead (several minutes)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from specdec import fused

    if args.check:
        exactness_sweep()
        print(f"fused graphs compiled: {fused.compile_stats()}")
        return
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, B=1, V={args.vocab}")
    start = time.perf_counter()
    rows = tail_table(args.vocab, args.reps)
    print(f"(tail table: {time.perf_counter() - start:.0f} s, fused graphs {fused.compile_stats()})")
    print("| case | eager us | fused us | eager / fused |")
    print("|---|---:|---:|---:|")
    for label, eager, fast in rows:
        print(f"| {label} | {eager:.1f} | {fast:.1f} | {eager / fast:.1f}x |")
    if not args.skip_forward:
        share = forward_share(args.context, args.forward_reps)
        print(f"\nbundled target (V={share['vocab']}), compiled forward over 1 token after {args.context}, "
              f"each followed by a tail timed apart; compile + first calls {share['compile_s']:.0f} s")
        print("| timed | median ms | (forward + tail) / forward |")
        print("|---|---:|---:|")
        print(f"| forward | {share['forward_ms']:.3f} | |")
        for name in ("fused", "eager"):
            print(f"| {name} sampling tail, right after the forward | {share['tail_ms'][name]:.3f} | "
                  f"{share['ratio'][name]:.3f} |")
    if not args.skip_generate:
        share = generation_share(args.new_tokens, args.repeats)
        ms = share["ms_per_token"]
        print(f"\nplain decoding, compile=True, B=1, {args.new_tokens} tokens a request, median over "
              f"{3 * args.repeats} requests (3 prompts x {args.repeats}); warm-up {share['warmup_s']:.0f} s")
        print("| decoding | ms / token | / greedy |")
        print("|---|---:|---:|")
        for name, value in ms.items():
            print(f"| {name} | {value:.3f} | {value / ms['greedy']:.3f} |")
        print(f"step graphs {share['stats']}")
    print(f"\nfused graphs compiled: {fused.compile_stats()}")


if __name__ == "__main__":
    main()
