"""Load-aware block lengths (Algorithm 1), the cost table, and sequential temperature scaling."""

import itertools
import json

import numpy as np
import pytest
import torch

from vllm_dspark.eval.metrics import calibration_report
from vllm_dspark.scheduling import (
    CALIBRATION_FILE,
    CostTable,
    DraftPause,
    apply_temperature,
    choose_block_lengths,
    fit_sequential_temperature,
    fixed_block_lengths,
    load_calibration,
    plan_block_lengths,
    save_calibration,
)


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


# ---------------------------------------------------------------------------------------------- policy


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
    table = CostTable.from_profile({b: 0.010 + 0.001 * b for b in range(1, 64)})
    row = np.array([0.9, 0.8, 0.7, 0.55, 0.4])
    for r in (1, 2, 3):
        surv = np.tile(row, (r, 1))
        best, _ = brute_force(surv, table.sps, [5] * r)
        plan = plan_block_lengths(surv, table)
        assert plan.throughput == pytest.approx(best, rel=1e-9)
        assert plan.lengths.max() - plan.lengths.min() <= 1  # identical requests get (nearly) equal blocks


def test_early_stop_hand_case():
    # SPS 100, 100, 80, 50 at B = 1..4: Theta = 100, 190, 192 (take 2), 125 (stop).
    table = CostTable.from_profile({1: 0.010, 2: 0.010, 3: 0.0125, 4: 0.020})
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
    table = CostTable.from_profile({b: 0.02 * max(1.0, b / 64) for b in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]})
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


def test_torch_input_and_cost_table_agree_with_callable():
    rng = np.random.default_rng(3)
    surv = random_survival(rng, 8, 6)
    table = CostTable.from_profile({b: 0.01 + 0.0005 * b for b in range(1, 80)})
    a = plan_block_lengths(torch.tensor(surv, dtype=torch.float32), table)
    b = plan_block_lengths(surv, lambda n: table.sps(n))
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


# ---------------------------------------------------------------------------------------------- cost table


def test_cost_table_is_monotone_on_noisy_profile():
    table = CostTable.from_profile({1: 0.010, 2: 0.009, 4: 0.012, 8: 0.011, 16: 0.020, 64: 0.030})
    sps = table.sps_many(np.arange(1, 300))
    assert (np.diff(sps) <= 1e-15).all()
    assert table.seconds(1) == pytest.approx(table.seconds(2))  # pooled violators
    assert table.seconds(200) > table.seconds(64)  # grows beyond the profile
    assert table.seconds(128) >= 0.030 * 2 - 1e-12  # at least compute-bound growth
    assert CostTable.from_profile({4: 0.01, 8: 0.02}).seconds(1) == pytest.approx(0.01)  # flat below


def test_cost_table_online_update_moves_estimate():
    table = CostTable.from_profile({1: 0.01, 8: 0.01, 64: 0.1}, alpha=0.2)
    before = table.seconds(8)
    table.observe(8, 0.05)
    after_one = table.seconds(8)
    assert before < after_one < 0.05  # moved, but one step does not define the bucket
    for _ in range(60):
        table.observe(8, 0.05)
    assert table.seconds(8) == pytest.approx(0.05, rel=1e-3)
    # Observations that contradict monotonicity are pooled, not trusted: 32 now looks slower than 64.
    for _ in range(60):
        table.observe(32, 0.2)
    assert table.to_dict()["buckets"]["32"][0] == pytest.approx(0.2, rel=1e-3)
    assert (np.diff(table.sps_many(np.arange(1, 100))) <= 1e-15).all()
    assert table.seconds(32) == pytest.approx(table.seconds(64))

    # A bucket never profiled starts from the interpolated prior.
    t2 = CostTable.from_profile({1: 0.01, 100: 0.2}, alpha=0.1)
    prior = t2.seconds(50)
    t2.observe(50, 0.15)
    assert t2.seconds(50) == pytest.approx(0.9 * prior + 0.1 * 0.15)


def test_cost_table_buckets_and_round_trip():
    table = CostTable(significant_bits=6)
    assert [table.bucket(b) for b in (1, 63, 64, 65, 130)] == [1, 63, 64, 64, 128]
    table = CostTable.from_profile({1: 0.01, 16: 0.012, 256: 0.05})
    table.observe(40, 0.02)
    clone = CostTable.from_dict(json.loads(json.dumps(table.to_dict())))
    b = np.arange(1, 1000)
    np.testing.assert_allclose(clone.sps_many(b), table.sps_many(b))


def test_empty_cost_table_means_free_verification():
    table = CostTable()
    assert table.sps(1) == table.sps(1000) == 1.0
    assert choose_block_lengths(np.full((2, 3), 0.5), table).tolist() == [3, 3]
    table.observe(4, 0.02)  # first observation defines the table
    assert table.seconds(4) == pytest.approx(0.02)


def test_cost_table_validates():
    with pytest.raises(ValueError, match="seconds"):
        CostTable.from_profile({4: 0.0})
    with pytest.raises(ValueError, match="num_tokens"):
        CostTable().observe(0, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        CostTable(alpha=0.0)


# ---------------------------------------------------------------------------------------------- calibration


def synthetic_rounds(rng, n, k, overconfidence):
    """True per-round conditional acceptances, sequential accept outcomes, over-confident logits."""
    p = rng.uniform(0.15, 0.97, size=(n, k))
    accepted = (rng.uniform(size=(n, k)) < p).cumprod(axis=1).sum(axis=1)
    z = overconfidence * np.log(p / (1 - p))
    return z, accepted


def test_sts_lowers_ece_on_held_out_rounds():
    rng = np.random.default_rng(4)
    k = 5
    z_fit, acc_fit = synthetic_rounds(rng, 20000, k, overconfidence=3.0)
    z_test, acc_test = synthetic_rounds(rng, 20000, k, overconfidence=3.0)
    temps = fit_sequential_temperature(z_fit, acc_fit, num_bins=10)
    assert temps.shape == (k,)
    assert 2.0 < temps[0] < 4.5  # undoes the 3x over-confidence at the first position
    before = calibration_report(apply_temperature(z_test, np.ones(k)), acc_test)["ece"]
    after = calibration_report(apply_temperature(z_test, temps), acc_test)["ece"]
    for k_, (b, a) in enumerate(zip(before, after), start=1):
        assert a < 0.5 * b and a < 0.03, (k_, b, a)


def test_sts_leaves_calibrated_logits_near_one_and_respects_drafted():
    rng = np.random.default_rng(5)
    z, acc = synthetic_rounds(rng, 20000, 3, overconfidence=1.0)
    temps = fit_sequential_temperature(z, acc)
    assert np.all((temps > 0.7) & (temps < 1.4)), temps
    # Rounds that drafted fewer positions do not vote for the later ones; no round reached k=3 -> 1.0.
    drafted = np.minimum(2, rng.integers(1, 4, size=z.shape[0]))
    temps2 = fit_sequential_temperature(z * 3.0, np.minimum(acc, drafted), drafted=drafted)
    assert temps2[2] == 1.0 and temps2[0] > 2.0
    # A position few rounds reach keeps 1.0 (the fit would land on the grid's bounds); with the floor
    # lowered the same rounds give a temperature far from 1.
    sparse_acc = np.minimum(acc, 1)
    sparse_acc[:12] = 3  # 12 rounds reach position 3 (and 2)
    rare = fit_sequential_temperature(z * 3.0, sparse_acc)
    assert rare[2] == 1.0 and rare[0] > 2.0
    assert fit_sequential_temperature(z * 3.0, sparse_acc, min_reached=1)[2] != 1.0


def test_apply_temperature_numpy_and_torch_agree():
    z = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    temps = np.array([2.0, 0.5, 1.0])
    expected = np.cumprod(1 / (1 + np.exp(-z / temps)), axis=1)
    np.testing.assert_allclose(apply_temperature(z, temps), expected, rtol=1e-12)
    got = apply_temperature(torch.tensor(z, dtype=torch.float64), temps)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(apply_temperature(z[:, :2], temps), expected[:, :2])
    with pytest.raises(ValueError, match="temperatures"):
        apply_temperature(z, temps[:2])


def test_calibration_json_round_trip(tmp_path):
    temps = np.array([1.5, 2.25, 0.75])
    path = save_calibration(tmp_path, temps, {"drafter": "toy", "rounds": 123})
    assert path.endswith(CALIBRATION_FILE)
    loaded, meta = load_calibration(tmp_path)
    np.testing.assert_array_equal(loaded, temps)
    assert meta == {"drafter": "toy", "rounds": 123}
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other", "temperatures": [1.0]}))
    with pytest.raises(ValueError, match="format"):
        load_calibration(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="positive"):
        save_calibration(tmp_path / "x.json", [1.0, -1.0])


def test_linear_cost_fits_online_steps_and_uses_its_prior_until_sizes_spread():
    from vllm_dspark.scheduling import LinearCost

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


def test_linear_cost_learns_a_small_step_that_is_slower_than_its_line():
    from vllm_dspark.scheduling import LinearCost

    cost = LinearCost(overhead_tokens=10.0)
    line = {1: 0.035, 2: 0.036, 3: 0.037, 4: 0.038, 8: 0.042}  # 1 ms per token on a 34 ms step
    measured = {**line, 2: 0.040}  # ... but 2 tokens take 40 ms (measured with vLLM on this CPU)
    for _ in range(200):
        for b, t in measured.items():
            cost.observe(b, t)
    assert abs(cost.line(3) - 0.037) < 1.5e-3
    assert abs(cost.seconds(2) - 0.040) < 1e-3  # its own correction
    assert abs(cost.seconds(3) - 0.037) < 1e-3 and abs(cost.seconds(16) - cost.line(16)) < 1e-12
    assert cost.sps(3) > cost.sps(2)  # not monotone: the policy must scan
    # A size seen fewer than RESIDUAL_MIN times keeps the line.
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
    table = CostTable.from_profile({b: 0.05 + 0.002 * b for b in range(1, 129)})
    assert (plan_block_lengths(survival, table.sps, scan=True).lengths ==
            plan_block_lengths(survival, table).lengths).all()


# ------------------------------------------------------------------------------------------ pauses in drafting
def test_draft_pause_backs_off_exponentially_and_resets():
    pause = DraftPause(base=4, cap=16)
    assert not pause.active(0, 32)
    starts = []
    step = 0
    for _ in range(5):  # five plans in a row find drafting not worth it, each right when the pause ends
        pause.not_worth_it(step, 32)
        paused = [s for s in range(step, step + 40) if pause.active(s, 32)]
        assert paused == list(range(step, paused[-1] + 1))
        starts.append(len(paused))
        step = paused[-1] + 1
    assert starts == [4, 8, 16, 16, 16]  # doubled, capped
    pause.worth_it()
    pause.not_worth_it(step, 32)
    assert [pause.active(step + i, 32) for i in range(5)] == [True] * 4 + [False]  # back to the base pause
    for _ in range(3):  # small batches never grow the pause: whether drafting pays turns on the text
        step += 4
        pause.not_worth_it(step, 2, grow=False)
        assert [pause.active(step + i, 2) for i in range(5)] == [True] * 4 + [False]


def test_draft_pause_ends_when_the_batch_halves():
    pause = DraftPause(base=8, cap=64)
    pause.not_worth_it(0, 32)
    pause.not_worth_it(8, 32)  # the second pause: 16 steps
    assert pause.active(9, 17)  # still more than half the batch
    assert not pause.active(10, 16)  # load fell: probe at once ...
    pause.not_worth_it(10, 16)
    assert [pause.active(10 + i, 16) for i in range(9)] == [True] * 8 + [False]  # ... with a fresh backoff


def test_draft_pause_and_probe_settings_are_checked():
    from vllm_dspark.config import DSparkConfigError
    from vllm_dspark.integration.proposer import DSparkSettings

    with pytest.raises(ValueError, match="expected 1 <= base <= cap; got base=8, cap=4"):
        DraftPause(8, 4)
    ok = DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "probe_interval": 8}})
    assert (ok.probe_interval, ok.probe_interval_max) == (8, 1024)
    with pytest.raises(DSparkConfigError, match=r'\["probe_interval_max"\]=16: expected >= probe_interval \(32\)'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "probe_interval_max": 16}})
    with pytest.raises(DSparkConfigError, match=r'\["probe_interval"\]=0: expected an integer >= 1'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "probe_interval": 0}})
    assert DSparkSettings.from_additional_config({"dspark": {"drafter": "d"}}).head_dtype == "auto"
    with pytest.raises(DSparkConfigError, match=r'\["lookup"\]=\'yes\': expected true or false'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "lookup": "yes"}})
    with pytest.raises(DSparkConfigError, match=r'\["lookup_max"\]=1: expected >= lookup_min \(2\)'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "lookup": True, "lookup_max": 1}})
    with pytest.raises(DSparkConfigError, match=r'\["lookup_min"\]=0: expected an integer >= 1'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "lookup_min": 0}})
    with pytest.raises(DSparkConfigError, match=r'\["head_dtype"\]=\'int8\': expected auto\|same\|float32'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "head_dtype": "int8"}})


def _bare_proposer(k: int = 4):
    """A DSparkProposer with only the state ``_plan`` reads (no engine, no drafter)."""
    from vllm_dspark.integration.proposer import DSparkProposer, ProposerStats
    from vllm_dspark.scheduling import LinearCost, PayoffMeter

    prop = DSparkProposer.__new__(DSparkProposer)
    prop.calibration, prop.max_model_len, prop.num_spec_tokens, prop._g = None, 10_000, k, k
    prop.cost, prop.draft_cost = LinearCost(overhead_tokens=10.0), LinearCost(overhead_tokens=4.0)
    for _ in range(prop.WARMUP_STEPS):
        prop.cost.observe(16, 0.1)  # a 16-token step takes 0.1 s
    prop._pause, prop.stats, prop.step_overhead, prop.net_ratio = DraftPause(32, 1024), ProposerStats(), 0.0, None
    prop._probe_steps = 0
    prop.draft_rest, prop.plain_rest, prop._timing = LinearCost(overhead_tokens=4.0), None, None
    prop.payoff, prop._last_ratio, prop._batch_req_ids = PayoffMeter(), None, [f"r{i}" for i in range(k)]
    prop._payoff_logged, prop._seeds = set(), {}
    prop.stats.steps = 100
    return prop


def test_probe_stands_for_the_batch_and_verifies_nothing():
    confident = torch.full((4, 4), 6.0)  # survival ~1 at every position
    prop = _bare_proposer()
    prop._pause.not_worth_it(40, 16)
    assert not prop._pause.active(100, 16) and prop._pause.probing
    # Cheap drafting: worth it for the batch of 16 -> the pause ends, but the probe itself drafts nothing.
    assert prop._plan(confident, [10] * 4, 4, 0.001, batch=16) == [0, 0, 0, 0]
    assert (prop._pause.until, prop._pause.probing, prop._pause.interval) == (0, False, 32)
    assert prop._g > 1
    # The same four rows drafting for themselves (not a probe) get their drafts.
    assert prop._plan(confident, [10] * 4, 4, 0.001, batch=4) == [4, 4, 4, 4]
    # Drafting that costs more than it saves for a batch of 16: a pause, sized from the whole batch.
    prop = _bare_proposer()
    assert prop._plan(confident, [10] * 4, 4, 5.0, batch=16) == [0, 0, 0, 0]
    assert (prop._pause.until, prop._pause.batch, prop._pause.interval) == (100 + 32, 16, 64)
    a, b = prop.draft_cost.coefficients()
    assert a + 4 * b == pytest.approx(5.0)  # drafting 4 requests took 5 s: the model learned it


def test_engine_overhead_per_step_favours_drafting():
    """One request, drafts of survival 0.5 and a drafter that costs half a forward: drafting does not pay against
    the forward alone (pause), it does once the engine's own time per step (which drafting does not add to)
    counts. Either way this step's drafts are verified where that pays: they are already paid for."""
    half = torch.zeros(1, 4)  # sigmoid(0) = 0.5 per position
    prop = _bare_proposer()
    lengths = prop._plan(half, [10], 4, 0.05, batch=1)
    assert lengths[0] > 0 and prop._pause.until == 100 + 32 and prop.net_ratio < 1
    prop = _bare_proposer()
    prop.step_overhead = 0.2
    assert prop._plan(half, [10], 4, 0.05, batch=1)[0] >= lengths[0]  # a longer step: longer blocks pay
    assert prop._pause.until == 0 and prop.net_ratio > 1


def test_measured_step_periods_decide_where_the_pieces_timed_miss_a_cost():
    """Steps timed whole (start to next start): a drafting step's rest (period - forward - drafter) that the
    forward and drafter timings do not see makes drafting not pay; the same rest in plain steps does not."""
    from vllm_dspark.integration.proposer import _StepTiming

    half = torch.zeros(4, 4)
    prop = _bare_proposer()
    prop.step_overhead = 0.01
    for _ in range(40):
        prop._plan(half, [10] * 4, 4, 0.005, batch=4)
    assert prop._pause.until == 0 and prop.net_ratio > 1  # forward + drafter alone: drafting pays
    t = 1000.0
    for drafts in (True, False):  # drafting steps: 0.1 s forward, 5 ms drafter, 60 ms more; plain: 10 ms more
        for _ in range(8):
            prop._timing = _StepTiming(t, 0.1, 4, 4, verified=drafts, prefill=True, drafter=0.005 * drafts)
            t += 0.1 + (0.065 if drafts else 0.01)
            prop._observe_period(t)
    assert prop._overheads(4) == (pytest.approx(0.06), pytest.approx(0.01))
    for _ in range(40):
        prop._plan(half, [10] * 4, 4, 0.005, batch=4)
    assert prop._pause.until > 0 and prop.net_ratio < 1
    # An idle engine between two generate() calls is not a step's cost: the rest is clamped to the forward.
    prop._timing = _StepTiming(t, 0.1, 4, 4, verified=False, prefill=True)
    prop._observe_period(t + 3600.0)
    assert prop.plain_rest <= 0.1


def test_a_pause_between_steps_is_not_a_step_cost():
    """An engine paused between two steps (idle, or while another engine in the process steps: the bench's time
    slices) neither raises its overhead per step nor adds to the previous step's measured period."""
    import time

    from vllm_dspark.integration.proposer import _StepTiming

    prop = _bare_proposer()
    prop.store, prop._last_forward, prop.step_overhead = None, 0.1, 0.002
    now = time.perf_counter()
    prop._step_end, prop._timing = now - 0.004, _StepTiming(now - 0.104, 0.1, 4, 4, verified=False, prefill=False)
    prop.on_finished([])  # a usual gap (4 ms + this call): folded in
    assert 0.0021 < prop.step_overhead < 0.0035 and prop._timing is None and prop.plain_rest is not None
    overhead, rest = prop.step_overhead, prop.plain_rest
    for pause in (0.06, 3600.0):  # > half a forward: another engine's step, an idle engine
        now = time.perf_counter()
        prop._step_end = now - pause
        prop._timing = _StepTiming(now - pause - 0.1, 0.1, 4, 4, verified=False, prefill=False)
        prop.on_finished([])
        assert (prop.step_overhead, prop.plain_rest, prop._timing) == (overhead, rest, None)
    assert prop._step_t0 is not None  # the next step's forward is timed as usual


def test_one_unlucky_block_does_not_pause_drafting():
    prop = _bare_proposer()
    prop.step_overhead = 0.2
    confident, hopeless = torch.full((1, 4), 6.0), torch.full((1, 4), -8.0)
    for _ in range(20):
        prop._plan(confident, [10], 4, 0.05, batch=1)
    high = prop.net_ratio
    assert prop._plan(hopeless, [10], 4, 0.05, batch=1) == [0]  # nothing worth verifying this step ...
    assert prop._pause.until == 0 and 1 < prop.net_ratio < high  # ... but drafting goes on
    for _ in range(100):
        prop._plan(hopeless, [10], 4, 0.05, batch=1)
    assert prop._pause.until > 0  # a run of them pauses it


def test_a_small_batch_probes_for_several_steps_and_keeps_its_running_average():
    """After a pause a single request drafts SMALL_PROBE_STEPS steps before the next verdict, and its running
    average carries over: the first block after a pause, unlucky or lucky, does not decide alone."""
    prop = _bare_proposer()
    prop.step_overhead = 0.2
    confident, hopeless = torch.full((1, 4), 6.0), torch.full((1, 4), -8.0)
    prop.net_ratio = 0.9  # drafting did not pay before the pause ...
    prop._pause.not_worth_it(68, 1, grow=False)
    assert prop._pause.active(99, 1) and not prop._pause.active(100, 1) and prop._pause.probing
    for i in range(prop.SMALL_PROBE_STEPS - 1):  # ... and now it does: no verdict while the average is < 1
        assert prop._plan(confident, [10], 4, 0.05, batch=1) == [4]
        assert prop._pause.until == 100 and prop._pause.probing, i
    assert prop.net_ratio > 1
    prop._plan(confident, [10], 4, 0.05, batch=1)  # the verdict: drafting pays
    assert (prop._pause.until, prop._pause.probing, prop._probe_steps) == (0, False, 0)
    # High average, paused anyway (e.g. the budget), then one hopeless block: the average barely moves.
    high = prop.net_ratio
    prop._pause.not_worth_it(100, 1, grow=False)
    assert not prop._pause.active(132, 1) and prop._pause.probing
    assert prop._plan(hopeless, [10], 4, 0.05, batch=1) == [0]
    assert 1 < prop.net_ratio < high and high - prop.net_ratio < 0.1 * high


def test_no_verdict_before_the_cost_model_has_seen_enough_steps():
    from vllm_dspark.scheduling import LinearCost

    prop = _bare_proposer()
    prop.cost = LinearCost(overhead_tokens=10.0)
    prop.cost.observe(60, 0.06)  # a prefill only: a decode step looks 3x cheaper than it is
    hopeless = torch.full((1, 4), -8.0)
    for _ in range(prop.WARMUP_STEPS - 2):
        prop.cost.observe(1, 0.03)
        prop._plan(hopeless, [10], 4, 0.05, batch=1)
        assert prop._pause.until == 0 and prop.net_ratio < 1
    prop.cost.observe(1, 0.03)
    prop._plan(hopeless, [10], 4, 0.05, batch=1)
    assert prop._pause.until > 0  # enough steps: the verdict


def test_prompt_lookup_rows_are_planned_with_their_measured_acceptance():
    from vllm_dspark.lookup import LookupStats

    prop = _bare_proposer()
    prop.lookup_stats = LookupStats(4, prior=0.9)
    assert prop._plan(None, [10], 4, 0.0001, batch=1, lookup=[3]) == [3]  # never beyond the copied text
    assert len(prop.draft_cost) == 0  # the drafter did not run: its cost model is untouched
    hopeless = torch.full((1, 4), -8.0)
    assert prop._plan(hopeless, [10, 10], 4, 0.01, batch=2, lookup=[2]) == [0, 2]
    assert len(prop.draft_cost) == 1
    prop.lookup_stats = LookupStats(4, prior=0.01)  # lookups that are never accepted are not verified
    assert prop._plan(None, [10], 4, 0.0001, batch=1, lookup=[3]) == [0]


def test_prompt_lookup_only_in_small_all_greedy_batches():
    from vllm_dspark.integration.proposer import DSparkSettings

    prop = _bare_proposer()
    prop.settings = DSparkSettings(drafter="d", lookup=True, lookup_max_batch=2)
    prop._budget = 4
    text = np.array([[5, 1, 2, 3, 9, 8, 7, 6, 1, 2, 3]] * 3)
    n = np.array([11, 11, 11])
    assert prop._lookup([0, 1], [0.0, 0.0], n, text) == {0: [9, 8, 7, 6], 1: [9, 8, 7, 6]}
    assert prop._lookup([0, 1, 2], [0.0] * 3, n, text) == {}  # a batch of 3: the drafter serves it
    assert prop._lookup([0, 1], [0.0, 0.7], n, text) == {}  # a sampled request: q for all rows or none
    prop.settings = DSparkSettings(drafter="d", lookup=False)
    assert prop._lookup([0], [0.0], n, text) == {}


def test_a_big_batch_weighs_its_verdict_by_its_size():
    """Under load one step averages over many requests, and drafting at a loss is costly: two losing steps of a
    16-request batch pause drafting (a single request needs a long run of them, above)."""
    prop = _bare_proposer()
    prop.step_overhead = 0.2
    for _ in range(5):
        prop._plan(torch.full((16, 4), 6.0), [10] * 16, 4, 0.05, batch=16)
    assert prop._pause.until == 0 and prop.net_ratio > 2
    for _ in range(2):
        prop._plan(torch.full((16, 4), -8.0), [10] * 16, 4, 0.05, batch=16)
    assert prop._pause.until > 0


def test_requests_without_context_are_counted_and_the_first_few_logged(caplog):
    from types import SimpleNamespace

    prop = _bare_proposer()
    prop.store = SimpleNamespace(length=lambda req_id: 5)
    prop._gap_reqs, prop._gap_logged = {"a": "vLLM's prefix cache served its first 64 tokens"}, set()
    with caplog.at_level("INFO", logger="vllm_dspark"):
        for req_id in ["a", "a", "b", "c", "d", "e"]:
            prop._skip(req_id, 9)
    assert prop.stats.skipped_gap == 6
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == prop.GAP_LOG_REQUESTS == 3  # one line per request, three requests at most
    assert lines[0] == ("vllm-dspark: request a does not draft: its drafter context has 5 rows, 9 expected "
                        "(vLLM's prefix cache served its first 64 tokens)")
    assert lines[1].startswith("vllm-dspark: request b does not draft") and "were not delivered" in lines[1]


def test_payoff_meter_measures_drafting_against_plain_steps_per_batch():
    from vllm_dspark.scheduling import PayoffMeter

    meter = PayoffMeter(max_batch=4, min_draft=8, min_plain=4, refresh=100)
    for i in range(8):  # drafting at batch 4: 6 tokens per 0.15 s = 40 tok/s; the model predicted 1.2x
        meter.observe(4, True, 6, 0.15, predicted=1.2, step=i)
        assert meter.correction(4) is None  # no plain steps yet
    assert meter.wants_plain(4, 8) and not meter.wants_plain(3, 8)  # only where drafting was measured
    for i in range(4):  # plain: 4 tokens per 0.1 s = 40 tok/s
        meter.observe(4, False, 4, 0.1, step=10 + i)
    assert meter.measured(4) == pytest.approx(1.0)
    assert meter.correction(4) == pytest.approx(1.0 / 1.2)
    assert not meter.wants_plain(4, 50) and meter.wants_plain(4, 114 + 1)  # stale after `refresh` steps
    meter.observe(4, True, 6, 0.15)  # a drafting step without a prediction is not counted
    meter.observe(9, False, 9, 0.1)  # beyond max_batch: not measured
    assert meter.count(4) == (8, 4) and meter.count(9) == (0, 0)
    for _ in range(200):  # drafting steps 4x faster: the correction is clipped
        meter.observe(4, True, 24, 0.15, predicted=1.0)
    assert meter.correction(4) == pytest.approx(meter.clip)
    with pytest.raises(ValueError, match="PayoffMeter"):
        PayoffMeter(min_plain=0)


def test_measured_payoff_overrides_the_predicted_one(caplog):
    """The model predicts that drafting pays at batch 4; the whole steps measured say it loses 10%: pause. First
    it pauses (base interval, no growth) to measure plain steps it has never seen."""
    from vllm_dspark.integration.proposer import _StepTiming

    confident = torch.full((4, 4), 0.5)
    prop = _bare_proposer()
    prop.step_overhead = 0.05
    for _ in range(40):
        prop._plan(confident, [10] * 4, 4, 0.005, batch=4)
    assert prop._pause.until == 0 and 1.2 < prop.net_ratio < 1.8
    t = 0.0
    for drafting in [True] * prop.payoff.min_draft:
        prop._timing = _StepTiming(t, 0.1, 4, 5, verified=True, prefill=False, predicted=prop.net_ratio)
        t += 0.125
        prop._observe_period(t)
    prop.stats.steps = 200
    prop._plan(confident, [10] * 4, 4, 0.005, batch=4)
    assert (prop._pause.until, prop._pause.interval) == (200 + 32, 32)  # a plain window to measure
    for _ in range(prop.payoff.min_plain):  # plain steps: 4 tokens per 0.09 s = 44.4 tok/s vs 40 drafting
        prop._timing = _StepTiming(t, 0.09, 4, 4, verified=False, prefill=False)
        t += 0.09
        prop._observe_period(t)
    assert prop.payoff.measured(4) == pytest.approx(0.9)
    prop.stats.steps = 240
    with caplog.at_level("INFO", logger="vllm_dspark"):
        prop._plan(confident, [10] * 4, 4, 0.005, batch=4)
    assert prop._pause.until == 240 + 32  # measured: drafting loses
    predicted = prop.payoff.measured(4) / prop.payoff.correction(4)
    assert [r.getMessage() for r in caplog.records] == [
        "vllm-dspark: measured at 4 requests: drafting steps 0.90x the tokens/s of plain steps (the cost model "
        f"predicted {predicted:.2f}x); later pause verdicts are corrected by that"]
    # Without the measurement the same plan keeps drafting.
    prop.payoff = type(prop.payoff)()
    prop.stats.steps = 300
    prop._plan(confident, [10] * 4, 4, 0.005, batch=4)
    assert prop._pause.until == 0


def test_a_batch_size_measured_to_lose_pauses_without_probing():
    """Drafting at 4 requests measured 0.9x the tokens/s of plain steps: 4-request batches skip drafting with
    growing pauses (not a probe every 32 steps) until that measurement is stale; noise within two standard errors,
    other batch sizes and a missing plain measurement do not count as losing."""
    from vllm_dspark.scheduling import PayoffMeter

    def meter(draft_tokens, stale_after=1024):
        m = PayoffMeter(min_draft=8, min_plain=4, stale_after=stale_after)
        for i in range(8):  # 0.125 s per drafting step
            m.observe(4, True, draft_tokens(i), 0.125, predicted=1.2, step=i)
        assert not m.loses(4, 8)  # no plain steps yet
        for i in range(4):  # plain: 4 tokens per 0.09 s = 44.4 tok/s
            m.observe(4, False, 4, 0.09, step=10 + i)
        return m

    steady = meter(lambda i: 5, stale_after=100)  # 40 tok/s
    assert steady.measured(4) == pytest.approx(0.9)
    assert steady.loses(4, 20) and not steady.pays(4) and not steady.loses(3, 20)
    assert steady.loses(4, 7 + 100) and not steady.loses(4, 7 + 101)  # last drafting step at 7: stale after 100
    noisy = meter(lambda i: 1 + 8 * (i % 2))  # also 40 tok/s, but 1 or 9 tokens per step
    assert noisy.measured(4) == pytest.approx(0.9, rel=0.01) and not noisy.loses(4, 20)

    prop = _bare_proposer()
    prop.payoff, prop.store, prop.adaptive = meter(lambda i: 5), object(), True
    prop.stats.steps, pauses = 20, []
    for _ in range(4):
        prop.stats.steps = max(prop.stats.steps, prop._pause.until)  # the previous pause is over
        assert prop._propose([[1]] * 4, np.full(4, 10)) == [[]] * 4
        pauses.append(prop._pause.until - (prop.stats.steps - 1))
    assert pauses == [32, 64, 128, 256]


def test_payoff_correction_is_shrunk_by_the_noise_of_few_drafting_steps():
    """A single request emits 1 or 3 tokens per drafting step: after 32 steps a 15% shortfall against the model is
    within two standard errors (no correction); after 400 it is not (corrected, less the remaining error)."""
    from vllm_dspark.scheduling import PayoffMeter

    meter = PayoffMeter(half_life=1e9)
    for _ in range(16):
        meter.observe(1, False, 1, 0.05)  # plain: 20 tok/s
    for i in range(32):  # drafting: 2 tokens per 0.1 s on average = 20 tok/s; the model predicted 1/0.85
        meter.observe(1, True, 1 + 2 * (i % 2), 0.1, predicted=1 / 0.85)
    assert meter.measured(1) == pytest.approx(1.0)
    assert meter.correction(1) == 1.0  # 0.85 + 2 x 0.088 > 1
    for i in range(368):
        meter.observe(1, True, 1 + 2 * (i % 2), 0.1, predicted=1 / 0.85)
    assert meter.correction(1) == pytest.approx(0.85 + 2 * 0.5 / 400 ** 0.5, rel=1e-3)


def test_a_small_batch_keeps_drafting_while_its_drafting_steps_measurably_pay():
    """One request: hopeless confidences make the model pause, unless its drafting steps measured clearly more
    tokens/s than its plain steps; once they measure less, the model's verdict is back."""
    from vllm_dspark.integration.proposer import _StepTiming

    prop = _bare_proposer(k=1)
    prop.step_overhead = 0.01
    hopeless = torch.full((1, 4), -8.0)
    t = 0.0

    def steps(n, drafting, tokens, seconds):
        nonlocal t
        for i in range(n):
            prop._timing = _StepTiming(t, seconds, 1, tokens(i), verified=drafting, prefill=False,
                                       predicted=1.0 if drafting else None)
            t += seconds
            prop._observe_period(t)

    steps(16, False, lambda i: 1, 0.03)  # plain: 33 tok/s
    steps(40, True, lambda i: 1 + i % 2, 0.035)  # drafting: 1.5 tokens per 35 ms = 43 tok/s
    assert prop.payoff.pays(1)
    for _ in range(100):
        prop._plan(hopeless, [10], 4, 0.005, batch=1)
    assert prop._pause.until == 0 and prop.net_ratio < 1  # the model alone would have paused
    steps(300, True, lambda i: 1, 0.035)  # now drafting yields nothing: 28.6 tok/s
    assert not prop.payoff.pays(1)
    prop._plan(hopeless, [10], 4, 0.005, batch=1)
    assert prop._pause.until > 0


def test_a_probe_drafts_the_requests_with_the_least_deferred_context():
    from vllm_dspark.integration.proposer import probe_rows

    deferred = [900, 3, 250, 0, 3, 3, 40, 700]
    assert probe_rows(deferred, turn=0, n=4) == [1, 3, 4, 5]  # 0, then the three 3s
    assert probe_rows(deferred, turn=5, n=3) == [1, 3, 5]  # ties taken from row 5 on: 5, then (wrapping) 1
    assert probe_rows([0] * 6, turn=4, n=2) == [4, 5]  # all equal: in turn, as before
    assert probe_rows([0] * 6, turn=5, n=2) == [0, 5]
    assert probe_rows([1, 2], turn=0, n=4) == [0, 1]  # fewer rows than n: all

