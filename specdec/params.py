"""Generation parameters and their validation (everything is checked before compute)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# A draft longer than this costs more in wasted draft forwards than it can ever save;
# values above it are almost certainly a typo (e.g. 4000 for 4).
MAX_DRAFT_TOKENS = 64
# The longest draft num_draft_tokens="auto" considers.
AUTO_MAX_DRAFT_TOKENS = 8


@dataclass(frozen=True)
class GenerationParams:
    """One request's decoding settings, resolved and validated."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | tuple[int, ...] | None = None  # one seed for every row, or one per row
    drafter: str = "auto"
    num_draft_tokens: int | str = "auto"  # an int fixes K; "auto" chooses it every step
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    # A row ends when its decoded text contains one of these; the text is cut before it
    # (see specdec.stopping). Part of the response-cache key.
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Built directly (not through make_params) the seed is still held to the range the
        # noise can key on: a seed outside it would sample exactly what another seed samples.
        seed = self.seed
        if seed is None or (type(seed) is int and 0 <= seed <= MAX_SEED):
            return
        for s in seed if isinstance(seed, tuple) else (seed,):
            _check_int("seed", s, minimum=0, maximum=MAX_SEED, hint=SEED_HINT)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adaptive_draft(self) -> bool:
        """True when the draft length is chosen every step (num_draft_tokens="auto")."""
        return self.num_draft_tokens == "auto"

    @property
    def draft_limit(self) -> int:
        """The most drafts a step may verify: K, or the largest K "auto" considers."""
        return AUTO_MAX_DRAFT_TOKENS if self.adaptive_draft else int(self.num_draft_tokens)

    @property
    def deterministic(self) -> bool:
        """True when the same request always yields the same tokens."""
        return self.greedy or self.seed is not None

    def row_seeds(self, batch: int) -> list[int] | None:
        """The seed of each of `batch` rows, or None when unseeded."""
        if self.seed is None:
            return None
        if isinstance(self.seed, int):
            return [self.seed] * batch
        if len(self.seed) != batch:
            raise ValueError(f"seed has {len(self.seed)} entries but there are {batch} prompts; pass one seed per prompt")
        return list(self.seed)

    def for_row(self, index: int, batch: int) -> "GenerationParams":
        """These params as they apply to one row (a per-row seed becomes that row's int)."""
        if self.seed is None or isinstance(self.seed, int):
            return self
        if len(self.seed) != batch:
            self.row_seeds(batch)  # raises the length error
        return replace(self, seed=self.seed[index])

    def for_rows(self, indices: list[int], batch: int) -> "GenerationParams":
        """These params for a subset of the rows."""
        seeds = self.row_seeds(batch)
        if seeds is None or isinstance(self.seed, int):
            return self
        return replace(self, seed=tuple(seeds[i] for i in indices))


def _check_int(name: str, value, *, minimum: int, hint: str, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}; {hint}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; {hint}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}; {hint}")
    return value


# Seeds key the counter-based noise as int64 (specdec.noise): a larger seed would be
# reduced modulo 2**63 and sample exactly what a smaller one samples.
MAX_SEED = (1 << 63) - 1
SEED_HINT = "pass an int in [0, 2**63), a list of them (one per prompt), or None"


def _check_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


# Names transformers users type, with what to use here instead (None: accepted and mapped
# by make_params). Anything else unknown gets the list of options.
_REFUSED = {
    "max_length": "max_length counts the prompt's tokens too; pass max_new_tokens= (new tokens only)",
    "min_length": "not supported; there is no minimum length (use ignore_eos=True to run to max_new_tokens)",
    "min_new_tokens": "not supported; use ignore_eos=True to always generate max_new_tokens tokens",
    "stop_strings": "pass stop=[...] (a list of strings)",
    "num_beams": "beam search is not supported: speculative decoding here is greedy or sampling",
    "num_return_sequences": "not supported; pass the prompt several times in the list of prompts",
    "repetition_penalty": "not supported: it would change the target's distribution that drafts are verified against",
    "no_repeat_ngram_size": "not supported: it would change the target's distribution that drafts are verified against",
    "min_p": "not supported; use top_k= or top_p=",
    "typical_p": "not supported; use top_k= or top_p=",
    "assistant_model": "load the draft with SpeculativeGenerator.from_pretrained(target, draft) and pass drafter=\"model\"",
    "prompt_lookup_num_tokens": "pass drafter=\"ngram\" and num_draft_tokens=",
    "num_assistant_tokens": "pass num_draft_tokens=",
    "pad_token_id": "not needed: each row decodes with its own length, nothing is padded",
    "attention_mask": "not needed: pass each prompt's own token ids (generate_ids) and nothing is padded",
    "streamer": "use SpeculativeGenerator.stream(prompt, ...) for text as it is accepted",
}
_GENERATION_CONFIG_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                             "stop_strings")
# GenerationConfig.to_diff_dict() always lists these; they say nothing about decoding.
_GENERATION_CONFIG_IGNORED = ("transformers_version", "_from_model_config", "bos_token_id", "pad_token_id")


def make_params(**kwargs) -> GenerationParams:
    """Validate user-facing generation arguments and return GenerationParams.

    Options: max_new_tokens, temperature, top_k, top_p, seed, drafter, num_draft_tokens,
    stop_token_ids, stop, ignore_eos. transformers habits are mapped: do_sample=True means
    temperature 1.0 unless a temperature is given (do_sample=False: greedy),
    eos_token_id adds stop token ids, generation_config=GenerationConfig(...) supplies
    these same fields (explicit keyword arguments win). Other transformers options raise
    with the name to use instead.
    """
    kwargs = _map_transformers_habits(kwargs)
    unknown = sorted(set(kwargs) - set(_OPTIONS))
    if unknown:
        name = unknown[0]
        if name in _REFUSED:
            raise TypeError(f"{name}={kwargs[name]!r} is not a specdec option: {_REFUSED[name]}")
        raise TypeError(f"unknown generation option {name!r}; allowed: {', '.join(_OPTIONS)}")
    return _make_params(**kwargs)


_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "drafter", "num_draft_tokens",
            "stop_token_ids", "stop", "ignore_eos")


def _map_transformers_habits(kwargs: dict) -> dict:
    """do_sample / eos_token_id / generation_config -> specdec's own options."""
    kwargs = dict(kwargs)
    config = kwargs.pop("generation_config", None)
    if config is not None:
        to_diff = getattr(config, "to_diff_dict", None)
        if to_diff is None:
            raise TypeError(
                f"generation_config must be a transformers GenerationConfig, got {type(config).__name__}"
            )
        for name, value in to_diff().items():
            if name in _GENERATION_CONFIG_IGNORED or value is None:
                continue
            if name not in _GENERATION_CONFIG_FIELDS:
                hint = _REFUSED.get(name, "not supported by specdec")
                raise ValueError(
                    f"generation_config sets {name}={value!r}: {hint}. Supported fields: "
                    f"{', '.join(_GENERATION_CONFIG_FIELDS)}"
                )
            target = "stop" if name == "stop_strings" else name
            kwargs.setdefault(target, value)
    if "do_sample" in kwargs:
        do_sample = kwargs.pop("do_sample")
        if not isinstance(do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__} {do_sample!r}")
        temperature = kwargs.get("temperature")
        if do_sample and temperature is None:
            kwargs["temperature"] = 1.0  # transformers' default when sampling
        elif do_sample and temperature == 0:
            raise ValueError("do_sample=True with temperature=0 is contradictory; temperature 0 means greedy here")
        elif not do_sample and temperature not in (None, 0, 0.0):
            raise ValueError(
                f"do_sample=False with temperature={temperature!r} is contradictory; here temperature=0 is greedy "
                "and temperature>0 samples: drop do_sample and pass only temperature"
            )
        elif not do_sample:
            kwargs["temperature"] = 0.0
    if "eos_token_id" in kwargs:
        eos = kwargs.pop("eos_token_id")
        if eos is not None:
            extra = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
            if not isinstance(extra, (list, tuple)):
                raise TypeError(f"eos_token_id must be an int or a list of ints, got {type(eos).__name__} {eos!r}")
            current = kwargs.get("stop_token_ids")
            current = [] if current is None else ([current] if isinstance(current, int) else list(current))
            kwargs["stop_token_ids"] = current + list(extra)
    if kwargs.get("temperature") is None:
        kwargs.pop("temperature", None)
    return kwargs


def _check_stop_token_ids(stop_token_ids) -> tuple[int, ...]:
    if stop_token_ids is None:
        return ()
    if isinstance(stop_token_ids, int) and not isinstance(stop_token_ids, bool):
        stop_token_ids = [stop_token_ids]
    if not isinstance(stop_token_ids, (list, tuple, set, frozenset)):
        raise TypeError(
            f"stop_token_ids must be an int or a list of ints, got {type(stop_token_ids).__name__} "
            f"{stop_token_ids!r}; e.g. stop_token_ids=[tokenizer.eos_token_id]"
        )
    stops = tuple(stop_token_ids)
    for t in stops:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(
                f"stop_token_ids must be non-negative ints, got {list(stops)!r}; e.g. stop_token_ids=[2]"
            )
    return stops


def _check_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise TypeError(f"stop must be a str or a list of str, got {type(stop).__name__} {stop!r}")
    for s in stop:
        if not isinstance(s, str):
            raise TypeError(f"stop must hold strings, got {type(s).__name__} {s!r}; for token ids use stop_token_ids=")
        if not s:
            raise ValueError("stop holds an empty string, which would end every row at once; remove it")
        check_text("stop string", s)
    # Sorted and deduplicated: the same set gives the same cache key.
    return tuple(sorted(set(stop)))


def check_text(what: str, text: str) -> None:
    """ValueError when `text` cannot be encoded as UTF-8 (a lone surrogate, e.g. from a bad decode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} holds a character that is not valid Unicode text ({text[exc.start]!r} at index {exc.start}, "
            "a lone surrogate); fix how the text was decoded, e.g. bytes.decode('utf-8', errors='replace')"
        ) from None


def _make_params(
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    drafter: str = "auto",
    num_draft_tokens: int | str = "auto",
    stop_token_ids=None,
    stop=None,
    ignore_eos: bool = False,
) -> GenerationParams:
    _check_int("max_new_tokens", max_new_tokens, minimum=0, hint="pass the number of tokens to generate")
    temperature = _check_float("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}; use 0 for greedy decoding")
    _check_int("top_k", top_k, minimum=0, hint="use 0 to disable top-k filtering")
    top_p = _check_float("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}; use 1.0 to disable nucleus filtering")
    if isinstance(seed, (list, tuple)):
        for s in seed:
            _check_int("seed", s, minimum=0, maximum=MAX_SEED, hint="pass ints in [0, 2**63), one per prompt")
        seed = tuple(seed)
    elif seed is not None:
        _check_int("seed", seed, minimum=0, maximum=MAX_SEED, hint=SEED_HINT)
    if not isinstance(drafter, str):
        raise TypeError(f"drafter must be a str, got {type(drafter).__name__} {drafter!r}")
    if isinstance(num_draft_tokens, str):
        if num_draft_tokens != "auto":
            raise ValueError(
                f'num_draft_tokens must be an int or "auto", got {num_draft_tokens!r}; "auto" chooses '
                "the draft length every step from measured costs and acceptance"
            )
    elif _check_int(
        "num_draft_tokens", num_draft_tokens, minimum=0, hint='0 disables drafting; "auto" chooses it every step'
    ) > MAX_DRAFT_TOKENS:
        raise ValueError(
            f"num_draft_tokens={num_draft_tokens} is larger than the supported maximum of "
            f"{MAX_DRAFT_TOKENS}; typical values are 2 to 8"
        )
    stops = _check_stop_token_ids(stop_token_ids)
    stop_strings = _check_stop(stop)
    if not isinstance(ignore_eos, bool):
        raise TypeError(f"ignore_eos must be a bool, got {ignore_eos!r}")
    return GenerationParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        drafter=drafter,
        num_draft_tokens=num_draft_tokens,
        stop_token_ids=stops,
        ignore_eos=ignore_eos,
        stop=stop_strings,
    )
