"""compile=True on CUDA: steps replayed as CUDA graphs give the eager path's tokens."""

from __future__ import annotations

import pytest

from gpu_support import GPU_MARKS
from specdec import SpeculativeGenerator

pytestmark = GPU_MARKS

PROMPTS = ["the cat sat on", "a b c d e f g h i j k", "once upon a time there was a"]


@pytest.fixture(scope="module")
def cuda_pair(llama_pair):
    eager = SpeculativeGenerator.from_pretrained(
        llama_pair.target, llama_pair.drafts["partial"], dtype="float32", device="cuda"
    )
    compiled = SpeculativeGenerator(eager.target_model, eager.tokenizer, eager.draft_model, engine="static", compile=True)
    compiled.warmup()
    return eager, compiled


@pytest.mark.parametrize("drafter", ["none", "model", "ngram", "auto"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 20, "seed": [5, 6, 7]}], ids=["greedy", "seeded"])
def test_cuda_graph_steps_give_the_eager_tokens(cuda_pair, drafter, sampling):
    eager, compiled = cuda_pair
    kwargs = dict(max_new_tokens=24, drafter=drafter, ignore_eos=True, **sampling)
    expected = [r.token_ids for r in eager.generate(PROMPTS, **kwargs)]
    assert [r.token_ids for r in compiled.generate(PROMPTS, **kwargs)] == expected
    assert compiled.compile_stats()["graphs"] > 0
