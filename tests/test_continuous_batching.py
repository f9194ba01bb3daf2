"""Continuous batching in the engine (specdec.engine.DecodeBatch): rows with their own budgets,
seeds and stop ids decode together, leave when they finish, and other batches' rows join
between steps; every row's tokens are what it gives alone (float64, so numerics hide nothing).
"""

from __future__ import annotations

import pytest
import torch

from specdec import SpeculativeGenerator
from specdec.engine import DecodeBatch
from specdec.params import make_params

PROMPTS = [
    [5, 17, 42, 9, 100, 7, 33],
    [61],
    [3, 9, 11, 202, 202, 15, 15, 15, 8, 1, 40, 4, 90, 91, 92],
    [250, 251],
    [7, 7, 7, 7, 8, 9],
]
BUDGETS = [24, 9, 31, 17, 12]
SEEDS = [3, 11, 3, 40, 7]
SETTINGS = {
    "greedy-model-auto": dict(drafter="model", num_draft_tokens="auto"),
    "greedy-auto": dict(drafter="auto", num_draft_tokens="auto"),
    "greedy-ngram-4": dict(drafter="ngram", num_draft_tokens=4),
    "seeded-model-auto": dict(drafter="model", num_draft_tokens="auto", temperature=0.8, top_k=40, top_p=0.95),
    "seeded-auto-3": dict(drafter="auto", num_draft_tokens=3, temperature=1.2),
    "seeded-none": dict(drafter="none", temperature=0.7),
}


def load(pair) -> SpeculativeGenerator:
    return SpeculativeGenerator.from_pretrained(str(pair.target), str(pair.drafts["partial"]), dtype=torch.float64)


def start(gen, rows: list[int], settings: dict, stop_ids=None) -> DecodeBatch:
    """A batch of PROMPTS[rows], each with its own budget (and seed when sampled)."""
    seeded = settings.get("temperature", 0.0) > 0
    params = make_params(max_new_tokens=max(BUDGETS[r] for r in rows), ignore_eos=True,
                         seed=tuple(SEEDS[r] for r in rows) if seeded else None, **settings)
    prompts = [PROMPTS[r] for r in rows]
    _, drafters, stops = gen._prepare(prompts, params, None)
    per_row = [frozenset(stop_ids[r]) if stop_ids else stops for r in rows]
    return DecodeBatch(gen.target_model, prompts, params, drafters, per_row, budgets=[BUDGETS[r] for r in rows],
                       row_ids=rows, **gen._engine_args())


def alone(gen, row: int, settings: dict, stop_ids=None) -> list[int]:
    seeded = settings.get("temperature", 0.0) > 0
    return gen.generate_ids([PROMPTS[row]], max_new_tokens=BUDGETS[row], ignore_eos=True,
                            seed=SEEDS[row] if seeded else None, stop_token_ids=stop_ids[row] if stop_ids else None,
                            **settings)[0].token_ids


def drive(batch: DecodeBatch, steps: int | None = None) -> dict[int, list[int]]:
    """Step the batch (`steps` times, or until it is empty); the finished rows' tokens."""
    done = {}
    streamed = batch.__dict__.setdefault("streamed", {})  # what step() handed out, per row
    n = 0
    while batch.rows and (steps is None or n < steps):
        for row, new in batch.step():
            streamed.setdefault(row, []).extend(new)
        n += 1
        for row, out in batch.take_finished().items():
            assert out.token_ids == streamed[row]  # what step() handed out is the row's output
            done[row] = out.token_ids
    return done


@pytest.mark.parametrize("name", list(SETTINGS))
def test_rows_that_join_a_running_batch_decode_as_they_would_alone(tiny_pair, name):
    """Two rows start; three more join after three steps (one of them after its own first
    step); rows finish at different times. Each row equals its request alone: greedy token
    for token, seeded sampling sample for sample (its noise and its draft plan are its own)."""
    gen = load(tiny_pair)
    settings = SETTINGS[name]
    running = start(gen, [0, 1], settings)
    done = drive(running, steps=3)
    joining = start(gen, [2, 3, 4], settings)
    done.update(drive(joining, steps=1))
    assert running.can_merge and joining.can_merge
    running.merge(joining)
    running.streamed.update(joining.streamed)
    assert joining.rows == [] and sorted(running.rows) == sorted(set(range(5)) - set(done))
    done.update(drive(running))
    running.close()
    assert sorted(done) == list(range(5))
    for row in range(5):
        assert done[row] == alone(gen, row, settings), (name, row)
        assert len(done[row]) == BUDGETS[row]


def test_rows_keep_their_own_stop_ids_in_one_batch(llama_pair):
    """A stop id of one row does not stop another: each row's stop set travels with it."""
    gen = load(llama_pair)
    settings = SETTINGS["greedy-model-auto"]
    plain = {r: alone(gen, r, settings) for r in range(5)}
    # Row r stops at the 4th token of its own plain output (a token the others may emit too).
    stop_ids = {r: [plain[r][3]] for r in range(5)}
    running = start(gen, [0, 1, 2], settings, stop_ids)
    done = drive(running, steps=1)
    joining = start(gen, [3, 4], settings, stop_ids)
    done.update(drive(joining, steps=1))
    running.merge(joining)
    running.streamed.update(joining.streamed)
    done.update(drive(running))
    for row in range(5):
        assert done[row] == alone(gen, row, settings, stop_ids)
        assert done[row][-1] == stop_ids[row][0] and len(done[row]) <= 4


def test_dropped_rows_leave_and_the_others_go_on(llama_pair):
    gen = load(llama_pair)
    settings = SETTINGS["greedy-auto"]
    batch = start(gen, [0, 2, 3], settings)
    drive(batch, steps=2)
    batch.drop([2], "cancelled")
    out = batch.take_finished()
    assert out[2].finish_reason == "cancelled" and 0 < len(out[2].token_ids) < BUDGETS[2]
    assert sorted(batch.rows) == [0, 3]
    done = drive(batch)
    assert done == {0: alone(gen, 0, settings), 3: alone(gen, 3, settings)}


def test_batches_that_cannot_merge_say_so(tiny_pair, monkeypatch):
    """Different settings, a batch before its first step, and the generic KV path refuse."""
    gen = load(tiny_pair)
    a = start(gen, [0], SETTINGS["greedy-auto"])
    b = start(gen, [1], SETTINGS["greedy-auto"])
    with pytest.raises(ValueError, match="first step"):
        a.merge(b)
    drive(a, steps=1)
    drive(b, steps=1)
    c = start(gen, [2], SETTINGS["seeded-auto-3"])
    drive(c, steps=1)
    with pytest.raises(ValueError, match="same sources and sampling mode|merge"):
        a.merge(c)
    gen.engine = "generic"
    d = start(gen, [3], SETTINGS["greedy-auto"])
    assert not d.can_merge


MIXED = [  # per row: its own sampling settings
    dict(temperature=0.8, top_k=40, top_p=0.95),
    dict(temperature=1.3),
    dict(temperature=0.6, top_p=0.8),
    dict(temperature=1.0, top_k=5),
    dict(temperature=0.8, top_k=40, top_p=0.95),
]


def start_mixed(gen, rows: list[int], settings: dict, per_row: list[dict], seeded: bool) -> DecodeBatch:
    """A batch whose rows sample with their own settings (as a server's batch does)."""
    first = per_row[rows[0]]
    params = make_params(max_new_tokens=max(BUDGETS[r] for r in rows), ignore_eos=True,
                         seed=tuple(SEEDS[r] for r in rows) if seeded else None, **settings, **first)
    prompts = [PROMPTS[r] for r in rows]
    _, drafters, stops = gen._prepare(prompts, params, None)
    sampling = [(float(per_row[r].get("temperature", 0.0)), int(per_row[r].get("top_k", 0)),
                 float(per_row[r].get("top_p", 1.0))) for r in rows]
    return DecodeBatch(gen.target_model, prompts, params, drafters, [stops] * len(rows),
                       budgets=[BUDGETS[r] for r in rows], row_ids=rows, row_sampling=sampling, **gen._engine_args())


@pytest.mark.parametrize("drafter", [dict(drafter="model", num_draft_tokens="auto"),
                                     dict(drafter="auto", num_draft_tokens=3), dict(drafter="none")],
                         ids=["model-auto", "auto-3", "none"])
def test_seeded_rows_with_different_sampling_settings_share_a_batch(tiny_pair, drafter):
    """Temperature, top-k and top-p per row in one batch (joined mid-way): each seeded row's
    sample is exactly its sample alone, draft model included (its q follows the row's own
    settings, so lossless verification holds row by row)."""
    gen = load(tiny_pair)
    running = start_mixed(gen, [0, 1], drafter, MIXED, seeded=True)
    done = drive(running, steps=2)
    joining = start_mixed(gen, [2, 3, 4], drafter, MIXED, seeded=True)
    done.update(drive(joining, steps=1))
    running.merge(joining)
    running.streamed.update(joining.streamed)
    done.update(drive(running))
    for row in range(5):
        expected = gen.generate_ids([PROMPTS[row]], max_new_tokens=BUDGETS[row], ignore_eos=True, seed=SEEDS[row],
                                    **drafter, **MIXED[row])[0].token_ids
        assert done[row] == expected, row


def test_greedy_rows_beside_sampled_rows_stay_greedy(tiny_pair):
    """Greedy rows in a batch with unseeded sampled rows: token for token plain greedy decoding."""
    gen = load(tiny_pair)
    per_row = [dict(), dict(temperature=0.9), dict(), dict(temperature=1.1, top_k=30), dict()]
    settings = dict(drafter="auto", num_draft_tokens="auto")
    running = start_mixed(gen, [0, 1, 2], settings, per_row, seeded=False)
    done = drive(running, steps=2)
    joining = start_mixed(gen, [3, 4], settings, per_row, seeded=False)
    done.update(drive(joining, steps=1))
    running.merge(joining)
    running.streamed.update(joining.streamed)
    done.update(drive(running))
    for row in (0, 2, 4):
        assert done[row] == alone(gen, row, settings), row
    for row in (1, 3):
        assert len(done[row]) == BUDGETS[row]
