"""A tiny target/draft pair on disk for the command-line tests (no downloads).

The draft is an exact copy of the target, so with greedy decoding every draft is
accepted: the benchmark's acceptance columns then have a known value to check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

CLI_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "def mul(a, b):\n    return a * b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    sys.exit(main())\n",
]


@dataclass(frozen=True)
class CliPair:
    target: str  # local path of the saved target
    draft: str  # local path of the saved draft (identical weights)
    prompts: str  # a small prompts.jsonl with {"prompt"} and {"turns"} records


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CLI_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    return fast


@pytest.fixture(scope="session")
def cli_pair(tmp_path_factory) -> CliPair:
    """Target and draft (same weights) saved with save_pretrained, plus a prompts file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cli_pair")
    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    paths = {}
    for name in ("target", "draft"):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    prompts = root / "prompts.jsonl"
    records = [
        {"prompt": "def add(a, b):\n    return"},
        {"id": "q2", "turns": ["for i in range(10):", "and then?"]},
        {"prompt": "class Point:\n    def __init__(self, x, y):\n"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    return CliPair(paths["target"], paths["draft"], str(prompts))
