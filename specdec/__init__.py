"""specdec: speculative decoding for Hugging Face causal language models.

    from specdec import SpeculativeGenerator
    gen = SpeculativeGenerator.from_pretrained("target-id-or-path", "draft-id-or-path")
    result = gen.generate("def fibonacci(n):", max_new_tokens=64)[0]
"""

from .generator import SpeculativeGenerator, check_vocab_compatible
from .params import MAX_DRAFT_TOKENS, GenerationParams
from .stats import GenerationResult, GenerationStats

__version__ = "0.1.0"

__all__ = [
    "MAX_DRAFT_TOKENS",
    "GenerationParams",
    "GenerationResult",
    "GenerationStats",
    "SpeculativeGenerator",
    "check_vocab_compatible",
]
