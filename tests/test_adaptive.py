"""The adaptive draft-length policy (specdec.adaptive), on its own: the estimates, the cost
curves, and the choice of K against simulated drafters whose acceptance and costs are known,
where the best fixed K can be computed exactly."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.adaptive import (
    AcceptanceCounts,
    AdaptiveDraftPolicy,
    ConfidenceCalibration,
    CostCurve,
    expected_tokens,
    optimistic_rates,
    proxy_cost,
)


def test_expected_tokens_is_one_plus_the_sum_of_prefix_products():
    rates = [0.5, 0.8, 0.25]
    assert expected_tokens(rates, 0) == 1.0
    assert expected_tokens(rates, 1) == pytest.approx(1.5)
    assert expected_tokens(rates, 2) == pytest.approx(1.5 + 0.4)
    assert expected_tokens(rates, 3) == pytest.approx(1.5 + 0.4 + 0.1)


def test_counts_judge_slots_up_to_the_first_rejection_only():
    c = AcceptanceCounts(4)
    c.record(drafted=4, accepted=1)  # slot 1 accepted, slot 2 rejected, slots 3-4 never judged
    assert c.successes == [1, 0, 0, 0] and c.trials == [1, 1, 0, 0]
    c.record(drafted=2, accepted=2)  # both accepted, nothing said about slots 3-4
    assert c.successes == [2, 1, 0, 0] and c.trials == [2, 2, 0, 0]
    rates = c.rates([0.5] * 4, weight=2.0)
    assert rates == pytest.approx([(1 + 2) / 4, (1 + 1) / 4, 0.5, 0.5])
    c.discount(0.5)
    assert c.successes == [1, 0.5, 0, 0] and c.trials == [1, 1, 0, 0]


def test_shadow_outcome_scores_an_unverified_offer_as_verification_would():
    from specdec.adaptive import shadow_outcome

    assert shadow_outcome([1, 2, 3], [1, 2, 9]) == (3, 2)  # slot 3 rejected
    assert shadow_outcome([1, 2, 3], [1, 2, 3, 4]) == (3, 3)  # all three accepted
    assert shadow_outcome([1, 2, 3, 4, 5], [1, 2]) == (2, 2)  # slots 3-5 not judged
    assert shadow_outcome([7], [1, 2]) == (1, 0)
    assert shadow_outcome([], [1]) == (0, 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=8), st.lists(st.integers(0, 3), max_size=8), st.data())
def test_shadow_counts_equal_verifying_the_offer_under_greedy(chain, offer, data):
    """Greedy: the target's tokens are one chain; a step emits a prefix of it (another source's
    accepted drafts and the target's own token). The shadow counts of an offer then equal those
    of verifying it, on every slot they judge."""
    from specdec.adaptive import shadow_outcome

    emitted = chain[: data.draw(st.integers(1, len(chain)))]
    verified = 0  # what verifying the offer against the chain accepts
    while verified < min(len(offer), len(chain)) and offer[verified] == chain[verified]:
        verified += 1
    shadow, truth = AcceptanceCounts(8), AcceptanceCounts(8)
    shadow.record(*shadow_outcome(offer, emitted))
    truth.record(len(offer), verified)
    judged = int(sum(shadow.trials))
    assert shadow.trials == truth.trials[:judged] + [0.0] * (8 - judged)
    assert shadow.successes == truth.successes[:judged] + [0.0] * (8 - judged)


def test_a_row_tries_the_model_before_a_lookup_it_knows_nothing_about():
    """Seeded rows (and a fixed K) plan on their own counts: an unscored lookup offer waits
    while the model drafts (that step scores the offer too), but is drafted when the model
    would not draft at all, and wins once its own evidence says it is accepted."""
    from specdec.drafters.auto import LOOKUP, MODEL, plan_row

    blank = AcceptanceCounts(8)
    assert plan_row(blank, AcceptanceCounts(8), 8, 8, ratio=0.125)[1] == MODEL
    assert plan_row(blank, AcceptanceCounts(8), 8, 4, ratio=None) == (4, MODEL)
    useless = AcceptanceCounts(8)
    for _ in range(10):
        useless.record(4, 0)
    k, source = plan_row(blank, useless, 3, 8, ratio=1.0)  # the model never pays: the offer is tried
    assert source == LOOKUP and k >= 1
    assert plan_row(blank, useless, 0, 8, ratio=1.0)[0] == 0  # nothing on offer: plain decoding
    good = AcceptanceCounts(8)
    for _ in range(10):
        good.record(8, 8)
    assert plan_row(good, AcceptanceCounts(8), 8, 8, ratio=0.125) == (8, LOOKUP)  # known good and free
    assert plan_row(good, AcceptanceCounts(8), 8, 4, ratio=None) == (4, LOOKUP)


def test_shadow_evidence_updates_acceptance_only():
    policy = AdaptiveDraftPolicy(4, batch_size=2)
    policy.idle[1] = 3
    for _ in range(20):
        policy.record_shadow("ngram", 1, 4, 4)
    assert policy.row_rates("ngram", 1)[0] > 0.9 and policy.pooled["ngram"].trials[0] > 0
    assert "ngram" not in policy.rows[0]  # only the row it was scored for
    assert policy.idle == [0, 3] and policy.overhead is None  # no probe schedule, no costs
    policy.record_shadow("ngram", 0, 0, 0)  # nothing judged: nothing recorded
    assert "ngram" not in policy.rows[0]


def test_cost_curve_interpolates_and_extrapolates_measured_sizes():
    curve = CostCurve()
    assert curve(3) is None
    curve.observe(1, 1.0)
    assert curve(5) == 1.0  # one size known: flat
    curve.observe(5, 2.0)
    assert curve(3) == pytest.approx(1.5)
    assert curve(9) == pytest.approx(3.0)  # extrapolated from the two nearest
    proportional = CostCurve(proportional=True)
    proportional.observe(2, 1.0)
    assert proportional(4) == pytest.approx(2.0)


def test_a_verify_curve_keeps_the_decode_forward_apart_from_the_line():
    """Target forwards: 1 token 6.4, then 7.6 + 0.2 per token. Size 1 is its own average; the
    line goes through the wider sizes once two are known (before, through the prefill)."""
    curve = CostCurve(decode_step=True)
    curve.observe(100, 30.0, prior=True)  # the prefill
    curve.observe(1, 6.4)
    assert curve(1) == 6.4
    assert curve(2) == pytest.approx(6.4 + 23.6 / 99)  # the prefill and the decode: all there is
    curve.observe(3, 7.8)
    assert curve(1) == 6.4 and curve(3) == pytest.approx(7.8)  # size 3 and the prefill
    for _ in range(3):
        curve.observe(2, 7.6)
        curve.observe(5, 8.2)
    assert curve(1) == 6.4
    assert curve(2) == pytest.approx(7.6) and curve(4) == pytest.approx(8.0) and curve(9) == pytest.approx(9.0)
    line = CostCurve()  # without decode_step the decode forward bends the line
    for n, v in [(1, 6.4), (2, 7.6), (3, 7.8), (5, 8.2)]:
        line.observe(n, v)
    assert line(2) - line(1) < 0.5


def test_calibration_starts_at_the_draft_probability_and_learns():
    cal = ConfidenceCalibration(bins=10)
    assert cal(0.95) == pytest.approx(0.95)
    for _ in range(50):
        cal.record([0.95], accepted=0)  # confident drafts that are always rejected
    assert cal(0.95) < 0.1
    assert cal(0.55) == pytest.approx(0.55)  # other bins untouched


# --------------------------------------------------------------------------- simulation


class SimulatedPair:
    """A drafter with i.i.d. acceptance `alpha` per slot, a draft forward costing `draft`
    seconds, and a target forward over n tokens costing verify1 + slope * (n - 1), plus `jump`
    for any n > 1 (a decode forward against a wider one)."""

    def __init__(self, alpha, draft, verify1=1.0, slope=0.05, overhead=0.02, jump=0.0):
        self.alpha, self.draft_s, self.verify1, self.slope, self.overhead = alpha, draft, verify1, slope, overhead
        self.jump = jump

    def verify(self, n):
        return self.verify1 + self.slope * (n - 1) + (self.jump if n > 1 else 0.0)

    def prefill_draft(self, n):
        """The draft's prefill over n tokens: the same shape of cost, scaled by the cost ratio."""
        return self.verify(n) * self.draft_s / self.verify1

    def step_time(self, k):
        return self.overhead + self.verify(k + 1) + k * self.draft_s

    def rate(self, k):
        """Exact expected tokens per second of a fixed K."""
        return expected_tokens([self.alpha] * k, k) / self.step_time(k)

    def accepted(self, k, rng):
        n = 0
        while n < k and rng.random() < self.alpha:
            n += 1
        return n


def run_policy(pair, steps=3000, k_max=8, uses_model=True, seed=0, prompt=32):
    """(tokens per second, K of each step); a lookup drafter (uses_model=False) offers k_max."""
    rng = random.Random(seed)
    policy = AdaptiveDraftPolicy(k_max, batch_size=1)
    policy.record_prefill(prompt, pair.verify(prompt), pair.prefill_draft(prompt) if uses_model else None)
    tokens = seconds = 0.0
    chosen = []
    for _ in range(steps):
        k = policy.choose("sim", k_max, uses_model, None if uses_model else [k_max])
        a = pair.accepted(k, rng)
        t = pair.step_time(k)
        policy.record_step("sim", k, pair.verify(k + 1), k * pair.draft_s, t, [k], [a])
        tokens += a + 1
        seconds += t
        chosen.append(k)
    return tokens / seconds, chosen


CASES = {
    # alpha, draft seconds per forward (target forward = 1 s)
    "useless draft of the target's size": (0.0, 1.0),
    "useless cheap draft": (0.02, 0.15),
    "good distilled draft": (0.8, 0.12),
    "excellent draft": (0.95, 0.05),
}


@pytest.mark.parametrize("case", list(CASES))
def test_policy_reaches_the_best_fixed_k(case):
    alpha, draft = CASES[case]
    # The prefill ratio gives the draft cost before the first step (draft prefill / target prefill).
    pair = SimulatedPair(alpha, draft)
    best_k = max(range(9), key=pair.rate)
    got, chosen = run_policy(pair)
    assert got >= 0.97 * pair.rate(best_k), (case, got, pair.rate(best_k), best_k, chosen[-20:])


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.7])
def test_the_first_draft_pays_for_the_jump_from_a_decode_forward(alpha):
    """A free lookup drafter, and a target whose forward over two tokens costs 18% more than
    a one-token decode, each further token 3% (the bundled target on CPU). At 10% acceptance
    every K loses to plain decoding, although a line through the widths would price the
    first draft at about 3%; at 30% and 70% drafting pays. The policy must reach the best
    fixed K within 3% in each case."""
    pair = SimulatedPair(alpha, 0.0, slope=0.03, jump=0.15)
    best_k = max(range(9), key=pair.rate)
    assert (best_k == 0) == (alpha == 0.1)
    got, chosen = run_policy(pair, uses_model=False)
    assert got >= 0.97 * pair.rate(best_k), (got, pair.rate(best_k), best_k, chosen[-20:])


def test_a_draft_at_break_even_costs_nothing_against_plain_decoding():
    """Acceptance 0.35 at a quarter of a target forward: K = 1 is only 4% ahead of K = 0, and the
    estimates hover around the break-even point (0.29). The policy must lose at most 1% to plain
    decoding, and stays within 5% of the best fixed K."""
    pair = SimulatedPair(0.35, 0.25)
    got, _ = run_policy(pair)
    assert got >= 0.99 * pair.rate(0)
    assert got >= 0.95 * max(pair.rate(k) for k in range(9))


def test_useless_draft_settles_at_k0_and_probes_rarely():
    pair = SimulatedPair(0.0, 0.5)
    _, chosen = run_policy(pair, steps=2000)
    assert chosen[-1000:].count(0) >= 980  # probes are rare


def test_a_draft_as_large_as_the_target_is_never_probed():
    """Drafts always accepted from a draft of the target's size would save only a sliver of the
    step overhead; a probe would also pay the draft model's catch-up over the skipped tokens.
    The policy must not draft at all, from the first step on."""
    pair = SimulatedPair(0.0, 1.0, overhead=0.15)
    _, chosen = run_policy(pair, steps=500)
    assert chosen.count(0) == 500
    policy = AdaptiveDraftPolicy(8, batch_size=1)  # seeded sampling: the fixed cost proxy
    assert all(policy.choose_per_row("m", 8, cost_ratio=0.95)[0] == 0 for _ in range(200) if not policy.record_step(
        "m", 0, 1.0, 0.0, 1.0, [0], [0]))


@pytest.mark.parametrize("alpha", [0.02, 0.12])
def test_seeded_lookup_drafts_that_are_almost_never_accepted_settle_at_k0(alpha):
    """Prompt lookup under sampling at T=0.8: 2-12% of drafts accepted (7% on the bundled
    target, more in bursts). Drafting is free but verifying a draft is not: the first draft
    turns a decode forward into a wider one (FIRST_DRAFT_PROXY). The fixed proxy must price
    that and stop drafting (priced by width alone, one draft at 12% looked like a gain and
    was drafted on every step)."""
    policy = AdaptiveDraftPolicy(8, batch_size=1)
    rng = random.Random(0)
    chosen = []
    for _ in range(300):
        k = policy.choose_per_row("ngram", 8, cost_ratio=0.0, available=[8])[0]
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        policy.record_step("ngram", k, 1.0, 0.0, 1.0, [k], [accepted])
        chosen.append(k)
    assert chosen[-200:].count(0) >= 190
    good = AdaptiveDraftPolicy(8, batch_size=1)  # the same free drafter, accepted 80%: drafts long
    for _ in range(50):
        good.record_step("ngram", 8, 1.0, 0.0, 1.0, [8], [rng.choice([8, 8, 6, 7, 3])])
    assert good.choose_per_row("ngram", 8, cost_ratio=0.0, available=[8])[0] >= 6


def test_seeded_rows_choose_k_with_the_exploration_bonus():
    """Seeded rows choose K from the same optimistic estimates as the measured policy: the
    posterior means plus half a standard deviation. Without the bonus a fresh row starts at
    K=2 on the bundled pair's proxy (a 0.5 prior), takes several steps to reach the 4-6
    that pay, and a slot whose estimate fell early is tried again only as its evidence decays.
    Both seeded planners (choose_per_row and drafter "auto"'s plan_row) agree with the
    brute-force best K, which is larger than the one from the plain means."""
    from specdec.drafters.auto import MODEL, plan_row

    def best_k(rates, ratio):
        return max(range(9), key=lambda k: (expected_tokens(rates, k) / proxy_cost(k, ratio), -k))

    policy = AdaptiveDraftPolicy(8, batch_size=1)
    blank = AcceptanceCounts(8)
    fresh = best_k(optimistic_rates(blank.rates(), blank.trials), 0.125)
    assert fresh > best_k(blank.rates(), 0.125)
    assert policy.choose_per_row("m", 8, cost_ratio=0.125) == [fresh]
    assert plan_row(AcceptanceCounts(8), blank, 0, 8, ratio=0.125) == (fresh, MODEL)
    for drafted, accepted in [(3, 3), (3, 1), (4, 4), (4, 2)]:  # some evidence: still the bonus
        policy.record_step("m", drafted, 1.0, 0.1, 1.2, [drafted], [accepted])
        blank.observe(drafted, accepted)
        want = best_k(optimistic_rates(blank.rates(), blank.trials), 0.125)
        assert policy.choose_per_row("m", 8, cost_ratio=0.125) == [want]
        assert plan_row(AcceptanceCounts(8), blank, 0, 8, ratio=0.125) == (want, MODEL)


def test_k0_is_left_again_when_drafts_start_paying():
    """A drafter useless for the first part of a request and good after it: the policy must
    come back from K = 0 and then draft long."""
    rng = random.Random(1)
    bad, good = SimulatedPair(0.0, 0.1), SimulatedPair(0.9, 0.1)
    policy = AdaptiveDraftPolicy(8, batch_size=1)
    policy.record_prefill(32, bad.verify(32), bad.prefill_draft(32))
    chosen = []
    for step in range(1500):
        pair = bad if step < 500 else good
        k = policy.choose("sim", 8, True)
        policy.record_step("sim", k, pair.verify(k + 1), k * pair.draft_s, pair.step_time(k), [k], [pair.accepted(k, rng)])
        chosen.append(k)
    assert chosen[400:500].count(0) >= 90
    assert sum(chosen[-200:]) / 200 >= 4


def test_a_stall_cannot_make_a_width_look_unaffordable_for_good():
    """A free lookup drafter whose first drafts miss (the policy parks at K = 0) and whose
    first probes run into stalls (30 target forwards long: another process took the CPU).
    Later its drafts are accepted 90%: the policy must probe again, see that the widths
    cost what they always did, and draft long. Before, one stall measured at a width kept
    that width's cost high for good and the promise test skipped every later probe."""
    rng = random.Random(3)
    pair = SimulatedPair(0.9, 0.0)
    policy = AdaptiveDraftPolicy(8, batch_size=1)
    policy.record_prefill(32, pair.verify(32))
    chosen, stalls = [], 0
    for step in range(800):
        k = policy.choose("ngram", 8, uses_model=False, available=[8])
        verify = pair.verify(k + 1)
        if k and step >= 50 and stalls < 3:  # the probes after parking
            verify, stalls = 30.0, stalls + 1
        accepted = 0 if step < 100 else pair.accepted(k, rng)
        policy.record_step("ngram", k, verify, 0.0, pair.overhead + verify, [k], [accepted])
        chosen.append(k)
    assert stalls == 3
    assert sum(chosen[-200:]) / 200 >= 4


def test_auto_drafter_rows_that_draft_nothing_wait_for_their_probe():
    """Drafter "auto" records each step per source; a row that drafted from no source is idle,
    so a parked row is probed after PROBE_MIN steps (before, auto rows never counted idle
    and a row parked once stayed parked for the rest of the request)."""
    from specdec.adaptive import PROBE_MIN, DraftController
    from specdec.params import make_params

    class Auto:  # what the controller reads of a drafter
        name, uses_draft_model, chooses_length = "auto", True, True

    params = make_params(drafter="auto", num_draft_tokens="auto")
    controller = DraftController(params, Auto(), batch=2, device=torch.device("cpu"), cost_ratio=0.1)
    policy = controller.policy
    policy.record_prefill(16, 1.0)
    for _ in range(PROBE_MIN):
        for mark in ("step", "drafted", "verified"):
            controller.mark(mark)
        # Row 0 drafted nothing; row 1 drafted 2 lookup tokens.
        controller.record(2, [0, 2], [0, 1], None, sources=["ngram", "ngram"])
    assert policy.idle == [PROBE_MIN, 0]
    assert policy.probe_due("ngram", 8, False, [8, 0])


def test_lookup_drafter_without_proposals_costs_nothing():
    policy = AdaptiveDraftPolicy(8, batch_size=2)
    policy.record_prefill(16, 1.0)
    assert policy.choose("ngram", 8, uses_model=False, available=[0, 0]) == 0
    # With proposals for one row, drafting is free for a lookup drafter: draft what is there.
    assert policy.choose("ngram", 8, uses_model=False, available=[3, 0]) >= 1


def test_rows_keep_their_own_estimates():
    policy = AdaptiveDraftPolicy(4, batch_size=2)
    for _ in range(30):
        policy.record_step("m", 4, 1.0, 0.4, 1.5, drafted=[4, 4], accepted=[4, 0])
    good, bad = policy.row_rates("m", 0), policy.row_rates("m", 1)
    assert good[0] > 0.8 and bad[0] < 0.2
    policy.select_rows([1])
    assert policy.row_rates("m", 0) == bad


# --------------------------------------------------------------------------- in the engine
#
# Auto K changes only how fast, never what: greedy output equals plain greedy decoding
# token for token, and sampled output follows the target's exact distribution, on both
# engine paths, whatever lengths the policy chooses.


from specdec import SpeculativeGenerator, kernels  # noqa: E402
from specdec.drafters import Drafter, register_drafter  # noqa: E402
from specdec.drafters.ngram import NgramDrafter  # noqa: E402
from specdec.kernels import reference  # noqa: E402

AUTO_PROMPTS = [
    [5, 17, 42, 9, 100, 7, 33],
    [61],
    [3, 9, 11, 202, 202, 15, 15, 15, 8, 1, 40, 4, 90, 91, 92],
    [250, 251, 250, 251, 250],
]
AUTO_NEW = 32


def _load(pair, draft):
    return SpeculativeGenerator.from_pretrained(
        str(pair.target), str(pair.drafts[draft]) if draft else None, dtype=torch.float64
    )


@pytest.mark.parametrize("draft", ["same", "random", "partial"])
def test_greedy_auto_k_equals_baseline(tiny_pair, engine_path, draft):
    gen = _load(tiny_pair, draft)
    expected = [
        gen.generate_ids([p], max_new_tokens=AUTO_NEW, drafter="none", ignore_eos=True)[0].token_ids
        for p in AUTO_PROMPTS
    ]
    for drafter, k in (("model", "auto"), ("ngram", "auto"), ("auto", "auto"), ("auto", 3)):
        batch = gen.generate_ids(AUTO_PROMPTS, max_new_tokens=AUTO_NEW, drafter=drafter, num_draft_tokens=k, ignore_eos=True)
        assert [r.token_ids for r in batch] == expected, (drafter, k)
        for r in batch:
            s = r.stats
            # The histogram accounts every verification step of the row, and names the drafter.
            assert sum(s.draft_lengths.values()) == s.target_forwards
            assert sum(k * n for k, n in s.draft_lengths.items()) == s.drafted_tokens
            assert set(s.drafter_steps) <= ({"model", "ngram"} if drafter == "auto" else {drafter})


class _LookupWithoutOffers(Drafter):
    """A one-hot drafter that only packs proposals (no host `offers`): the adaptive loop
    chooses from the packed proposal and cuts it."""

    def start(self, state):
        self.inner = NgramDrafter(self.generator)
        self.inner.start(state)

    def propose(self, state, k):
        return self.inner.propose(state, k)

    def select_rows(self, keep):
        self.inner.select_rows(keep)


def test_auto_k_takes_one_hot_drafters_with_or_without_host_offers(tiny_pair, engine_path):
    gen = _load(tiny_pair, None)
    register_drafter("test-lookup-without-offers")(_LookupWithoutOffers)
    expected = [r.token_ids for r in gen.generate_ids(AUTO_PROMPTS, max_new_tokens=AUTO_NEW, drafter="none", ignore_eos=True)]
    runs = {
        name: gen.generate_ids(AUTO_PROMPTS, max_new_tokens=AUTO_NEW, drafter=name, num_draft_tokens="auto", ignore_eos=True)
        for name in ("ngram", "test-lookup-without-offers")
    }
    for name, batch in runs.items():
        assert [r.token_ids for r in batch] == expected, name
        assert sum(r.stats.drafted_tokens for r in batch) > 0, name


def test_a_seeded_draft_that_can_never_pay_runs_plain_decoding(tiny_pair, monkeypatch):
    """Seeded sampling prices a draft as large as the target at about one target forward:
    no K could pay even if every draft were accepted, so the request is plain decoding
    (the same tokens as drafter "none" with that seed) and the policy is not consulted on
    any step; nor is it for drafter "none". Priced as a small draft, the same request does
    consult it."""
    gen = _load(tiny_pair, "same")
    calls = []
    real = AdaptiveDraftPolicy.choose_per_row
    monkeypatch.setattr(AdaptiveDraftPolicy, "choose_per_row",
                        lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    kwargs = dict(max_new_tokens=AUTO_NEW, temperature=0.9, seed=5, ignore_eos=True)
    plain = gen.generate_ids(AUTO_PROMPTS, drafter="none", **kwargs)  # K "auto" too: nothing to choose
    auto = gen.generate_ids(AUTO_PROMPTS, drafter="model", num_draft_tokens="auto", **kwargs)
    assert [r.token_ids for r in auto] == [r.token_ids for r in plain]
    assert calls == [] and all(r.stats.draft_forwards == 0 for r in auto)
    gen._draft_cost_ratio = lambda: 0.1
    gen.generate_ids(AUTO_PROMPTS[:1], drafter="model", num_draft_tokens="auto", **kwargs)
    assert calls


def test_auto_is_the_default_and_an_int_still_fixes_k(llama_pair):
    gen = _load(llama_pair, "same")
    fixed = gen.generate_ids([AUTO_PROMPTS[0]], max_new_tokens=20, drafter="model", num_draft_tokens=3, ignore_eos=True)
    assert set(fixed[0].stats.draft_lengths) == {3}  # 20 tokens = 5 steps of 4 (K=3 never cut)
    auto = gen.generate_ids([AUTO_PROMPTS[0]], max_new_tokens=20, drafter="model", ignore_eos=True)
    assert auto[0].token_ids == fixed[0].token_ids


@pytest.mark.parametrize("bad", ["fast", 4.0, -1, None])
def test_num_draft_tokens_is_an_int_or_auto(llama_pair, bad):
    gen = _load(llama_pair, None)
    with pytest.raises((TypeError, ValueError), match="num_draft_tokens"):
        gen.generate_ids([[1, 2]], num_draft_tokens=bad)



def test_auto_scores_the_lookup_offers_it_did_not_verify(tiny_pair, monkeypatch):
    """While the draft model drafts a row, drafter "auto" scores that row's lookup offer against
    the tokens the target emitted, so the lookup estimate stays current (without it, a lookup
    that fell behind once was never chosen again while the model drafted)."""
    from specdec.drafters import auto

    scored = []
    real = auto.shadow_outcome

    def spy(offer, emitted):
        scored.append((list(offer), list(emitted)))
        return real(offer, emitted)

    monkeypatch.setattr(auto, "shadow_outcome", spy)
    gen = _load(tiny_pair, "same")
    expected = [gen.generate_ids([p], max_new_tokens=AUTO_NEW, drafter="none", ignore_eos=True)[0].token_ids
                for p in AUTO_PROMPTS]
    # A fixed K: the choice of source is deterministic (auto K takes the same path in observe,
    # but a same-size draft never pays there, so the model would not run).
    batch = gen.generate_ids(AUTO_PROMPTS, max_new_tokens=AUTO_NEW, drafter="auto", num_draft_tokens=3, ignore_eos=True)
    assert [r.token_ids for r in batch] == expected
    assert scored  # rows drafted by the model while a lookup offer existed
    for offer, emitted in scored:  # each judged against a piece of some row's output
        assert offer and emitted and any(emitted == out[i : i + len(emitted)] for out in expected for i in range(len(out)))

@pytest.mark.parametrize("drafter", ["model", "auto"])
def test_seeded_auto_is_reproducible_and_batch_invariant(tiny_pair, drafter):
    """Seeded rows choose K (and drafter "auto" its source) from their own history and a fixed
    cost proxy: the same seed gives the same tokens alone and in any batch."""
    gen = _load(tiny_pair, "partial")
    kw = dict(max_new_tokens=24, temperature=0.9, top_k=8, ignore_eos=True, drafter=drafter)
    together = [r.token_ids for r in gen.generate_ids(AUTO_PROMPTS, seed=5, **kw)]
    alone = [gen.generate_ids([p], seed=5, **kw)[0].token_ids for p in AUTO_PROMPTS]
    again = [r.token_ids for r in gen.generate_ids(AUTO_PROMPTS, seed=5, **kw)]
    assert together == alone == again


def test_useless_same_size_draft_is_not_run(llama_pair, tiny_tokenizer, tmp_path):
    """A draft as large as the target can never pay (bound <= 1): seeded auto K never drafts
    with it, so it costs its prefill and nothing per token."""
    from fixtures_models import make_model, save

    vocab = len(tiny_tokenizer)
    big = save(make_model("llama", vocab, seed=9), tiny_tokenizer, tmp_path / "big-random-draft")
    gen = SpeculativeGenerator.from_pretrained(str(llama_pair.target), str(big), dtype=torch.float64)
    res = gen.generate_ids([AUTO_PROMPTS[0]], max_new_tokens=24, temperature=1.0, seed=1, drafter="model", ignore_eos=True)
    assert res[0].stats.draft_lengths == {0: res[0].stats.target_forwards}


# Sampled: the exact-distribution harness of test_sampling (context-dependent target, 4 tokens).
from test_sampling import (  # noqa: E402
    ALPHA,
    NEW,
    PROMPT,
    SAMPLES,
    SETTINGS,
    chi_square_pvalue,
    exact_distribution,
    models,  # noqa: F401  (fixture)
)


def _draw_auto(gen, drafter, temperature, top_k, top_p, seeded_policy=True, monkeypatch=None):
    import specdec.adaptive as adaptive

    if not seeded_policy:  # the timing-driven policy, as unseeded requests get it
        original = adaptive.DraftController.__init__

        def timing_policy(self, *a, **kw):
            original(self, *a, **kw)
            self.seeded = False

        monkeypatch.setattr(adaptive.DraftController, "__init__", timing_policy)
    # The seeded policy's cost proxy is the parameter ratio, which for these 5-token models is
    # mostly embeddings; a cheap draft makes the policy draft, which is what is under test.
    gen._cost_ratio = 0.05
    results = gen.generate_ids(
        [PROMPT] * SAMPLES, max_new_tokens=NEW, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=list(range(SAMPLES)), drafter=drafter, num_draft_tokens="auto", ignore_eos=True,
    )
    return [tuple(r.token_ids) for r in results], results


# Both paths with plain temperature; the filtered settings on the default path only (the
# static/generic equality of seeded samples is tested in test_sampling): keeps CI short.
AUTO_SETTINGS = [(*SETTINGS[0].values, "static"), (*SETTINGS[0].values, "generic"), (*SETTINGS[4].values, "static")]


@pytest.mark.slow
@pytest.mark.parametrize("temperature,top_k,top_p,path", AUTO_SETTINGS)
@pytest.mark.parametrize("drafter", ["model", "ngram", "auto"])
def test_auto_k_sampled_tokens_follow_target_distribution(models, monkeypatch, drafter, temperature, top_k, top_p, path):  # noqa: F811
    target, draft = models
    gen = SpeculativeGenerator(target, None, draft, engine=path)
    samples, results = _draw_auto(gen, drafter, temperature, top_k, top_p)
    assert sum(r.stats.drafted_tokens for r in results) > SAMPLES // 2  # drafts are exercised
    assert chi_square_pvalue(samples, exact_distribution(target, temperature, top_k, top_p)) > ALPHA


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["model", "ngram", "auto"])
def test_timing_driven_auto_k_sampled_tokens_follow_target_distribution(models, monkeypatch, drafter):  # noqa: F811
    """The timing-driven policy (unseeded requests) with early stop: K depends on measured
    times, so the sample is not a fixed outcome; the threshold is 1e-5 to keep it from
    failing by chance while a wrong verifier still fails by far (below)."""
    import specdec.adaptive as adaptive

    target, draft = models
    gen = SpeculativeGenerator(target, None, draft)
    # Drafting priced at nothing, so that the policy drafts (what is under test is that its
    # timing-driven choices, early stop and source switches change no distribution).
    monkeypatch.setattr(adaptive.AdaptiveDraftPolicy, "draft_cost", lambda self, *a: 0.0)
    samples, results = _draw_auto(gen, drafter, 1.0, 0, 1.0, seeded_policy=False, monkeypatch=monkeypatch)
    assert sum(r.stats.drafted_tokens for r in results) > SAMPLES // 2
    assert chi_square_pvalue(samples, exact_distribution(target, 1.0, 0, 1.0)) > 1e-5


@pytest.mark.slow
def test_auto_k_negative_control_overaccepting_verifier_fails(models, monkeypatch):  # noqa: F811
    target, draft = models
    gen = SpeculativeGenerator(target, None, draft)
    real = reference.verify_sampling

    def overaccepting(draft_tokens, draft_probs, target_logits, uniforms, *args, **kwargs):
        return real(draft_tokens, draft_probs, target_logits, uniforms * 0.5, *args, **kwargs)

    monkeypatch.setattr(kernels, "verify_sampling", overaccepting)
    samples, _ = _draw_auto(gen, "model", 1.0, 0, 1.0, seeded_policy=False, monkeypatch=monkeypatch)
    assert chi_square_pvalue(samples, exact_distribution(target, 1.0, 0, 1.0)) < 1e-6


def test_a_request_starts_from_what_the_last_one_learned(tiny_pair):
    """Unseeded auto K keeps the measured costs between requests (per drafter and K_max) and
    the pair's pooled acceptance per sampling settings too; seeded sampling neither reads nor
    writes them."""
    gen = _load(tiny_pair, "same")
    gen._draft_cost_ratio = lambda: 0.1  # priced as a small draft, so the policy drafts at once
    prompt = AUTO_PROMPTS[0]
    gen.generate_ids([prompt], max_new_tokens=16, drafter="model", temperature=0.8, seed=1)
    assert gen._policy_memory == {}
    first = gen.generate_ids([prompt], max_new_tokens=16, drafter="model")[0]
    costs, greedy = gen._policy_memory[("model", 8)], gen._policy_memory[("model", 8, "greedy")]
    pooled = greedy["pooled"]["model"]
    assert sum(pooled.trials) > 0 and costs["_verify"] and "pooled" not in costs
    # The next request's policy begins there: a copy, so the stored state is not mutated.
    policy = AdaptiveDraftPolicy(8, batch_size=1)
    policy.start_from(costs)
    policy.start_from(greedy)
    assert policy.pooled["model"].successes == pooled.successes and policy.pooled["model"] is not pooled
    assert policy._verify.keys() == costs["_verify"].keys()
    second = gen.generate_ids([prompt], max_new_tokens=16, drafter="model")[0]
    assert second.token_ids == first.token_ids  # learning changes speed, never the output
    assert sum(gen._policy_memory[("model", 8, "greedy")]["pooled"]["model"].trials) > 0


def test_sampled_requests_learn_acceptance_apart_from_greedy_ones(tiny_pair, monkeypatch):
    """Acceptance under greedy decoding says little about acceptance at T = 0.8: an unseeded
    sampled request starts from the costs the greedy ones measured, but from the prior
    acceptance, and leaves the greedy estimate as it was."""
    gen = _load(tiny_pair, "same")
    gen._draft_cost_ratio = lambda: 0.1
    prompt = AUTO_PROMPTS[0]
    gen.generate_ids([prompt], max_new_tokens=16, drafter="model")
    greedy_before = gen._policy_memory[("model", 8, "greedy")]["pooled"]["model"].trials
    started = []
    real = AdaptiveDraftPolicy.start_from
    monkeypatch.setattr(AdaptiveDraftPolicy, "start_from", lambda self, learned: (started.append(set(learned)),
                                                                                     real(self, learned))[1])
    gen.generate_ids([prompt], max_new_tokens=16, drafter="model", temperature=0.8, top_k=20)
    assert started == [set(AdaptiveDraftPolicy.COSTS)]  # no acceptance from the greedy requests
    # Its own acceptance is kept under its settings (whether it drafted depends on the timings).
    assert "pooled" in gen._policy_memory[("model", 8, ("sampled", 0.8, 20, 1.0))]
    assert gen._policy_memory[("model", 8, "greedy")]["pooled"]["model"].trials == greedy_before


def test_the_seeded_cost_proxy_weighs_parameters_and_depth():
    """Seeded sampling prices a draft forward by size alone: the mean of the parameter and the
    depth ratios. A draft as wide as the target but 1 of its 8 layers deep is far cheaper
    than its parameter share says (per-layer overhead dominates small-batch forwards)."""
    from fixtures_models import make_model

    from specdec.generator import size_cost_ratio

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    deep, shallow = make_model("llama", 64, seed=0, layers=8), make_model("llama", 64, seed=1, layers=1)
    params = count(shallow) / count(deep)
    assert size_cost_ratio(shallow, deep) == pytest.approx(0.5 * (params + 1 / 8))
    assert size_cost_ratio(shallow, deep) < params  # shallower than its parameter share
    assert size_cost_ratio(deep, deep) == pytest.approx(1.0)  # a same-shape draft costs a target forward
    gpt2 = make_model("gpt2", 64, seed=2, layers=2)  # n_layer, not num_hidden_layers
    assert size_cost_ratio(gpt2, deep) == pytest.approx(0.5 * (count(gpt2) / count(deep) + 2 / 8))
