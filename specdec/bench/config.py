"""`specdec bench` settings: the methods it knows, the presets, and validation.

The default preset is the headline: baseline, the draft model, the EAGLE-3 head (rows skipped
with a note where none is loaded) and n-gram at the main K (and "auto" where the engine offers it), against transformers' plain, assisted and
prompt-lookup generation, greedy and sampled, on 4 prompts: under five minutes on a
2-core CPU. `--full` adds the K sweep, the cache workload and 16 prompts. `--quick` is a
smoke run. `--preset smollm2` and `--preset gemma3` run the same comparison on a real
pretrained model and a real workload (see PRESETS). Any explicit option overrides the
preset: --target, --workload / --prompts, --num-prompts and the rest.

specdec's own methods come from the drafter registry (specdec.drafters), read when they
are asked for, so that drafters registered by plug-ins are methods too: "baseline"
(drafter "none"), every registered drafter X at each --k, "X-auto" (drafter X with K
chosen per step), "auto" (drafter "auto", K auto) and, for drafters that read the shared
draft store (like "cache"), the cache workload. With --compile, "X-eager" runs specdec's
main-workload method X on an eager generator that shares the compiled one's models: compiled
and eager rows measured side by side in one run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

SETTINGS = ("greedy", "sampled")
# "cache" runs cache-cold and cache-warm on the cache workload; "hf-assisted" runs
# transformers' defaults and, per K, hf-assisted-k.
# --draft random: a draft of the target's own shape with random weights (the useless-draft
# workload: every draft is rejected and each costs a full target forward).
RANDOM_DRAFT = "random"
BASELINE = "baseline"
AUTO_SUFFIX = "-auto"
# "X-eager" (with --compile): specdec's method X on an eager generator beside the compiled rows.
EAGER_SUFFIX = "-eager"
CACHE = "cache"
# "auto-nohead": drafter "auto" on a generator without the EAGLE-3 head (the same models otherwise).
AUTO_NO_HEAD = "auto-nohead"
# "hf-compiled": transformers' documented fast path (static cache, torch.compile'd forward).
HF_COMPILED = "hf-compiled"
PEERS = ("hf", HF_COMPILED, "hf-assisted", "hf-lookup")
# Methods a preset runs only when asked (--methods) or, for hf-compiled, with --compile: their
# compile warm-up costs minutes on a CPU, more than the presets' budgets allow.
OPT_IN = (HF_COMPILED,)
# Row names the bench uses itself: a drafter registered under one of them is not a method.
RESERVED = (BASELINE, *PEERS, "hf-assisted-k", "cache-cold", "cache-warm")
HEADLINE_METHODS = ("baseline", "model", "eagle", "ngram", "auto", "hf", "hf-assisted", "hf-lookup")


@dataclass(frozen=True)
class Method:
    """One of specdec's own methods: the drafter it runs, how K is set, on which workload."""

    name: str
    drafter: str
    k: str  # "none" (baseline), "fixed" (one row per --k) or "auto" (num_draft_tokens="auto")
    workload: str = "main"  # "cache": the cache workload, cold and warm rows at the main K
    needs_model: bool = False  # skipped, with a note, when no draft model is loaded
    needs_head: bool = False  # skipped, with a note, when no EAGLE-3 head is loaded
    no_head: bool = False  # run on a generator without the head (drafter "auto" over the other sources)
    eager: bool = False  # an eager twin ("X-eager", --compile): X on the eager generator beside the compiled one


def specdec_methods() -> dict[str, Method]:
    """specdec's methods by name, in the order they are listed, from the drafter registry as it
    is now (plug-ins included)."""
    from ..drafters import AUTO, NONE, available_drafters, get_drafter_class

    main: list[str] = []
    store: list[str] = []
    needs: dict[str, frozenset] = {}
    for name in available_drafters():
        if name in (AUTO, NONE) or name in RESERVED:
            continue
        needs[name] = frozenset(get_drafter_class(name).needs)
        (store if "store" in needs[name] else main).append(name)
    if CACHE not in store:  # the cache rows stay a method; the runner notes a missing cache drafter
        store.append(CACHE)
    out = {BASELINE: Method(BASELINE, NONE, "none")}
    for name in main:
        out[name] = Method(name, name, "fixed", needs_model="model" in needs[name], needs_head="head" in needs[name])
    out[AUTO] = Method(AUTO, AUTO, "auto")
    if any("head" in n for n in needs.values()):  # "auto" beside the same "auto" without the head
        out.setdefault(AUTO_NO_HEAD, Method(AUTO_NO_HEAD, AUTO, "auto", needs_head=True, no_head=True))
    for name in main:
        # A registered drafter of that name keeps it.
        out.setdefault(name + AUTO_SUFFIX,
                       Method(name + AUTO_SUFFIX, name, "auto", needs_model="model" in needs[name],
                              needs_head="head" in needs[name]))
    for name in store:
        out[name] = Method(name, name, "fixed", workload="cache",
                           needs_model="model" in needs.get(name, frozenset()))
    return out


def eager_base(name: str, specs: dict[str, Method] | None = None) -> str | None:
    """The specdec method that `name` is the eager twin of ("auto-eager" -> "auto"), or None: a
    name without the suffix, whose method is not specdec's, or that is a method itself (a
    registered drafter named "x-eager" keeps its name)."""
    specs = specdec_methods() if specs is None else specs
    if not name.endswith(EAGER_SUFFIX) or name in specs:
        return None
    base = name[: -len(EAGER_SUFFIX)]
    return base if base in specs else None


def with_eager_twins(specs: dict[str, Method], names: tuple[str, ...] | list[str]) -> dict[str, Method]:
    """`specs` plus the eager twins among `names`, each right after its method (so that their rows
    run and print beside each other); only main-workload methods have twins (see validate)."""
    out: dict[str, Method] = {}
    for name, spec in specs.items():
        out[name] = spec
        twin = name + EAGER_SUFFIX
        if twin in names and twin not in specs and spec.workload == "main":
            out[twin] = replace(spec, name=twin, eager=True)
    return out


def ours_methods() -> tuple[str, ...]:
    """The names of specdec's own methods (see specdec_methods)."""
    return tuple(specdec_methods())


def all_methods() -> tuple[str, ...]:
    """Every name --methods accepts: specdec's own, then transformers' (PEERS)."""
    return ours_methods() + PEERS


def default_methods() -> tuple[str, ...]:
    """What a preset that runs "every method" runs: all_methods() less the OPT_IN ones."""
    return tuple(m for m in all_methods() if m not in OPT_IN)


def __getattr__(name: str):
    # OURS and ALL_METHODS are read from the registry at each access (plug-ins register late).
    if name == "OURS":
        return ours_methods()
    if name == "ALL_METHODS":
        return all_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Preset:
    """Defaults that --preset NAME (--full, --quick: --preset full, quick) or the plain command
    choose between."""

    num_draft_tokens: tuple[int, ...]
    max_new_tokens: int
    num_prompts: int
    repeats: int
    cache_prompts: int
    method_names: tuple[str, ...] | None  # None: every method but OPT_IN (default_methods(), plug-ins included)
    target: str | None = None  # None: the bundled pair (specdec.loading names the real models)
    workload: str | None = None  # a name in specdec.workload.WORKLOADS; None: the default (stdlib)
    description: str = ""  # one line for --help

    @property
    def methods(self) -> tuple[str, ...]:
        return default_methods() if self.method_names is None else self.method_names


# The real-model presets. Without --draft the "model" and "hf-assisted" rows are dropped with a
# note; with one they run too (about 1.5x the time). Duration on a 2-core CPU, one torch thread,
# from decoding speed alone: every method is counted at the slowest plain-decoding speed, which
# overestimates the drafting rows.
#   smollm2: SmolLM2-135M decodes 20-40 tokens/s there. Without a draft, 10 rows (greedy:
#     baseline, hf, auto, ngram, hf-lookup; the same sampled) x (4 prompts x 3 repeats + 1
#     warm-up) = 130 generations x at most 64 new tokens = 8,320 tokens: 210-420 s, plus
#     prefills of about 130 HumanEval tokens (under 0.2 s each, 25 s) and about 30 s of loading
#     and forward-cost measurement: 4.5 to 8 minutes, under the 10-minute bound.
#   gemma3: Gemma 3 270M reads twice SmolLM2's weights per token (its output layer over a
#     262k-token vocabulary alone has 168M), about 10-20 tokens/s; grounded prompts run to
#     150-400 tokens. 10 rows x (4 prompts x 2 repeats + 1) = 90 generations x at most 64 new
#     tokens = 5,760 tokens: 290-580 s, plus 90 prefills of up to a second (logits at the last
#     position only) and about a minute of loading: 7 to 12 minutes.
PRESETS = {
    "headline": Preset((4,), 128, 4, 3, 4, HEADLINE_METHODS,
                       description="bundled pair on stdlib, 4 prompts x 128 tokens x 3 repeats (the default)"),
    "full": Preset((4, 2, 6, 8), 128, 16, 3, 4, None,
                   description="adds the K sweep (4,2,6,8), the cache workload and 16 prompts"),
    "quick": Preset((4,), 32, 3, 1, 1, None, description="a smoke run, 3 prompts x 32 tokens, one repeat"),
    "smollm2": Preset((4,), 64, 4, 3, 4, HEADLINE_METHODS, target="smollm2-135m", workload="humaneval",
                      description="SmolLM2-135M on HumanEval, 4 prompts x 64 tokens x 3 repeats "
                                  "(under 10 min on a 2-core CPU)"),
    "gemma3": Preset((4,), 64, 4, 2, 4, HEADLINE_METHODS, target="gemma3-270m", workload="grounded",
                     description="Gemma 3 270M on the grounded tasks, 4 prompts x 64 tokens x 2 repeats "
                                 "(about 7-12 min on a 2-core CPU)"),
}


@dataclass
class BenchConfig:
    """Validated `specdec bench` settings (see cli.py for the options)."""

    target: str
    draft: str | None
    out: Path
    device: str | None = None
    dtype: str | None = None
    device_map: str | None = None
    head: str = "default"  # the EAGLE-3 head: a folder, "none", or "default" (the one shipped for the target)
    numerics: str = "native"  # specdec.numerics: "stable" = float32 final norm and LM head, eager attention
    compile: bool = False  # specdec's methods on a generator built with compile=True (specdec.compiled)
    num_draft_tokens: list[int] = field(default_factory=lambda: [4])  # first value = main K
    max_new_tokens: int = 128
    num_prompts: int = 4
    repeats: int = 3
    warmup: bool = True
    prompts_file: str | None = None
    workload: str | None = None  # a named workload (specdec.workload.WORKLOADS); None: stdlib or prompts_file
    seed: int = 0
    temperature: float = 0.8  # the sampled setting
    settings: tuple[str, ...] = SETTINGS
    methods: tuple[str, ...] = HEADLINE_METHODS
    cache_url: str = "memory://specdec-bench"
    cache_prompts: int = 4  # originals in the cache workload (x3 with repeats and near-duplicates)
    threads: int | None = None  # None: 1 on CPU (see runner.apply_threads), torch's choice on GPU
    preset: str = "headline"
    progress: bool = True
    command: str = ""

    @classmethod
    def from_preset(cls, name: str = "headline", *, out: Path, target: str | None = None, draft: str | None = None,
                    **options) -> BenchConfig:
        """The settings of preset `name`, with every option given here (not None) in place of the
        preset's value: the way `specdec bench --preset NAME [options]` builds its config.

        `target` defaults to the preset's model (the real-model presets name one); `prompts_file`
        replaces the preset's workload rather than clashing with it (an explicit `workload` and
        `prompts_file` together still do: validate() refuses them). With `compile` and no
        explicit `methods`, the preset's methods gain hf-compiled: compiled specdec is held
        against transformers compiled, not only against its eager `hf`.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        preset = PRESETS[name]
        target = target or preset.target
        if target is None:
            raise ValueError(f"preset {name!r} names no target model; pass one")
        given = {key: value for key, value in options.items() if value is not None}
        values = dict(
            num_draft_tokens=list(preset.num_draft_tokens), max_new_tokens=preset.max_new_tokens,
            num_prompts=preset.num_prompts, repeats=preset.repeats, cache_prompts=preset.cache_prompts,
            methods=preset.methods,
        )
        if "prompts_file" not in given:
            values["workload"] = preset.workload
        if given.get("compile") and "methods" not in given and HF_COMPILED not in preset.methods:
            values["methods"] = (*preset.methods, HF_COMPILED)
        values.update(given)
        return cls(target=target, draft=draft, out=Path(out), preset=name, **values)

    @property
    def main_k(self) -> int:
        return self.num_draft_tokens[0]

    def validate(self) -> None:
        """Every check that does not need the models; ValueError with the fix."""
        from ..params import MAX_DRAFT_TOKENS

        ks = self.num_draft_tokens
        if not ks:
            raise ValueError("--num-draft-tokens needs at least one value, e.g. 4 or 2,4,8")
        for k in ks:
            if not 1 <= k <= MAX_DRAFT_TOKENS:
                raise ValueError(f"--num-draft-tokens values must be in 1..{MAX_DRAFT_TOKENS}, got {k}")
        if len(set(ks)) != len(ks):
            raise ValueError(f"--num-draft-tokens has repeated values: {ks}")
        if self.workload is not None and self.prompts_file is not None:
            raise ValueError(f"pass either --workload ({self.workload}) or --prompts ({self.prompts_file}), not "
                             "both: --workload names a built-in prompt set, --prompts reads your own file")
        if self.workload is not None:
            from ..workload import get_workload

            get_workload(self.workload)  # an unknown name fails now, listing the names
        for name in ("max_new_tokens", "num_prompts", "repeats", "cache_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        from ..params import MAX_SEED

        # Seeds of the run: seed + repeat * prompts + prompt, on the main and the cache workload.
        last_seed = self.seed + self.repeats * (self.num_prompts + 3 * self.cache_prompts)
        if self.seed < 0 or last_seed > MAX_SEED:
            raise ValueError(
                f"--seed must be >= 0 and leave room for the run's seeds (up to seed + {last_seed - self.seed}, "
                f"below 2**63), got {self.seed}"
            )
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"--temperature (the sampled setting) must be > 0, got {self.temperature}")
        if not self.settings:
            raise ValueError(f"--settings needs at least one of {', '.join(SETTINGS)}")
        for s in self.settings:
            if s not in SETTINGS:
                raise ValueError(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
        specs = specdec_methods()  # read now: plug-in drafters are registered by the time a run is checked
        known = (*specs, *PEERS)
        for m in self.methods:
            if m in known:
                continue
            base = eager_base(m, specs)
            if base is None:
                raise ValueError(f"unknown method {m!r}; choose from {', '.join(known)} (with --compile, also "
                                 f"X{EAGER_SUFFIX} for specdec's method X)")
            if specs[base].workload != "main":
                raise ValueError(f"method {m!r}: the {base} rows run on the cache workload, which has no eager "
                                 "twin; name the main-workload methods (baseline, model, ngram, auto, ...)")
            if not self.compile:
                raise ValueError(f"method {m!r} needs --compile: it runs {base} on an eager generator beside the "
                                 f"compiled one, and without --compile {base} is already eager")
        if "baseline" not in self.methods:
            raise ValueError("--methods must include baseline: every speedup is measured against it")
        if self.device is not None and self.device_map is not None:
            raise ValueError("pass either --device or --device-map, not both")
        if self.device is not None:
            check_device(self.device)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.cache_url is not None:
            from ..cache.config import parse_cache_url

            # Checked even when no cache row runs: a URL given is a URL meant, and a typo in it
            # must not pass silently (nor fail only after the models load).
            parse_cache_url(self.cache_url)
        check_out(self.out)


def check_out(out: Path) -> None:
    """ValueError unless the results can be written under `out`, checked before the run (which
    writes them only at its end) without leaving anything behind: `out` is a folder, or can be
    created as one, and a file can be created in it (or in the folder that will hold it)."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    base = out
    while not base.exists():  # the nearest folder that exists: where the first mkdir happens
        if base.parent == base:
            break
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"--out {str(out)!r} cannot be created: {str(base)!r} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".specdec-bench-"):
            pass
    except OSError as exc:
        raise ValueError(
            f"--out {str(out)!r} is not writable ({exc.strerror or exc}); pass a folder you can write to"
        ) from None
    if base == out:
        for name in ("results.json", "results.csv", "results.md"):
            if (out / name).exists() and not os.access(out / name, os.W_OK):
                raise ValueError(
                    f"--out {str(out)!r}: {name} is there and not writable; remove it or pass another folder"
                )


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
