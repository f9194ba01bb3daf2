"""Outputs recorded before the draft planner took over every draft decision.

The planner moved code, not behaviour: for the bundled pair in float64, every drafter
with a fixed K and with K "auto", greedy and seeded sampled, on a ragged batch, gives
the tokens recorded in tests/data/recorded_outputs.json. Greedy outputs equal plain
decoding anyway; seeded sampled outputs depend on each step's draft length, so they
pin the planner's decisions for seeded rows (which depend on counts and a fixed cost
proxy only, never on timing).

One case was re-recorded on purpose after the move, with its reason: sampled-ngram-kauto,
when seeded rows stopped exploring a free source (its offers are scored every step, so it
needs no optimism) and began asking a free plan to beat plain decoding by FREE_MARGIN
(specdec.planning.planner). Every other case is as recorded before the planner.

Regenerate (only when a change of the outputs is intended and explained):
    python -P tests/test_recorded_outputs.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "recorded_outputs.json"

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\n\nfor name in os.listdir('.'):\n    print(name)\nfor name in",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]
DRAFTERS = ("none", "ngram", "model", "auto")
KS = (3, "auto")
SETTINGS = {
    "greedy": {},
    "sampled": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 1234},
}
MAX_NEW_TOKENS = 40


def cases() -> list[tuple[str, str, object]]:
    return [(s, d, k) for s in SETTINGS for d in DRAFTERS for k in KS if not (d == "none" and k != KS[0])]


def case_id(setting: str, drafter: str, k) -> str:
    return f"{setting}-{drafter}-k{k}"


def run_case(gen, setting: str, drafter: str, k) -> list[list[int]]:
    results = gen.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS, drafter=drafter, num_draft_tokens=k,
                           ignore_eos=True, **SETTINGS[setting])
    return [r.token_ids for r in results]


def load_generator():
    from specdec import SpeculativeGenerator

    # The sources recorded then: the draft model and the n-gram drafter (the EAGLE-3 head came later).
    return SpeculativeGenerator.from_pretrained("bundled", dtype="float64", head=None)


@pytest.fixture(scope="module")
def bundled64():
    return load_generator()


@pytest.mark.parametrize("setting,drafter,k", cases(), ids=[case_id(*c) for c in cases()])
def test_outputs_equal_those_recorded_before_the_planner(bundled64, setting, drafter, k):
    recorded = json.loads(DATA.read_text())
    assert run_case(bundled64, setting, drafter, k) == recorded[case_id(setting, drafter, k)]


if __name__ == "__main__":
    gen = load_generator()
    out = {case_id(*c): run_case(gen, *c) for c in cases()}
    DATA.write_text(json.dumps(out, indent=0) + "\n")
    print(f"wrote {len(out)} cases to {DATA}")
