"""Where a compiled decoding step's time goes (compile=True), on the bundled pair.

Times the parts of every step of the real loop with the host clock (CUDA synchronised
around each part), for the compiled baseline and the compiled "auto" drafter, greedy and
sampled:

  forward    the target's step forward (the compiled graph)
  draft      the drafters' proposals: the draft model's forwards (compiled graphs) and the
             sampling of its draft tokens, n-gram and store lookups
  planner    the rest of Planner.propose (which source drafts, how many tokens, packing the
             drafts) plus Planner.observe (acceptance statistics, drafter updates)
  verify     greedy check or rejection sampling (engine._verify / _verify_by_position)
  host copy  the step's one device-to-host copy (StepOutcome.read)
  rest       everything else in the step: the loop's bookkeeping (limits, stops, rollback,
             stats, the stream) = step time minus the parts above

The prefill (eager, one per request) is kept out. The issue's bar: planner + rest <= 15%
of a step.

    python -P benchmarks/profile_compiled.py --out benchmarks/results/profile_compiled_cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

PARTS = ("forward", "draft", "planner", "verify", "host copy", "rest")


class StepTimer:
    """Accumulates seconds per part while installed (wraps the loop's functions)."""

    def __init__(self, target_model: torch.nn.Module) -> None:
        self.target_model = target_model
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = next(target_model.parameters()).is_cuda
        self._undo: list = []

    def _wrap(self, owner, name: str, part, classmethod_: bool = False) -> None:
        original = owner.__dict__[name] if classmethod_ else getattr(owner, name)
        call = original.__func__ if classmethod_ else original
        timer = self

        def timed(*args, **kwargs):
            key = part(args) if callable(part) else part
            if timer.cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                if timer.cuda:
                    torch.cuda.synchronize()
                timer.seconds[key] += time.perf_counter() - t

        setattr(owner, name, classmethod(timed) if classmethod_ else timed)
        self._undo.append((owner, name, original))

    def __enter__(self) -> "StepTimer":
        from specdec import engine
        from specdec.kv import KVState
        from specdec.planning import Planner

        from specdec.drafters import available_drafters, get_drafter_class

        target = self.target_model
        self._wrap(engine, "prefill_logits", "prefill")
        self._wrap(KVState, "forward", lambda args: "forward" if args[0].model is target else "draft forward")
        wrapped = set()
        for name in available_drafters():
            if name in ("auto", "none"):  # the planner's choices, not drafter classes
                continue
            cls = get_drafter_class(name)
            if "propose" in vars(cls) and cls not in wrapped:
                wrapped.add(cls)
                self._wrap(cls, "propose", "draft")
        self._wrap(Planner, "propose", "propose")
        self._wrap(Planner, "observe", "observe")
        self._wrap(engine, "_verify", "verify")
        self._wrap(engine, "_verify_by_position", "verify")
        self._wrap(engine.StepOutcome, "read", "host copy", classmethod_=True)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def run_method(gen, prompts, *, drafter: str, temperature: float | None, new_tokens: int, seed: int) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, drafter=drafter, num_draft_tokens="auto" if drafter == "auto" else 4)
    if temperature is not None:
        kwargs["temperature"] = temperature
    with StepTimer(gen.target_model) as timer:
        wall = tokens = steps = 0
        for i, ids in enumerate(prompts):
            t = time.perf_counter()
            res = gen.generate_ids([ids], seed=(seed + i) if temperature is not None else None, **kwargs)[0]
            wall += time.perf_counter() - t
            tokens += len(res.token_ids)
            steps += res.stats.target_forwards  # the prefill stands in for the first step's forward
    s = dict(timer.seconds)
    prefill = s.pop("prefill", 0.0)
    s["forward"] = s.get("forward", 0.0) - prefill  # the prefill's forward went through KVState.forward too
    parts = {
        "forward": s["forward"],
        "draft": s.get("draft", 0.0),  # the draft model's forwards happen inside its propose
        "planner": s.get("propose", 0.0) - s.get("draft", 0.0) + s.get("observe", 0.0),
        "verify": s.get("verify", 0.0),
        "host copy": s.get("host copy", 0.0),
    }
    step_time = wall - prefill
    parts["rest"] = step_time - sum(parts.values())
    return {"step_time": step_time, "tokens": tokens, "steps": steps, "parts": parts}


def summarise(samples: list[dict]) -> dict:
    first = samples[0]
    out = {"tokens": first["tokens"], "steps": first["steps"], "tau": first["tokens"] / first["steps"]}
    out["ms_per_step"] = statistics.median(s["step_time"] / s["steps"] * 1e3 for s in samples)
    out["tokens_per_s"] = statistics.median(s["tokens"] / s["step_time"] for s in samples)
    for p in PARTS:
        out[f"{p}_ms"] = statistics.median(s["parts"][p] / s["steps"] * 1e3 for s in samples)
        out[f"{p}_share"] = statistics.median(s["parts"][p] / s["step_time"] for s in samples)
    out["planner_and_rest_share"] = statistics.median(
        (s["parts"]["planner"] + s["parts"]["rest"]) / s["step_time"] for s in samples)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from specdec import SpeculativeGenerator
    from specdec.workload import load_builtin

    gen = SpeculativeGenerator.from_pretrained("bundled", compile=True)
    warmup_s = gen.warmup()
    prompts = [gen._encode(p.text) for p in load_builtin(args.num_prompts)]
    methods = [
        ("greedy", "baseline", "none", None),
        ("greedy", "auto", "auto", None),
        ("sampled", "baseline", "none", args.temperature),
        ("sampled", "auto", "auto", args.temperature),
    ]
    for _, _, drafter, temp in methods:  # untimed pass: anything left to compile compiles here
        run_method(gen, prompts, drafter=drafter, temperature=temp, new_tokens=args.new_tokens, seed=args.seed)
    samples = defaultdict(list)
    for r in range(args.repeats):
        for setting, name, drafter, temp in (methods if r % 2 == 0 else methods[::-1]):
            samples[(setting, name)].append(
                run_method(gen, prompts, drafter=drafter, temperature=temp, new_tokens=args.new_tokens, seed=args.seed))
    rows = [{"setting": s, "method": n, **summarise(samples[(s, n)])} for s, n, _, _ in methods]

    from specdec.bench.runner import machine_info

    doc = {
        "command": "python -P benchmarks/profile_compiled.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(next(gen.target_model.parameters()).device),
        "workload": {"prompts": len(prompts), "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "temperature": args.temperature},
        "warmup_s": warmup_s,
        "compile": gen.compile_stats(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "profile.md").write_text(report(doc))
    print(report(doc))
    return 0


def report(doc: dict) -> str:
    w, m = doc["workload"], doc["machine"]
    lines = [
        "# Where a compiled decoding step's time goes", "",
        f"Command: `{doc['command']}`  ", f"Date: {doc['date']}  ",
        f"Machine: {m['device_name']}, torch threads {m['torch_threads']}, Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}  ",
        f"Workload: bundled pair, compile=True, {w['prompts']} built-in prompts x {w['new_tokens']} new tokens, "
        f"median of {w['repeats']} repeats in alternating order; sampled at T={w['temperature']}. "
        f"Warm-up {doc['warmup_s']:.1f} s; graphs {doc['compile']['graphs']}, recompiles {doc['compile']['recompiles']}.",
        "",
        "| setting | method | tok/s | tokens/step | ms/step | " + " | ".join(PARTS) + " | planner + rest |",
        "|---|---|---|---|---|" + "---|" * len(PARTS) + "---|",
    ]
    for r in doc["rows"]:
        cells = " | ".join(f"{r[f'{p}_ms']:.3f} ({r[f'{p}_share']:.0%})" for p in PARTS)
        lines.append(f"| {r['setting']} | {r['method']} | {r['tokens_per_s']:.0f} | {r['tau']:.2f} | "
                     f"{r['ms_per_step']:.3f} | {cells} | {r['planner_and_rest_share']:.1%} |")
    lines += ["", "Each part: ms per step (share of the step). Parts as in the script's docstring.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
