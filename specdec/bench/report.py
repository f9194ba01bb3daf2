"""The report: one column definition drives the CSV, the markdown table and the prose.

Files written to --out: results.json (everything), results.csv and results.md (the
COLUMNS), speedup.png (bars at the main K), speedup_vs_k.png (a K sweep only) and
acceptance_by_position.png.
"""

from __future__ import annotations

import csv
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Column:
    """One column of the results: its key in the rows, its table header, how it prints, what it means."""

    key: str
    header: str
    digits: int | None  # decimals in the markdown table; None: printed as is
    meaning: str


COLUMNS: list[Column] = [
    Column("setting", "setting", None, "greedy (temperature 0) or sampled"),
    Column("workload", "workload", None, "main (the prompt set) or cache (repeats and near-duplicates)"),
    Column("method", "method", None, "what ran (see the methods list)"),
    Column("k", "K", None, "draft tokens per step (- for methods without K)"),
    Column("tokens_per_s", "tokens/s", 1, "new tokens / wall time over all prompts, median of the repeats"),
    Column("speedup", "speedup", 2, "tokens/s / baseline tokens/s on the same prompt in the same repeat (same "
           "setting, same workload; runs take turns prompt by prompt): median over the repeats, geometric mean "
           "over the prompts"),
    Column("acceptance_rate", "accept", 2, "accepted drafts / drafted tokens"),
    Column("mean_accepted_length", "tau", 2, "tokens emitted per target forward, bonus/correction token included"),
    Column("target_forwards_per_token", "fwd/token", 2, "target forwards per new token (1 / tau)"),
    Column("c", "c", 3, "draft forward time / target forward time (0 for drafters without a model)"),
    Column("bound", "bound", 2, "tau / (k c + 1), k = draft forwards per target forward (Leviathan et al. 2023)"),
    Column("efficiency", "efficiency", 2, "speedup / bound"),
    Column("spread", "spread", 2, "(max - min) / median of the per-repeat tokens/s; over 0.10 is flagged"),
    Column("greedy_equals_baseline", "= baseline", None,
           "greedy: output identical to baseline's for every prompt (NO names a method that differs)"),
    Column("k_used", "K used", None, "share of steps by the number of drafts they verified (K: share), all "
           "generations; an auto row chooses it per row and step"),
    Column("drafters_used", "drafters", None, "share of steps by the drafter that drafted them (none: plain "
           "decoding steps)"),
    Column("cache_hit_rate", "cache hits", 2, "share of generations answered by the response cache"),
    Column("warmup_s", "warm-up s", 1, "compile warm-up seconds before the row's timed calls, excluded from its "
           "tokens/s (hf-compiled; specdec's rows under --compile, which share one warm-up); - where nothing compiles"),
    Column("new_tokens", "new tokens", None, "new tokens per repeat, all prompts"),
    Column("prompts", "prompts", None, "prompts per repeat"),
    Column("repeats", "repeats", None, "timed repeats"),
]
COLUMN_KEYS = [c.key for c in COLUMNS]
# The markdown table shows these; the CSV and the JSON have every column.
TABLE_KEYS = ("setting", "workload", "method", "k", "tokens_per_s", "speedup", "acceptance_rate",
              "mean_accepted_length", "c", "bound", "efficiency", "spread", "greedy_equals_baseline")


def fmt(value: Any, digits: int | None = 2) -> str:
    """A cell: - for missing, yes/NO for flags, `digits` decimals for floats."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}f}"
    return str(value)


def format_duration(seconds: float) -> str:
    """A wall-clock duration in whole seconds: "48 s", "3 min 49 s" (never "60 s")."""
    total = int(round(seconds))
    minutes, secs = divmod(total, 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def markdown_table(rows: list[dict[str, Any]], keys: tuple[str, ...] = TABLE_KEYS) -> str:
    """The results table as markdown (the columns named in `keys`)."""
    cols = [c for c in COLUMNS if c.key in keys]
    lines = ["| " + " | ".join(c.header for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c.key), c.digits) for c in cols) + " |")
    return "\n".join(lines)


def step_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: the K and drafter histograms of the rows that choose them per step (no fixed K)."""
    chosen = [r for r in rows if r.get("k") is None and r.get("k_used")]
    if not chosen:
        return []
    table = markdown_table(chosen, ("setting", "workload", "method", "k_used", "drafters_used"))
    meanings = "; ".join(f"{c.header} = {c.meaning}" for c in COLUMNS if c.key in ("k_used", "drafters_used"))
    return ["", "Draft length and drafter per step (rows that choose them):", "", *table.splitlines(), "",
            meanings + "."]


def warmup_lines(rows: list[dict[str, Any]], compile_stats: dict[str, Any] | None = None) -> list[str]:
    """Markdown lines: the compile warm-ups, excluded from the timings (none: [])."""
    from .config import AUTO_NO_HEAD, PEERS

    hf = [r for r in rows if r.get("warmup_s") is not None and r["method"] in PEERS]
    ours = [r for r in rows if r.get("warmup_s") is not None and r["method"] not in (*PEERS, AUTO_NO_HEAD)]
    headless = [r for r in rows if r.get("warmup_s") is not None and r["method"] == AUTO_NO_HEAD]
    def graphs(group: list[dict[str, Any]]) -> str:
        counts = [r.get("compile_graphs") or {} for r in group]
        text = f", {counts[0].get('warmup', 0)} graph(s)" if counts[0] else ""
        later = sum(c.get("warmup_pass", 0) for c in counts)
        return text + (f" (and {later} more in the warm-up pass)" if later else "")

    parts = []
    if ours:
        parts.append(f"specdec's step graphs (--compile) {ours[0]['warmup_s']:.1f} s{graphs(ours)}, one warm-up "
                     f"for its {len(ours)} rows")
    if headless:  # the generator without the head warms up its own graphs (its target step differs)
        parts.append(f"the generator without the head ({AUTO_NO_HEAD}) {headless[0]['warmup_s']:.1f} s"
                     f"{graphs(headless)}, one warm-up for its {len(headless)} rows")
    for r in hf:
        parts.append(f"{r['setting']} {r['method']} {r['warmup_s']:.1f} s{graphs([r])}")
    if not parts:
        return []
    line = "Compile warm-up, excluded from the timings: " + "; ".join(parts) + "."
    if compile_stats and compile_stats.get("compile") and compile_stats.get("recompiles"):
        line += (f" specdec's step forwards recompiled {compile_stats['recompiles']} time(s) in all (the reasons: "
                 "results.json, compile.reasons).")
    return ["", line]


def column_prose() -> str:
    """What each table column means, from the same definitions."""
    return "Columns: " + "; ".join(f"{c.header} = {c.meaning}" for c in COLUMNS if c.key in TABLE_KEYS) + "."


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMN_KEYS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMN_KEYS})


def headline(rows: list[dict[str, Any]], main_k: int) -> list[str]:
    """The draft-model method at the main K against baseline and the transformers peers, per setting."""
    lines = []
    for setting in ("greedy", "sampled"):
        by = {(r["method"], r["k"]): r for r in rows if r["setting"] == setting and r["workload"] == "main"}
        model = by.get(("model", main_k))
        if model is None or model.get("speedup") is None:
            continue
        parts = [f"{model['speedup']:.2f}x baseline"]
        for method, k in (("hf", None), ("hf-compiled", None), ("hf-assisted", None), ("hf-assisted-k", main_k)):
            peer = by.get((method, k))
            if peer is not None and peer.get("tokens_per_s"):
                parts.append(f"{model['tokens_per_s'] / peer['tokens_per_s']:.2f}x {method}")
        if model.get("efficiency") is not None:
            parts.append(f"efficiency {model['efficiency']:.2f} of the bound {model['bound']:.2f}")
        lines.append(f"{setting}, draft model K={main_k}: " + ", ".join(parts))
    return lines + auto_lines(rows) + eager_lines(rows)


def eager_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each compiled row against its eager twin ("X-eager", --compile), from the generations the
    two ran side by side (metrics.compare_eager_twins)."""
    lines = []
    for setting in ("greedy", "sampled"):
        for r in rows:
            twin = r.get("vs_eager")
            if r["setting"] != setting or twin is None:
                continue
            k = f" K={r['k']}" if r["k"] else ""
            lines.append(f"{setting}, {r['method']}{k} compiled: {twin['ratio']:.2f}x {twin['method']} "
                         "(the same prompts, side by side)")
    return lines


def auto_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each auto row against the best fixed K of the drafters it chooses from (same setting) and,
    for drafter "auto", the better single-drafter auto row (metrics.compare_auto_rows)."""
    lines = []
    for setting in ("greedy", "sampled"):
        for r in rows:
            best = r.get("vs_best_fixed")
            if r["setting"] != setting or r["workload"] != "main" or best is None:
                continue
            # The paired ratio first; the ratio of the two speedups beside it (they differ by
            # the noise of the run: the two estimates pair the generations differently).
            line = (f"{setting}, {r['method']}: {r['speedup']:.2f}x baseline, {best['ratio']:.2f}x the best fixed K "
                    f"({best['method']} K={best['k']}, {best['speedup']:.2f}x baseline; ratio of the speedups "
                    f"{r['speedup'] / best['speedup']:.2f}x)")
            better = r.get("vs_better_single")
            if better is not None:
                line += (f", {better['ratio']:.2f}x the better single drafter ({better['method']}; ratio of the "
                         f"speedups {r['speedup'] / better['speedup']:.2f}x)")
            lines.append(line)
    return lines


def write_results(out: Path, doc: dict[str, Any]) -> None:
    """results.json, results.csv, results.md and the PNG plots under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    doc["plots"] = write_plots(out, doc["rows"], doc["settings"]["main_k"])
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_csv(out / "results.csv", doc["rows"])
    (out / "results.md").write_text(report_markdown(doc))


def report_markdown(doc: dict[str, Any]) -> str:
    """A self-contained markdown report: command, machine, cost, warnings, table, notes."""
    m, cost, settings = doc["machine"], doc["cost"], doc["settings"]
    main_k = settings["main_k"]
    lines = ["# specdec bench", ""]
    if doc.get("partial"):
        lines += ["**PARTIAL: interrupted before the end; rows without repeats were not measured.**", ""]
    lines += [
        f"Command: `{doc['command']}`",
        "",
    ]
    if doc.get("elapsed_seconds") is not None:
        lines += [f"Ran {format_duration(doc['elapsed_seconds'])}, model loading included.", ""]
    lines += [
        f"Machine: {m['device_name']} ({m['cpu_count']} logical CPUs, torch threads {m['torch_threads']}); "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}.",
        "",
        f"Models: target `{doc['models']['target']}` ({doc['models']['target_parameters']:,} parameters), draft "
        f"`{doc['models']['draft']}`"
        + (f" ({doc['models']['draft_parameters']:,} parameters)" if doc["models"]["draft_parameters"] else "")
        + f"; dtype {doc['models']['dtype']} on {doc['models']['device']}.",
        "",
        f"Workload: {_workload_name(doc['workload'])}{doc['workload']['prompts']} prompts "
        f"(mean {doc['workload']['mean_prompt_tokens']:.0f} tokens), up to {doc['workload']['max_new_tokens']} new "
        f"tokens each, batch 1; cache workload {doc['workload']['cache_workload_prompts']} prompts. "
        f"Median of {settings['repeats']} repeats, alternating order"
        + (", after a warm-up pass." if settings["warmup"] else "."),
        "",
        "Forward cost at " + f"{cost['context_tokens']} tokens of context: target {cost['target_forward_ms']:.2f} ms"
        + (f", draft {cost['draft_forward_ms']:.2f} ms, c = {cost['c']:.3f}" if "c" in cost else "")
        + f"; target forward over K+1 = {main_k + 1} tokens: {cost[f'target_verify_ms_k{main_k}']:.2f} ms.",
        "",
    ]
    if doc.get("suspect"):
        lines += ["Suspect measurements:"] + [f"- WARNING: {w}" for w in doc["suspect"]] + [""]
    lines += [*[f"- {line}" for line in headline(doc["rows"], main_k)], "", markdown_table(doc["rows"]), "",
              column_prose()]
    lines += step_table(doc["rows"])
    lines += warmup_lines(doc["rows"], doc.get("compile"))
    if doc["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots

# One fixed look per method: colour, marker, line style, so that a method reads the same in
# every figure and no two methods share a colour.
STYLES = {
    "baseline": ("#000000", "s", "-"),
    "model": ("#1f77b4", "o", "-"),
    "ngram": ("#2ca02c", "^", "-"),
    "auto": ("#9467bd", "D", "-"),
    "hf": ("#7f7f7f", "x", ":"),
    "hf-compiled": ("#3f3f3f", "X", ":"),
    "hf-assisted": ("#ff7f0e", "v", "--"),
    "hf-assisted-k": ("#d62728", "P", "--"),
    "hf-lookup": ("#8c564b", "*", "-."),
    "cache-cold": ("#17becf", "h", "-"),
    "cache-warm": ("#bcbd22", "H", "-"),
}
ORDER = list(STYLES)
# Drafters registered by plug-ins: a colour and marker each, from their name (stable across figures).
_EXTRA_COLORS = ("#e377c2", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d")
_EXTRA_MARKERS = ("p", "<", ">", "d", "8", "X")


def _eager_base(method: str) -> str | None:
    """The method an eager twin's row ("X-eager", --compile) runs, None for any other row name."""
    from .config import eager_base

    return eager_base(method)


def _style(method: str) -> tuple[str, str, str]:
    if method in STYLES:
        return STYLES[method]
    base = _eager_base(method)
    if base is not None:  # an eager twin: its method's colour and marker, dashed
        color, marker, _ = _style(base)
        return color, marker, "--"
    h = zlib.crc32(method.encode())
    return _EXTRA_COLORS[h % len(_EXTRA_COLORS)], _EXTRA_MARKERS[h % len(_EXTRA_MARKERS)], "-"


def _order(rows: list[dict[str, Any]], twins: bool = True) -> list[str]:
    """The methods a figure shows, in order: the built-in ones (ORDER), then the other fixed-K
    drafters (plug-ins) in the order their rows ran, each followed by its eager twin where one
    ran (`twins`). Single-drafter auto rows are not plotted."""
    from .config import specdec_methods

    specs = specdec_methods()
    ran = dict.fromkeys(r["method"] for r in rows)
    extra = [m for m in ran if m not in STYLES and m in specs and specs[m].k == "fixed" and specs[m].workload == "main"]
    twin_of = {base: t for t in ran if (base := _eager_base(t)) is not None} if twins else {}
    order = []
    for m in ORDER + extra:
        order.append(m)
        if m in twin_of:
            order.append(twin_of[m])
    return order


def write_plots(out: Path, rows: list[dict[str, Any]], main_k: int) -> list[str]:
    """The PNG figures; [] when matplotlib is missing or nothing was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    main = [r for r in rows if r["workload"] == "main" and r.get("speedup") is not None]
    if not main:
        return []
    written = [_speedup_bars(plt, out, main, main_k)]
    ks = sorted({r["k"] for r in main if r["k"] is not None})
    if len(ks) > 1:
        written.append(_speedup_vs_k(plt, out, main, ks))
    acc = _acceptance(plt, out, main, main_k, ks)
    if acc:
        written.append(acc)
    return written


def _speedup_bars(plt, out: Path, rows: list[dict[str, Any]], main_k: int) -> str:
    """Bars: every method at the main K (or without K), one group per setting, values printed."""
    settings = [s for s in ("greedy", "sampled") if any(r["setting"] == s for r in rows)]
    methods = [m for m in _order(rows) if any(r["method"] == m and r["k"] in (None, main_k) for r in rows)]
    fig, ax = plt.subplots(figsize=(min(11.0, max(6.0, 0.8 * len(methods) * len(settings))), 4.2))
    width = 0.8 / len(methods)
    labelled: set[str] = set()
    for j, method in enumerate(methods):
        color, _, _ = _style(method)
        for i, setting in enumerate(settings):
            r = next((r for r in rows if r["setting"] == setting and r["method"] == method
                      and r["k"] in (None, main_k)), None)
            if r is None:
                continue
            x = i + (j - (len(methods) - 1) / 2) * width
            hatch = "//" if method.startswith("hf") else ".." if _eager_base(method) else None
            ax.bar(x, r["speedup"], width * 0.92, color=color, hatch=hatch, edgecolor="white",
                   label=None if method in labelled else method)
            labelled.add(method)
            ax.text(x, r["speedup"], f"{r['speedup']:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(settings)
    ax.set_ylabel("speedup vs baseline (tokens/s ratio)")
    ax.set_title(f"Speedup at K={main_k} (hatched: transformers)")  # dotted: eager twins, named in the legend
    ax.legend(fontsize=8, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_ylim(0, max(r["speedup"] for r in rows) * 1.15)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=120)
    plt.close(fig)
    return "speedup.png"


def _speedup_vs_k(plt, out: Path, rows: list[dict[str, Any]], ks: list[int]) -> str:
    """Greedy speedup against K, one line per K method; methods without K as labelled levels."""
    greedy = [r for r in rows if r["setting"] == "greedy"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    order = _order(greedy)
    for method in order:
        pts = sorted((r["k"], r["speedup"]) for r in greedy if r["method"] == method and r["k"] is not None)
        if pts:
            color, marker, line = _style(method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=line, color=color,
                    label=method)
    # Methods without K are levels; each gets its own colour and style and its value in the label,
    # so two levels that nearly coincide (hf and baseline) stay distinguishable.
    for method in order:
        r = next((r for r in greedy if r["method"] == method and r["k"] is None), None)
        if r is not None:
            color, _, line = _style(method)
            ax.axhline(r["speedup"], color=color, linestyle=line if method != "baseline" else "-",
                       linewidth=1.6 if method == "baseline" else 1.2, label=f"{method} ({r['speedup']:.2f}x)")
    ax.set_xticks(ks)
    ax.set_xlabel("draft tokens per step (K)")
    ax.set_ylabel("speedup vs baseline (tokens/s ratio)")
    ax.set_title("Greedy speedup vs K")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_k.png", dpi=120)
    plt.close(fig)
    return "speedup_vs_k.png"


def _acceptance(plt, out: Path, rows: list[dict[str, Any]], main_k: int, ks: list[int]) -> str | None:
    """P(slot i accepted | drafted): grouped bars per slot for one K, one line per (method, K) in a sweep."""
    # specdec's drafters at fixed K (plug-ins included) and drafter "auto".
    # Eager twins draft as their compiled rows do: left out.
    order = [m for m in _order(rows, twins=False) if m in ("model", "ngram", "auto") or m not in STYLES]
    greedy = [r for r in rows if r["setting"] == "greedy" and r.get("per_position_acceptance")
              and r["method"] in order]
    if not greedy:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if len(ks) > 1:  # a sweep: one line per (method, K), colour by method, line style by K
        dashes = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
        for r in sorted(greedy, key=lambda r: (order.index(r["method"]), r["k"] or 0)):
            acc = r["per_position_acceptance"]
            color, marker, _ = _style(r["method"])
            line = dashes[ks.index(r["k"]) % len(dashes)] if r["k"] in ks else "-"
            ax.plot(range(1, len(acc) + 1), acc, marker=marker, color=color, linestyle=line,
                    label=f"{r['method']}" + (f" K={r['k']}" if r["k"] else ""))
    else:  # one K: grouped bars, one group per draft position
        width = 0.8 / len(greedy)
        for j, r in enumerate(greedy):
            acc = r["per_position_acceptance"]
            color, _, _ = _style(r["method"])
            xs = [i + 1 + (j - (len(greedy) - 1) / 2) * width for i in range(len(acc))]
            ax.bar(xs, acc, width * 0.92, color=color, label=f"{r['method']}" + (f" K={r['k']}" if r["k"] else ""))
    width_slots = max(len(r["per_position_acceptance"]) for r in greedy)
    ax.set_xticks(range(1, width_slots + 1))
    ax.set_xlabel("draft position")
    ax.set_ylabel("accepted / drafted at this position")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance by draft position (greedy)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out / "acceptance_by_position.png", dpi=120)
    plt.close(fig)
    return "acceptance_by_position.png"


def _workload_name(workload: dict) -> str:
    """'humaneval (source; licence), ' for a named workload, 'FILE, ' for a --prompts file."""
    if workload.get("name"):
        licence = f"; {workload['licence']}" if workload.get("licence") else ""
        return f"{workload['name']} ({workload['source']}{licence}), "
    return f"{workload['source']}, "
