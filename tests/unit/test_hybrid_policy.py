"""SpeedPolicy.sources: which requests run the drafter, which keep a copied (suffix) draft and which splice the two,
against an exhaustive search over every subset of requests with the same Algorithm-1 plan and cost."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from vllm_dspark.policy import SpeedPolicy
from vllm_dspark.policy.plan import plan_block_lengths


class FakeCost:
    """seconds = forward(a + b * tokens) + drafter(c + d * requests drafted, when any)."""

    def __init__(self, a=0.03, b=0.002, c=0.004, d=0.001):
        self.a, self.b, self.c, self.d = a, b, c, d

    def seconds_many(self, tokens, drafted):
        return self.a + self.b * np.asarray(tokens, dtype=float) + ((self.c + self.d * drafted) if drafted else 0.0)

    def steps_per_second(self, batch, drafted):
        cost = self

        class Rate:
            def __call__(self, tokens):
                return float(1.0 / cost.seconds_many([tokens], drafted)[0])

            def sps_many(self, tokens):
                return 1.0 / cost.seconds_many(tokens, drafted)
        return Rate()


def policy(k, cost, expected):
    p = SpeedPolicy(k)
    p.cost = cost
    p.expected = np.asarray(expected, dtype=float)
    return p


def suffix_rows(rows):
    """[(conditional acceptance, length)] -> survival [R, K] (K = 4), lengths [R]."""
    k = 4
    out = np.zeros((len(rows), k))
    for r, (c, n) in enumerate(rows):
        out[r, :n] = np.cumprod(np.full(n, c))
    return out, np.array([n for _, n in rows])


def test_each_request_gets_the_source_that_pays():
    drafter = np.cumprod([0.8, 0.8, 0.8, 0.8])
    surv, lengths = suffix_rows([(0.97, 4), (0.0, 0), (0.99, 1), (0.3, 2)])
    p = policy(4, FakeCost(c=0.002, d=0.0005), drafter)
    codes = p.sources(surv, lengths, [4] * 4, batch=4)
    # a sure full copy keeps it; no copy -> drafter; one sure copied token -> splice; a weak copy -> drafter
    assert codes.tolist() == [0, 1, 2, 1]
    assert p.sources(surv, lengths, [4] * 4, batch=4, drafter=False).tolist() == [0, 0, 0, 0]


def test_a_drafter_too_dear_runs_for_nobody():
    surv, lengths = suffix_rows([(0.0, 0), (0.6, 2)])
    p = policy(4, FakeCost(c=0.5, d=0.5), np.cumprod([0.5] * 4))
    assert p.sources(surv, lengths, [4, 4], batch=2).tolist() == [0, 0]
    cheap = policy(4, FakeCost(c=0.0, d=0.0), np.cumprod([0.5] * 4))
    assert cheap.sources(surv, lengths, [4, 4], batch=2).tolist() == [1, 2]


def best_by_search(p, surv, lengths, caps):
    """The fastest plan over every subset of requests running the drafter, each with its better of drafter and
    splice (written out independently of SpeedPolicy.sources)."""
    k = surv.shape[1]
    d = p.drafter_survival()[:k]
    best = -1.0
    for subset in itertools.product([0, 1], repeat=surv.shape[0]):
        planned = surv.copy()
        for r, on in enumerate(subset):
            if not on:
                continue
            n = int(lengths[r])
            splice = surv[r].copy()
            if 0 < n < k:
                splice[n:] = surv[r, n - 1] * np.array([d[j] / d[n - 1] for j in range(n, k)])
            planned[r] = splice if splice.sum() > d.sum() else d
        theta = plan_block_lengths(planned, p.cost.steps_per_second(len(surv), sum(subset)), caps,
                                   scan=True).throughput
        best = max(best, theta)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_the_ranked_search_is_as_fast_as_trying_every_subset(seed):
    rng = np.random.default_rng(seed)
    R, k = 5, 4
    surv = np.zeros((R, k))
    lengths = rng.integers(0, k + 1, R)
    for r in range(R):
        surv[r, :lengths[r]] = np.cumprod(rng.uniform(0.2, 1.0, lengths[r]))
    cost = FakeCost(c=rng.uniform(0.0, 0.03), d=rng.uniform(0.0, 0.01))
    p = policy(k, cost, np.cumprod(rng.uniform(0.3, 0.8, k)))
    caps = [k] * R
    codes = p.sources(surv, lengths, caps, batch=R)
    d = p.drafter_survival()
    planned = surv.copy()
    for r, c in enumerate(codes):
        if c == 1:
            planned[r] = d
        elif c == 2:
            n = int(lengths[r])
            planned[r, n:] = surv[r, n - 1] * d[n:] / d[n - 1]
    got = plan_block_lengths(planned, cost.steps_per_second(R, int((codes > 0).sum())), caps, scan=True).throughput
    assert got >= 0.99 * best_by_search(p, surv, lengths, caps)


def test_past_the_drafters_block_only_copies_run_on():
    # K = 6 verified at most, the drafter drafts 3: its rows survive nothing past 3, and a copy of 3 or more tokens
    # cannot be spliced (the drafter has no block left to continue it).
    p = SpeedPolicy(6, drafter_k=3)
    p.cost, p.expected = FakeCost(c=0.0, d=0.0), np.array([0.9, 0.8, 0.7, 0.0, 0.0, 0.0])
    d = p.drafter_survival()
    assert d[3:].tolist() == [0.0] * 3 and d[0] > 0
    surv = np.zeros((3, 6))
    surv[0, :6] = np.cumprod([0.99] * 6)  # a sure loop: kept whole, past the drafter's block
    surv[1, :3] = np.cumprod([0.5] * 3)  # 3 weak copied tokens: the drafter instead, never a splice
    surv[2, :1] = 0.99  # one sure token: spliced
    codes = p.sources(surv, np.array([6, 3, 1]), [6] * 3, batch=3)
    assert codes.tolist() == [0, 1, 2]
    lengths = p.lengths(np.vstack([np.r_[d[:3], 0, 0, 0], surv[0]]), [6, 6], batch=2, drafted=1)
    assert lengths[0] <= 3 and lengths[1] == 6
    with pytest.raises(ValueError, match="expected 1 <= drafter_k <= k, got k=3, drafter_k=4"):
        SpeedPolicy(3, drafter_k=4)


def test_ranked_out_with_no_copies_is_a_verdict_against_the_drafter():
    """Under load with no copies the ranking gives the drafter nobody: that pauses it (before, begin() offered it
    again every step, and every step paid for the ranking and for lookups the pause would have skipped)."""
    rows = np.zeros((32, 4))
    dear = policy(4, FakeCost(b=0.02, c=0.5, d=0.5), np.cumprod([0.5] * 4))
    assert dear.sources(rows, np.zeros(32, dtype=int), [4] * 32, batch=32).tolist() == [0] * 32
    assert all(dear.pause.active(step, 32) for step in range(1, 1 + dear.pause.base))  # from the next step on
    cheap = policy(4, FakeCost(c=0.0, d=0.0), np.cumprod([0.9] * 4))
    assert cheap.sources(np.zeros((2, 4)), np.zeros(2, dtype=int), [4, 4], batch=2).tolist() == [1, 1]
    assert not cheap.pause.active(cheap.step + 1, 2)
    copies, lengths = suffix_rows([(0.99, 4)] * 32)  # sure copies: the drafter adds nothing, but no verdict
    dear.pause.worth_it()
    dear.sources(copies, lengths, [4] * 32, batch=32)
    assert not dear.pause.active(dear.step + 1, 32)
