"""The numbers of one results row, from the samples of a run and of its baseline.

  tokens/s    new tokens / wall time over all prompts of a repeat; median over repeats
  speedup     tokens/s / baseline tokens/s on the same prompt in the same repeat (same setting
              and workload): median over repeats, geometric mean over prompts (paired_ratio)
  tau         tokens emitted per target forward (bonus/correction token included)
  bound       tau / (k c + 1) (Leviathan et al. 2023), k = draft forwards per target
              forward, c = draft forward time / target forward time; drafters without a
              model cost no forward: bound = tau
  efficiency  speedup / bound
  spread      (max - min) / median of the per-repeat tokens/s

Every function here is plain arithmetic on counts, so tests can check it by hand.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any

from .config import specdec_methods
from .methods import Run, Sample
from .report import COLUMN_KEYS

SPREAD_LIMIT = 0.10  # repeats further apart than this make a row suspect


def repeat_tokens_per_s(repeat: list[Sample]) -> float:
    """New tokens over all prompts of one repeat / their summed wall time."""
    return sum(len(s.tokens) for s in repeat) / sum(s.seconds for s in repeat)


def bound(tau: float, draft_forwards_per_step: float, c: float) -> float:
    """Leviathan et al.'s speedup bound tau / (k c + 1) for a measured run."""
    return tau / (draft_forwards_per_step * c + 1.0)


def per_position_acceptance(samples: list[Sample]) -> list[float]:
    """Accepted / drafted at each draft slot, summed over samples (0.0 where nothing was drafted)."""
    width = max((len(s.drafted_per_position) for s in samples), default=0)
    drafted = [0] * width
    accepted = [0] * width
    for s in samples:
        for i, (d, a) in enumerate(zip(s.drafted_per_position, s.accepted_per_position)):
            drafted[i] += d
            accepted[i] += a
    return [a / d if d else 0.0 for a, d in zip(accepted, drafted)]


def step_histograms(samples: list[Sample]) -> tuple[dict[int, int], dict[str, int]]:
    """Steps per draft length and per drafter, summed over samples; a step that drafted nothing
    counts as drafter "none" (plain decoding)."""
    lengths: Counter = Counter()
    drafters: Counter = Counter()
    for s in samples:
        lengths.update(s.draft_lengths)
        drafters.update(s.drafter_steps)
    drafters["none"] += lengths[0]
    return ({k: n for k, n in sorted(lengths.items()) if n},
            {name: n for name, n in sorted(drafters.items(), key=lambda kv: (-kv[1], kv[0])) if n})


def shares(counts: dict) -> str | None:
    """'key:share%' for each entry ("4:20% 6:75% 8:5%"); None when nothing was counted."""
    total = sum(counts.values())
    if not total:
        return None
    return " ".join(f"{key}:{100 * n / total:.0f}%" for key, n in counts.items())


def paired_ratio(run: Run, other: Run) -> float | None:
    """How many times faster `run` is than `other`, from the generations they ran side by side.

    Runs on the main prompts take turns prompt by prompt (see the runner), so each (repeat,
    prompt) gives one ratio of tokens/s measured in the same moments. Per prompt, the median
    over the repeats (a stall of a shared machine spoils one pair, not the prompt); over the
    prompts, the geometric mean. Prompts differ by far more than the noise (a repetitive one
    runs 3x, a free-form one 1.5x), so a median over all pairs would jump between prompts
    with the noise; the mean of the logs weighs every prompt alike and moves smoothly.
    None when the two share no complete pair (a different prompt count).
    """
    per_prompt: dict[int, list[float]] = {}
    for rep, ref in zip(run.samples, other.samples):
        if len(rep) != len(ref):
            return None
        for i, (s, b) in enumerate(zip(rep, ref)):
            if s.tokens and b.tokens and s.seconds > 0 and b.seconds > 0:
                per_prompt.setdefault(i, []).append((len(s.tokens) / s.seconds) / (len(b.tokens) / b.seconds))
    if not per_prompt:
        return None
    logs = [math.log(statistics.median(ratios)) for ratios in per_prompt.values()]
    return math.exp(sum(logs) / len(logs))


def paired_speedup(run: Run, baseline: Run) -> tuple[float, list[float]]:
    """(speedup, per-repeat speedups) against the baseline's samples of the same moments.

    The speedup is paired_ratio; runs that do not take turns with the baseline's (a
    different prompt count) fall back to the median of the per-repeat ratios.
    """
    per_repeat = [repeat_tokens_per_s(r) / repeat_tokens_per_s(b) for r, b in zip(run.samples, baseline.samples)]
    paired = paired_ratio(run, baseline)
    return (paired if paired is not None else statistics.median(per_repeat)), per_repeat


def greedy_mismatches(run: Run, baseline: Run) -> list[int]:
    """Indices of prompts whose tokens differ from baseline's in any repeat the two share."""
    bad = set()
    for repeat, ref in zip(run.samples, baseline.samples):
        for i, (s, r) in enumerate(zip(repeat, ref)):
            if s.tokens != r.tokens:
                bad.add(i)
    return sorted(bad)


def row(run: Run, baseline: Run | None, c: float | None) -> dict[str, Any]:
    """Every column of one run (None where it does not apply or was not measured)."""
    out: dict[str, Any] = dict.fromkeys(COLUMN_KEYS)
    out.update(setting=run.setting, workload=run.workload, method=run.method, k=run.k, warmup_s=run.warmup_s)
    if run.compile_graphs is not None:
        out["compile_graphs"] = dict(run.compile_graphs)
    if not run.samples:  # interrupted before a full repeat
        out["repeats"] = 0
        return out
    tps = [repeat_tokens_per_s(rep) for rep in run.samples]
    flat = [s for rep in run.samples for s in rep]
    tokens = sum(len(s.tokens) for s in flat)
    out.update(
        tokens_per_s=statistics.median(tps),
        tokens_per_s_repeats=tps,
        spread=(max(tps) - min(tps)) / statistics.median(tps) if len(tps) > 1 else None,
        new_tokens=tokens // len(run.samples),
        prompts=len(run.samples[0]),
        repeats=len(run.samples),
    )
    if baseline is not None and baseline.samples:
        out["speedup"], out["speedup_repeats"] = paired_speedup(run, baseline)
    forwards = [s.target_forwards for s in flat]
    if all(f is not None for f in forwards) and sum(forwards):
        tau = tokens / sum(forwards)
        out["mean_accepted_length"] = tau
        out["target_forwards_per_token"] = 1.0 / tau
        if run.uses_draft_model:
            if c is not None:
                k_eff = sum(s.draft_forwards or 0 for s in flat) / sum(forwards)
                out["c"] = c
                out["bound"] = bound(tau, k_eff, c)
        else:  # no draft model: drafting costs no model forward
            out["c"] = 0.0
            out["bound"] = tau
        if out.get("bound") and out.get("speedup") is not None:
            out["efficiency"] = out["speedup"] / out["bound"]
    drafted = [s.drafted for s in flat]
    if all(d is not None for d in drafted) and sum(drafted):
        out["acceptance_rate"] = sum(s.accepted for s in flat) / sum(drafted)
    out["per_position_acceptance"] = per_position_acceptance(flat)
    lengths, drafters = step_histograms(flat)
    if any(k for k in lengths):  # a method that drafts: which K and which drafter each step used
        out["draft_length_steps"], out["drafter_steps"] = lengths, drafters
        out["k_used"] = shares(lengths)
        out["drafters_used"] = shares(drafters)  # every step has one drafter ("none" included)
    out["cache_hit_rate"] = sum(s.cache_hit for s in flat) / len(flat)
    if run.setting == "greedy" and baseline is not None and baseline.samples:
        bad = greedy_mismatches(run, baseline)
        out["greedy_equals_baseline"] = not bad
        out["greedy_mismatches"] = bad
    return out


def auto_pools() -> dict[str, tuple[str, ...]]:
    """The auto rows and the fixed-K rows each is held against, from the drafter registry:
    "X-auto" against drafter X's, "auto" against those of the sources drafter "auto" chooses
    from ({"model-auto": ("model",), "ngram-auto": ("ngram",), "auto": ("model", "ngram")}
    for the built-in drafters)."""
    from ..drafters import AUTO, source_names

    specs = specdec_methods()
    pools = {name: (m.drafter,) for name, m in specs.items() if m.k == "auto" and m.drafter != AUTO}
    pools[AUTO] = tuple(source_names(AUTO, {"model", "head"}))
    return pools


def single_autos(pools: dict[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """The single-drafter auto rows drafter "auto" is held against: those of its sources."""
    from ..drafters import AUTO

    pools = auto_pools() if pools is None else pools
    return tuple(name for name, pool in pools.items() if name != AUTO and pool[0] in pools[AUTO])


def __getattr__(name: str):
    # AUTO_POOLS and SINGLE_AUTOS follow the drafter registry (plug-ins included): read at each access.
    if name == "AUTO_POOLS":
        return auto_pools()
    if name == "SINGLE_AUTOS":
        return single_autos()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def rows(runs: list[Run], c: float | None) -> list[dict[str, Any]]:
    """One row per run, each against the baseline of its setting and workload."""
    baselines = {(r.setting, r.workload): r for r in runs if r.method == "baseline"}
    out = [row(run, baselines.get((run.setting, run.workload)), c) for run in runs]
    compare_auto_rows(runs, out)
    compare_eager_twins(runs, out)
    return out


def compare_eager_twins(runs: list[Run], rows_: list[dict[str, Any]]) -> None:
    """Each compiled row with an eager twin ("X-eager", --compile) gains vs_eager: the twin's name
    and paired_ratio of the two runs' own generations (compiled over eager), which took turns
    prompt by prompt; the ratio of their speedups where they share no pair."""
    by_key = {(run.setting, run.workload, run.method, run.k): (run, r) for run, r in zip(runs, rows_)}
    for twin, twin_row in zip(runs, rows_):
        if twin.twin_of is None or twin_row.get("speedup") is None:
            continue
        found = by_key.get((twin.setting, twin.workload, twin.twin_of, twin.k))
        if found is None or found[1].get("tokens_per_s") is None:
            continue
        run, r = found
        ratio = paired_ratio(run, twin)
        if ratio is None and r.get("speedup") is not None:
            ratio = r["speedup"] / twin_row["speedup"]
        if ratio is not None:
            r["vs_eager"] = {"method": twin.method, "ratio": ratio}


def compare_auto_rows(runs: list[Run], rows_: list[dict[str, Any]]) -> None:
    """Each auto row gains vs_best_fixed (and drafter "auto" vs_better_single): the row with the
    highest speedup among those it is held against, and paired_ratio of the two runs' own
    generations, which took turns prompt by prompt (no baseline noise in between)."""
    measured = [(run, r) for run, r in zip(runs, rows_) if r.get("speedup") is not None and r["workload"] == "main"]
    pools = auto_pools()
    singles_of_auto = single_autos(pools)
    for run, r in measured:
        if run.method not in pools:
            continue
        same = [(o, orow) for o, orow in measured if orow["setting"] == r["setting"]]
        fixed = [(o, orow) for o, orow in same if o.method in pools[run.method] and o.k]
        singles = [(o, orow) for o, orow in same if o.method in singles_of_auto] if run.method == "auto" else []
        for key, pool in (("vs_best_fixed", fixed), ("vs_better_single", singles)):
            if pool:
                best, best_row = max(pool, key=lambda pair: pair[1]["speedup"])
                ratio = paired_ratio(run, best)
                r[key] = {"method": best.method, "k": best.k, "speedup": best_row["speedup"],
                          "ratio": ratio if ratio is not None else r["speedup"] / best_row["speedup"]}


def suspect(rows_: list[dict[str, Any]], cost: dict[str, float], repeats: int) -> list[str]:
    """Warnings about measurements that should not be trusted as they stand."""
    out = []
    one = cost.get("target_forward_ms")
    verify = next((v for k, v in cost.items() if k.startswith("target_verify_ms_k")), None)
    if one is not None and verify is not None and verify < one:
        out.append(
            f"the target's forward over K+1 tokens ({verify:.2f} ms) measured cheaper than a one-token "
            f"forward ({one:.2f} ms): the machine was busy or its clock changed; rerun on a quiet machine "
            "(--threads 1 on a shared CPU)"
        )
    if repeats < 2:
        out.append("a single repeat: no spread to judge the numbers by; use --repeats 3 or more")
    compiled = [r for r in rows_ if (r.get("compile_graphs") or {}).get("timed")]
    if compiled:
        names = ", ".join(f"{r['setting']} {r['method']}" + (f" K={r['k']}" if r["k"] else "") +
                          f" ({r['compile_graphs']['timed']})" for r in compiled[:6])
        out.append(
            f"{len(compiled)} row(s) compiled graphs during their timed calls, after the warm-up: {names}"
            + (", ..." if len(compiled) > 6 else "") + "; their tokens/s include compile time (a shape the "
            "warm-up did not cover)"
        )
    wide = [r for r in rows_ if r.get("spread") is not None and r["spread"] > SPREAD_LIMIT]
    if wide:
        names = ", ".join(f"{r['setting']} {r['method']}" + (f" K={r['k']}" if r["k"] else "") +
                          f" ({r['spread']:.0%})" for r in wide[:6])
        out.append(
            f"{len(wide)} row(s) vary more than {SPREAD_LIMIT:.0%} between repeats: {names}"
            + (", ..." if len(wide) > 6 else "") + "; the machine was busy: rerun on a quiet machine"
        )
    return out
