"""The runner: load once, measure forward costs, plan the runs, execute them, report.

Order alternates between repeats (forward, then reversed) after one untimed warm-up
pass, and each prompt is decoded alone (batch 1). Ctrl-C stops after the generation in
flight: what was measured (complete repeats) is written, marked partial.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from ..workload import DEFAULT_WORKLOAD, cache_workload, get_workload, load_jsonl, render
from . import metrics
from .config import (
    AUTO_NO_HEAD,
    BASELINE,
    CACHE,
    EAGER_SUFFIX,
    HF_COMPILED,
    RANDOM_DRAFT,
    BenchConfig,
    Method,
    eager_base,
    specdec_methods,
    with_eager_twins,
)
from .methods import (
    CompiledForward,
    Run,
    auto_k_supported,
    forward_ms,
    hf_compiled_prepare,
    hf_method,
    random_like,
    specdec_compile_prepare,
    specdec_method,
    specdec_uses_draft_model,
)
from .report import COLUMN_KEYS, write_results


class Bench:
    """Loads the models and workloads, builds the runs, executes them, reports."""

    def __init__(self, config: BenchConfig, log: Callable[[str], None] | None = None) -> None:
        config.validate()
        self.config = config
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.notes: list[str] = []
        self.partial = False
        self._cache_layers: list[Any] = []
        self._compiled_forward: CompiledForward | None = None  # hf-compiled's, shared by its rows
        # --compile: each compiled generator's warm-up (gen.warmup()'s seconds and graphs), once per
        # generator (the main one, and the one without the head for "auto-nohead"), by id()
        self._specdec_warmups: dict[int, dict[str, Any]] = {}
        # The workload is read before the models, so that a bad prompt file fails at once.
        if config.prompts_file:
            self.prompts = load_jsonl(config.prompts_file)[: config.num_prompts]
            self.workload_info = {"name": None, "source": config.prompts_file, "licence": None}
        else:
            workload = get_workload(config.workload or DEFAULT_WORKLOAD)
            self.prompts = workload.load(config.num_prompts)
            self.workload_info = {"name": workload.name, "source": workload.source, "licence": workload.licence}

    # ------------------------------------------------------------------ setup

    def load(self) -> None:
        from .. import SpeculativeGenerator

        cfg = self.config
        t0 = time.perf_counter()
        useless = cfg.draft == RANDOM_DRAFT
        self.gen = SpeculativeGenerator.from_pretrained(
            cfg.target, None if useless else cfg.draft, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map,
            numerics=cfg.numerics, compile=cfg.compile, head=None if cfg.head.lower() == "none" else cfg.head,
        )
        if useless:  # the useless-draft workload: the target's shape, random weights
            self.gen = SpeculativeGenerator(
                self.gen.target_model, self.gen.tokenizer, random_like(self.gen.target_model, seed=cfg.seed),
                numerics=cfg.numerics, compile=cfg.compile,
            )
        # The eager twins' generator ("X-eager", --compile): the same models, compile off, so that
        # a compiled row and its eager twin differ in the compiled step alone. The vocabularies
        # were checked when the compiled generator was built.
        self.eager_gen = None
        if cfg.compile and any(eager_base(m) is not None for m in cfg.methods):
            self.eager_gen = SpeculativeGenerator(
                self.gen.target_model, self.gen.tokenizer, self.gen.draft_model, draft_tokenizer=None,
                numerics=cfg.numerics, compile=False,
            )
        # "auto-nohead": the same models without the EAGLE-3 head.
        self.headless_gen = None
        if self.gen.draft_head is not None and any(m == AUTO_NO_HEAD for m in cfg.methods):
            self.headless_gen = SpeculativeGenerator(
                self.gen.target_model, self.gen.tokenizer, self.gen.draft_model, draft_tokenizer=None,
                numerics=cfg.numerics, compile=cfg.compile,
            )
        if self.eager_gen is not None and self.gen.draft_head is not None:
            self.eager_gen.draft_head = self.gen.draft_head
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
        cfg = self.config
        mean_prompt = sum(len(i) for i in self.ids) / len(self.ids)
        ctx = int(mean_prompt + cfg.max_new_tokens / 2)
        context = (self.ids[0] * (ctx // len(self.ids[0]) + 1))[:ctx]
        reps = 10 if cfg.preset == "quick" else 40
        target, draft = self.gen.target_model, self.gen.draft_model
        out: dict[str, float] = {"context_tokens": ctx}
        out["target_forward_ms"] = statistics.median(forward_ms(target, context, 1, reps))
        out[f"target_verify_ms_k{cfg.main_k}"] = statistics.median(forward_ms(target, context, cfg.main_k + 1, reps))
        if draft is not None:
            out["draft_forward_ms"] = statistics.median(forward_ms(draft, context, 1, reps))
            out["c"] = out["draft_forward_ms"] / out["target_forward_ms"]
        return out

    # ------------------------------------------------------------------ the plan

    def _compiled(self, run: Run, gen) -> Run:
        """A specdec row on a compiled generator (--compile; it was built with compile_graphs):
        warmed by gen.warmup(), once for all rows on that generator, before any timed call.
        Without it, a compiled generator runs a request below its compile budget eager."""
        if run.compile_graphs is not None:  # the dict its calls count their compiles in
            shared = self._specdec_warmups.setdefault(id(gen), {})
            run.prepare = specdec_compile_prepare(gen, run.compile_graphs, shared)
        return run

    def _ours(self, method: str, drafter: str, k: int | str | None, setting: str, layer: Any = None,
              workload: str = "main", group: str = "", before_repeat=None, eager: bool = False,
              no_head: bool = False) -> Run:
        """A specdec row; `eager`: an eager twin ("X-eager"), on the eager generator beside the
        compiled one (no warm-up, no compile counts: nothing of it compiles); `no_head`: on the
        generator without the EAGLE-3 head ("auto-nohead")."""
        cfg = self.config
        gen = self.eager_gen if eager else (self.headless_gen if no_head else self.gen)
        temperature = cfg.temperature if setting == "sampled" else None
        graphs: dict[str, int] | None = {} if cfg.compile and not eager else None
        execute = specdec_method(gen, drafter, 0 if k is None else k, max_new_tokens=cfg.max_new_tokens,
                                 temperature=temperature, cache_layer=layer, graphs=graphs)
        uses = specdec_uses_draft_model(drafter, gen.draft_resources)
        run = Run(setting, workload, method, k if isinstance(k, int) and drafter != "none" else None, execute,
                  uses_draft_model=uses, group=group, before_repeat=before_repeat, compile_graphs=graphs,
                  twin_of=method[: -len(EAGER_SUFFIX)] if eager else None)
        return self._compiled(run, gen)

    def _hf(self, method: str, setting: str, *, assistant: bool = False, k: int | None = None,
            lookup: bool = False) -> Run:
        cfg = self.config
        compiled = None
        graphs: dict[str, int] | None = None
        if method == HF_COMPILED:
            if self._compiled_forward is None:
                self._compiled_forward = CompiledForward(self.gen.target_model)
            compiled, graphs = self._compiled_forward, {}
        execute = hf_method(
            self.gen.target_model, self.gen.draft_model if assistant else None, eos=self.eos, pad=self.pad,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature if setting == "sampled" else None,
            lookup_k=k if lookup else None, assistant_k=k if assistant else None, compiled=compiled, graphs=graphs,
        )
        run = Run(setting, "main", method, k, execute, uses_draft_model=assistant, compile_graphs=graphs)
        if graphs is not None:
            run.prepare = hf_compiled_prepare(execute, graphs, cfg.seed)
        return run

    def _cache_runs(self, setting: str, method: Method) -> list[Run]:
        """<name>-cold and <name>-warm (cache-cold and cache-warm for drafter "cache") on the cache
        workload, in a fresh namespace each repeat."""
        from ..caching import CacheLayer

        k = self.config.main_k
        run_id = uuid.uuid4().hex[:8]
        holder: dict[str, Any] = {}

        def fresh_namespace(repeat: int) -> None:
            if "layer" in holder:
                holder["layer"].close()
            # response_cache=false: measure the drafter, not whole responses served from the cache.
            holder["layer"] = CacheLayer.open(
                self.config.cache_url, self.gen, namespace=f"bench-{run_id}-{method.name}-{setting}-{repeat}",
                response_cache=False,
            )
            self._cache_layers.append(holder["layer"])

        def flush_writes(repeat: int) -> None:
            # The warm pass must see everything the cold pass wrote (writes are write-behind).
            holder["layer"].flush()

        temperature = self.config.temperature if setting == "sampled" else None

        def through_layer(graphs: dict[str, int] | None):
            def execute(ids: list[int], seed: int):
                return specdec_method(self.gen, method.drafter, k, max_new_tokens=self.config.max_new_tokens,
                                      temperature=temperature, cache_layer=holder["layer"], graphs=graphs)(ids, seed)

            return execute

        uses = specdec_uses_draft_model(method.drafter, self.gen.draft_resources)
        group = f"{method.name}-{setting}"
        runs = []
        for suffix, before_repeat in (("cold", fresh_namespace), ("warm", flush_writes)):
            graphs: dict[str, int] | None = {} if self.config.compile else None
            runs.append(self._compiled(Run(
                setting, "cache", f"{method.name}-{suffix}", k, through_layer(graphs), uses_draft_model=uses,
                group=group, before_repeat=before_repeat, compile_graphs=graphs,
            ), self.gen))
        return runs

    def cache_available(self, drafter: str = CACHE) -> bool:
        """True when `drafter` (a drafter of the shared draft store) is registered and a cache layer
        opens on --cache."""
        from ..cache.config import redact_url

        try:
            from ..drafters import available_drafters

            if drafter not in available_drafters():
                self.notes.append(f"{drafter} rows skipped: the {drafter} drafter is not registered")
                return False
            from ..caching import CacheLayer

            CacheLayer.open(self.config.cache_url, self.gen, namespace="bench-probe").close()
            return True
        except ImportError as exc:
            self.notes.append(f"{drafter} rows skipped: the cache package is not available ({exc})")
            return False
        except (OSError, ValueError) as exc:
            self.notes.append(f"{drafter} rows skipped: {redact_url(self.config.cache_url)} did not open ({exc})")
            return False

    def plan(self) -> list[Run]:
        """Every (setting, workload, method, K) row, in execution order."""
        cfg = self.config
        # The registry as it is now (plug-in drafters included), with the eager twins asked for.
        specs = with_eager_twins(specdec_methods(), cfg.methods)
        methods = set(cfg.methods)
        if self.gen.draft_model is None:
            skipped = [m for m in cfg.methods if m == "hf-assisted" or (m in specs and specs[m].needs_model)]
            if skipped:
                self.notes.append(f"{_names(skipped)} rows skipped: no draft model (pass --draft)")
                methods -= set(skipped)
        if self.gen.draft_head is None:
            skipped = [m for m in methods if m in specs and specs[m].needs_head]
            if skipped:
                self.notes.append(f"{_names(skipped)} rows skipped: no EAGLE-3 head (pass --head)")
                methods -= set(skipped)
        auto_k = [m for m in cfg.methods if m in methods and m in specs and specs[m].k == "auto"]
        if auto_k and not auto_k_supported():
            self.notes.append(f'{_names(auto_k)} rows skipped: this engine has no num_draft_tokens="auto"')
            methods -= set(auto_k)
        ours = [spec for name, spec in specs.items() if name in methods and spec.k != "none"]  # no baseline
        chosen_k = [spec for spec in ours if spec.workload == "main" and spec.k == "auto"]
        fixed_k = [spec for spec in ours if spec.workload == "main" and spec.k == "fixed"]
        runs: list[Run] = []
        for setting in cfg.settings:
            sampled = setting == "sampled"
            # Greedy sweeps every K for every method; sampled sweeps specdec's own drafters (the
            # best fixed K is what "auto" answers to) and runs transformers' at the main K only.
            ks = cfg.num_draft_tokens
            runs.append(self._ours(BASELINE, "none", None, setting))
            if BASELINE + EAGER_SUFFIX in methods:
                runs.append(self._ours(BASELINE + EAGER_SUFFIX, "none", None, setting, eager=True))
            if "hf" in methods:
                runs.append(self._hf("hf", setting))
            if HF_COMPILED in methods:
                runs.append(self._hf(HF_COMPILED, setting))
            if "hf-assisted" in methods and not sampled:
                runs.append(self._hf("hf-assisted", setting, assistant=True))
            for spec in chosen_k:  # "auto", then each drafter alone with K chosen every step
                runs.append(self._ours(spec.name, spec.drafter, "auto", setting, eager=spec.eager, no_head=spec.no_head))
            for k in ks:
                for spec in fixed_k:
                    runs.append(self._ours(spec.name, spec.drafter, k, setting, eager=spec.eager))
                if sampled and k != cfg.main_k:
                    continue
                if "hf-assisted" in methods:
                    runs.append(self._hf("hf-assisted-k", setting, assistant=True, k=k))
                if "hf-lookup" in methods:
                    runs.append(self._hf("hf-lookup", setting, k=k, lookup=True))
        if "greedy" in cfg.settings:
            stores = [spec for spec in ours if spec.workload == "cache" and self.cache_available(spec.drafter)]
            if stores:
                runs.append(self._ours(BASELINE, "none", None, "greedy", workload="cache"))
                for spec in stores:
                    runs.extend(self._cache_runs("greedy", spec))
        return runs

    # ------------------------------------------------------------------ execution

    @staticmethod
    def _groups(runs: list[Run]) -> list[list[Run]]:
        groups: list[list[Run]] = []
        for run in runs:
            if run.group and groups and groups[-1][0].group == run.group:
                groups[-1].append(run)
            else:
                groups.append([run])
        return groups

    @staticmethod
    def _interleaved(group: list[Run]) -> bool:
        """Runs on the main prompts that need no state between repeats take turns per prompt."""
        run = group[0]
        return len(group) == 1 and not run.group and run.workload == "main" and run.before_repeat is None

    def _prompt_ids(self, run: Run) -> list[list[int]]:
        return self.cache_ids if run.workload == "cache" else self.ids

    def _seed(self, repeat: int, prompt: int, prompts: int) -> int:
        """The sampling seed of one generation: every method gets the same one for a (repeat,
        prompt), and each repeat new ones. A seed fixes which draws a sampled run gets; with the
        same seeds in every repeat a method would keep its one lucky or unlucky draw, which
        repeats cannot average away (a few percent of tau on a short workload)."""
        return self.config.seed + repeat * prompts + prompt

    def execute(self, runs: list[Run]) -> None:
        """Compile warm-ups, the warm-up pass, then the timed repeats in alternating order; Ctrl-C
        ends it early (self.partial).

        A run that compiles (Run.prepare) is warmed first, with every prompt it will decode,
        even under --no-warmup: timing a compile would measure the compiler. Its seconds go to
        Run.warmup_s; compile_graphs counts the graphs each phase compiled: "warmup" (prepare),
        "warmup_pass" and "timed" (none, where the warm-up covered every shape).
        """
        cfg = self.config
        groups = self._groups(runs)
        total = sum(len(self._prompt_ids(r)) for r in runs) * cfg.repeats + (len(runs) if cfg.warmup else 0)
        bar = _progress(total, cfg.progress)
        try:
            for run in runs:
                if run.prepare is not None:
                    bar.set_description(f"compiling {run.setting} {run.method}")
                    run.warmup_s = run.prepare(self._prompt_ids(run))
            if cfg.warmup:
                for group in groups:
                    for run in group:
                        if run.before_repeat is not None:
                            run.before_repeat(-1)
                        bar.set_description(f"warm-up {run.method}")
                        run.execute(self._prompt_ids(run)[0], cfg.seed)
                        bar.update(1)
            for run in runs:  # what the warm-up pass compiled is untimed too: counted apart
                if run.compile_graphs is not None:
                    run.compile_graphs["warmup_pass"] = run.compile_graphs.get("timed", 0)
                    run.compile_graphs["timed"] = 0
            for repeat in range(cfg.repeats):
                order = groups if repeat % 2 == 0 else list(reversed(groups))
                # Runs without a group take turns prompt by prompt (the order alternating), so
                # every method sees the machine in the same moments: on a shared CPU whose
                # speed drifts over seconds, that is what keeps their ratios steady.
                loose = [g[0] for g in order if self._interleaved(g)]
                if loose:
                    by_run: dict[int, list] = {id(run): [] for run in loose}
                    for i, ids in enumerate(self.ids):
                        for run in (loose if (repeat + i) % 2 == 0 else loose[::-1]):
                            bar.set_description(f"{repeat + 1}/{cfg.repeats} prompt {i + 1}")
                            by_run[id(run)].append(run.execute(ids, self._seed(repeat, i, len(self.ids))))
                            bar.update(1)
                    for run in loose:
                        run.samples.append(by_run[id(run)])
                for group in order:
                    if self._interleaved(group):
                        continue
                    for run in group:
                        if run.before_repeat is not None:
                            run.before_repeat(repeat)
                        label = run.method + (f" k={run.k}" if run.k else "")
                        bar.set_description(f"{repeat + 1}/{cfg.repeats} {run.setting} {label}")
                        samples = []
                        prompts = self._prompt_ids(run)
                        for i, ids in enumerate(prompts):
                            samples.append(run.execute(ids, self._seed(repeat, i, len(prompts))))
                            bar.update(1)
                        run.samples.append(samples)
        except KeyboardInterrupt:
            self.partial = True
            done = min((len(r.samples) for r in runs), default=0)
            self.notes.append(
                f"interrupted (Ctrl-C) during repeat {done + 1} of {cfg.repeats}: rows report the repeats that "
                "finished; rows without any were not measured"
            )
        finally:
            bar.close()
            for layer in self._cache_layers:
                layer.close()

    # ------------------------------------------------------------------ everything

    def run(self) -> dict[str, Any]:
        """Load, measure c, execute, write the files; returns the JSON document.

        Ctrl-C while loading or measuring propagates (nothing measured yet); during the
        timed runs it ends them, and what finished is written with "partial": true.
        """
        from ..cache.config import redact_url
        from ..generator import parameter_count

        cfg = self.config
        started = time.perf_counter()
        self.log(f"loading target {cfg.target}" + (f" and draft {cfg.draft}" if cfg.draft else ""))
        self.load()
        cost = self.measure_cost()
        self.log("forward cost: " + ", ".join(f"{k}={v:.3f}" for k, v in cost.items()))
        runs = self.plan()
        self.execute(runs)
        rows = metrics.rows(runs, cost.get("c"))
        repeats_done = max((len(r.samples) for r in runs), default=0)
        doc = {
            "command": cfg.command,
            "partial": self.partial,
            # The whole run, model loading included (what a user waits for, not the timed part).
            "elapsed_seconds": round(time.perf_counter() - started, 1),
            "machine": machine_info(self.gen.device),
            "models": {
                "target": display_model(cfg.target),
                "draft": display_model(cfg.draft),
                "target_parameters": parameter_count(self.gen.target_model),
                "draft_parameters": (parameter_count(self.gen.draft_model)
                                     if self.gen.draft_model is not None else None),
                "dtype": str(self.gen.target_dtype).replace("torch.", ""),
                "numerics": self.gen.numerics,
                "compile": self.gen.compile,
                "device": str(self.gen.device),
                "load_seconds": self.load_seconds,
            },
            "workload": {
                **self.workload_info,  # name (None for a --prompts file), source, licence
                "prompts": len(self.prompts),
                "mean_prompt_tokens": sum(len(i) for i in self.ids) / len(self.ids),
                "cache_workload_prompts": len(self.cache_prompts),
                "max_new_tokens": cfg.max_new_tokens,
            },
            "settings": {
                "preset": cfg.preset,
                "num_draft_tokens": cfg.num_draft_tokens,
                "main_k": cfg.main_k,
                "repeats": cfg.repeats,
                "warmup": cfg.warmup,
                "seed": cfg.seed,
                "sampled_temperature": cfg.temperature,
                "threads": torch.get_num_threads(),
                "cache_url": redact_url(cfg.cache_url),
            },
            "cost": cost,
            # --compile: the generator's compile stats (graphs, recompiles, warm-up seconds); each
            # row's own warm-up is its warmup_s, and compile_graphs what compiled when.
            "compile": self.gen.compile_stats(),
            "suspect": metrics.suspect(rows, cost, min(cfg.repeats, repeats_done) if self.partial else cfg.repeats),
            "notes": self.notes,
            "columns": COLUMN_KEYS,
            "rows": rows,
        }
        write_results(cfg.out, doc)
        return doc


def _names(names: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def apply_threads(threads: int | None, device: str | None, device_map: str | None) -> int:
    """Torch CPU threads for this process: `threads` if given, else 1 for a CPU run.

    One thread per process keeps a shared or small CPU from stalling single calls for
    seconds (two busy threads on two cores contend with everything else); GPU runs keep
    torch's default. Returns the count in effect.
    """
    on_cpu = device_map is None and (
        (device is not None and torch.device(device).type == "cpu")
        or (device is None and not torch.cuda.is_available())
    )
    if threads is not None:
        torch.set_num_threads(threads)
    elif on_cpu:
        torch.set_num_threads(1)
    return torch.get_num_threads()


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


def machine_info(device: torch.device) -> dict[str, Any]:
    """Device name, CPU, versions: enough to tell two result files apart."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
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


def display_model(path: str | None) -> str | None:
    """How a model is named in results: the bundled pair by its package path, anything else as given."""
    from ..loading import bundled_pair

    if path is None:
        return None
    for name, bundled in zip(("target", "draft"), bundled_pair()):
        if Path(path).resolve() == Path(bundled).resolve():
            return f"specdec/assets/default_pair/{name} (bundled)"
    return path
