"""Greedy equality with transformers on real models, on every prompt of every workload.

For each named real model (specdec.real_models) and each named workload
(specdec.workload), in float32 on CPU: transformers' `generate(do_sample=False)` on each
prompt alone is the reference; specdec decodes the same prompts in ragged batches with
the drafters none, ngram, auto and cache (a fresh in-memory store, cold then warm), and
each row's tokens must equal the reference. Writes one JSON per model and a table.

    python -P benchmarks/real_equality.py --models smollm2-135m --new 32
    python -P benchmarks/real_equality.py --models gemma3-270m --new 32
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import uuid
from pathlib import Path

import torch

DRAFTERS = ("none", "ngram", "auto", "cache-cold", "cache-warm")


def reference(model, rows: list[list[int]], new: int, stop: list[int], pad: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for ids in rows:
            tokens = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=stop,
                                    pad_token_id=pad)
            out.append(tokens[0, len(ids):].tolist())
    return out


def ours(gen, rows: list[list[int]], new: int, batch: int, **kwargs) -> list[list[int]]:
    out = []
    for start in range(0, len(rows), batch):
        results = gen.generate_ids(rows[start:start + batch], max_new_tokens=new, **kwargs)
        out.extend(r.token_ids for r in results)
    return out


def run(model_name: str, workloads: list[str], new: int, batch: int, limit: int | None, out: Path) -> dict:
    from specdec import SpeculativeGenerator
    from specdec.caching import CacheLayer
    from specdec.workload import load_workload, render

    torch.set_num_threads(1)
    gen = SpeculativeGenerator.from_pretrained(model_name, dtype=torch.float32)
    tok = gen.tokenizer
    stop = sorted(gen.eos_token_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    report: dict = {"model": model_name, "new_tokens": new, "batch": batch, "workloads": {}}
    for name in workloads:
        prompts = load_workload(name, limit)
        rows = [list(tok(render(p, tok))["input_ids"]) for p in prompts]
        t0 = time.perf_counter()
        expected = reference(gen.target_model, rows, new, stop, pad)
        counts = {}
        for drafter in DRAFTERS:
            if drafter.startswith("cache"):
                continue
            got = ours(gen, rows, new, batch, drafter=drafter)
            counts[drafter] = sum(g == e for g, e in zip(got, expected))
        with CacheLayer.open(f"memory://{uuid.uuid4().hex}", gen, response_cache=False) as layer:
            cold = ours(gen, rows, new, batch, drafter="cache", cache=layer)
            layer.flush()
            warm = ours(gen, rows, new, batch, drafter="cache", cache=layer)
        counts["cache-cold"] = sum(g == e for g, e in zip(cold, expected))
        counts["cache-warm"] = sum(g == e for g, e in zip(warm, expected))
        report["workloads"][name] = {"prompts": len(rows), "equal": counts,
                                     "seconds": round(time.perf_counter() - t0, 1)}
        print(model_name, name, len(rows), counts, flush=True)
        report["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
        (out / f"{model_name}.json").write_text(json.dumps(report, indent=1) + "\n")  # after each workload
    return report


def main() -> None:
    from specdec.workload import workload_names

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--workloads", default=",".join(workload_names()))
    parser.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    parser.add_argument("--batch", type=int, default=16, help="prompts per specdec call (ragged batches)")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each workload (default: all)")
    parser.add_argument("--out", default="benchmarks/results/real_equality")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        run(name, args.workloads.split(","), args.new, args.batch, args.limit, out)


if __name__ == "__main__":
    main()
