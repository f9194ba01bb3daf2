"""The engine end to end on a CUDA device with a real vocabulary (Llama 3's 128256
tokens: 63 tiles of the verify kernels per row) and Llama-shaped tiny models.

bf16: greedy speculative output must equal baseline bf16 decoding (drafter "none") for
at least 99% of prompts. It is not required for every prompt because the verify forward
runs K+1 tokens where the baseline runs one, and in bf16 that can change a logit by a
rounding step; where the baseline's top two logits are that close, the two paths may
pick different tokens. The failure message gives the rate and, for each differing
prompt, the baseline's top-2 logit gap where the outputs part, so a real bug (a gap
far above bf16 resolution) is told apart from rounding.
fp32: equality for every prompt. The bundled trained pair in bf16: >= 99% as well.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from gpu_support import GPU_MARKS, require_compiled_kernels

pytestmark = GPU_MARKS

DEVICE = "cuda"
VOCAB = 128256
NEW_TOKENS = 24


def _llama(layers: int, hidden: int, seed: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    with torch.device(DEVICE):
        return LlamaForCausalLM._from_config(config, dtype=dtype).eval()


def _prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (count,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _count_kernel_calls(monkeypatch) -> list[int]:
    from specdec.kernels import greedy

    calls: list[int] = []
    original = greedy.verify_greedy_triton
    monkeypatch.setattr(greedy, "verify_greedy_triton", lambda *a, **kw: (calls.append(1), original(*a, **kw))[1])
    return calls


@torch.inference_mode()
def _divergence(target, prompt: list[int], base: list[int], spec: list[int]) -> str:
    """Where two outputs part, and the baseline's top-2 logit gap there (full forward)."""
    i = next(j for j, (a, b) in enumerate(zip(base, spec)) if a != b)
    ids = torch.tensor([prompt + base[:i]], device=DEVICE)
    logits = target(input_ids=ids).logits[0, -1].float()  # [V]
    top = torch.topk(logits, 2)
    gap = float(top.values[0] - top.values[1])
    ulp = float(torch.finfo(torch.bfloat16).eps) * abs(float(top.values[0]))
    return (f"token {i}: baseline {base[i]} vs {spec[i]}, baseline top-2 {top.indices.tolist()}, "
            f"gap {gap:.4g} ({gap / ulp:.2g} bf16 steps)")


@pytest.fixture(scope="module")
def models():
    require_compiled_kernels()
    return {dtype: (_llama(2, 128, 0, dtype), _llama(1, 64, 1, dtype)) for dtype in (torch.bfloat16, torch.float32)}


@pytest.mark.parametrize("draft", ["random", "self"])
@pytest.mark.parametrize("dtype,min_rate", [(torch.bfloat16, 0.99), (torch.float32, 1.0)], ids=["bf16", "fp32"])
def test_engine_greedy_equals_baseline_on_a_128k_vocabulary(models, monkeypatch, draft, dtype, min_rate):
    from specdec import SpeculativeGenerator

    target, random_draft = models[dtype]
    gen = SpeculativeGenerator(target, None, random_draft if draft == "random" else target)
    prompts = _prompts(100, seed=3)
    base = gen.generate_ids(prompts, max_new_tokens=NEW_TOKENS, drafter="none", ignore_eos=True)
    calls = _count_kernel_calls(monkeypatch)
    spec = gen.generate_ids(prompts, max_new_tokens=NEW_TOKENS, drafter="model", num_draft_tokens=4,
                            ignore_eos=True)
    assert calls, "the engine did not verify through the Triton kernel"
    assert all(len(r.token_ids) == NEW_TOKENS for r in spec)
    same = [a.token_ids == b.token_ids for a, b in zip(base, spec)]
    rate = sum(same) / len(same)
    details = [f"prompt {i}: " + _divergence(target, prompts[i], base[i].token_ids, spec[i].token_ids)
               for i, ok in enumerate(same) if not ok]
    accepted = sum(r.stats.accepted_tokens for r in spec) / max(1, sum(r.stats.drafted_tokens for r in spec))
    assert rate >= min_rate, (f"{dtype} greedy output equals baseline for {rate:.1%} of {len(same)} prompts "
                              f"(need {min_rate:.0%}; draft {draft}, acceptance {accepted:.2f}):\n"
                              + "\n".join(details))
    if draft == "self":
        assert accepted > 0.9, f"the target as its own draft accepted only {accepted:.2f} of its drafts"
    print(f"{dtype} draft={draft}: equal to baseline for {rate:.1%} of prompts, acceptance {accepted:.2f}")


def test_bundled_pair_bf16_greedy_equals_baseline(monkeypatch):
    """The bundled trained pair, loaded in bf16 on the GPU, on the bundled held-out prompts."""
    from specdec import SpeculativeGenerator

    require_compiled_kernels()
    assets = resources.files("specdec.assets")
    pair = assets.joinpath("default_pair")
    gen = SpeculativeGenerator.from_pretrained(str(pair.joinpath("target")), str(pair.joinpath("draft")),
                                               device=DEVICE, dtype=torch.bfloat16)
    lines = assets.joinpath("prompts", "stdlib_heldout.jsonl").read_text().splitlines()
    prompts = [list(gen.tokenizer(json.loads(line)["prompt"])["input_ids"]) for line in lines if line.strip()]
    assert len(prompts) >= 50
    base = gen.generate_ids(prompts, max_new_tokens=64, drafter="none")
    calls = _count_kernel_calls(monkeypatch)
    spec = gen.generate_ids(prompts, max_new_tokens=64, drafter="model", num_draft_tokens=4)
    assert calls, "the engine did not verify through the Triton kernel"
    same = [a.token_ids == b.token_ids for a, b in zip(base, spec)]
    rate = sum(same) / len(same)
    details = [f"prompt {i}: " + _divergence(gen.target_model, prompts[i], base[i].token_ids, spec[i].token_ids)
               for i, ok in enumerate(same) if not ok and base[i].token_ids and spec[i].token_ids]
    accepted = sum(r.stats.accepted_tokens for r in spec) / max(1, sum(r.stats.drafted_tokens for r in spec))
    assert rate >= 0.99, (f"bundled pair, bf16: greedy output equals baseline for {rate:.1%} of {len(same)} prompts "
                          f"(acceptance {accepted:.2f}):\n" + "\n".join(details))
    print(f"bundled pair bf16: equal to baseline for {rate:.1%} of prompts, acceptance {accepted:.2f}")
