"""`specdec bench`: speculative decoding against baseline and Hugging Face peers, side by side.

Every method runs in one process on the same prompts, models and machine:

  baseline     specdec, drafter "none" (plain autoregressive decoding, same loop)
  model        specdec, draft model, K drafts per step
  ngram        specdec, prompt-lookup drafter
  cache-cold   specdec, draft-token store drafter, store empty at the start
  cache-warm   specdec, draft-token store drafter, store filled by the cold pass
  hf           transformers `generate`
  hf-assisted  `generate(assistant_model=draft)`, transformers' own drafting defaults
  hf-assisted-k  same, K assistant tokens per step, no confidence stop (our policy)
  hf-lookup    `generate(prompt_lookup_num_tokens=K)`

Order alternates between repeats (forward, then reversed) after one untimed warm-up
pass, and tokens/s is the median over repeats of (new tokens / wall time) summed over
the prompts, each prompt decoded alone (batch 1). Speedup is relative to baseline in
the same setting and workload. The bound is tau / (k * c + 1) (Leviathan et al. 2023):
tau = tokens emitted per target forward, k = draft forwards per target forward, c =
draft forward time / target forward time, measured here for one token at the
workload's typical context length. Efficiency = speedup / bound.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import statistics
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .workload import cache_workload, load_builtin, load_jsonl, render

OURS = ("baseline", "model", "ngram", "cache")
PEERS = ("hf", "hf-assisted", "hf-lookup")
ALL_METHODS = OURS + PEERS
SETTINGS = ("greedy", "sampled")

COLUMNS = [
    "setting", "workload", "method", "k", "tokens_per_s", "speedup", "acceptance_rate",
    "mean_accepted_length", "target_forwards_per_token", "c", "bound", "efficiency",
    "greedy_equals_baseline", "cache_hit_rate", "new_tokens", "prompts", "repeats",
]


# --------------------------------------------------------------------------- configuration


@dataclass
class BenchConfig:
    """Validated `specdec bench` settings (see cli.py for the options)."""

    target: str
    draft: str | None
    out: Path
    device: str | None = None
    dtype: str | None = None
    device_map: str | None = None
    num_draft_tokens: list[int] = field(default_factory=lambda: [4])  # first value = main K
    max_new_tokens: int = 128
    num_prompts: int = 16
    repeats: int = 3
    warmup: bool = True
    prompts_file: str | None = None
    seed: int = 0
    temperature: float = 0.8  # the sampled setting
    settings: tuple[str, ...] = SETTINGS
    methods: tuple[str, ...] = ALL_METHODS
    cache_url: str = "memory://specdec-bench"
    cache_prompts: int = 4  # originals in the cache workload (x3 with repeats and near-duplicates)
    threads: int | None = None
    quick: bool = False
    progress: bool = True
    command: str = ""

    @property
    def main_k(self) -> int:
        return self.num_draft_tokens[0]

    def validate(self) -> None:
        """Every check that does not need the models; ValueError with the fix."""
        ks = self.num_draft_tokens
        if not ks:
            raise ValueError("--num-draft-tokens needs at least one value, e.g. 4 or 2,4,8")
        from .params import MAX_DRAFT_TOKENS

        for k in ks:
            if not 1 <= k <= MAX_DRAFT_TOKENS:
                raise ValueError(f"--num-draft-tokens values must be in 1..{MAX_DRAFT_TOKENS}, got {k}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"--num-draft-tokens has repeated values: {ks}")
        for name in ("max_new_tokens", "num_prompts", "repeats", "cache_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"--temperature (the sampled setting) must be > 0, got {self.temperature}")
        for s in self.settings:
            if s not in SETTINGS:
                raise ValueError(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
        if not self.settings:
            raise ValueError(f"--settings needs at least one of {', '.join(SETTINGS)}")
        for m in self.methods:
            if m not in ALL_METHODS:
                raise ValueError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
        if "baseline" not in self.methods:
            raise ValueError("--methods must include baseline: every speedup is measured against it")
        if self.device is not None and self.device_map is not None:
            raise ValueError("pass either --device or --device-map, not both")
        if self.device is not None:
            check_device(self.device)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {str(self.out)!r} exists and is not a folder")


def check_device(device: str) -> None:
    """ValueError unless `device` names a torch device that exists here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:1, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device!r}: MPS is not available on this machine; use --device cpu")


def parse_int_list(text: str) -> list[int]:
    """'4' or '2,4,8' -> [4] or [2, 4, 8]; ValueError otherwise."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"expected one integer or a comma-separated list like 2,4,8, got {text!r}") from None
    if not values:
        raise ValueError(f"expected one integer or a comma-separated list like 2,4,8, got {text!r}")
    return values


# --------------------------------------------------------------------------- measurement


@dataclass
class Sample:
    """One prompt decoded by one method."""

    tokens: list[int]
    seconds: float
    target_forwards: int | None = None
    draft_forwards: int | None = None
    drafted: int | None = None
    accepted: int | None = None
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    cache_hit: bool = False


@dataclass
class Run:
    """One row of the table: a method in one setting on one workload."""

    setting: str
    workload: str
    method: str
    k: int | None
    execute: Callable[[list[int], int], Sample]  # (prompt ids, seed) -> Sample
    group: str = ""  # runs of one group always run back to back, in order
    before_repeat: Callable[[int], None] | None = None  # called with the repeat index
    samples: list[list[Sample]] = field(default_factory=list)  # [repeat][prompt]

    @property
    def key(self) -> tuple:
        return (self.setting, self.workload, self.method, self.k)


class ForwardCounter:
    """Counts forward calls of a module while active (for Hugging Face generate)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, module, args, output) -> None:
        self.count += 1


@contextmanager
def count_forwards(model: torch.nn.Module | None) -> Iterator[ForwardCounter]:
    counter = ForwardCounter()
    handle = model.register_forward_hook(counter) if model is not None else None
    try:
        yield counter
    finally:
        if handle is not None:
            handle.remove()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def forward_ms(model, context: list[int], n_tokens: int, reps: int) -> float:
    """Median milliseconds of one forward of `n_tokens` new tokens after a KV cache of `context`."""
    from transformers import DynamicCache

    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([context], device=device)
    cache = DynamicCache()
    model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True)
    new = torch.tensor([context[:n_tokens]], device=device)
    mask = torch.ones(1, len(context) + n_tokens, dtype=torch.long, device=device)
    positions = torch.arange(len(context), len(context) + n_tokens, device=device).unsqueeze(0)
    times = []
    for _ in range(reps + 3):
        synchronize(device)
        t0 = time.perf_counter()
        model(input_ids=new, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        cache.crop(-n_tokens)
    return statistics.median(times[3:]) * 1e3


# --------------------------------------------------------------------------- the runner


class Bench:
    """Loads the models and workloads, builds the runs, executes them, reports."""

    def __init__(self, config: BenchConfig, log: Callable[[str], None] | None = None) -> None:
        config.validate()
        self.config = config
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.notes: list[str] = []
        # The workload is read before the models, so that a bad prompt file fails at once.
        if config.prompts_file:
            self.prompts = load_jsonl(config.prompts_file)[: config.num_prompts]
        else:
            self.prompts = load_builtin(config.num_prompts)

    # ------------------------------------------------------------------ setup

    def load(self) -> None:
        from . import SpeculativeGenerator

        cfg = self.config
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        t0 = time.perf_counter()
        self.gen = SpeculativeGenerator.from_pretrained(
            cfg.target, cfg.draft, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map
        )
        self.load_seconds = time.perf_counter() - t0
        tok = self.gen.tokenizer
        self.ids = [list(tok(render(p, tok))["input_ids"]) for p in self.prompts]
        self.cache_prompts = cache_workload(self.prompts, min(cfg.cache_prompts, len(self.prompts)))
        self.cache_ids = [list(tok(render(p, tok))["input_ids"]) for p in self.cache_prompts]
        limit = self.gen.max_positions
        for p, ids in zip(self.prompts + self.cache_prompts, self.ids + self.cache_ids):
            if limit is not None and len(ids) + cfg.max_new_tokens > limit:
                raise ValueError(
                    f"prompt {p.id!r} has {len(ids)} tokens; with --max-new-tokens {cfg.max_new_tokens} that is "
                    f"more than the model's {limit} positions; lower --max-new-tokens or use shorter prompts"
                )
        self.eos = sorted(self.gen.eos_token_ids)
        pad = getattr(tok, "pad_token_id", None)
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)

    def measure_cost(self) -> dict[str, float]:
        """Forward times at the workload's typical context (mean prompt + half the new tokens)."""
        mean_prompt = sum(len(i) for i in self.ids) / len(self.ids)
        ctx = int(mean_prompt + self.config.max_new_tokens / 2)
        context = (self.ids[0] * (ctx // len(self.ids[0]) + 1))[:ctx]
        reps = 10 if self.config.quick else 40
        target = self.gen.target_model
        draft = self.gen.draft_model
        out = {"context_tokens": ctx, "target_forward_ms": forward_ms(target, context, 1, reps)}
        out[f"target_verify_ms_k{self.config.main_k}"] = forward_ms(target, context, self.config.main_k + 1, reps)
        if draft is not None:
            out["draft_forward_ms"] = forward_ms(draft, context, 1, reps)
            out["c"] = out["draft_forward_ms"] / out["target_forward_ms"]
        return out

    # ------------------------------------------------------------------ methods

    def _ours(self, drafter: str, k: int, sampled: bool, layer: Any = None) -> Callable[[list[int], int], Sample]:
        cfg = self.config
        kwargs: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, drafter=drafter, num_draft_tokens=k)
        if sampled:
            kwargs["temperature"] = cfg.temperature
        if layer is not None:
            kwargs["cache"] = layer
        device = self.gen.device

        def execute(ids: list[int], seed: int) -> Sample:
            synchronize(device)
            t0 = time.perf_counter()
            res = self.gen.generate_ids([ids], seed=seed if sampled else None, **kwargs)[0]
            synchronize(device)
            seconds = time.perf_counter() - t0
            s = res.stats
            return Sample(
                tokens=list(res.token_ids),
                seconds=seconds,
                target_forwards=s.target_forwards,
                draft_forwards=s.draft_forwards,
                drafted=s.drafted_tokens,
                accepted=s.accepted_tokens,
                drafted_per_position=list(s.drafted_per_position),
                accepted_per_position=list(s.accepted_per_position),
                cache_hit=bool(s.cache_hit),
            )

        return execute

    def _hf(self, sampled: bool, assistant: bool = False, lookup_k: int | None = None,
            assistant_k: int | None = None) -> Callable[[list[int], int], Sample]:
        cfg = self.config
        target = self.gen.target_model
        draft = self.gen.draft_model if assistant else None
        device = self.gen.device
        kwargs: dict[str, Any] = dict(
            max_new_tokens=cfg.max_new_tokens, do_sample=sampled, pad_token_id=self.pad,
            eos_token_id=self.eos or None,
        )
        if sampled:
            kwargs.update(temperature=cfg.temperature, top_k=0, top_p=1.0)
        if draft is not None:
            kwargs["assistant_model"] = draft
        if lookup_k is not None:
            kwargs["prompt_lookup_num_tokens"] = lookup_k

        @torch.inference_mode()
        def execute(ids: list[int], seed: int) -> Sample:
            inputs = torch.tensor([ids], device=device)
            saved = None
            if draft is not None and assistant_k is not None:
                # transformers reads the drafting policy from the assistant's generation config.
                gc = draft.generation_config
                saved = (gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold)
                gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = assistant_k, "constant"
                gc.assistant_confidence_threshold = 0.0
            if sampled:
                torch.manual_seed(seed)
            try:
                with count_forwards(target) as t_count, count_forwards(draft) as d_count:
                    synchronize(device)
                    t0 = time.perf_counter()
                    out = target.generate(inputs, attention_mask=torch.ones_like(inputs), **kwargs)
                    tokens = out[0, len(ids):].tolist()
                    seconds = time.perf_counter() - t0
            finally:
                if saved is not None:
                    gc = draft.generation_config
                    gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = saved
            # generate pads finished sequences; keep tokens up to and including the first eos.
            for i, t in enumerate(tokens):
                if t in self.eos:
                    tokens = tokens[: i + 1]
                    break
            sample = Sample(tokens=tokens, seconds=seconds, target_forwards=t_count.count)
            if draft is not None:
                # Each assistant forward proposes one token; each target forward emits accepted + 1.
                sample.draft_forwards = d_count.count
                sample.drafted = d_count.count
                sample.accepted = max(0, len(tokens) - t_count.count)
            return sample

        return execute

    def _cache_runs(self, setting: str) -> list[Run]:
        """cache-cold and cache-warm on the cache workload, in a fresh namespace each repeat."""
        from .caching import CacheLayer

        k = self.config.main_k
        sampled = setting == "sampled"
        run_id = uuid.uuid4().hex[:8]
        holder: dict[str, Any] = {}

        def fresh_namespace(repeat: int) -> None:
            if "layer" in holder:
                holder["layer"].close()
            # response_cache=false: measure the drafter, not whole responses served from the cache.
            holder["layer"] = CacheLayer.open(
                self.config.cache_url, self.gen, namespace=f"bench-{run_id}-{setting}-{repeat}", response_cache=False
            )

        def flush_writes(repeat: int) -> None:
            # The warm pass must see everything the cold pass wrote (writes are write-behind).
            holder["layer"].flush()

        def cold(ids: list[int], seed: int) -> Sample:
            return self._ours("cache", k, sampled, holder["layer"])(ids, seed)

        def warm(ids: list[int], seed: int) -> Sample:
            return self._ours("cache", k, sampled, holder["layer"])(ids, seed)

        self._cache_holder = holder
        return [
            Run(setting, "cache", "cache-cold", k, cold, group=f"cache-{setting}", before_repeat=fresh_namespace),
            Run(setting, "cache", "cache-warm", k, warm, group=f"cache-{setting}", before_repeat=flush_writes),
        ]

    def cache_available(self) -> bool:
        """True when the cache drafter is registered and a cache layer opens on --cache."""
        try:
            from .drafters import available_drafters

            if "cache" not in available_drafters():
                self.notes.append("cache rows skipped: the cache drafter is not registered")
                return False
            from .caching import CacheLayer

            CacheLayer.open(self.config.cache_url, self.gen, namespace="bench-probe").close()
            return True
        except ImportError as exc:
            self.notes.append(f"cache rows skipped: the cache package is not available ({exc})")
            return False

    def plan(self) -> list[Run]:
        """Every (setting, workload, method, K) row, in execution order."""
        cfg = self.config
        has_draft = self.gen.draft_model is not None
        methods = set(cfg.methods)
        if not has_draft and methods & {"model", "hf-assisted"}:
            self.notes.append("model and hf-assisted rows skipped: no draft model (pass --draft)")
            methods -= {"model", "hf-assisted"}
        runs: list[Run] = []
        for setting in cfg.settings:
            sampled = setting == "sampled"
            # The sampled setting uses the main K only; greedy sweeps every K.
            ks = cfg.num_draft_tokens if not sampled else [cfg.main_k]
            runs.append(Run(setting, "main", "baseline", None, self._ours("none", 0, sampled)))
            if "hf" in methods:
                runs.append(Run(setting, "main", "hf", None, self._hf(sampled)))
            if "hf-assisted" in methods and not sampled:
                runs.append(Run(setting, "main", "hf-assisted", None, self._hf(sampled, assistant=True)))
            for k in ks:
                if "model" in methods:
                    runs.append(Run(setting, "main", "model", k, self._ours("model", k, sampled)))
                if "ngram" in methods:
                    runs.append(Run(setting, "main", "ngram", k, self._ours("ngram", k, sampled)))
                if "hf-assisted" in methods:
                    runs.append(Run(setting, "main", "hf-assisted-k", k, self._hf(sampled, True, assistant_k=k)))
                if "hf-lookup" in methods:
                    runs.append(Run(setting, "main", "hf-lookup", k, self._hf(sampled, lookup_k=k)))
        if "cache" in methods and "greedy" in cfg.settings and self.cache_available():
            runs.append(Run("greedy", "cache", "baseline", None, self._ours("none", 0, False)))
            runs.extend(self._cache_runs("greedy"))
        return runs

    # ------------------------------------------------------------------ execution

    def _groups(self, runs: list[Run]) -> list[list[Run]]:
        groups: list[list[Run]] = []
        for run in runs:
            if run.group and groups and groups[-1][0].group == run.group:
                groups[-1].append(run)
            else:
                groups.append([run])
        return groups

    def _prompt_ids(self, run: Run) -> list[list[int]]:
        return self.cache_ids if run.workload == "cache" else self.ids

    def execute(self, runs: list[Run]) -> None:
        """Warm-up, then the timed repeats in alternating order."""
        cfg = self.config
        groups = self._groups(runs)
        total = sum(len(self._prompt_ids(r)) for r in runs) * cfg.repeats + (len(runs) if cfg.warmup else 0)
        bar = _progress(total, cfg.progress)
        if cfg.warmup:
            for group in groups:
                for run in group:
                    if run.before_repeat is not None:
                        run.before_repeat(-1)
                    bar.set_description(f"warm-up {run.method}")
                    run.execute(self._prompt_ids(run)[0], cfg.seed)
                    bar.update(1)
        for repeat in range(cfg.repeats):
            order = groups if repeat % 2 == 0 else list(reversed(groups))
            for group in order:
                for run in group:
                    if run.before_repeat is not None:
                        run.before_repeat(repeat)
                    label = run.method + (f" k={run.k}" if run.k else "")
                    bar.set_description(f"{repeat + 1}/{cfg.repeats} {run.setting} {label}")
                    samples = []
                    for i, ids in enumerate(self._prompt_ids(run)):
                        samples.append(run.execute(ids, cfg.seed + i))
                        bar.update(1)
                    run.samples.append(samples)
        bar.close()
        holder = getattr(self, "_cache_holder", None)
        if holder and "layer" in holder:
            holder["layer"].close()

    # ------------------------------------------------------------------ results

    def rows(self, runs: list[Run], cost: dict[str, float]) -> list[dict[str, Any]]:
        """One dict per run with the COLUMNS, plus per-position acceptance."""
        baselines = {(r.setting, r.workload): r for r in runs if r.method == "baseline"}
        c = cost.get("c")
        out = []
        for run in runs:
            tps = [sum(len(s.tokens) for s in rep) / sum(s.seconds for s in rep) for rep in run.samples]
            flat = [s for rep in run.samples for s in rep]
            tokens = sum(len(s.tokens) for s in flat)
            base = baselines[(run.setting, run.workload)]
            base_tps = statistics.median(
                [sum(len(s.tokens) for s in rep) / sum(s.seconds for s in rep) for rep in base.samples]
            )
            row: dict[str, Any] = dict.fromkeys(COLUMNS)
            row.update(setting=run.setting, workload=run.workload, method=run.method, k=run.k,
                       tokens_per_s=statistics.median(tps), new_tokens=tokens // len(run.samples),
                       prompts=len(run.samples[0]), repeats=len(run.samples))
            row["tokens_per_s_repeats"] = tps
            row["speedup"] = row["tokens_per_s"] / base_tps
            forwards = [s.target_forwards for s in flat]
            if all(f is not None for f in forwards) and sum(forwards):
                tau = tokens / sum(forwards)
                row["mean_accepted_length"] = tau
                row["target_forwards_per_token"] = 1.0 / tau
                drafts = [s.draft_forwards for s in flat]
                if run.method in ("model", "hf-assisted", "hf-assisted-k"):
                    k_eff = sum(drafts) / sum(forwards)  # draft forwards per target forward
                    if c is not None:
                        row["c"] = c
                        row["bound"] = tau / (k_eff * c + 1.0)
                else:  # no draft model: drafting costs no model forward
                    row["c"] = 0.0
                    row["bound"] = tau
                if row["bound"]:
                    row["efficiency"] = row["speedup"] / row["bound"]
            drafted = [s.drafted for s in flat]
            if all(d is not None for d in drafted) and sum(drafted):
                row["acceptance_rate"] = sum(s.accepted for s in flat) / sum(drafted)
            row["per_position_acceptance"] = _per_position(flat)
            row["cache_hit_rate"] = sum(s.cache_hit for s in flat) / len(flat)
            if run.setting == "greedy":
                ref = [s.tokens for s in base.samples[0]]
                same = [s.tokens == r for s, r in zip(run.samples[0], ref)]
                row["greedy_equals_baseline"] = all(same)
                row["greedy_mismatches"] = [i for i, ok in enumerate(same) if not ok]
            out.append(row)
        return out

    def run(self) -> dict[str, Any]:
        """Everything: load, measure c, execute, write the files; returns the JSON document."""
        cfg = self.config
        self.log(f"loading target {cfg.target}" + (f" and draft {cfg.draft}" if cfg.draft else ""))
        self.load()
        cost = self.measure_cost()
        self.log("forward cost: " + ", ".join(f"{k}={v:.3f}" for k, v in cost.items()))
        runs = self.plan()
        self.execute(runs)
        rows = self.rows(runs, cost)
        doc = {
            "command": cfg.command,
            "machine": machine_info(self.gen.device),
            "models": {
                "target": display_model(cfg.target),
                "draft": display_model(cfg.draft),
                "target_parameters": sum(p.numel() for p in self.gen.target_model.parameters()),
                "draft_parameters": (sum(p.numel() for p in self.gen.draft_model.parameters())
                                     if self.gen.draft_model is not None else None),
                "dtype": str(self.gen.target_dtype).replace("torch.", ""),
                "device": str(self.gen.device),
                "load_seconds": self.load_seconds,
            },
            "workload": {
                "source": cfg.prompts_file or "built-in held-out standard-library prompts",
                "prompts": len(self.prompts),
                "mean_prompt_tokens": sum(len(i) for i in self.ids) / len(self.ids),
                "cache_workload_prompts": len(self.cache_prompts),
                "max_new_tokens": cfg.max_new_tokens,
            },
            "settings": {
                "num_draft_tokens": cfg.num_draft_tokens,
                "main_k": cfg.main_k,
                "repeats": cfg.repeats,
                "warmup": cfg.warmup,
                "seed": cfg.seed,
                "sampled_temperature": cfg.temperature,
                "threads": torch.get_num_threads(),
                "quick": cfg.quick,
                "cache_url": _redact(cfg.cache_url),
            },
            "cost": cost,
            "notes": self.notes,
            "columns": COLUMNS,
            "rows": rows,
        }
        write_results(cfg.out, doc)
        return doc


def _per_position(samples: list[Sample]) -> list[float]:
    width = max((len(s.drafted_per_position) for s in samples), default=0)
    drafted = [0] * width
    accepted = [0] * width
    for s in samples:
        for i, (d, a) in enumerate(zip(s.drafted_per_position, s.accepted_per_position)):
            drafted[i] += d
            accepted[i] += a
    return [a / d if d else 0.0 for a, d in zip(accepted, drafted)]


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: a silent stand-in
        return _NoBar()
    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="gen", dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, text: str) -> None: ...
    def close(self) -> None: ...


def _redact(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(parts.password, "***")
    return url


def machine_info(device: torch.device) -> dict[str, Any]:
    """Device name, CPU, versions: enough to tell two result files apart."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    import transformers

    info = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return info


# --------------------------------------------------------------------------- output


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def headline(rows: list[dict[str, Any]], main_k: int) -> list[str]:
    """The draft-model method at the main K against baseline and the transformers peers, per setting."""
    lines = []
    for setting in SETTINGS:
        by = {(r["method"], r["k"]): r for r in rows if r["setting"] == setting and r["workload"] == "main"}
        model = by.get(("model", main_k))
        if model is None:
            continue
        parts = [f"{model['speedup']:.2f}x baseline"]
        for method, k in (("hf", None), ("hf-assisted", None), ("hf-assisted-k", main_k)):
            peer = by.get((method, k))
            if peer is not None:
                parts.append(f"{model['tokens_per_s'] / peer['tokens_per_s']:.2f}x {method}")
        if model["efficiency"] is not None:
            parts.append(f"efficiency {model['efficiency']:.2f} of the bound {model['bound']:.2f}")
        lines.append(f"{setting}, draft model K={main_k}: " + ", ".join(parts))
    return lines


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results table as markdown."""
    head = ["setting", "workload", "method", "K", "tokens/s", "speedup", "accept", "tau",
            "fwd/token", "c", "bound", "efficiency", "= baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], r["workload"], r["method"], _fmt(r["k"]), _fmt(r["tokens_per_s"], 1),
                 _fmt(r["speedup"]), _fmt(r["acceptance_rate"]), _fmt(r["mean_accepted_length"]),
                 _fmt(r["target_forwards_per_token"]), _fmt(r["c"], 3), _fmt(r["bound"]),
                 _fmt(r["efficiency"]), _fmt(r["greedy_equals_baseline"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, doc: dict[str, Any]) -> None:
    """results.json, results.csv, results.md and the PNG plots under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in doc["rows"]:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    (out / "results.md").write_text(report_markdown(doc))
    doc["plots"] = write_plots(out, doc["rows"])


def report_markdown(doc: dict[str, Any]) -> str:
    """A self-contained markdown report: command, machine, cost, table, notes."""
    m, cost = doc["machine"], doc["cost"]
    main_k = doc["settings"]["main_k"]
    lines = [
        "# specdec bench",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Machine: {m['device_name']} ({m['cpu_count']} logical CPUs, torch threads {m['torch_threads']}); "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}.",
        "",
        f"Models: target `{doc['models']['target']}` ({doc['models']['target_parameters']:,} parameters), draft "
        f"`{doc['models']['draft']}`"
        + (f" ({doc['models']['draft_parameters']:,} parameters)" if doc["models"]["draft_parameters"] else "")
        + f"; dtype {doc['models']['dtype']} on {doc['models']['device']}.",
        "",
        f"Workload: {doc['workload']['source']}, {doc['workload']['prompts']} prompts "
        f"(mean {doc['workload']['mean_prompt_tokens']:.0f} tokens), up to {doc['workload']['max_new_tokens']} new "
        f"tokens each, batch 1; cache workload {doc['workload']['cache_workload_prompts']} prompts. "
        f"Median of {doc['settings']['repeats']} repeats, alternating order"
        + (", after a warm-up pass." if doc["settings"]["warmup"] else "."),
        "",
        "Forward cost at " + f"{cost['context_tokens']} tokens of context: target {cost['target_forward_ms']:.2f} ms"
        + (f", draft {cost['draft_forward_ms']:.2f} ms, c = {cost['c']:.3f}" if "c" in cost else "")
        + f"; target forward over K+1 = {main_k + 1} tokens: {cost[f'target_verify_ms_k{main_k}']:.2f} ms.",
        "",
        *[f"- {line}" for line in headline(doc["rows"], main_k)],
        "",
        markdown_table(doc["rows"]),
        "",
        "Columns: tokens/s = median over repeats; speedup = tokens/s / baseline tokens/s (same setting, same "
        "workload); accept = accepted drafts / drafted tokens; tau = tokens emitted per target forward; "
        "fwd/token = target forwards per token; bound = tau / (k c + 1), k = draft forwards per target forward; "
        "efficiency = speedup / bound; = baseline: greedy output identical to baseline for every prompt.",
    ]
    if doc["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def write_plots(out: Path, rows: list[dict[str, Any]]) -> list[str]:
    """speedup_vs_k.png and acceptance_by_position.png; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    greedy = [r for r in rows if r["setting"] == "greedy" and r["workload"] == "main"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ("model", "ngram", "hf-assisted-k", "hf-lookup"):
        pts = sorted((r["k"], r["speedup"]) for r in greedy if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    for method, style in (("hf", ":"), ("hf-assisted", "--")):
        for r in greedy:
            if r["method"] == method:
                ax.axhline(r["speedup"], linestyle=style, color="gray", label=f"{method} (no K)")
    ax.axhline(1.0, color="black", linewidth=0.8, label="baseline")
    ax.set_xlabel("draft tokens per step (K)")
    ax.set_ylabel("speedup vs baseline (tokens/s)")
    ax.set_title("Greedy speedup vs K")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_k.png", dpi=120)
    plt.close(fig)
    written.append("speedup_vs_k.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in greedy:
        if r["method"] in ("model", "ngram") and r.get("per_position_acceptance"):
            acc = r["per_position_acceptance"]
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{r['method']} K={r['k']}")
    ax.set_xlabel("draft position")
    ax.set_ylabel("accepted / drafted at this slot")
    ax.set_ylim(0, 1.05)
    ax.set_title("Acceptance by draft position (greedy)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "acceptance_by_position.png", dpi=120)
    plt.close(fig)
    written.append("acceptance_by_position.png")
    return written


def display_model(path: str | None) -> str | None:
    """How a model is named in results: the bundled pair by its package path, anything else as given."""
    if path is None:
        return None
    from pathlib import Path as _Path

    for name, bundled in zip(("target", "draft"), default_pair()):
        if _Path(path).resolve() == _Path(bundled).resolve():
            return f"specdec/assets/default_pair/{name} (bundled)"
    return path


def default_pair() -> tuple[str, str]:
    """Local paths of the bundled target and draft."""
    from importlib import resources

    root = resources.files("specdec.assets").joinpath("default_pair")
    return str(root.joinpath("target")), str(root.joinpath("draft"))


def as_dict(config: BenchConfig) -> dict[str, Any]:
    d = asdict(config)
    d["out"] = str(config.out)
    return d
