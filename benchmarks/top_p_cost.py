"""What top-p costs on CPU: the nucleus threshold from a full sort against from a prefix.

`reference.top_p_threshold` reads the nucleus from the largest few probabilities (topk of
a prefix, longer prefixes, then the whole row sorted) where the full sort of the
vocabulary used to run on every sampled position. This measures, in one run:

  * real rows: the logits a sampled SmolLM2 decode (HumanEval prompts) verifies, each
    row's threshold both ways (checked equal), the nucleus sizes and the time per call;
  * worst case: flat rows at 131k and 262k ids whose nucleus is most of the vocabulary
    (both prefixes miss, then the sort runs), the time per call both ways;
  * end to end: sampled decoding with top-p (drafter "none" and "ngram"), the full sort
    patched back in for the "sort" rows, alternating, tokens per second;
  * with --fused: the compiled path's sampled verify (specdec.fused.sample_step, one graph,
    5 positions, draft probs) at 49k and 262k ids, the threshold given to the graph against
    the graph's own sort (fused.EAGER_TOP_P_VOCAB raised past the vocabulary), alternating.

    python -P benchmarks/top_p_cost.py --out benchmarks/results/top_p_cpu
    python -P benchmarks/top_p_cost.py --fused --out benchmarks/results/top_p_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def full_sort_threshold(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The definition: the whole row sorted (what every call ran before)."""
    sorted_probs = torch.sort(probs, dim=-1, descending=True).values
    exclusive_mass = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    last_rank = (exclusive_mass < top_p).sum(dim=-1, keepdim=True) - 1
    return sorted_probs.gather(-1, last_rank.clamp(min=0))


def timed(fn, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def fused_verify(repeats: int) -> dict:
    """ms per compiled sampled verify of 5 positions at top-p 0.95 (random N(0, 16) logits and
    draft probs, one row), the threshold given against sorted in the graph."""
    from specdec import fused

    given = fused.EAGER_TOP_P_VOCAB
    out: dict[str, dict[str, float]] = {}
    for vocab in (49152, 262144):
        g = torch.Generator().manual_seed(0)
        k = 4
        args = (torch.zeros(1, dtype=torch.int64), torch.full((1,), 100, dtype=torch.int64),
                torch.randint(0, vocab, (1, k), generator=g),
                torch.softmax(torch.randn(1, k, vocab, generator=g) * 4, dim=-1),
                torch.randn(1, k + 1, vocab, generator=g) * 4, torch.full((1,), k, dtype=torch.int64))
        times: dict[str, list[float]] = {"threshold_given": [], "sort_in_graph": []}
        try:
            for rep in range(repeats):
                order = [("threshold_given", given), ("sort_in_graph", vocab + 1)]
                for name, bar in order if rep % 2 == 0 else order[::-1]:
                    fused.EAGER_TOP_P_VOCAB = bar
                    times[name].append(timed(lambda: fused.sample_step(
                        *args, temperature=0.7, top_p=0.95, noise_dtype=torch.float32), 5))
        finally:
            fused.EAGER_TOP_P_VOCAB = given
        out[str(vocab)] = {name: round(statistics.median(v), 2) for name, v in times.items()}
    return out


def main() -> None:
    from specdec import SpeculativeGenerator
    from specdec.kernels import reference
    from specdec.workload import load_workload, render

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workload", default="humaneval")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fused", action="store_true", help="only the compiled path's sampled verify")
    parser.add_argument("--out", default="benchmarks/results/top_p_cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fused:
        report = {"command": f"python -P benchmarks/top_p_cost.py --fused --repeats {args.repeats} --out {args.out}",
                  "machine": f"{platform.machine()}, 1 torch thread, torch {torch.__version__}",
                  "top_p": 0.95, "temperature": 0.7, "positions": 5,
                  "ms_per_verify": fused_verify(max(args.repeats, 3))}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fused.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(report, indent=1))
        return
    gen = SpeculativeGenerator.from_pretrained(args.model)
    tok = gen.tokenizer
    rows = [list(tok(render(p, tok))["input_ids"]) for p in load_workload(args.workload, args.prompts)]
    sample = dict(temperature=args.temperature, top_p=args.top_p, seed=1)

    # Real rows: what sampled decoding hands logits_to_probs.
    seen: list[tuple[torch.Tensor, float]] = []
    real_fn = reference.logits_to_probs

    def recording(logits, temperature=1.0, top_k=0, top_p=1.0):
        seen.append((torch.softmax(reference.sanitize_logits(logits.float() / temperature), dim=-1), top_p))
        return real_fn(logits, temperature, top_k, top_p)

    reference.logits_to_probs = recording
    try:
        for r in rows:
            gen.generate_ids([r], max_new_tokens=args.new, drafter="none", **sample)
    finally:
        reference.logits_to_probs = real_fn
    sizes, sort_ms, prefix_ms = [], [], []
    for probs, top_p in seen:
        want = full_sort_threshold(probs, top_p)
        if not torch.equal(reference.top_p_threshold(probs, top_p), want):
            raise SystemExit("the prefix threshold differs from the full sort's")
        sizes += (probs >= want).sum(dim=-1).flatten().tolist()
        sort_ms.append(timed(lambda: full_sort_threshold(probs, top_p), 3))
        prefix_ms.append(timed(lambda: reference.top_p_threshold(probs, top_p), 3))
    sizes.sort()
    real = {
        "calls": len(seen), "row_shape": list(seen[0][0].shape),
        "nucleus_ids": {"median": statistics.median(sizes), "p90": sizes[int(0.9 * (len(sizes) - 1))],
                        "max": sizes[-1]},
        "ms_per_call": {"full_sort": round(statistics.median(sort_ms), 3),
                        "prefix": round(statistics.median(prefix_ms), 3)},
    }

    # Worst case: a nucleus of most of the vocabulary.
    worst = {}
    for vocab in (131072, 262144):
        probs = torch.softmax(torch.randn(5, vocab, generator=torch.Generator().manual_seed(0)) * 0.05, dim=-1)
        worst[str(vocab)] = {"rows": 5, "full_sort_ms": round(timed(lambda: full_sort_threshold(probs, 0.95)), 2),
                             "prefix_ms": round(timed(lambda: reference.top_p_threshold(probs, 0.95)), 2)}

    # End to end: the same requests with the full sort patched back in, alternating.
    real_threshold = reference.top_p_threshold
    rates: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        order = [("prefix", real_threshold), ("sort", full_sort_threshold)]
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            reference.top_p_threshold = fn
            try:
                for drafter in ("none", "ngram"):
                    t0 = time.perf_counter()
                    n = sum(len(gen.generate_ids([r], max_new_tokens=args.new, drafter=drafter, num_draft_tokens=4,
                                                 **sample)[0].token_ids) for r in rows)
                    rates.setdefault(f"{drafter} {name}", []).append(n / (time.perf_counter() - t0))
            finally:
                reference.top_p_threshold = real_threshold
    end_to_end = {k: round(statistics.median(v), 2) for k, v in rates.items()}
    ratios = {d: round(end_to_end[f"{d} prefix"] / end_to_end[f"{d} sort"], 3) for d in ("none", "ngram")}
    report = {
        "command": "python -P benchmarks/top_p_cost.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out") + f" --out {args.out}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, torch {torch.__version__}",
        "model": args.model, "workload": args.workload, "prompts": len(rows), "new_tokens": args.new,
        "temperature": args.temperature, "top_p": args.top_p, "repeats": args.repeats,
        "real_rows": real, "worst_case": worst,
        "tokens_per_second": end_to_end, "runs": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "prefix_over_sort": ratios,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.model}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
