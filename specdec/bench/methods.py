"""What `specdec bench` runs: one callable per method, each decoding one prompt.

  baseline       specdec, drafter "none" (plain autoregressive decoding, same loop)
  model          specdec, draft model, K drafts per step
  ngram          specdec, prompt-lookup drafter
  X              specdec, any other registered drafter X (a plug-in), K drafts per step
  X-auto         specdec, drafter X with num_draft_tokens="auto" (model-auto, ngram-auto, ...)
  auto           specdec, drafter "auto" with num_draft_tokens="auto" (where the engine has it)
  X-eager        --compile: specdec's method X on an eager generator sharing the compiled one's models
  cache-cold     specdec, draft-token store drafter, store empty at the start
  cache-warm     specdec, draft-token store drafter, store filled by the cold pass
  hf             transformers `generate`
  hf-compiled    `generate(cache_implementation="static")` with the forward through torch.compile
  hf-assisted    `generate(assistant_model=draft)`, transformers' own drafting defaults
  hf-assisted-k  same, K assistant tokens per step, no confidence stop (specdec's policy)
  hf-lookup      `generate(prompt_lookup_num_tokens=K)`

Each call returns a Sample: the new tokens, the wall time and the counters the
report needs (target and draft forwards, drafted and accepted tokens per position).
A method that compiles (hf-compiled; specdec's under --compile) is warmed before any timed
call: Run.prepare for hf-compiled, SpeculativeGenerator.warmup() for specdec's; the seconds
go to Run.warmup_s, apart from the timings.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager, nullcontext
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
    # Compile warm-up: called once with every prompt the run decodes, before any of its timed
    # (or warm-up pass) calls; returns the seconds it took, which go to warmup_s.
    prepare: Callable[[list[list[int]]], float] | None = None
    warmup_s: float | None = None  # compile warm-up seconds, excluded from the timings (None: none)
    # Graphs compiled in each phase: "warmup" (prepare), "warmup_pass", "timed" (see Bench.execute).
    compile_graphs: dict[str, int] | None = None
    # An eager twin ("X-eager", --compile): the method X whose compiled row it runs beside.
    twin_of: str | None = None
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
                   cache_layer: Any = None, graphs: dict[str, int] | None = None) -> Execute:
    """Decode one prompt with SpeculativeGenerator `gen` (temperature None: greedy); `graphs`
    (a compiled generator) counts, under "timed", the graphs compiled during these calls."""
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, drafter=drafter, num_draft_tokens=k)
    if temperature is not None:
        kwargs["temperature"] = temperature
    if cache_layer is not None:
        kwargs["cache"] = cache_layer
    device = gen.device
    sampled = temperature is not None

    def execute(ids: list[int], seed: int) -> Sample:
        before = graphs_compiled() if graphs is not None else 0
        synchronize(device)
        t0 = time.perf_counter()
        res = gen.generate_ids([ids], seed=seed if sampled else None, **kwargs)[0]
        synchronize(device)
        seconds = time.perf_counter() - t0
        if graphs is not None:
            graphs["timed"] = graphs.get("timed", 0) + graphs_compiled() - before
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


def graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledForward:
    """A model's forward through torch.compile, in place on the model only inside `installed()`.

    transformers documents its fast path as `model.forward = torch.compile(model.forward)`
    with a static cache. The bench shares one target between its methods, so the compiled
    forward is an instance attribute only while an hf-compiled call runs: the other methods
    (hf, specdec's) call the model's own forward. One instance per model, shared by the
    greedy and sampled rows, so that they share its graphs.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        # Default mode and options, as documented. transformers' forwards run through one
        # decorator's wrapper, a code object every torch.compile of any model's forward shares,
        # and with it dynamo's recompile limit (8 entries, then eager): isolated (where torch
        # has it), these graphs count neither against a compiled generator's (--compile) nor
        # the reverse.
        isolate = "isolate_recompiles" in inspect.signature(torch.compile).parameters
        self.compiled = torch.compile(model.forward, **({"isolate_recompiles": True} if isolate else {}))

    @contextmanager
    def installed(self) -> Iterator[None]:
        model = self.model
        had_own = "forward" in vars(model)  # an instance forward (a wrapper) comes back as it was
        own = vars(model).get("forward")
        model.forward = self.compiled
        try:
            yield
        finally:
            if had_own:
                model.forward = own
            else:
                del model.forward  # the class's forward shows through again


def hf_method(target, draft, *, eos: list[int], pad: int, max_new_tokens: int, temperature: float | None,
              lookup_k: int | None = None, assistant_k: int | None = None,
              compiled: CompiledForward | None = None, graphs: dict[str, int] | None = None) -> Execute:
    """Decode one prompt with transformers' `generate` (assisted when `draft` is given).

    `compiled`: hf-compiled, transformers' fast path: a static cache and `compiled` installed
    as the target's forward for the call. `graphs` (hf-compiled) counts, under "timed", the
    graphs compiled during these calls: none once hf_compiled_prepare covered the prompts.
    """
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
    if compiled is not None:
        # generate compiles the model's __call__ by itself with a static cache on GPUs; turned
        # off, so that on every device the forward compiled here is the one compiled graph.
        kwargs.update(cache_implementation="static", disable_compile=True)

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
        before = graphs_compiled() if graphs is not None else 0
        try:
            with (
                compiled.installed() if compiled is not None else nullcontext(),
                count_forwards(target) as t_count,
                count_forwards(draft) as d_count,
            ):
                synchronize(device)
                t0 = time.perf_counter()
                out = target.generate(inputs, attention_mask=torch.ones_like(inputs), **kwargs)
                tokens = out[0, len(ids):].tolist()
                seconds = time.perf_counter() - t0
        finally:
            if graphs is not None:
                graphs["timed"] = graphs.get("timed", 0) + graphs_compiled() - before
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


def specdec_compile_prepare(gen, graphs: dict[str, int], shared: dict[str, Any]) -> Callable[[list[list[int]]], float]:
    """The compile warm-up of specdec's rows on a compiled generator (Run.prepare):
    `gen.warmup()`, run once for all rows (`shared` holds its seconds and graphs); every row
    reports those seconds, since each needed that warm-up before its timings."""

    def prepare(prompts: list[list[int]]) -> float:
        if "seconds" not in shared:
            before = graphs_compiled()
            shared["seconds"] = gen.warmup()
            shared["graphs"] = graphs_compiled() - before
        graphs["warmup"] = shared["graphs"]
        graphs["timed"] = 0
        return shared["seconds"]

    return prepare


def hf_compiled_prepare(execute: Execute, graphs: dict[str, int], seed: int) -> Callable[[list[list[int]]], float]:
    """hf-compiled's compile warm-up (Run.prepare): one call of `execute` per distinct prompt
    length among the prompts it is given; returns the seconds spent.

    The static cache is sized prompt + max_new_tokens per call, so its shapes follow the
    prompt's length: the first call compiles the prefill and the decoding step at that
    length, a second length recompiles them with dynamic sizes, and further lengths usually
    reuse those. One call per length covers every shape the timed calls (the same prompts,
    the same max_new_tokens) present, whatever torch decides to specialise. The graphs
    compiled here are counted under graphs["warmup"], and the timed calls' own under
    graphs["timed"] are reset to zero.
    """

    def prepare(prompts: list[list[int]]) -> float:
        before = graphs_compiled()
        t0 = time.perf_counter()
        seen: set[int] = set()
        for ids in prompts:
            if len(ids) not in seen:
                seen.add(len(ids))
                execute(ids, seed)
        graphs["warmup"] = graphs.get("warmup", 0) + graphs_compiled() - before
        graphs["timed"] = 0
        return time.perf_counter() - t0

    return prepare


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

