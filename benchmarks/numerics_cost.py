"""What numerics="stable" costs: plain decoding speed and memory, native versus stable.

Both modes decode the same prompts (drafter "none", greedy, each prompt its own call)
in alternating order, repeated; reports the median tokens per second of each and their
ratio, and the bytes of the float32 copies the stable mode keeps (final norm and LM
head). One torch thread.

    python -P benchmarks/numerics_cost.py --model bundled --prompts 8 --new 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    from specdec import SpeculativeGenerator
    from specdec.numerics import stable_head
    from specdec.workload import load_workload, render

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workload", default="humaneval")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/numerics_cost")
    args = parser.parse_args()
    torch.set_num_threads(1)
    native = SpeculativeGenerator.from_pretrained(args.model, dtype=args.dtype)
    stable = SpeculativeGenerator(native.target_model, native.tokenizer, native.draft_model, numerics="stable")
    tok = native.tokenizer
    rows = [list(tok(render(p, tok))["input_ids"]) for p in load_workload(args.workload, args.prompts)]
    rates: dict[str, list[float]] = {"native": [], "stable": []}
    for gen in (native, stable):  # warm-up (and the stable copies are made here)
        gen.generate_ids([rows[0]], max_new_tokens=4, drafter="none")
    for rep in range(args.repeats):
        order = [("native", native), ("stable", stable)]
        for name, gen in order if rep % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            tokens = sum(len(gen.generate_ids([r], max_new_tokens=args.new, drafter="none")[0].token_ids) for r in rows)
            rates[name].append(tokens / (time.perf_counter() - t0))
    head = stable_head(native.target_model)
    copies = sum(p.numel() * 4 for m in (head._head32, head._norm32) if m is not None for p in m.parameters())
    report = {
        "model": args.model, "dtype": args.dtype, "workload": args.workload, "prompts": len(rows),
        "new_tokens": args.new, "repeats": args.repeats,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, torch {torch.__version__}",
        "tokens_per_second": {k: round(statistics.median(v), 2) for k, v in rates.items()},
        "runs": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "stable_over_native": round(statistics.median(rates["stable"]) / statistics.median(rates["native"]), 3),
        "float32_copies_bytes": copies,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.model}_{args.dtype}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
