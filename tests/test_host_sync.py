"""Host reads per decode step on the static path: at most 2 per target forward.

Every torch.Tensor method that hands a value to Python (item, tolist, bool/int/float/
index conversions, nonzero, numpy, a copy to the CPU) is wrapped and counted for a
whole generate call (prefill, drafting, verification, bookkeeping and transformers'
own forward code included); the count is compared with the number of target forwards.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch

from fixtures_models import make_model, perturbed
from specdec import SpeculativeGenerator

VOCAB = 120
PROMPTS = [[5, 17, 42, 9, 100, 7, 33, 5, 17, 42], [61], [3, 9, 11, 2, 2, 15, 15, 15, 8, 1, 3, 9, 11, 2], [50, 51]]
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu")


class ReadCounter:
    """Counts (and locates) host value reads while active."""

    def __init__(self, monkeypatch) -> None:
        self.sites: collections.Counter[str] = collections.Counter()
        self.active = False
        for name in READS:
            self._wrap(monkeypatch, torch.Tensor, name)
        self._wrap(monkeypatch, torch, "nonzero")
        real_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            target = args[0] if args else kwargs.get("device")
            if self.active and isinstance(target, (str, torch.device)) and str(target).startswith("cpu") \
                    and tensor.device.type != "cpu":
                self._record("to(cpu)")
            return real_to(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)

    def _wrap(self, monkeypatch, owner, name: str) -> None:
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if self.active:
                self._record(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    def _record(self, name: str) -> None:
        self.active = False  # the stack walk below must not count itself
        frame = next((f for f in reversed(traceback.extract_stack()[:-2]) if "test_host_sync" not in f.filename), None)
        self.sites[f"{name} at {frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}" if frame else name] += 1
        self.active = True

    @property
    def total(self) -> int:
        return sum(self.sites.values())


@pytest.fixture(scope="module")
def pair():
    target = make_model("llama", VOCAB, seed=0)
    return target, perturbed(target, 0.1, seed=2)


def generate(gen, batch: int, **kw):
    return gen.generate_ids(PROMPTS[:batch], max_new_tokens=20, ignore_eos=True, num_draft_tokens=4, **kw)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("drafter", ["model", "ngram", "none"])
def test_at_most_two_host_reads_per_target_forward(pair, monkeypatch, batch, sampled, drafter):
    target, draft = pair
    gen = SpeculativeGenerator(target, None, draft, engine="static")
    kw = dict(drafter=drafter, temperature=0.8 if sampled else 0.0, seed=5 if sampled else None)
    expected = generate(gen, batch, **kw)  # also warms up lazy initialisation
    counter = ReadCounter(monkeypatch)
    counter.active = True
    results = generate(gen, batch, **kw)
    counter.active = False
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    forwards = max(r.stats.target_forwards for r in results)
    assert forwards >= 5
    assert counter.total <= 2 * forwards, counter.sites.most_common()


def test_counter_sees_reads(pair, monkeypatch):
    """The counter is not blind: the generic path reads the validity mask on the host."""
    target, draft = pair
    gen = SpeculativeGenerator(target, None, draft, engine="generic")
    counter = ReadCounter(monkeypatch)
    counter.active = True
    results = generate(gen, 4, drafter="model")
    counter.active = False
    assert counter.total > 2 * max(r.stats.target_forwards for r in results)
