"""Prompt lookup: drafts copied from the request's own text (n-gram matching, as vLLM's ``ngram`` method).

Small models repeat themselves and their prompts: on MT-Bench SmolLM2-135M-Instruct accepts ~2.4 tokens per
round from vLLM's ngram drafts, where a 2-layer drafter trained on this project's budget reaches ~1.4. The
proposer takes such a draft, when the text has one, instead of running the drafter for that request (see
``DSparkSettings.lookup``); the drafter serves the rest of the batch. Numpy only; imports no vLLM.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["LookupStats", "lookup_drafts", "prompt_lookup"]


def prompt_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the earliest earlier occurrence of the longest suffix of ``tokens``
    of ``min_n``..``max_n`` tokens (vLLM's ngram rule); [] when no such suffix occurred before.

    ``tokens`` [L]: the request's prompt and output so far, the newest token last.
    """
    if not 1 <= min_n <= max_n:
        raise ValueError(f"prompt_lookup: expected 1 <= min_n <= max_n; got min_n={min_n}, max_n={max_n}")
    t = np.asarray(tokens).reshape(-1)
    length = t.shape[0]
    if k <= 0:
        return []
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows that start before the suffix itself and leave at least one token after them.
        windows = sliding_window_view(t[: length - 1], n)  # [L - n, n]; window i covers t[i : i + n]
        hits = np.flatnonzero((windows == t[length - n:]).all(axis=1))
        if hits.size:
            start = int(hits[0]) + n
            return t[start: start + k].tolist()
    return []


def lookup_drafts(token_ids: np.ndarray, num_tokens, rows: list[int], min_n: int, max_n: int,
                  caps: list[int]) -> dict[int, list[int]]:
    """{index into ``rows``: drafts} for the batch rows whose text has a match (``token_ids`` [batch, L], the first
    ``num_tokens[row]`` of each row filled; ``caps``: drafts allowed per listed row)."""
    looked = {}
    for j, (i, cap) in enumerate(zip(rows, caps)):
        d = prompt_lookup(token_ids[i, :int(num_tokens[i])], min_n, max_n, cap)
        if d:
            looked[j] = d
    return looked


class LookupStats:
    """Conditional acceptance of lookup drafts per position, the survival the load-aware policy gives them.

    Starts from ``prior`` (as if ``prior_rounds`` rounds had shown it) and counts every verified round since.
    """

    def __init__(self, k: int, prior: float = 0.6, prior_rounds: float = 8.0):
        self.drafted = np.full(k, prior_rounds)
        self.accepted = np.full(k, prior * prior_rounds)

    def observe(self, drafted: int, accepted: int) -> None:
        """One verified round: ``drafted`` drafts of which the first ``accepted`` were accepted."""
        accepted = min(accepted, drafted)
        self.drafted[:min(drafted, accepted + 1)] += 1  # positions the round reached
        self.accepted[:accepted] += 1

    def conditional(self) -> np.ndarray:
        """[K] P(draft k accepted | drafts before it accepted)."""
        return self.accepted / self.drafted

    def survival(self, length: int) -> np.ndarray:
        """[K] survival of a lookup draft of ``length`` tokens (0 beyond it)."""
        a = np.cumprod(self.conditional())
        a[length:] = 0.0
        return a
