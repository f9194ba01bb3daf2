"""`specdec bench` settings: the methods it knows, the two presets, and validation.

Two presets. The default is the headline: baseline, the draft model and n-gram at
the main K (and "auto" where the engine offers it), against transformers' plain,
assisted and prompt-lookup generation, greedy and sampled, on 4 prompts: under five
minutes on a 2-core CPU. `--full` adds the K sweep, the cache workload and 16
prompts. `--quick` is a smoke run. Any explicit option overrides the preset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

SETTINGS = ("greedy", "sampled")
# Names accepted by --methods. "cache" runs cache-cold and cache-warm on the cache
# workload; "hf-assisted" runs transformers' defaults and, per K, hf-assisted-k.
# --draft random: a draft of the target's own shape with random weights (the useless-draft
# workload: every draft is rejected and each costs a full target forward).
RANDOM_DRAFT = "random"
OURS = ("baseline", "model", "ngram", "auto", "model-auto", "ngram-auto", "cache")
PEERS = ("hf", "hf-assisted", "hf-lookup")
ALL_METHODS = OURS + PEERS
HEADLINE_METHODS = ("baseline", "model", "ngram", "auto", "hf", "hf-assisted", "hf-lookup")


@dataclass(frozen=True)
class Preset:
    """Defaults that --full / --quick / the plain command choose between."""

    num_draft_tokens: tuple[int, ...]
    max_new_tokens: int
    num_prompts: int
    repeats: int
    cache_prompts: int
    methods: tuple[str, ...]


PRESETS = {
    "headline": Preset((4,), 128, 4, 3, 4, HEADLINE_METHODS),
    "full": Preset((4, 2, 6, 8), 128, 16, 3, 4, ALL_METHODS),
    "quick": Preset((4,), 32, 3, 1, 1, ALL_METHODS),
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
    num_draft_tokens: list[int] = field(default_factory=lambda: [4])  # first value = main K
    max_new_tokens: int = 128
    num_prompts: int = 4
    repeats: int = 3
    warmup: bool = True
    prompts_file: str | None = None
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
        for name in ("max_new_tokens", "num_prompts", "repeats", "cache_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"--temperature (the sampled setting) must be > 0, got {self.temperature}")
        if not self.settings:
            raise ValueError(f"--settings needs at least one of {', '.join(SETTINGS)}")
        for s in self.settings:
            if s not in SETTINGS:
                raise ValueError(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
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
        if self.cache_url and "cache" in self.methods:
            from ..cache.config import parse_cache_url

            parse_cache_url(self.cache_url)  # a bad URL fails now, not after the models load


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
