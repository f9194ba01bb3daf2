"""What `specdec bench` runs: one callable per method, each decoding one prompt.

  baseline       specdec, drafter "none" (plain autoregressive decoding, same loop)
  model          specdec, draft model, K drafts per step
  ngram          specdec, prompt-lookup drafter
  X              specdec, any other registered drafter X (a plug-in), K drafts per step
  X-auto         specdec, drafter X with num_draft_tokens="auto" (model-auto, ngram-auto, ...)
  auto           specdec, drafter "auto" with num_draft_tokens="auto" (where the engine has it)
  cache-cold     specdec, draft-token store drafter, store empty at the start
  cache-warm     specdec, draft-token store drafter, store filled by the cold pass
  hf             transformers `generate`
  hf-assisted    `generate(assistant_model=draft)`, transformers' own drafting defaults
  hf-assisted-k  same, K assistant tokens per step, no confidence stop (specdec's policy)
  hf-lookup      `generate(prompt_lookup_num_tokens=K)`

Each call returns a Sample: the new tokens, the wall time and the counters the
report needs (target and draft forwards, drafted and accepted tokens per position).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..drafters import reads_draft_model

Execute = Callable[[list[int], int], "Sample"]  # (prompt ids, seed) -> Sample


@dataclass
class Sample:
    """One prompt decoded by one method."""

    tokens: list[int]
    seconds: float
    target_forwards: int | None = None
    draft_forwards: int | None = None
    drafted: int | None = None
    accepted: int | None = None
    drafted_per_position: list[int] = field(default_factory=list)  # [K] drafts offered at slot i
    accepted_per_position: list[int] = field(default_factory=list)  # [K] drafts accepted at slot i
    draft_lengths: dict[int, int] = field(default_factory=dict)  # drafts offered in a step -> steps
    drafter_steps: dict[str, int] = field(default_factory=dict)  # drafter that drafted a step -> steps
    cache_hit: bool = False


@dataclass
class Run:
    """One row of the table: a method in one setting on one workload."""

    setting: str
    workload: str
    method: str
    k: int | None
    execute: Execute
    uses_draft_model: bool = False  # its drafting costs draft-model forwards (the bound's k*c term)
    group: str = ""  # runs of one group always run back to back, in order
    before_repeat: Callable[[int], None] | None = None  # called with the repeat index
    samples: list[list[Sample]] = field(default_factory=list)  # [repeat][prompt], complete repeats only


def specdec_uses_draft_model(drafter: str, has_draft_model: bool) -> bool:
    """Whether specdec's `drafter` (a name, "auto" and "none" included) runs the draft model."""
    return reads_draft_model(drafter, has_draft_model)


def auto_k_supported() -> bool:
    """True when the engine accepts num_draft_tokens="auto" (K chosen per row per step)."""
    from ..params import make_params

    try:
        make_params(num_draft_tokens="auto")
    except (TypeError, ValueError):
        return False
    return True


def random_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A model of `model`'s architecture and shape with random weights, on its device and dtype."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    param = next(model.parameters())
    return AutoModelForCausalLM.from_config(model.config).to(device=param.device, dtype=param.dtype).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def specdec_method(gen, drafter: str, k: int | str, *, max_new_tokens: int, temperature: float | None,
                   cache_layer: Any = None) -> Execute:
    """Decode one prompt with SpeculativeGenerator `gen` (temperature None: greedy)."""
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, drafter=drafter, num_draft_tokens=k)
    if temperature is not None:
        kwargs["temperature"] = temperature
    if cache_layer is not None:
        kwargs["cache"] = cache_layer
    device = gen.device
    sampled = temperature is not None

    def execute(ids: list[int], seed: int) -> Sample:
        synchronize(device)
        t0 = time.perf_counter()
        res = gen.generate_ids([ids], seed=seed if sampled else None, **kwargs)[0]
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
            draft_lengths=dict(s.draft_lengths),
            drafter_steps=dict(s.drafter_steps),
            cache_hit=bool(s.cache_hit),
        )

    return execute


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


def hf_method(target, draft, *, eos: list[int], pad: int, max_new_tokens: int, temperature: float | None,
              lookup_k: int | None = None, assistant_k: int | None = None) -> Execute:
    """Decode one prompt with transformers' `generate` (assisted when `draft` is given)."""
    device = target.get_input_embeddings().weight.device
    sampled = temperature is not None
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=sampled, pad_token_id=pad, eos_token_id=eos or None,
    )
    if sampled:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
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
            if t in eos:
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


@torch.inference_mode()
def forward_ms(model, context: list[int], n_tokens: int, reps: int) -> list[float]:
    """Milliseconds of each of `reps` forwards of `n_tokens` new tokens after a KV cache of `context`
    (three untimed forwards first)."""
    from transformers import DynamicCache

    from ..kv import cache_keyword

    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([context], device=device)
    cache = DynamicCache()
    kw = cache_keyword(model)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{kw: cache})
    new = torch.tensor([context[:n_tokens]], device=device)
    mask = torch.ones(1, len(context) + n_tokens, dtype=torch.long, device=device)
    positions = torch.arange(len(context), len(context) + n_tokens, device=device).unsqueeze(0)
    times = []
    for _ in range(reps + 3):
        synchronize(device)
        t0 = time.perf_counter()
        model(input_ids=new, attention_mask=mask, position_ids=positions, use_cache=True, **{kw: cache})
        synchronize(device)
        times.append(time.perf_counter() - t0)
        cache.crop(-n_tokens)
    return [t * 1e3 for t in times[3:]]

