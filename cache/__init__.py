"""Caching for specdec: a response cache and a draft-token store over Redis or memory.

    backend.py / redis_backend.py / memory_backend.py   storage behind one interface
    config.py          URL + options -> CacheConfig
    store.py           per-process handle: breaker, write-behind, counters (never raises)
    keys.py            canonical JSON, SHA-256 keys, the Redis key layout
    normalize.py       prompt normalisation (NFKC, whitespace, case folding, chat)
    fingerprint.py     model / tokenizer fingerprints
    codec.py           versioned, size-capped int32 values (never pickle)
    namespace.py       epochs and invalidation (random epoch tokens, signed with a secret; model epochs, key, SCAN flush)
    response_cache.py  whole responses of deterministic requests
    draft_store.py     continuations indexed by hashed token contexts
    cli.py             `specdec cache stats | invalidate | flush`

The glue to the generator is specdec.caching.CacheLayer. Nothing in this package
imports torch.
"""

from .breaker import CircuitBreaker
from .codec import CorruptValue, ValueTooLarge, decode_value, encode_value
from .config import ENV_URL, CacheConfig, default_url, parse_cache_url
from .draft_store import DraftStore
from .fingerprint import fingerprint_id, model_fingerprint, tokenizer_fingerprint
from .keys import SCHEMA_VERSION, canonical_json, canonicalize, digest
from .namespace import Namespace
from .normalize import NORMALIZATION_VERSION, NormalizationOptions, normalize_text, render_prompt
from .response_cache import ResponseCache, ResponseRequest
from .store import CacheStore, get_store, release_store

__all__ = [
    "ENV_URL",
    "NORMALIZATION_VERSION",
    "SCHEMA_VERSION",
    "CacheConfig",
    "CacheStore",
    "CircuitBreaker",
    "CorruptValue",
    "DraftStore",
    "Namespace",
    "NormalizationOptions",
    "ResponseCache",
    "ResponseRequest",
    "ValueTooLarge",
    "canonical_json",
    "canonicalize",
    "decode_value",
    "default_url",
    "digest",
    "encode_value",
    "fingerprint_id",
    "get_store",
    "model_fingerprint",
    "normalize_text",
    "parse_cache_url",
    "release_store",
    "render_prompt",
    "tokenizer_fingerprint",
]
