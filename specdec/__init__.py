"""specdec: speculative decoding for Hugging Face causal language models.

    from specdec import SpeculativeGenerator
    gen = SpeculativeGenerator.from_pretrained("bundled")   # or hub ids / local paths
    result = gen.generate("def fibonacci(n):", max_new_tokens=64, stop=["\\n\\n"])[0]
"""

from .generator import SpeculativeGenerator, check_vocab_compatible
from .loading import bundled_pair
from .params import MAX_DRAFT_TOKENS, GenerationParams
from .real_models import list_real_models
from .stats import GenerationResult, GenerationStats

# The package version: pyproject.toml reads it from here, `specdec --version` prints it.
__version__ = "0.1.0"

__all__ = [
    "MAX_DRAFT_TOKENS",
    "GenerationParams",
    "GenerationResult",
    "GenerationStats",
    "SpeculativeGenerator",
    "bundled_pair",
    "check_vocab_compatible",
    "list_real_models",
]
