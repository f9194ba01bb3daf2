"""Drafter registry and the n-gram index."""

from __future__ import annotations

import pytest

from specdec.drafters import available_drafters, get_drafter_class, pack_proposals
from specdec.drafters.ngram import NgramIndex


def test_registry_names():
    names = available_drafters()
    for name in ("model", "ngram", "none", "auto"):
        assert name in names
    assert get_drafter_class("ngram").name == "ngram"
    with pytest.raises(ValueError, match="unknown drafter 'beam'"):
        get_drafter_class("beam")


def test_ngram_proposes_what_followed_the_latest_match():
    seq = [1, 2, 3, 9, 1, 2, 4, 5, 1, 2]
    index = NgramIndex(1, 3)
    assert index.propose(seq, 3) == [4, 5, 1]  # "1 2" last seen at 4..5, followed by 4 5 1


def test_ngram_prefers_longer_matches():
    seq = [3, 2, 9, 9, 7, 2, 5, 5, 3, 2]
    index = NgramIndex(1, 3)
    assert index.propose(seq, 2) == [9, 9]  # "3 2" (at 0..1) beats the later bare "2" (at 5)


def test_ngram_no_match_and_growth():
    index = NgramIndex(1, 2)
    seq = [1, 2, 3]
    assert index.propose(seq, 4) == []
    seq += [1]
    assert index.propose(seq, 4) == [2, 3, 1, 2]  # the copy runs on over its own output
    seq += [2]
    assert index.propose(seq, 2) == [3, 1]


def test_ngram_repeating_pattern_gives_full_drafts():
    seq = [9, 4, 5, 4, 5, 4, 5]  # period 2; the latest earlier "4 5" ends one period back
    assert NgramIndex(1, 3).propose(seq, 6) == [4, 5, 4, 5, 4, 5]


def test_drafter_can_ask_for_the_targets_hidden_states(monkeypatch):
    """A drafter that sets reads_hidden_states reads the target's last hidden states after
    each step; other drafters get None (the target forward does not produce them)."""
    from fixtures_models import make_model
    from specdec import SpeculativeGenerator
    from specdec import drafters
    from specdec.drafters import Drafter, empty_proposal

    seen: dict[str, list] = {"probe": [], "plain": []}

    def make(name: str, wants: bool):
        class Probe(Drafter):
            reads_hidden_states = wants

            def propose(self, state, k, early_stop=None):
                return empty_proposal(state.batch_size, state.device)

            def observe(self, state):
                hidden = state.target_hidden
                seen[name].append(None if hidden is None else tuple(hidden.shape))

        monkeypatch.setitem(drafters._REGISTRY, name, Probe)

    make("probe", True)
    make("plain", False)
    model = make_model("llama", 64, seed=0, hidden=32)
    gen = SpeculativeGenerator(model, None)
    base = gen.generate_ids([[5, 6, 7], [9]], max_new_tokens=4, drafter="none", ignore_eos=True)
    for name in ("probe", "plain"):
        res = gen.generate_ids([[5, 6, 7], [9]], max_new_tokens=4, drafter=name, ignore_eos=True)
        assert [r.token_ids for r in res] == [r.token_ids for r in base]
    assert seen["probe"] == [(2, 1, 32)] * 4
    assert seen["plain"] == [None] * 4


def test_pack_proposals_cuts_rows_longer_than_k():
    """The planner packs free offers at the length the draft model reached, which an early
    stop can make shorter than the offers: every row is cut to k."""
    proposal = pack_proposals([[5, 6, 7, 8, 9], [], [1, 2]], 3)
    assert proposal.tokens.tolist() == [[5, 6, 7], [-1, -1, -1], [1, 2, -1]]
    assert proposal.num_draft.tolist() == [3, 0, 2] and proposal.host_num_draft == [3, 0, 2]
    assert proposal.host_rows == [[5, 6, 7], [], [1, 2]]
    assert pack_proposals([[], []], 3).tokens.shape == (2, 0)
