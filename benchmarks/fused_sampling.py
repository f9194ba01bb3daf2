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
timed alone, followed by the fused tail, and followed by the eager tail (on its logits), in
rotation; reports each median and (forward + tail) / forward.

One torch thread. Compiling costs about a minute on a 2-core CPU (excluded from timings).

    python -P benchmarks/fused_sampling.py --reps 3000 --forward-reps 1500
"""

from __future__ import annotations

import argparse
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


def tail_table(vocab: int, reps: int) -> list[tuple[str, float, float]]:
    from specdec import fused, kernels, noise
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
            def eager():
                uniforms = noise.uniform(seeds, counters, noise.UNIFORM_STREAM, k, f32)
                exponentials = noise.exponential(seeds, counters, noise.BONUS_STREAM, vocab, f32)
                return kernels.verify_sampling(drafts, probs, logits, uniforms, exponentials, temperature=t,
                                               top_k=top_k, top_p=top_p, num_draft=num_draft)

            def fast():
                return fused.sample_step(seeds, counters, drafts, probs, logits, num_draft, temperature=t,
                                         top_k=top_k, top_p=top_p, noise_dtype=f32)

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

    def with_fused():
        logits = step()
        fused.sample_step(seeds, counters, none, None, logits, zero, temperature=0.7, noise_dtype=f32)

    def with_eager():
        logits = step()
        e = noise.exponential(seeds, counters, noise.BONUS_STREAM, vocab, f32)
        kernels.verify_sampling(none, None, logits, noise.uniform(seeds, counters, 0, 0, f32), e,
                                temperature=0.7, num_draft=zero)

    start = time.perf_counter()
    step()
    with_fused()
    compile_s = time.perf_counter() - start
    t_fwd, t_fused, t_eager = _alternate([step, with_fused, with_eager], reps, warm=20)
    fwd, fz, ea = (statistics.median(t) * 1e3 for t in (t_fwd, t_fused, t_eager))
    return {"vocab": vocab, "forward_ms": fwd, "forward_fused_ms": fz, "forward_eager_ms": ea,
            "ratio_fused": fz / fwd, "ratio_eager": ea / fwd, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3000)
    parser.add_argument("--forward-reps", type=int, default=1500)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--skip-forward", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from specdec import fused

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
              f"compile + first calls {share['compile_s']:.0f} s")
        print("| timed | median ms | / forward |")
        print("|---|---:|---:|")
        print(f"| forward | {share['forward_ms']:.3f} | 1.000 |")
        print(f"| forward + fused sampling | {share['forward_fused_ms']:.3f} | {share['ratio_fused']:.3f} |")
        print(f"| forward + eager sampling | {share['forward_eager_ms']:.3f} | {share['ratio_eager']:.3f} |")
    print(f"\nfused graphs compiled: {fused.compile_stats()}")


if __name__ == "__main__":
    main()
