"""Suffix drafts (vllm_dspark.suffix) against a brute-force reading of the same rule: the longest suffix of the text
(at least its last bigram) that occurred before, the most frequent continuation of all its occurrences token by
token (ties: the newest occurrence), counts per token; and the online calibration of their survival."""
from __future__ import annotations

import numpy as np
import pytest

from vllm_dspark.suffix import SEP, SuffixCalibration, SuffixDraft, SuffixDrafter, TokenIndex, walk


def brute_force(text: list[int], depth: int, k: int) -> tuple[list[int], list[float], list[int], int]:
    """The rule written out plainly over the text itself (the draft may read on into its own tokens)."""
    n = len(text)
    best, starts = 0, []
    for i in range(1, n - 1):  # i: the last token of an earlier occurrence (not the text's own end)
        m = 0
        while m < min(depth, i + 1) and text[i - m] == text[n - 1 - m]:
            m += 1
        if m >= 2 and m > best:
            best, starts = m, [i + 1]
        elif m >= 2 and m == best:
            starts.append(i + 1)
    starts = starts[::-1]  # newest first
    virtual = list(text)
    draft, ratio, support = [], [], []
    for d in range(k):
        toks = [virtual[c + d] for c in starts if c + d < len(virtual)]
        if not toks:
            break
        counts = {}
        for t in toks:
            counts[t] = counts.get(t, 0) + 1
        top = max(counts.values())
        choice = next(t for t in toks if counts[t] == top)  # newest among the most frequent
        draft.append(choice)
        ratio.append(top / len(toks))
        support.append(len(toks))
        starts = [c for c in starts if c + d < len(virtual) and virtual[c + d] == choice]
        virtual.append(choice)
    return draft, ratio, support, best


@pytest.mark.parametrize("seed", range(12))
def test_own_text_drafts_match_the_rule_written_out(seed):
    rng = np.random.default_rng(seed)
    alphabet = 3 + seed % 4  # small alphabets: many repeats, ties and long matches
    text = rng.integers(0, alphabet, 40 + 7 * seed).tolist()
    index = TokenIndex()
    index.extend(text)
    starts, m = index.matches(text[-8:], depth=8, recent=10_000)
    got = walk(index, starts, 6, own_end=index.n)
    want = brute_force(text, 8, 6)
    assert (got[0], got[1], got[2], m) == want


def test_a_loop_drafts_past_the_end_of_the_text():
    text = [1, 2, 3] + [5, 6, 7, 8] * 3 + [5, 6]
    d = SuffixDrafter().propose("r", np.array(text), 7)
    assert d.tokens == [7, 8, 5, 6, 7, 8, 5] and d.origin == "own"
    assert d.match == 10 and d.support == [1] * 7  # the newest period matches longest
    assert SuffixDrafter().propose("r", np.array([1, 2, 3, 4, 5]), 7) is None  # no bigram repeats


def test_finished_outputs_feed_other_requests_and_the_oldest_are_evicted():
    drafter = SuffixDrafter(cache_tokens=64)
    drafter.propose("a", np.array([100, 101, 20, 21]), 4)  # prompt [100, 101, 20], first output token 21
    drafter.propose("a", np.array([100, 101, 20, 21, 22, 23, 24, 25]), 4)
    drafter.finish("a")
    assert "a" not in drafter.own
    assert drafter.cache.tokens == [SEP, 21, 22, 23, 24, 25]  # the output only
    d = drafter.propose("b", np.array([9, 9, 21, 22]), 3)
    assert (d.tokens, d.origin, d.match) == ([23, 24, 25], "outputs", 2)
    assert drafter.propose("c", np.array([101, 20]), 3) is None  # prompts do not join the cache
    for r in range(10):  # 10 more outputs of 9 tokens: "a"'s goes
        out = [200 + r] * 2 + list(range(300 + 10 * r, 307 + 10 * r))
        drafter.propose(f"x{r}", np.array([1] + out[:1]), 1)
        drafter.propose(f"x{r}", np.array([1] + out), 1)
        drafter.finish(f"x{r}")
    assert drafter.cache.n <= 64
    assert drafter.propose("d", np.array([7, 21, 22]), 3) is None
    newest = drafter.propose("f", np.array([5, 393, 394]), 2)  # the newest output is kept
    assert newest.tokens == [395, 396] and newest.origin == "outputs"


def _draft(ratio, support, match=3, sampled=False, origin="own"):
    return SuffixDraft([1] * len(ratio), list(ratio), list(support), match, origin, sampled)


def test_calibration_starts_at_the_counts_and_learns_from_verification():
    cal = SuffixCalibration(prior=4.0, decay=1.0)
    d = _draft([1.0, 0.5, 1.0], [1, 4, 3])
    raw = np.array([1.0 * 1 / 2, 0.5 * 4 / 5, 1.0 * 3 / 4])
    np.testing.assert_allclose(cal.survival(d), np.cumprod(raw))
    for _ in range(40):  # the first token of such drafts is always accepted, the second never
        cal.observe(d, verified=3, accepted=1)
    cond = cal.conditional(d)
    np.testing.assert_allclose(cond[0], (40 + 4 * 0.5) / (40 + 4))
    np.testing.assert_allclose(cond[1], (0 + 4 * 0.4) / (40 + 4))
    np.testing.assert_allclose(cond[2], raw[2])  # never reached: still the counts' estimate
    # sampled requests learn apart: the same statistics at temperature > 0 keep their own estimate
    np.testing.assert_allclose(cal.conditional(_draft([1.0, 0.5, 1.0], [1, 4, 3], sampled=True)), raw)


def test_calibration_counts_only_the_positions_verification_reached():
    cal = SuffixCalibration(prior=1.0, decay=1.0)
    d = _draft([1.0] * 5, [9] * 5, match=9)
    cal.observe(d, verified=2, accepted=2)  # two verified, both accepted: positions 1, 2 reached
    cal.observe(d, verified=5, accepted=0)  # first rejected: position 1 only
    assert cal.drafted.sum() == 3 and cal.accepted.sum() == 2


def test_survival_ranks_a_long_match_with_support_above_a_lucky_bigram():
    drafter = SuffixDrafter()
    text = [9, 1, 2, 3, 4, 5, 6] * 4 + [7, 7, 1, 2, 3]
    loop = drafter.propose("loop", np.array(text), 4)
    once = drafter.propose("once", np.array([40, 41, 42, 43, 44, 45, 46, 41, 42]), 4)
    assert loop.support[0] > 1 and once.support == [1] * 4
    assert loop.survival[0] > once.survival[0]


def test_depth_below_two_is_refused():
    with pytest.raises(ValueError, match=r"depth=1: expected >= 2"):
        SuffixDrafter(depth=1)


def test_calibration_decay_matches_decaying_every_count_at_each_observation():
    """The lazy decay (one scale for all counts) against the plain rule: every count times ``decay``, then the
    observation added, kept here in numpy arrays indexed like the bins."""
    rng = np.random.default_rng(5)
    cal = SuffixCalibration(prior=2.0, decay=0.9)
    origins = ("own", "outputs", "corpus")
    shape = (len(cal.RATIO) + 1, len(cal.SUPPORT) + 1, len(cal.MATCH) + 1, len(cal.DEPTH) + 1, len(origins), 2)
    acc, dra = np.zeros(shape), np.zeros(shape)
    from bisect import bisect_left
    for _ in range(300):
        n = int(rng.integers(1, 6))
        d = _draft(rng.uniform(0.3, 1.0, n).tolist(), rng.integers(1, 9, n).tolist(), match=int(rng.integers(2, 12)),
                   sampled=bool(rng.integers(0, 2)), origin=origins[int(rng.integers(0, 3))])
        verified, accepted = int(rng.integers(0, n + 1)), int(rng.integers(0, n + 1))
        cal.observe(d, verified, accepted)
        reached = min(verified, accepted + 1)
        if reached <= 0:
            continue
        acc, dra = acc * 0.9, dra * 0.9
        for pos in range(reached):
            b = (bisect_left(cal.RATIO, d.ratio[pos]), bisect_left(cal.SUPPORT, d.support[pos]),
                 bisect_left(cal.MATCH, d.match), bisect_left(cal.DEPTH, pos + 1),
                 origins.index(d.origin), int(d.sampled))
            dra[b] += 1
            acc[b] += pos < accepted
    np.testing.assert_allclose(cal.drafted, dra, atol=1e-9)
    np.testing.assert_allclose(cal.accepted, acc, atol=1e-9)
