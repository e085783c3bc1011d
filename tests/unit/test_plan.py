"""Load-aware block lengths (Algorithm 1) against brute force, and the linear step-cost fit they are planned with."""

import itertools

import numpy as np
import pytest
import torch

from vllm_dspark.policy import LinearCost, choose_block_lengths, fixed_block_lengths, plan_block_lengths


def affine_sps(t0: float, per_token: float):
    """SPS for a step time t0 + per_token * B: Theta is then unimodal, so the greedy stop is optimal."""
    return lambda b: 1.0 / (t0 + per_token * b)


def theta_of(lengths, surv, sps) -> float:
    tau = sum(1.0 + surv[r, :l].sum() for r, l in enumerate(lengths))
    return tau * sps(int(len(lengths) + sum(lengths)))


def brute_force(surv, sps, caps):
    best, best_l = -1.0, None
    for lengths in itertools.product(*[range(c + 1) for c in caps]):
        t = theta_of(lengths, surv, sps)
        if t > best + 1e-12:
            best, best_l = t, lengths
    return best, np.asarray(best_l)


def random_survival(rng, r, k):
    cond = rng.uniform(0.2, 1.0, size=(r, k))
    return np.cumprod(cond, axis=1)


def profile_sps(points: dict):
    """Steps per second from a profile {B: seconds}: interpolated linearly, flat below it, proportional above."""
    xs = sorted(points)
    ys = [points[x] for x in xs]
    return lambda b: 1.0 / (float(np.interp(b, xs, ys)) if b <= xs[-1] else ys[-1] * b / xs[-1])


@pytest.mark.parametrize("per_token", [0.002, 0.02, 0.1, 0.4])
def test_greedy_matches_brute_force_optimum(per_token):
    rng = np.random.default_rng(int(per_token * 1000))
    chosen_totals = set()
    for _ in range(25):
        r, k = rng.integers(1, 4), rng.integers(1, 5)
        surv = random_survival(rng, r, k)
        caps = rng.integers(0, k + 2, size=r)
        sps = affine_sps(1.0, per_token)
        best, best_l = brute_force(surv, sps, np.minimum(caps, k))
        plan = plan_block_lengths(surv, sps, max_lengths=caps)
        assert plan.throughput == pytest.approx(best, rel=1e-12)
        np.testing.assert_array_equal(plan.lengths, best_l)
        chosen_totals.add(int(plan.lengths.sum()))
    assert len(chosen_totals) > 1  # the cases really exercise different budgets


def test_identical_rows_with_profiled_table_match_brute_force():
    # A profiled table with affine step time (memory-bound 10 ms + 1 ms per verified token).
    table = profile_sps({b: 0.010 + 0.001 * b for b in range(1, 64)})
    row = np.array([0.9, 0.8, 0.7, 0.55, 0.4])
    for r in (1, 2, 3):
        surv = np.tile(row, (r, 1))
        best, _ = brute_force(surv, table, [5] * r)
        plan = plan_block_lengths(surv, table)
        assert plan.throughput == pytest.approx(best, rel=1e-9)
        assert plan.lengths.max() - plan.lengths.min() <= 1  # identical requests get (nearly) equal blocks


def test_early_stop_hand_case():
    # SPS 100, 100, 80, 50 at B = 1..4: Theta = 100, 190, 192 (take 2), 125 (stop).
    table = profile_sps({1: 0.010, 2: 0.010, 3: 0.0125, 4: 0.020})
    plan = plan_block_lengths(np.array([[0.9, 0.5, 0.1]]), table)
    assert plan.lengths.tolist() == [2]
    assert plan.num_tokens == 3
    assert plan.expected_tokens == pytest.approx(2.4)
    assert plan.throughput == pytest.approx(192.0)


def test_stops_at_first_non_improving_admission():
    # Theta: 100 -> 95 (stop), although three drafts would give 3.7 * 50 = 185: the rule looks no further.
    sps = {1: 100.0, 2: 50.0, 3: 50.0, 4: 50.0}.__getitem__
    plan = plan_block_lengths(np.array([[0.9, 0.9, 0.9]]), sps)
    assert plan.lengths.tolist() == [0]
    assert plan.throughput == pytest.approx(100.0)


def test_free_verification_takes_every_useful_draft_and_no_useless_one():
    surv = np.array([[0.9, 0.5, 0.0], [0.3, 0.2, 0.1]])
    plan = plan_block_lengths(surv, lambda b: 1.0)
    # A zero-survival draft adds no expected token, so it never raises Theta.
    assert plan.lengths.tolist() == [2, 3]


def test_load_monotonicity_in_cost_slope():
    rng = np.random.default_rng(0)
    surv = random_survival(rng, 16, 7)
    totals = [int(choose_block_lengths(surv, affine_sps(1.0, c)).sum()) for c in np.geomspace(1e-4, 1.0, 30)]
    assert all(b <= a for a, b in zip(totals, totals[1:])), totals
    assert totals[0] >= 100 and totals[-1] < 16


def test_per_request_length_shrinks_with_concurrency():
    # Step time flat to 64 tokens, then linear (a memory-bound -> compute-bound knee).
    table = profile_sps({b: 0.02 * max(1.0, b / 64) for b in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]})
    row = np.cumprod(np.full(7, 0.8))
    means = [choose_block_lengths(np.tile(row, (r, 1)), table).mean() for r in (1, 4, 16, 32, 64, 128, 200)]
    assert all(b <= a for a, b in zip(means, means[1:])), means
    assert means[0] == 7 and means[-1] < 2


def test_bonus_token_always_verified():
    rng = np.random.default_rng(1)
    for _ in range(20):
        r, k = rng.integers(1, 9), rng.integers(0, 8)
        surv = random_survival(rng, r, k) * rng.uniform(0, 1)
        plan = plan_block_lengths(surv, affine_sps(0.1, rng.uniform(0, 1)))
        assert (plan.lengths >= 0).all()
        assert plan.num_tokens == r + plan.lengths.sum() >= r
    # Zero survival and a very expensive target: bonus tokens only.
    plan = plan_block_lengths(np.zeros((3, 4)), affine_sps(0.0, 1.0))
    assert plan.lengths.tolist() == [0, 0, 0] and plan.num_tokens == 3 and plan.expected_tokens == 3.0


def test_caps_and_min_length():
    surv = np.tile([0.99, 0.98, 0.97, 0.96], (4, 1))
    free = lambda b: 1.0  # noqa: E731
    assert choose_block_lengths(surv, free, max_lengths=[0, 2, 4, 9]).tolist() == [0, 2, 4, 4]
    # min_length is granted even when drafting does not pay, but never beyond the cap.
    costly = affine_sps(0.0, 1.0)
    assert choose_block_lengths(surv, costly).tolist() == [0, 0, 0, 0]
    assert choose_block_lengths(surv, costly, max_lengths=[0, 1, 4, 4], min_length=2).tolist() == [0, 1, 2, 2]
    with pytest.raises(ValueError, match="max_lengths"):
        choose_block_lengths(surv, free, max_lengths=[1, 2])
    with pytest.raises(ValueError, match="max_lengths"):
        choose_block_lengths(surv, free, max_lengths=[1, -1, 2, 2])


def test_prefix_property_with_non_monotone_survival():
    # Slot 2 of request 0 looks great (0.95) but its predecessor is poor (0.2): it must wait for slot 1.
    surv = np.array([[0.2, 0.95], [0.6, 0.5]])
    plan = plan_block_lengths(surv, affine_sps(1.0, 0.25))
    assert plan.lengths.tolist() == [0, 2]
    assert plan.expected_tokens == pytest.approx(2 + 0.6 + 0.5)
    # Whatever is chosen, the reported tau is that of the prefixes.
    rng = np.random.default_rng(2)
    for _ in range(20):
        s = rng.uniform(0, 1, size=(5, 6))
        p = plan_block_lengths(s, affine_sps(1.0, rng.uniform(0, 0.3)))
        assert p.expected_tokens == pytest.approx(sum(1 + s[r, :l].sum() for r, l in enumerate(p.lengths)))


def test_torch_input_and_a_cost_with_sps_many_agree_with_callable():
    rng = np.random.default_rng(3)
    surv = random_survival(rng, 8, 6)
    cost = LinearCost()
    for b in range(1, 80):
        cost.observe(b, 0.01 + 0.0005 * b)
    a = plan_block_lengths(torch.tensor(surv, dtype=torch.float32), cost)
    b = plan_block_lengths(surv, lambda n: cost.sps(n))
    np.testing.assert_array_equal(a.lengths, b.lengths)
    assert a.num_tokens == b.num_tokens


def test_empty_and_degenerate_inputs():
    assert plan_block_lengths(np.zeros((0, 4)), lambda b: 1.0).lengths.shape == (0,)
    plan = plan_block_lengths(np.zeros((3, 0)), lambda b: 2.0)
    assert plan.lengths.tolist() == [0, 0, 0] and plan.throughput == 6.0
    with pytest.raises(ValueError, match="nan"):
        plan_block_lengths(np.array([[np.nan]]), lambda b: 1.0)


def test_fixed_block_lengths():
    assert fixed_block_lengths(3, 7).tolist() == [7, 7, 7]
    assert fixed_block_lengths(3, 7, max_lengths=[0, 3, 10]).tolist() == [0, 3, 7]


def test_linear_cost_fits_online_steps_and_uses_its_prior_until_sizes_spread():
    cost = LinearCost(overhead_tokens=10.0)
    for _ in range(20):
        cost.observe(8, 0.18)  # one size only: the prior sets the slope, the data the level
    a, b = cost.coefficients()
    assert abs(a / b - 10.0) < 1e-9 and abs(cost.seconds(8) - 0.18) < 1e-9
    for B, t in [(1, 0.101), (16, 0.251), (64, 0.731), (128, 1.371)] * 10:  # t = 0.091 + 0.01 B
        cost.observe(B, t)
    a, b = cost.coefficients()
    assert abs(b - 0.01) < 2e-3 and 0.0 < a < 0.2
    assert cost.sps(1) > cost.sps(8) > cost.sps(64)
    # Under load the policy trims: same survival, but a steeper cost per token gives shorter blocks.
    survival = np.tile([0.8, 0.6, 0.45, 0.3, 0.2], (16, 1))
    flat = plan_block_lengths(survival, LinearCost(overhead_tokens=1000.0)).lengths.sum()
    steep = plan_block_lengths(survival, LinearCost(overhead_tokens=2.0)).lengths.sum()
    assert steep < flat


def test_linear_cost_keeps_the_measured_time_of_small_steps():
    cost = LinearCost(overhead_tokens=10.0)
    line = {1: 0.035, 2: 0.036, 3: 0.037, 4: 0.038, 8: 0.042}  # 1 ms per token on a 34 ms step
    measured = {**line, 2: 0.040}  # ... but 2 tokens take 40 ms (measured with vLLM on this CPU)
    for _ in range(200):
        for b, t in measured.items():
            cost.observe(b, t)
    assert abs(cost.line(3) - 0.037) < 1.5e-3
    assert abs(cost.seconds(2) - 0.040) < 1e-3  # its own average
    assert abs(cost.seconds(3) - 0.037) < 1e-3 and abs(cost.seconds(16) - cost.line(16)) < 1e-12
    assert cost.sps(3) > cost.sps(2)  # not monotone: the policy must scan
    # A size seen fewer than MEASURED_MIN times keeps the line.
    fresh = LinearCost(overhead_tokens=10.0)
    for b in (1, 4, 1, 4, 1, 4, 2):
        fresh.observe(b, 0.035 if b == 1 else 0.038 if b == 4 else 0.08)
    assert fresh.seconds(2) == fresh.line(2)
    # Many sizes at once (the plan's scan): the same numbers, a step's extra seconds added to each.
    sizes = np.array([1, 2, 3, 8, 16, 40])
    np.testing.assert_allclose(cost.seconds_many(sizes), [cost.seconds(int(b)) for b in sizes], rtol=1e-12)
    np.testing.assert_allclose(cost.sps_many(sizes, 0.004), [1 / (cost.seconds(int(b)) + 0.004) for b in sizes],
                               rtol=1e-12)


def test_scan_finds_the_best_block_past_a_slow_size_that_stops_the_early_stop():
    seconds = {1: 1.0, 2: 1.5, 3: 1.05, 4: 1.1}  # B = 2 slow, as verifying 2 tokens is on this CPU
    survival = [[0.5, 0.4, 0.05]]
    cost = lambda b: 1.0 / seconds[b]  # noqa: E731
    assert plan_block_lengths(survival, cost).lengths.tolist() == [0]  # theta(1 draft) = 1.0: stops
    plan = plan_block_lengths(survival, cost, scan=True)
    assert plan.lengths.tolist() == [2]  # 1.9 / 1.05 = 1.81 > 1.95 / 1.1 = 1.77 > 1.0
    assert abs(plan.throughput - 1.9 / 1.05) < 1e-12 and plan.num_tokens == 3
    # With a monotone cost, scanning and the early stop agree.
    survival = np.tile([0.8, 0.6, 0.45, 0.3, 0.2], (16, 1))
    table = profile_sps({b: 0.05 + 0.002 * b for b in range(1, 129)})
    assert (plan_block_lengths(survival, table, scan=True).lengths ==
            plan_block_lengths(survival, table).lengths).all()
