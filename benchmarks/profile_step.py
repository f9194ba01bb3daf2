"""Where a decode step's time goes: baseline and draft model, greedy and sampled, one run.

`specdec bench` reports the draft model's efficiency against Leviathan et al.'s bound
tau / (k c + 1). That bound prices the target's verify forward over K+1 tokens like a
one-token forward and the step's own work at zero. This script times the parts of every
step of the real loop (host clock; CUDA synchronised around each part) and splits the
gap between the bound and the measured speedup into what causes it:

  draft    Planner.propose: the draft model's forwards (catch-up included)
  verify   the target's forward (KVState.forward on the target's KV state)
  accept   engine._verify: greedy check or rejection sampling
  rest     everything else in the step: bookkeeping, the one host copy, stats, drafter updates

Per method: ms per new token of each part, the draft/verify costs per step in units of
the baseline's own forward, and the efficiency against the Leviathan bound and against
the "cost-aware" bound tau / (k c' + v) where c' is the measured draft forward cost and
v the measured verify forward over K+1 tokens, both over the baseline's one-token forward.
The baseline's time per token over its own forward time is the loop's overhead figure.

    python benchmarks/profile_step.py --out benchmarks/results/profile_step_cpu
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

PARTS = ("draft", "verify", "accept", "rest")


class StepTimer:
    """Accumulates seconds per part while installed (wraps the loop's functions)."""

    def __init__(self, target_model: torch.nn.Module) -> None:
        self.target_model = target_model
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = next(target_model.parameters()).is_cuda
        self._undo: list = []

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _wrap(self, owner, name: str, part: str, only_target: bool = False) -> None:
        original = getattr(owner, name)
        timer = self

        def timed(*args, **kwargs):
            if only_target and getattr(args[0], "model", None) is not timer.target_model:
                return original(*args, **kwargs)
            timer._sync()
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer._sync()
                timer.seconds[part] += time.perf_counter() - t

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def __enter__(self) -> "StepTimer":
        from specdec import engine
        from specdec.planning import Planner
        from specdec.kv import KVState

        self._wrap(engine, "prefill_logits", "prefill")  # the prompt, before the first step
        self._wrap(Planner, "propose", "draft")
        self._wrap(KVState, "forward", "verify", only_target=True)
        self._wrap(engine, "_verify", "accept")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def run_method(gen, prompts, *, drafter: str, k, temperature: float | None, new_tokens: int, seed: int):
    """All prompts once; returns wall seconds, tokens, target forwards, part seconds, outputs."""
    kwargs = dict(max_new_tokens=new_tokens, drafter=drafter, num_draft_tokens=k)
    if temperature is not None:
        kwargs["temperature"] = temperature
    with StepTimer(gen.target_model) as timer:
        wall = tokens = forwards = 0
        outputs = []
        for i, ids in enumerate(prompts):
            t = time.perf_counter()
            res = gen.generate_ids([ids], seed=(seed + i) if temperature is not None else None, **kwargs)[0]
            if timer.cuda:
                torch.cuda.synchronize()
            wall += time.perf_counter() - t
            tokens += len(res.token_ids)
            forwards += res.stats.target_forwards
            outputs.append(list(res.token_ids))
    parts = dict(timer.seconds)
    # The prefill's forward is inside 'verify' (KVState.forward) too: keep it out of the steps.
    prefill = parts.pop("prefill", 0.0)
    parts["verify"] = parts.get("verify", 0.0) - prefill
    steps_total = wall - prefill
    parts["rest"] = steps_total - sum(parts.get(p, 0.0) for p in ("draft", "verify", "accept"))
    return dict(wall=wall, prefill=prefill, steps=steps_total, tokens=tokens, forwards=forwards,
                parts=parts, outputs=outputs)


def summarise(samples: list[dict]) -> dict:
    """Medians over repeats of the per-token figures."""
    out = {"tokens": samples[0]["tokens"], "forwards": samples[0]["forwards"]}
    steps = samples[0]["forwards"] - len(samples[0]["outputs"])  # one prefill forward per prompt
    out["steps"] = steps
    out["ms_per_token"] = statistics.median(s["steps"] / s["tokens"] * 1e3 for s in samples)
    for p in PARTS:
        out[f"{p}_ms_per_token"] = statistics.median(s["parts"].get(p, 0.0) / s["tokens"] * 1e3 for s in samples)
        out[f"{p}_ms_per_step"] = statistics.median(s["parts"].get(p, 0.0) / steps * 1e3 for s in samples)
    out["spread"] = (max(s["steps"] for s in samples) - min(s["steps"] for s in samples)) / statistics.median(
        s["steps"] for s in samples)
    out["tau"] = out["tokens"] / steps
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from specdec import SpeculativeGenerator
    from specdec.bench.methods import forward_ms
    from specdec.workload import load_builtin

    gen = SpeculativeGenerator.from_pretrained("bundled")
    prompts = [gen._encode(p.text) for p in load_builtin(args.num_prompts)]
    methods = [
        ("greedy", "baseline", "none", 0, None),
        ("greedy", f"model K={args.k}", "model", args.k, None),
        ("sampled", "baseline", "none", 0, args.temperature),
        ("sampled", f"model K={args.k}", "model", args.k, args.temperature),
    ]
    # Warm-up, then repeats in alternating order.
    for _, _, drafter, k, temp in methods:
        run_method(gen, prompts[:1], drafter=drafter, k=k, temperature=temp, new_tokens=16, seed=args.seed)
    samples = defaultdict(list)
    for r in range(args.repeats):
        for setting, name, drafter, k, temp in (methods if r % 2 == 0 else methods[::-1]):
            samples[(setting, name)].append(run_method(
                gen, prompts, drafter=drafter, k=k, temperature=temp, new_tokens=args.new_tokens, seed=args.seed))
    context = round(statistics.mean(len(p) for p in prompts) + args.new_tokens / 2)
    ctx_ids = (prompts[0] * 4)[:context]
    reps = 30
    cost = {
        "context_tokens": context,
        "target_forward_ms": statistics.median(forward_ms(gen.target_model, ctx_ids, 1, reps)),
        "target_verify_ms": statistics.median(forward_ms(gen.target_model, ctx_ids, args.k + 1, reps)),
        "draft_forward_ms": statistics.median(forward_ms(gen.draft_model, ctx_ids, 1, reps)),
    }
    cost["c"] = cost["draft_forward_ms"] / cost["target_forward_ms"]

    rows = []
    for setting in ("greedy", "sampled"):
        base = summarise(samples[(setting, "baseline")])
        base_forward = base["verify_ms_per_step"]  # the baseline's own one-token forward, in the loop
        for name in ("baseline", f"model K={args.k}"):
            s = summarise(samples[(setting, name)])
            row = {"setting": setting, "method": name, **s}
            row["speedup"] = base["ms_per_token"] / s["ms_per_token"]
            row["verify_over_forward"] = s["verify_ms_per_step"] / base_forward
            row["draft_over_forward"] = s["draft_ms_per_step"] / base_forward
            row["rest_over_forward"] = s["rest_ms_per_step"] / base_forward
            row["accept_over_forward"] = s["accept_ms_per_step"] / base_forward
            if name == "baseline":
                row["time_per_token_over_forward"] = s["ms_per_token"] / base_forward
                row["time_per_token_over_isolated_forward"] = s["ms_per_token"] / cost["target_forward_ms"]
            else:
                k_eff = args.k  # draft forwards per step: the draft model runs K times per step
                row["bound_leviathan"] = s["tau"] / (k_eff * cost["c"] + 1)
                row["bound_cost_aware"] = s["tau"] / (row["draft_over_forward"] + row["verify_over_forward"])
                row["efficiency_leviathan"] = row["speedup"] / row["bound_leviathan"]
                row["efficiency_cost_aware"] = row["speedup"] / row["bound_cost_aware"]
                if setting == "greedy":
                    row["equals_baseline"] = samples[(setting, name)][0]["outputs"] == samples[(setting, "baseline")][0]["outputs"]
            rows.append(row)

    from specdec.bench.runner import machine_info

    doc = {
        "command": "python benchmarks/profile_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(next(gen.target_model.parameters()).device),
        "workload": {"prompts": len(prompts), "new_tokens": args.new_tokens, "repeats": args.repeats, "k": args.k,
                     "temperature": args.temperature},
        "cost": cost,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "profile.md").write_text(report(doc))
    print(report(doc))
    return 0


def report(doc: dict) -> str:
    c, w = doc["cost"], doc["workload"]
    lines = [
        "# Where a decode step's time goes", "",
        f"Command: `{doc['command']}`  ", f"Date: {doc['date']}  ",
        f"Machine: {doc['machine']['device_name']}, torch threads {doc['machine']['torch_threads']}, Python "
        f"{doc['machine']['python']}, torch {doc['machine']['torch']}, transformers {doc['machine']['transformers']}  ",
        f"Workload: bundled pair, {w['prompts']} built-in prompts x {w['new_tokens']} new tokens, median of "
        f"{w['repeats']} repeats in alternating order; sampled at T={w['temperature']}.", "",
        f"Isolated forwards at {c['context_tokens']} tokens of context: target {c['target_forward_ms']:.2f} ms, "
        f"target over K+1 = {w['k'] + 1} tokens {c['target_verify_ms']:.2f} ms "
        f"({c['target_verify_ms'] / c['target_forward_ms']:.2f}x), draft {c['draft_forward_ms']:.2f} ms (c = {c['c']:.3f}).", "",
        "| setting | method | ms/token | draft | verify | accept | rest | tau | speedup | spread |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['ms_per_token']:.2f} | {r['draft_ms_per_token']:.2f} | "
            f"{r['verify_ms_per_token']:.2f} | {r['accept_ms_per_token']:.2f} | {r['rest_ms_per_token']:.2f} | "
            f"{r['tau']:.2f} | {r['speedup']:.2f} | {r['spread']:.2f} |")
    lines += ["", "Per step, in units of the baseline's own one-token forward in the loop:", "",
              "| setting | method | draft | verify | accept | rest | bound (Leviathan) | bound (cost-aware) | "
              "efficiency (Leviathan) | efficiency (cost-aware) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        def f(key):
            return f"{r[key]:.2f}" if key in r else "-"
        lines.append(
            f"| {r['setting']} | {r['method']} | {f('draft_over_forward')} | {f('verify_over_forward')} | "
            f"{f('accept_over_forward')} | {f('rest_over_forward')} | {f('bound_leviathan')} | {f('bound_cost_aware')} | "
            f"{f('efficiency_leviathan')} | {f('efficiency_cost_aware')} |")
    lines += [""]
    for r in doc["rows"]:
        if r["method"] == "baseline":
            lines.append(
                f"- {r['setting']} baseline: {r['ms_per_token']:.2f} ms per token = {r['time_per_token_over_forward']:.3f}x "
                f"its own forward in the loop, {r['time_per_token_over_isolated_forward']:.3f}x the isolated forward "
                f"measured at the mean context.")
    lines += ["",
              "Columns: ms/token and the parts: wall time of the decode steps (prefill excluded) per new token; "
              "draft = Planner.propose, verify = the target's forward, accept = verification and "
              "sampling, rest = the remainder of the step (bookkeeping, the host copy, stats, drafter updates). "
              "Per-step table: each part's mean time per step over the baseline's mean forward time per step. "
              "Leviathan bound = tau / (K c + 1) with c from the isolated forwards; cost-aware bound = tau / "
              "(draft + verify) with both measured in the loop, i.e. the speedup a step with zero accept and rest "
              "time would give; efficiency = speedup / bound.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
