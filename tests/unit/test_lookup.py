"""Prompt lookup (n-gram drafts) and the acceptance statistics the policy uses for them."""
from __future__ import annotations

import numpy as np
import pytest

from vllm_dspark.lookup import LookupStats, prompt_lookup


def test_longest_suffix_wins_and_the_earliest_occurrence_is_copied():
    #        0  1  2  3  4  5  6  7  8  9 10 11 12
    text = [5, 1, 2, 3, 9, 9, 7, 2, 3, 4, 4, 1, 2, 3]
    # Suffix [1, 2, 3] occurs at 1 (followed by 9 9 7); [2, 3] alone also at 7 (followed by 4 4): longest wins.
    assert prompt_lookup(np.array(text), 2, 4, 3) == [9, 9, 7]
    assert prompt_lookup(np.array(text), 2, 2, 3) == [9, 9, 7]  # [2, 3]: earliest occurrence (at 2)
    assert prompt_lookup(np.array(text), 2, 4, 20) == text[4:]  # up to the end of the text
    assert prompt_lookup(np.array(text), 4, 4, 3) == []  # [3, 1, 2, 3] never occurred before
    assert prompt_lookup(np.array(text), 2, 4, 0) == []


def test_no_match_short_text_and_repeats():
    assert prompt_lookup(np.array([1, 2, 3, 4]), 2, 4, 3) == []
    assert prompt_lookup(np.array([7]), 1, 4, 3) == []
    assert prompt_lookup(np.array([], dtype=np.int64), 1, 4, 3) == []
    # A run of one token: the suffix [8, 8] first occurs at 0 and is followed by more 8s.
    assert prompt_lookup(np.array([8, 8, 8, 8, 8]), 2, 3, 2) == [8, 8]
    with pytest.raises(ValueError, match="expected 1 <= min_n <= max_n; got min_n=3, max_n=2"):
        prompt_lookup(np.array([1, 2]), 3, 2, 1)


def test_lookup_stats_start_at_the_prior_and_follow_the_rounds():
    stats = LookupStats(k=3, prior=0.5, prior_rounds=2.0)
    assert stats.conditional().tolist() == [0.5, 0.5, 0.5]
    for _ in range(8):
        stats.observe(drafted=3, accepted=3)
    for _ in range(8):
        stats.observe(drafted=2, accepted=0)
    cond = stats.conditional()
    assert cond[0] == pytest.approx((1 + 8) / (2 + 16))
    assert cond[1] == pytest.approx((1 + 8) / (2 + 8))  # only rounds whose first draft was accepted reach it
    assert cond[2] == pytest.approx((1 + 8) / (2 + 8))
    surv = stats.survival(2)
    assert surv[0] == pytest.approx(cond[0]) and surv[1] == pytest.approx(cond[0] * cond[1]) and surv[2] == 0.0
