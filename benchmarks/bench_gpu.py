"""The engine on a device, against the floor: random Llama-shaped models, no downloads.

Builds a target and a draft from configs with random weights directly on the device
(preset `llama3-8b-1b`: Llama-3-8B and Llama-3.2-1B shapes in bf16; `tiny`: a small
pair that runs on CPU in fp32 in seconds), then measures in one run:

  * the device's copy bandwidth (a large device-to-device copy, bytes read + written
    per second) and the weight-streaming floor: the bytes of the target's weights that
    every decoding forward reads (the input embedding table is gathered, not streamed)
    / that bandwidth, i.e. the fastest a memory-bound decoding step can be;
  * forward costs at the workload's context: target one token, target K+1 tokens
    (the verify forward), draft one token, and c = draft / target;
  * ms per token (wall time / new tokens per row) for every method, in alternating
    order, median over rounds of fresh random prompts:
      baseline            specdec, drafter "none" (plain decoding through the same loop)
      oracle-a<alpha>     specdec, drafter "oracle" (benchmarks/oracle_drafter.py): the draft
                          model runs for its cost, the drafts are the target's greedy
                          continuation corrupted per token with probability 1 - alpha
      model-random        specdec, the random draft model (acceptance near 0)
      model-self          specdec, the target as its own draft (acceptance 1, c = 1)
      hf                  transformers generate
      hf-assisted-random  generate(assistant_model=random draft), K tokens per step (batch 1)
      hf-assisted-self    generate(assistant_model=the target), K tokens per step (batch 1)
    with tau (tokens per target forward), the Leviathan bound tau / (K c + 1),
    speedup over baseline and efficiency = speedup / bound, and how many rows equal
    baseline's greedy output.

    python benchmarks/bench_gpu.py --preset llama3-8b-1b --batch 1 --out results/gpu
    python benchmarks/bench_gpu.py --preset tiny --out /tmp/tiny         # CPU smoke run

Writes bench_gpu_<preset>_b<batches>.{json,md} under --out, with the device, versions
and the command. Eager only: CUDA-graph capture needs the static-KV engine
(`--graphs` says so and stops).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # oracle_drafter beside this file

from oracle_drafter import OracleDrafter  # noqa: E402  (registers drafter "oracle")

# Shapes of the published configs (rope settings do not change the cost).
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b-1b": dict(
        dtype="bf16", device="cuda", prompt_len=128, new_tokens=128, rounds=3,
        target=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                    max_position_embeddings=8192, tie_word_embeddings=False),
        draft=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                   max_position_embeddings=8192, tie_word_embeddings=True),
    ),
    "tiny": dict(
        dtype="fp32", device="cpu", prompt_len=16, new_tokens=16, rounds=2,
        target=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False),
        draft=dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   tie_word_embeddings=False),
    ),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = ("baseline", "oracle", "model-random", "model-self", "hf", "hf-assisted-random", "hf-assisted-self")
BATCH1_ONLY = ("hf-assisted-random", "hf-assisted-self")  # transformers' assisted generation is batch 1

# One definition of the report's columns: (key, header, format).
COLUMNS = [
    ("method", "method", "{}"), ("batch", "B", "{}"), ("k", "K", "{}"),
    ("ms_per_token", "ms/token", "{:.2f}"), ("tokens_per_s", "tokens/s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"), ("tau", "tau", "{:.2f}"), ("acceptance", "accept", "{:.2f}"),
    ("c", "c", "{:.3f}"), ("bound", "bound", "{:.2f}"), ("efficiency", "efficiency", "{:.2f}"),
    ("equal_to_baseline", "= baseline", "{:.0%}"),
]


# --------------------------------------------------------------------------- device facts


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_gbps(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """Device-to-device copy of `nbytes`: (bytes read + bytes written) / median time
    (CUDA events around 10 back-to-back copies on a GPU, wall time per copy on CPU)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / 10)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(times[2:]) / 1e9


def streamed_weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all weight bytes, bytes a decoding forward reads): an untied input embedding
    table is gathered one row per token, not streamed."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    tied = embed is model.get_output_embeddings().weight
    return total, total - (0 if tied else embed.numel() * embed.element_size())


def build_llama(shape: dict[str, Any], dtype: torch.dtype, device: torch.device, seed: int):
    """A LlamaForCausalLM with random weights, allocated and initialised on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(bos_token_id=1, eos_token_id=None, pad_token_id=0, **shape)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: decode the full length
    model.generation_config.pad_token_id = 0
    return model


def weight_sharing_twin(model):
    """Another module object over the same weight tensors (for hooks that must tell a
    target from the same target used as its own assistant)."""
    twin = copy.copy(model)
    for name in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
        if hasattr(model, name):
            setattr(twin, name, type(getattr(model, name))())
    twin.generation_config = copy.deepcopy(model.generation_config)
    return twin


@torch.inference_mode()
def forward_ms(model, batch: int, context: int, n_tokens: int, reps: int, device: torch.device) -> float:
    """Median ms of one forward of `n_tokens` new tokens per row after a KV cache of `context`,
    with the attention mask and position ids the engine passes."""
    from transformers import DynamicCache

    from specdec.kv import cache_keyword

    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, vocab, (batch, context), generator=g).to(device)
    cache = DynamicCache()
    kw = cache_keyword(model)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1, **{kw: cache})
    new = torch.randint(3, vocab, (batch, n_tokens), generator=g).to(device)
    mask = torch.ones(batch, context + n_tokens, dtype=torch.long, device=device)
    positions = torch.arange(context, context + n_tokens, device=device).expand(batch, -1)
    times = []
    for _ in range(reps + 3):
        synchronize(device)
        t0 = time.perf_counter()
        model(input_ids=new, attention_mask=mask, position_ids=positions, use_cache=True, **{kw: cache})
        synchronize(device)
        times.append(time.perf_counter() - t0)
        cache.crop(-n_tokens)  # drop the new tokens again
    return statistics.median(times[3:]) * 1e3


# --------------------------------------------------------------------------- methods


@dataclass
class Outcome:
    seconds: float
    tokens: list[list[int]]  # [B][new tokens]
    target_forwards: int = 0  # summed over rows
    drafted: int = 0
    accepted: int = 0


@dataclass
class Method:
    name: str
    run: Callable[[list[list[int]], int], Outcome]  # (prompts, new tokens per row) -> Outcome
    k: int = 0  # draft forwards per target forward (0: no drafting)
    c: float | None = None  # draft / target forward cost (None: from the measured forwards)
    outcomes: list[Outcome] = field(default_factory=list)


def ours(gen, drafter: str, k: int, device: torch.device, before: Callable[[], None] | None = None):
    """specdec's generate_ids with one drafter."""

    def run(prompts: list[list[int]], new_tokens: int) -> Outcome:
        if before is not None:
            before()
        synchronize(device)
        t0 = time.perf_counter()
        results = gen.generate_ids(prompts, max_new_tokens=new_tokens, drafter=drafter, num_draft_tokens=k,
                                   ignore_eos=True)
        synchronize(device)
        seconds = time.perf_counter() - t0
        return Outcome(seconds, [list(r.token_ids) for r in results],
                       target_forwards=sum(r.stats.target_forwards for r in results),
                       drafted=sum(r.stats.drafted_tokens for r in results),
                       accepted=sum(r.stats.accepted_tokens for r in results))
    return run


def transformers_generate(target, assistant, k: int, device: torch.device):
    """model.generate (plain, or assisted with K tokens per step and no confidence stop).
    Forward hooks count the target's forwards and the assistant's (one drafted token each)."""

    @torch.inference_mode()
    def run(prompts: list[list[int]], new_tokens: int) -> Outcome:
        inputs = torch.tensor(prompts, device=device)  # equal lengths: no padding
        kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=0)
        if assistant is not None:
            gc = assistant.generation_config
            gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = k, "constant"
            gc.assistant_confidence_threshold = 0.0
            kwargs["assistant_model"] = assistant
        calls = {"target": 0, "assistant": 0}
        handles = [target.register_forward_hook(lambda *_: calls.__setitem__("target", calls["target"] + 1))]
        if assistant is not None:
            handles.append(assistant.register_forward_hook(
                lambda *_: calls.__setitem__("assistant", calls["assistant"] + 1)))
        try:
            synchronize(device)
            t0 = time.perf_counter()
            out = target.generate(inputs, attention_mask=torch.ones_like(inputs), **kwargs)
            synchronize(device)
            seconds = time.perf_counter() - t0
        finally:
            for handle in handles:
                handle.remove()
        tokens = out[:, inputs.shape[1]:].tolist()
        emitted = sum(len(t) for t in tokens)
        forwards = calls["target"] * len(prompts)  # one forward serves every row
        return Outcome(seconds, tokens, target_forwards=forwards, drafted=calls["assistant"] * len(prompts),
                       accepted=max(0, emitted - forwards) if assistant is not None else 0)
    return run


# --------------------------------------------------------------------------- the run


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=g).tolist()


def measure(args, device: torch.device, dtype: torch.dtype, log: Callable[[str], None]) -> dict[str, Any]:
    from specdec import SpeculativeGenerator

    preset = PRESETS[args.preset]
    t0 = time.perf_counter()
    target = build_llama(preset["target"], dtype, device, seed=0)
    draft = build_llama(preset["draft"], dtype, device, seed=1)
    build_s = time.perf_counter() - t0
    total_bytes, streamed = streamed_weight_bytes(target)
    copy_gbps = copy_bandwidth_gbps(device, args.copy_mib * 2**20)
    floor_ms = streamed / (copy_gbps * 1e9) * 1e3
    log(f"built target + draft in {build_s:.1f} s; target weights {total_bytes / 1e9:.2f} GB "
        f"({streamed / 1e9:.2f} GB streamed per forward); copy bandwidth {copy_gbps:.0f} GB/s; "
        f"floor {floor_ms:.3f} ms per forward")

    gen = SpeculativeGenerator(target, None, draft)
    gen_self = SpeculativeGenerator(target, None, target)
    vocab = preset["target"]["vocab_size"]
    k, new_tokens = args.k, args.new_tokens
    doc: dict[str, Any] = dict(
        build_seconds=round(build_s, 2), target_weight_bytes=total_bytes, streamed_weight_bytes=streamed,
        draft_weight_bytes=streamed_weight_bytes(draft)[0], copy_bandwidth_gbps=round(copy_gbps, 1),
        floor_ms_per_forward=round(floor_ms, 4), batches={},
    )
    for batch in args.batch:
        log(f"batch {batch}")
        context = args.prompt_len + new_tokens // 2
        reps = 5 if device.type == "cpu" else 20
        costs = dict(
            target_ms=forward_ms(target, batch, context, 1, reps, device),
            target_verify_ms=forward_ms(target, batch, context, k + 1, reps, device),
            draft_ms=forward_ms(draft, batch, context, 1, reps, device),
        )
        costs["c"] = costs["draft_ms"] / costs["target_ms"]
        costs["verify_over_target"] = costs["target_verify_ms"] / costs["target_ms"]
        log("  forwards: " + ", ".join(f"{key} {value:.3f}" for key, value in costs.items()))

        rounds = [random_prompts(batch, args.prompt_len, vocab, seed=1000 * batch + r) for r in range(args.rounds)]
        # The target's greedy continuation of every prompt, once, through the baseline.
        continuations: dict[tuple[int, ...], list[int]] = {}
        for prompts in rounds:
            out = ours(gen, "none", 0, device)(prompts, new_tokens)
            continuations.update((tuple(p), t) for p, t in zip(prompts, out.tokens))

        methods: list[Method] = []
        for name in args.methods:
            if name in BATCH1_ONLY and batch != 1:
                continue
            if name == "baseline":
                methods.append(Method(name, ours(gen, "none", k, device)))
            elif name == "oracle":
                for alpha in args.alpha:
                    def configure(alpha=alpha):
                        OracleDrafter.configure(continuations, alpha, seed=args.seed)
                    methods.append(Method(f"oracle-a{alpha:g}", ours(gen, "oracle", k, device, configure), k))
            elif name == "model-random":
                methods.append(Method(name, ours(gen, "model", k, device), k))
            elif name == "model-self":
                methods.append(Method(name, ours(gen_self, "model", k, device), k, c=1.0))
            elif name == "hf":
                methods.append(Method(name, transformers_generate(target, None, k, device)))
            elif name == "hf-assisted-random":
                methods.append(Method(name, transformers_generate(target, draft, k, device), k))
            elif name == "hf-assisted-self":
                twin = weight_sharing_twin(target)
                methods.append(Method(name, transformers_generate(target, twin, k, device), k, c=1.0))

        if not args.no_warmup:  # kernel compilation, allocator, autotuning: one short untimed pass each
            for method in methods:
                method.run(rounds[0], min(new_tokens, 2 * k + 2))
        for r, prompts in enumerate(rounds):
            order = methods if r % 2 == 0 else methods[::-1]
            for method in order:
                method.outcomes.append(method.run(prompts, new_tokens))
                o = method.outcomes[-1]
                log(f"  round {r} {method.name:20s} {1e3 * o.seconds / new_tokens:9.2f} ms/token")
        doc["batches"][str(batch)] = dict(costs=costs, rows=rows(methods, rounds, batch, k, new_tokens, costs,
                                                                 floor_ms, continuations))
    return doc


def rows(methods: list[Method], rounds, batch, k, new_tokens, costs, floor_ms, continuations) -> list[dict]:
    base = next((m for m in methods if m.name == "baseline"), None)
    base_ms = statistics.median(1e3 * o.seconds / new_tokens for o in base.outcomes) if base else None
    out = []
    for m in methods:
        ms = statistics.median(1e3 * o.seconds / new_tokens for o in m.outcomes)
        emitted = sum(len(t) for o in m.outcomes for t in o.tokens)
        forwards = sum(o.target_forwards for o in m.outcomes)
        drafted = sum(o.drafted for o in m.outcomes)
        tau = emitted / forwards if forwards else None
        c = m.c if m.c is not None else costs["c"]
        bound = tau / (m.k * c + 1) if (tau and m.k) else None  # only for drafting methods
        speedup = base_ms / ms if base_ms else None
        equal = [t == continuations[tuple(p)] for o, prompts in zip(m.outcomes, rounds) for p, t in zip(prompts, o.tokens)]
        out.append(dict(
            method=m.name, batch=batch, k=m.k, ms_per_token=ms,
            tokens_per_s=statistics.median(batch * new_tokens / o.seconds for o in m.outcomes),
            speedup=speedup, tau=tau, acceptance=(sum(o.accepted for o in m.outcomes) / drafted) if drafted else None,
            c=c if m.k else None, bound=bound,
            efficiency=(speedup / bound) if (speedup and bound) else None,
            equal_to_baseline=sum(equal) / len(equal),
            ms_per_token_rounds=[1e3 * o.seconds / new_tokens for o in m.outcomes],
            over_floor=ms / floor_ms if m.name == "baseline" else None,
        ))
    return out


# --------------------------------------------------------------------------- report


def machine(device: torch.device) -> dict[str, Any]:
    import transformers

    info = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                platform=platform.platform(), device=str(device))
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def markdown(doc: dict[str, Any]) -> str:
    m, res = doc["machine"], doc["results"]
    lines = [
        f"# specdec on {m['device_name']}: random {doc['config']['preset']} shapes",
        "",
        f"- command: `{doc['command']}`",
        f"- date {doc['date']}; commit {m['commit']}; python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, triton {m['triton']}" + (f", CUDA {m['cuda']}" if m.get("cuda") else ""),
        f"- {doc['config']['dtype']}, prompts of {doc['config']['prompt_len']} random tokens, "
        f"{doc['config']['new_tokens']} new tokens (greedy, no eos), {doc['config']['rounds']} rounds per batch "
        "size in alternating order; ms/token = wall time / new tokens per row, median over rounds; eager (no CUDA graphs)",
        f"- copy bandwidth {res['copy_bandwidth_gbps']:.0f} GB/s (device-to-device copy, read + write); target "
        f"weights {res['target_weight_bytes'] / 1e9:.2f} GB, {res['streamed_weight_bytes'] / 1e9:.2f} GB read per "
        f"forward; weight-streaming floor {res['floor_ms_per_forward']:.3f} ms per forward",
        "- tau: tokens per target forward; c: draft forward / target forward (measured, 1 for a model drafting "
        "for itself); bound: tau / (K c + 1); efficiency: speedup / bound; = baseline: rows whose output equals "
        "baseline greedy decoding",
    ]
    for batch, part in res["batches"].items():
        costs = part["costs"]
        base = next((r for r in part["rows"] if r["method"] == "baseline"), None)
        lines += ["", f"## Batch {batch}", "",
                  f"Forwards (ms): target {costs['target_ms']:.3f}, target verify of K+1 tokens "
                  f"{costs['target_verify_ms']:.3f} ({costs['verify_over_target']:.2f}x), draft {costs['draft_ms']:.3f}, "
                  f"c = {costs['c']:.3f}."
                  + (f" Baseline {base['ms_per_token']:.2f} ms/token = {base['over_floor']:.2f}x the floor." if base else ""),
                  "", "| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for row in part["rows"]:
            lines.append("| " + " | ".join(_cell(row[key], fmt) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b-1b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (e.g. 1 16 64)")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per step")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.7, 1.0], help="oracle acceptance rates")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--prompt-len", type=int, help="prompt tokens (preset default)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per row (preset default)")
    parser.add_argument("--rounds", type=int, help="prompt sets per batch size (preset default)")
    parser.add_argument("--device", help="cuda or cpu (preset default; falls back to cpu without CUDA for tiny)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (preset default)")
    parser.add_argument("--copy-mib", type=int, help="buffer for the copy bandwidth (default 1024 on CUDA, 64 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="oracle corruption seed")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--graphs", action="store_true", help="CUDA-graph capture (not available yet)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the json and markdown")
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)

    if args.graphs:
        parser.error("--graphs is not available yet: capturing the decode step as CUDA graphs needs the "
                     "static-KV engine path; run without --graphs (eager)")
    preset = PRESETS[args.preset]
    for name in ("prompt_len", "new_tokens", "rounds"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    device_name = args.device or (preset["device"] if preset["device"] == "cpu" or torch.cuda.is_available() else None)
    if device_name is None:
        parser.error(f"preset {args.preset} needs a CUDA device and none is available; use --preset tiny on CPU")
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA device is available")
    dtype = DTYPES[args.dtype or preset["dtype"]]
    if args.copy_mib is None:
        args.copy_mib = 1024 if device.type == "cuda" else 64
    if min(args.batch) < 1 or args.k < 1 or args.new_tokens < 2 or args.prompt_len < 1 or args.rounds < 1:
        parser.error("--batch, --k, --prompt-len and --rounds must be >= 1 and --new-tokens >= 2")
    if any(not 0.0 <= a <= 1.0 for a in args.alpha):
        parser.error(f"--alpha values must be in [0, 1], got {args.alpha}")
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = measure(args, device, dtype, log)
    doc = dict(
        command=command, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=machine(device),
        config=dict(preset=args.preset, dtype=str(dtype).replace("torch.", ""), k=args.k, alpha=args.alpha,
                    batch=args.batch, methods=args.methods, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                    rounds=args.rounds, warmup=not args.no_warmup, graphs=False,
                    target=preset["target"], draft=preset["draft"]),
        results=results,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_gpu_{args.preset}_b{'-'.join(map(str, args.batch))}"
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = markdown(doc)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
