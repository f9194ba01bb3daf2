"""Per-position acceptance, the benchmark's most detailed number, against hand computation.

A drafter that knows the target's greedy continuation and is wrong at one chosen draft
slot gives an acceptance pattern that can be written down before running anything.
"""

from __future__ import annotations

import pytest
import torch

from fixtures_models import make_model
from specdec import GenerationStats, SpeculativeGenerator
from specdec.drafters import Drafter, pack_proposals, register_drafter

VOCAB = 40
PROMPT = [3, 1, 4, 1, 5]
NEW = 12
K = 4
WRONG_SLOT = 2  # 0-based: the third draft of every step is wrong


def test_record_step_by_hand():
    s = GenerationStats()
    s.record_step(drafted=4, accepted=2, emitted=3)  # slots 1-2 accepted, 3 rejected, 4 never checked
    s.record_step(drafted=4, accepted=0, emitted=1)
    s.record_step(drafted=2, accepted=2, emitted=3)  # fewer drafts near the end
    assert s.drafted_per_position == [3, 3, 2, 2]
    assert s.accepted_per_position == [2, 2, 0, 0]
    assert s.per_position_acceptance == [2 / 3, 2 / 3, 0.0, 0.0]
    assert s.acceptance_rate == pytest.approx(4 / 10)
    assert s.mean_accepted_length == pytest.approx(7 / 3)
    assert s.target_forwards == 3 and s.new_tokens == 7


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return make_model("llama", VOCAB, seed=0)


class _OracleWrongAtOneSlot(Drafter):
    """Drafts the target's own greedy continuation, except a wrong token at WRONG_SLOT."""

    full: list[int] = []  # prompt + greedy continuation, set by the test

    def propose(self, state, k: int, early_stop=None):
        rows = []
        for seq in state.sequences:
            n = len(seq)
            draft = list(self.full[n:n + k])
            if len(draft) > WRONG_SLOT:
                draft[WRONG_SLOT] = (draft[WRONG_SLOT] + 1) % VOCAB  # never the argmax
            rows.append(draft)
        return pack_proposals(rows, k, self.context.device)


def test_per_position_acceptance_with_a_draft_right_at_some_slots_only(target):
    gen = SpeculativeGenerator(target, None)
    plain = gen.generate_ids([PROMPT], max_new_tokens=NEW + K, drafter="none", ignore_eos=True)[0].token_ids
    _OracleWrongAtOneSlot.full = PROMPT + plain
    register_drafter("test-oracle-wrong-slot")(_OracleWrongAtOneSlot)
    r = gen.generate_ids([PROMPT], max_new_tokens=NEW, drafter="test-oracle-wrong-slot", num_draft_tokens=K,
                         ignore_eos=True)[0]
    assert r.token_ids == plain[:NEW]  # lossless, whatever the drafts
    # By hand: each full step accepts slots 1-2, rejects slot 3 (slot 4 is drafted but never reached)
    # and emits 3 tokens: 12 -> 9 -> 6 -> 3 remaining. With 3 left the engine drafts only 2 (it never
    # drafts past max_new_tokens), both right, plus the bonus token: 4 steps, 12 tokens.
    s = r.stats
    assert s.target_forwards == 4
    assert s.drafted_per_position == [4, 4, 3, 3]
    assert s.accepted_per_position == [4, 4, 0, 0]
    assert s.per_position_acceptance == [1.0, 1.0, 0.0, 0.0]
    assert s.acceptance_rate == pytest.approx(8 / 14)
    assert s.mean_accepted_length == pytest.approx(3.0)
