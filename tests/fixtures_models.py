"""Tiny models and a tiny tokenizer, built and saved in fixtures (no downloads).

Every checkpoint goes through save_pretrained and is loaded back through the same
from_pretrained path users take.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    sys.exit(main())\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé café naïve.\n",
]


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few lines, with bos/eos/pad and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return fast


def llama_config(vocab_size: int, layers: int = 2, hidden: int = 32, positions: int = 256) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def gpt2_config(vocab_size: int, layers: int = 2, hidden: int = 32, positions: int = 256) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def make_model(family: str, vocab_size: int, seed: int, layers: int = 2, hidden: int = 32, positions: int = 256):
    """A randomly initialised tiny causal LM in float64."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(llama_config(vocab_size, layers, hidden, positions))
    elif family == "gpt2":
        model = GPT2LMHeadModel(gpt2_config(vocab_size, layers, hidden, positions))
    else:
        raise ValueError(family)
    # Larger weights than the default init give peaked, input-dependent distributions,
    # so greedy runs exercise many different tokens instead of one repeated argmax.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    return model.to(torch.float64).eval()


def perturbed(model, scale: float, seed: int):
    """A copy of `model` with Gaussian noise added: a draft that agrees only partly."""
    torch.manual_seed(seed)
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for p in copy_.parameters():
            p.add_(torch.randn_like(p) * scale * p.std().clamp(min=1e-3))
    return copy_


@dataclass
class TinyPair:
    family: str
    target: Path  # checkpoint dir with tokenizer
    drafts: dict  # name -> checkpoint dir: "same", "random", "partial"


def save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


def _build_pair(family: str, root: Path, tokenizer) -> TinyPair:
    vocab = len(tokenizer)
    target = make_model(family, vocab, seed=0)
    drafts = {
        "same": save(target, tokenizer, root / "draft-same"),
        "random": save(make_model(family, vocab, seed=1, layers=1), tokenizer, root / "draft-random"),
        "partial": save(perturbed(target, 0.1, seed=2), tokenizer, root / "draft-partial"),
    }
    return TinyPair(family, save(target, tokenizer, root / "target"), drafts)


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_pair(request, tmp_path_factory, tiny_tokenizer) -> TinyPair:
    """Target + three drafts (identical, random, partly agreeing), float64, both families."""
    return _build_pair(request.param, tmp_path_factory.mktemp(f"pair-{request.param}"), tiny_tokenizer)


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory, tiny_tokenizer) -> TinyPair:
    return _build_pair("llama", tmp_path_factory.mktemp("pair-llama-only"), tiny_tokenizer)


@pytest.fixture(params=["static", "generic"])
def engine_path(request, monkeypatch) -> str:
    """Run a test on both engine paths (generators built without engine= take this one)."""
    import specdec.generator

    monkeypatch.setattr(specdec.generator, "DEFAULT_ENGINE", request.param)
    return request.param
