"""How often reduced precision changes an answer: verified cache hits versus the choice of drafter.

In bfloat16 two logits can sit one rounding step apart, and the same position computed
in a different shape (one token at a time, a K+1-token verify, one forward over prompt
+ response) can break that near-tie the other way. This script counts, over every
prompt of the named workloads, how often

- each drafter's greedy output differs from plain decoding (drafter "none"), and
- a verified cache hit's answer differs from the uncached call that wrote the entry
  (specdec.caching.verify_responses checks it; on a mismatch the target's token is kept
  and decoding goes on from there),

for each numerics mode given (`--numerics`: "native" computes as loaded; "stable"
computes the final norm and the LM head in float32; see specdec.numerics). Each prompt
is decoded alone (batch 1), so only the drafter or the cache changes the shapes. The
cache is an in-process store (`memory://`), fresh per mode; the "cache" drafter reads
the store the uncached calls filled. Prints a table and writes JSON with the timings
of each pass (one torch thread).

    python -P benchmarks/bf16_rates.py --model bundled --new 32
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import uuid
from pathlib import Path

import torch

DRAFTERS = ("ngram", "model", "auto", "cache")


def _decode(gen, rows, new, **kwargs):
    return [gen.generate_ids([ids], max_new_tokens=new, **kwargs)[0] for ids in rows]


def run_mode(gen, rows, new, drafters):
    """One numerics mode: plain decoding, each drafter, and the verified hit of each prompt."""
    from specdec.caching import CacheLayer

    out: dict = {}
    url = f"memory://{uuid.uuid4().hex}"
    with CacheLayer.open(url, gen) as layer:
        t0 = time.perf_counter()
        # The uncached call: plain decoding (a miss), which writes its answer and fills the draft store.
        first = _decode(gen, rows, new, drafter="none", cache=layer)
        out["none_seconds"] = round(time.perf_counter() - t0, 2)
        layer.flush()
        t0 = time.perf_counter()
        hits = _decode(gen, rows, new, drafter="none", cache=layer)
        out["hit_seconds"] = round(time.perf_counter() - t0, 2)
    ref = [r.token_ids for r in first]
    differs: dict[str, list[int]] = {}
    for drafter in drafters:
        if drafter == "model" and gen.draft_model is None:
            continue
        t0 = time.perf_counter()
        if drafter == "cache":  # the draft store the uncached calls filled: every prompt's own answer
            with CacheLayer.open(url, gen, response_cache=False) as layer:
                got = _decode(gen, rows, new, drafter="cache", cache=layer)
        else:
            got = _decode(gen, rows, new, drafter=drafter, cache=None)
        out[f"{drafter}_seconds"] = round(time.perf_counter() - t0, 2)
        differs[drafter] = [i for i, (g, e) in enumerate(zip(got, ref)) if g.token_ids != e]
    kinds: dict[str, int] = {}
    for h in hits:
        kinds[str(h.stats.cache_kind)] = kinds.get(str(h.stats.cache_kind), 0) + 1
    differs["verified-hit"] = [i for i, (h, e) in enumerate(zip(hits, ref)) if h.token_ids != e]
    out["hit_kinds"] = kinds
    out["differs"] = {k: len(v) for k, v in differs.items()}
    out["differs_prompts"] = differs
    return out


def main() -> None:
    from specdec import SpeculativeGenerator
    from specdec.workload import load_workload, render

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled", help='"bundled" (target + draft) or a real model name')
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workloads", default="stdlib,humaneval,grounded,chat")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each workload")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--numerics", default="native,stable")
    parser.add_argument("--drafters", default=",".join(DRAFTERS))
    parser.add_argument("--out", default="benchmarks/results/bf16_rates")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gens = {mode: SpeculativeGenerator.from_pretrained(args.model, dtype=args.dtype, numerics=mode)
            for mode in args.numerics.split(",")}
    tok = next(iter(gens.values())).tokenizer
    rows = []
    for name in args.workloads.split(","):
        rows += [list(tok(render(p, tok))["input_ids"]) for p in load_workload(name, args.limit)]
    report = {
        "model": args.model,
        "dtype": args.dtype,
        "prompts": len(rows),
        "new_tokens": args.new,
        "workloads": args.workloads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, torch {torch.__version__}",
        "modes": {},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for mode, gen in gens.items():
        result = run_mode(gen, rows, args.new, args.drafters.split(","))
        report["modes"][mode] = result
        print(mode, json.dumps({k: v for k, v in result.items() if k != "differs_prompts"}), flush=True)
        (out / f"{args.model}_{args.dtype}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'mode':<8} " + " ".join(f"{k:>15}" for k in report["modes"][mode]["differs"]))
    for mode, result in report["modes"].items():
        n = report["prompts"]
        print(f"{mode:<8} " + " ".join(f"{v:>9}/{n:<5}" for v in result["differs"].values()))


if __name__ == "__main__":
    main()
