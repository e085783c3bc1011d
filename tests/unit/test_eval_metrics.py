"""Acceptance / calibration / speedup maths, checked against hand-computed numbers, and the plots."""

import itertools

import numpy as np
import pytest

from vllm_dspark.eval.metrics import (
    AcceptanceStats,
    auroc,
    calibration_report,
    conditional_from_survival,
    expected_calibration_error,
    expected_speedup,
    per_category_tau,
    reliability_bins,
    survival_from_conditional,
)

nan = float("nan")


# ---------------------------------------------------------------------------------------------- acceptance


def test_fixed_k_acceptance_by_hand():
    # Four rounds of K = 3 drafts, accepting 0, 1, 3, 2.
    st = AcceptanceStats.from_rounds([3, 3, 3, 3], [0, 1, 3, 2])
    assert st.num_rounds == 4
    assert st.tau == pytest.approx((1 + 2 + 4 + 3) / 4)  # 2.5, bonus token included
    assert st.drafted_at.tolist() == [4, 4, 4]
    assert st.accepted_at.tolist() == [3, 2, 1]
    np.testing.assert_allclose(st.survival, [3 / 4, 2 / 4, 1 / 4])
    np.testing.assert_allclose(st.conditional, [3 / 4, 2 / 3, 1 / 2])
    # Fixed K: conditional_k = survival_k / survival_{k-1}.
    np.testing.assert_allclose(st.conditional, conditional_from_survival(st.survival))
    d = st.to_dict()
    assert d["tau"] == 2.5 and d["survival"] == [0.75, 0.5, 0.25] and d["num_rounds"] == 4


def test_variable_draft_lengths_by_hand():
    # Rounds drafted 1, 3, 2, 0 tokens and accepted 1, 1, 2, 0.
    st = AcceptanceStats.from_rounds([1, 3, 2, 0], [1, 1, 2, 0], max_k=4)
    assert st.tau == pytest.approx((2 + 2 + 3 + 1) / 4)
    assert st.drafted_at.tolist() == [3, 2, 1, 0]
    assert st.accepted_at.tolist() == [3, 1, 0, 0]
    # Position 2 was judged in rounds 1 and 2 only (round 0 drafted 1 token): one acceptance of two.
    assert st.reached_at.tolist() == [3, 2, 0, 0]
    np.testing.assert_allclose(st.survival, [1.0, 0.5, 0.0, nan])
    np.testing.assert_allclose(st.conditional, [1.0, 0.5, nan, nan])


def test_from_rounds_validates():
    with pytest.raises(ValueError, match="exceeds drafted"):
        AcceptanceStats.from_rounds([2, 2], [1, 3])
    with pytest.raises(ValueError, match="same length"):
        AcceptanceStats.from_rounds([2, 2], [1])


def test_vllm_counters_agree_with_rounds():
    rng = np.random.default_rng(0)
    k, n = 7, 500
    accepted = (rng.uniform(size=(n, k)) < 0.75).cumprod(1).sum(1)
    drafted = np.full(n, k)
    ours = AcceptanceStats.from_rounds(drafted, accepted)
    theirs = AcceptanceStats.from_vllm_counters(
        num_drafts=n,
        num_draft_tokens=n * k,
        num_accepted_tokens=int(accepted.sum()),
        accepted_per_pos=[int((accepted >= j + 1).sum()) for j in range(k)],
    )
    assert theirs.num_rounds == ours.num_rounds
    assert theirs.tau == pytest.approx(ours.tau)
    for field in ("drafted_at", "accepted_at", "reached_at"):
        np.testing.assert_array_equal(getattr(theirs, field), getattr(ours, field))
    np.testing.assert_allclose(theirs.survival, ours.survival)
    np.testing.assert_allclose(theirs.conditional, ours.conditional)
    with pytest.raises(ValueError, match="variable"):
        AcceptanceStats.from_vllm_counters(n, n * k - 3, int(accepted.sum()), theirs.accepted_at.tolist())
    with pytest.raises(ValueError, match="num_accepted_tokens"):
        AcceptanceStats.from_vllm_counters(n, n * k, int(accepted.sum()) + 1, theirs.accepted_at.tolist())


def test_survival_conditional_conversions():
    np.testing.assert_allclose(conditional_from_survival([0.8, 0.4, 0.2]), [0.8, 0.5, 0.5])
    np.testing.assert_allclose(survival_from_conditional([0.8, 0.5, 0.5]), [0.8, 0.4, 0.2])
    rng = np.random.default_rng(1)
    cond = rng.uniform(0.05, 1.0, size=9)
    np.testing.assert_allclose(conditional_from_survival(survival_from_conditional(cond)), cond)
    # After survival hits 0 the conditional is undefined, not 0.
    np.testing.assert_allclose(conditional_from_survival([0.5, 0.0, 0.0]), [0.5, 0.0, nan])


def test_per_category_tau():
    got = per_category_tau(["math", "chat", "math", "chat", "code"], [4, 4, 4, 4, 4], [4, 0, 2, 1, 3])
    assert got == {"math": 4.0, "chat": 1.5, "code": 4.0}
    assert list(got) == ["math", "chat", "code"]


def test_expected_speedup():
    # tokens/round = 1 + 0.5 + 0.25 = 1.75; 1.75 * 10 ms / (2 ms + 12 ms) = 1.25.
    assert expected_speedup([0.5, 0.5], 10.0, 2.0, 12.0) == pytest.approx(1.25)
    seen = []
    expected_speedup([0.5, 0.5], 10.0, 2.0, lambda b: seen.append(b) or 12.0)
    assert seen == [3]  # verifies gamma + 1 tokens
    # DSpark's flat 0.74 over 7 positions, free drafting and verification at the cost of one step.
    tokens = 1 + sum(0.74 ** k for k in range(1, 8))
    assert expected_speedup([0.74] * 7, 1.0, 0.0, 1.0) == pytest.approx(tokens)


# ---------------------------------------------------------------------------------------------- calibration


def test_ece_and_reliability_by_hand():
    prob = [0.1, 0.15, 0.8, 0.9, 0.95]
    label = [0, 1, 1, 1, 0]
    # Two bins: [0, .5): acc 1/2, conf 0.125 (n=2); [.5, 1]: acc 2/3, conf 0.88333 (n=3).
    expected = (2 * abs(0.5 - 0.125) + 3 * abs(2 / 3 - 2.65 / 3)) / 5
    assert expected == pytest.approx(0.28)
    assert expected_calibration_error(prob, label, num_bins=2) == pytest.approx(0.28)
    b = reliability_bins(prob, label, num_bins=2)
    np.testing.assert_allclose(b.centers, [0.25, 0.75])
    np.testing.assert_allclose(b.accuracy, [0.5, 2 / 3])
    np.testing.assert_allclose(b.confidence, [0.125, 2.65 / 3])
    assert b.counts.tolist() == [2, 3]
    # p = 1 lands in the last bin; perfectly calibrated -> 0; empty bins are nan, not 0.
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0
    assert expected_calibration_error([0.5] * 4, [0, 1, 0, 1]) == 0.0
    assert np.isnan(reliability_bins([0.05], [0], num_bins=4).accuracy[1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.2], [1])


def brute_force_auroc(score, label):
    pos = [s for s, y in zip(score, label) if y]
    neg = [s for s, y in zip(score, label) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_by_hand_and_by_pair_counting():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(0.75)  # ties count one half
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0 and auroc([3, 2, 1], [0, 1, 1]) == 0.0
    assert np.isnan(auroc([0.2, 0.3], [1, 1]))
    rng = np.random.default_rng(2)
    for _ in range(20):
        n = rng.integers(2, 40)
        score = rng.integers(0, 5, size=n) / 4  # many ties
        label = rng.integers(0, 2, size=n)
        if 0 < label.sum() < n:
            assert auroc(score, label) == pytest.approx(brute_force_auroc(score, label))


def test_calibration_report_uses_only_drafted_positions():
    surv = np.array([[0.9, 0.5], [0.8, 0.2], [0.3, 0.1], [0.6, 0.4]])
    accepted = np.array([2, 1, 0, 1])
    drafted = np.array([2, 2, 2, 1])  # the last round never drafted position 2
    rep = calibration_report(surv, accepted, drafted, num_bins=10)
    assert rep["count"] == [4, 3]
    assert rep["observed"] == pytest.approx([3 / 4, 1 / 3])
    assert rep["mean_pred"] == pytest.approx([2.6 / 4, 0.8 / 3])
    # Position 1: each prediction in its own bin -> mean |label - p| = (.1 + .2 + .3 + .4) / 4.
    assert rep["ece"][0] == pytest.approx(0.25)
    assert rep["auroc"] == pytest.approx([1.0, 1.0])
    assert rep["ece"][1] == pytest.approx(expected_calibration_error([0.5, 0.2, 0.1], [1, 0, 0]))
    assert rep["ece_mean"] == pytest.approx((4 * rep["ece"][0] + 3 * rep["ece"][1]) / 7)


# ---------------------------------------------------------------------------------------------- plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5 * 1024


def test_plots_write_pngs(tmp_path):
    from vllm_dspark.eval import plots

    curves = {
        "DFlash": [0.72, 0.65, 0.64, 0.66, 0.68, 0.69, 0.69],
        "DSpark": [0.74, 0.74, 0.74, 0.74, 0.76, 0.77, 0.76],
    }
    assert_png(plots.plot_conditional_acceptance(curves, tmp_path / "cond.png"))
    assert_png(plots.plot_survival({k: survival_from_conditional(v) for k, v in curves.items()},
                                   tmp_path / "sub" / "surv.png"))

    rng = np.random.default_rng(3)
    p = rng.uniform(size=(2000, 3))
    y = rng.uniform(size=(2000, 3)) < p ** 2  # over-confident predictor
    before = [reliability_bins(p[:, k], y[:, k]) for k in range(3)]
    after = [reliability_bins(p[:, k] ** 2, y[:, k]) for k in range(3)]
    assert_png(plots.plot_reliability(before[0], tmp_path / "rel_pooled.png"))
    assert_png(plots.plot_reliability({"before": before[0], "after": after[0]}, tmp_path / "rel_overlay.png"))
    assert_png(plots.plot_reliability({"before": before, "after": after}, tmp_path / "rel_positions.png"))

    results = [
        {"method": m, "concurrency": c, "tokens_per_s": base * scale}
        for m, scale in (("no spec", 1.0), ("fixed K=7", 1.8), ("DSpark load-aware", 2.0))
        for c, base in ((1, 40.0), (8, 250.0), (32, 700.0), (128, 1500.0))
    ]
    assert_png(plots.plot_throughput(results, tmp_path / "tput.png"))
    assert_png(plots.plot_throughput_vs_concurrency(results, tmp_path / "tput_line.png"))
    with pytest.raises(ValueError, match="nothing to plot"):
        plots.plot_throughput([], tmp_path / "empty.png")


def test_bench_ratios_pair_each_round_with_its_own_baseline_cell():
    import argparse

    from vllm_dspark.eval.bench import _report, format_table

    args = argparse.Namespace(target="t", drafter="d", ablation=None, prompts="mtbench", num_prompts=8, max_tokens=8,
                              rounds=3, dtype="float32", max_model_len=256, kv_cache_gib=1, seed=0, rebuild=False,
                              interleave="slices", slice_seconds=1.0, ramp=False)

    def cell(rate):
        return {"tokens_per_s": rate, "seconds": 1.0, "generated": 8, "spec": None}
    # The machine slows down over the run: round 3 is ~30% slower for every method.
    samples = {("none", 4): [cell(107.0), cell(92.0), cell(73.0)],
               ("dspark", 4): [cell(111.0), cell(92.0), cell(83.0)]}
    report = _report(args, [], ["none", "dspark"], {}, [4], samples, [])
    per_round = report["ratios_per_round"]["dspark"]["4"]
    assert per_round == pytest.approx([111 / 107, 1.0, 83 / 73])
    assert report["ratios"]["dspark"]["4"] == pytest.approx(111 / 107)  # the median round, not 92 / 92
    assert "dspark" in format_table(report) and "(1.04x)" in format_table(report)


def test_interleaved_closed_loops_take_turns_and_time_only_their_own_steps():
    """Two engines over the same prompts in time slices: each keeps at most c requests in flight, they alternate
    in slices of whole steps, and each engine's seconds are its own steps only (the other's are ~3x slower)."""
    import time
    import types

    from vllm_dspark.eval.bench import generate_interleaved

    log: list[str] = []

    class Engine:
        def __init__(self, name: str, step_s: float):
            self.name, self.step_s, self.live, self.max_live = name, step_s, {}, 0

        def add_request(self, rid, prompt, params):
            self.live[rid] = prompt["steps"]
            self.max_live = max(self.max_live, len(self.live))

        def step(self):
            time.sleep(self.step_s)
            log.append(self.name)
            out = []
            for rid in list(self.live):
                self.live[rid] -= 1
                if self.live[rid] == 0:
                    del self.live[rid]
                    out.append(types.SimpleNamespace(request_id=rid, finished=True, steps=rid))
            return out

    fast, slow = Engine("a", 0.002), Engine("b", 0.006)
    prompts = [{"steps": n} for n in (3, 5, 2, 4, 6, 1)]
    got = generate_interleaved({"a": types.SimpleNamespace(llm_engine=fast), "b": types.SimpleNamespace(
        llm_engine=slow)}, prompts, None, 2, slice_seconds=0.01)
    assert fast.max_live == slow.max_live == 2
    assert all(o is not None and o.finished for outs, _ in got.values() for o in outs)
    # 11 steps each (closed loop of 2 over 21 request-steps); slices of 0.01 s: ~5 steps of a, ~2 of b, until a
    # is done (b then runs alone).
    assert log.count("a") == log.count("b") == 11
    runs = [(name, len(list(g))) for name, g in itertools.groupby(log)]
    assert [name for name, _ in runs[:4]] == ["a", "b", "a", "b"] and max(n for _, n in runs[:4]) <= 6
    assert got["a"][1] == pytest.approx(11 * 0.002, rel=0.5) and got["b"][1] == pytest.approx(11 * 0.006, rel=0.5)


def _figure_texts(fig) -> str:
    texts = [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))]
    return " | ".join(t for t in texts if t)


def test_plots_show_counts_mark_empty_positions_and_say_what_was_measured(tmp_path, monkeypatch):
    from vllm_dspark.eval import plots

    figures = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path, **kw: (figures.append(fig), real_save(fig, path, **kw))[1])
    nan = float("nan")
    plots.plot_conditional_acceptance({"d": [0.3, 0.0, nan]}, tmp_path / "c.png", counts={"d": [40, 2, 0]},
                                      legend={"d": "d: tau 1.30, 40 rounds"}, subtitle="tiny, K=3, T=0.0")
    text = _figure_texts(figures[-1])
    assert "n=40" in text and "n=2" in text and "n=0" not in text
    assert "no data (no round reached this position)" in text and "tiny, K=3, T=0.0" in text
    assert "d: tau 1.30, 40 rounds" in text and "mean" not in text
    # a panel without samples says so, with no ECE; a panel with samples shows n and the ECE
    empty = reliability_bins(np.zeros(0), np.zeros(0))
    full = reliability_bins(np.array([0.2, 0.8, 0.9]), np.array([0.0, 1.0, 1.0]))
    plots.plot_reliability({"raw": [full, empty]}, tmp_path / "r.png", subtitle="tiny")
    axes = [ax for ax in figures[-1].axes if ax.get_visible()]
    assert axes[0].get_title() == "position 1: n=3, 2 accepted\nECE raw 0.167"
    assert axes[1].get_title() == "position 2: n=0" and "no data" in _figure_texts(figures[-1])


def test_ramped_closed_loop_admits_one_request_per_step_and_traces_each_step():
    """ramp: the first c requests join over c steps (not at once), later ones as slots free, one per step; the
    trace has every step's requests in flight, joiners and tokens gained."""
    import types

    from vllm_dspark.eval.loop import ClosedLoop

    class Engine:
        def __init__(self):
            self.live, self.joined, self.step_joins = {}, 0, []

        def add_request(self, rid, prompt, params):
            self.live[rid] = [prompt["steps"], 0]
            self.joined += 1

        def step(self):
            self.step_joins.append(self.joined)
            self.joined = 0
            out = []
            for rid, state in list(self.live.items()):
                state[0] -= 1
                state[1] += 1
                done = state[0] == 0
                if done:
                    del self.live[rid]
                out.append(types.SimpleNamespace(request_id=rid, finished=done, outputs=[
                    types.SimpleNamespace(token_ids=[0] * state[1])]))
            return out

    prompts = [{"steps": 3}] * 6
    for ramp, joins in ((False, [3, 0, 0, 3, 0, 0]), (True, [1, 1, 1, 1, 1, 1, 0, 0])):
        engine = Engine()
        loop = ClosedLoop(types.SimpleNamespace(llm_engine=engine), prompts, None, 3, ramp=ramp, trace=True)
        loop.run()
        assert engine.step_joins == joins and all(o is not None for o in loop.outputs)
        assert [s[2] for s in loop.steps] == joins and sum(s[3] for s in loop.steps) == 6 * 3
        assert max(s[1] for s in loop.steps) == 3
