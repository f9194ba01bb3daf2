"""Numerics modes (specdec.numerics): "stable" computes the final norm and LM head in float32.

The property that matters: in bfloat16, a "stable" generator's greedy tokens are the
argmax of float32 logits computed from the target's own (bfloat16) last hidden states,
so logits are never rounded onto a tie; "native" is untouched; float32 models are the
same in both modes; the mode is part of the cache key.
"""

from __future__ import annotations

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.numerics import final_norm, stable_head
from fixtures_models import make_model


def _bf16_target(seed: int = 3, vocab: int = 320):
    return make_model("llama", vocab, seed).to(torch.bfloat16).eval()


def _near_tied_target(seed: int, vocab: int = 320):
    """A bfloat16 model whose head rows come in pairs a hair apart (one weight one step up):
    each pair's logits differ far below a bfloat16 step, so rounded to bfloat16 they tie
    (argmax takes the first) while float32 picks by the sign of the hair: a near-tie at
    every greedy step, as real vocabularies have now and then."""
    model = _bf16_target(seed, vocab)
    with torch.no_grad():
        w = model.lm_head.weight  # [V, H] bfloat16
        w[1::2] = w[0::2]
        w[1::2, 0] = (w[0::2, 0].float() * (1 + 2**-7)).to(torch.bfloat16)
    return model


def _float32_head_argmax(model, ids: list[int]) -> int:
    """The next token by a float32 final norm + head over the model's last block output (by hand)."""
    captured = {}
    norm = model.model.norm
    handle = norm.register_forward_hook(lambda m, args, out: captured.setdefault("h", args[0]))
    with torch.no_grad():
        model(torch.tensor([ids]))
    handle.remove()
    h = captured["h"][0, -1].float()  # the final norm's input: what the blocks computed, in bfloat16
    h = norm.weight.float() * (h * torch.rsqrt(h.pow(2).mean() + norm.variance_epsilon))
    return int((model.lm_head.weight.float() @ h).argmax())


def test_stable_head_finds_the_final_norm_and_head():
    model = _bf16_target()
    assert final_norm(model) is model.model.norm
    head = stable_head(model)
    assert head.active and head.head is model.lm_head
    assert stable_head(model) is head  # made once per model


def test_stable_logits_are_float32_and_native_untouched():
    model = _bf16_target()
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        native = model(ids).logits
        with stable_head(model).applied():
            stable = model(ids).logits
        after = model(ids).logits
    assert native.dtype == torch.bfloat16 and after.dtype == torch.bfloat16
    assert stable.dtype == torch.float32
    assert torch.equal(native, after)  # the patch is gone outside the block
    assert "forward" not in vars(model.lm_head) and "forward" not in vars(model.model.norm)


def test_stable_greedy_follows_float32_head_in_bfloat16(tiny_tokenizer):
    """The first greedy token (the prefill's, one forward over the prompt as by hand) of the
    stable mode is the float32 head's argmax on every prompt; the native mode's logits are
    rounded to bfloat16, tie, and take the pair's first token where float32 takes the second."""
    model = _near_tied_target(seed=11)
    stable = SpeculativeGenerator(model, tiny_tokenizer, numerics="stable")
    native = SpeculativeGenerator(model, tiny_tokenizer)
    prompts = [[1, t, (t * 7) % 300 + 3, (t * 13) % 290 + 5] for t in range(3, 123, 3)]
    expected = [_float32_head_argmax(model, ids) for ids in prompts]
    got = [r.token_ids[0] for r in stable.generate_ids(prompts, max_new_tokens=1, ignore_eos=True)]
    assert got == expected
    nat = [r.token_ids[0] for r in native.generate_ids(prompts, max_new_tokens=1, ignore_eos=True)]
    assert sum(n != e for n, e in zip(nat, expected)) >= 5, "no bfloat16 tie: the test shows nothing"


def test_float32_models_are_the_same_in_both_modes(tiny_tokenizer):
    model = make_model("llama", 320, 5).to(torch.float32).eval()
    prompts = [[1, 7, 9], [1, 30, 31, 32, 33]]
    a = SpeculativeGenerator(model, tiny_tokenizer).generate_ids(prompts, max_new_tokens=10, drafter="ngram")
    b = SpeculativeGenerator(model, tiny_tokenizer, numerics="stable").generate_ids(
        prompts, max_new_tokens=10, drafter="ngram"
    )
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert not stable_head(model).active


def test_copies_follow_weight_updates():
    model = _bf16_target()
    ids = torch.tensor([[1, 5, 9]])
    head = stable_head(model)
    with torch.no_grad(), head.applied():
        before = model(ids).logits
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
        with head.applied():
            after = model(ids).logits
    assert not torch.allclose(before, after)


def test_mode_is_checked_and_keyed(tiny_tokenizer):
    model = _bf16_target()
    with pytest.raises(ValueError, match="numerics must be one of 'native', 'stable'"):
        SpeculativeGenerator(model, tiny_tokenizer, numerics="fast")
    native = SpeculativeGenerator(model, tiny_tokenizer)
    stable = SpeculativeGenerator(model, tiny_tokenizer, numerics="stable")
    assert native.model_fingerprint() != stable.model_fingerprint()
    assert "numerics" not in native.model_fingerprint()  # native keys are what they always were
    with pytest.raises(AttributeError):
        stable.numerics = "native"  # fixed at construction: cache keys carry it


def test_stable_attention_is_eager_inside_and_restored_after():
    model = _bf16_target()
    before = model.config._attn_implementation
    head = stable_head(model)
    with head.applied():
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == before
    with pytest.raises(RuntimeError):
        with head.applied():
            raise RuntimeError("a failing forward")
    assert model.config._attn_implementation == before
    assert "forward" not in vars(model.lm_head)

