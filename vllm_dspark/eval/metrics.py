"""Acceptance, calibration and speedup maths (numpy only; no vLLM, no torch).

Definitions follow DeepSpec and the DSpark paper; every function states which one it computes.

Conventions
-----------
* A *verification round* drafts ``d`` tokens (0 <= d <= K) and the target accepts the first ``a`` of them
  (0 <= a <= d), then emits one more token of its own (the correction, or the bonus token when all ``d``
  were accepted).  A round therefore yields ``a + 1`` tokens.
* ``tau`` is the mean number of tokens per round **including** the bonus token: ``mean(a + 1)``.
* Draft positions are 1-based in prose (k = 1..K) and 0-based in arrays (``survival[k - 1]``).
* *Survival* at k (DeepSpec's ``accept_rate@k``) = P(a >= k); *conditional* acceptance at k (the paper's
  Fig. 2) = P(a >= k | a >= k - 1).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "AcceptanceStats",
    "ReliabilityBins",
    "auroc",
    "calibration_report",
    "conditional_from_survival",
    "expected_calibration_error",
    "expected_speedup",
    "per_category_tau",
    "reliability_bins",
    "survival_from_conditional",
]


def _as_1d(x, name: str, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with nan where den == 0 (no data, not zero acceptance)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


# --------------------------------------------------------------------------------------------------------
# Acceptance statistics


@dataclass(frozen=True)
class AcceptanceStats:
    """Acceptance statistics over a set of verification rounds.

    Attributes (arrays have length K, index k - 1 for draft position k):
        num_rounds:   number of verification rounds.
        tau:          mean tokens per round including the bonus token, ``mean(accepted + 1)``.
        drafted_at:   rounds that drafted at least k tokens.
        accepted_at:  rounds that accepted at least k drafts.
        reached_at:   rounds that drafted at least k tokens and accepted the first k - 1 (so position k was
                      actually judged by the target).
        survival:     ``accepted_at / drafted_at`` = P(accepted >= k | drafted >= k).  The denominator counts
                      only rounds that drafted position k, so rounds cut short by a cap or by the load-aware
                      policy do not count as rejections.  With a fixed K this is DeepSpec's ``accept_rate@k``.
        conditional:  ``accepted_at / reached_at`` = P(accepted >= k | accepted >= k - 1, drafted >= k), the
                      paper's Fig. 2.  With a fixed K it equals ``survival_k / survival_{k-1}``.
    Entries with an empty denominator are nan (no data), never 0.
    """

    num_rounds: int
    tau: float
    drafted_at: np.ndarray  # [K] int
    accepted_at: np.ndarray  # [K] int
    reached_at: np.ndarray  # [K] int
    survival: np.ndarray  # [K] float
    conditional: np.ndarray  # [K] float

    @property
    def max_k(self) -> int:
        return int(self.drafted_at.shape[0])

    @classmethod
    def from_rounds(cls, drafted, accepted, max_k: int | None = None) -> AcceptanceStats:
        """Build stats from per-round records.

        Args:
            drafted:  [N] number of draft tokens proposed in each round.
            accepted: [N] number of those accepted (0 <= accepted <= drafted).
            max_k:    number of positions to report (default: the largest ``drafted``).
        """
        d = _as_1d(drafted, "drafted", np.int64)
        a = _as_1d(accepted, "accepted", np.int64)
        if d.shape != a.shape:
            raise ValueError(f"drafted and accepted must have the same length, got {d.shape[0]} and {a.shape[0]}")
        if (d < 0).any() or (a < 0).any():
            raise ValueError("drafted and accepted must be non-negative")
        if (a > d).any():
            i = int(np.flatnonzero(a > d)[0])
            raise ValueError(f"round {i}: accepted={a[i]} exceeds drafted={d[i]}")
        k_max = int(d.max(initial=0)) if max_k is None else int(max_k)
        if k_max < 0:
            raise ValueError(f"max_k must be >= 0, got {max_k}")
        ks = np.arange(1, k_max + 1)[:, None]  # [K, 1]
        drafted_at = (d[None, :] >= ks).sum(1)
        accepted_at = (a[None, :] >= ks).sum(1)
        reached_at = ((d[None, :] >= ks) & (a[None, :] >= ks - 1)).sum(1)
        return cls(
            num_rounds=int(d.shape[0]),
            tau=float(np.mean(a + 1)) if d.size else float("nan"),
            drafted_at=drafted_at,
            accepted_at=accepted_at,
            reached_at=reached_at,
            survival=_safe_div(accepted_at, drafted_at),
            conditional=_safe_div(accepted_at, reached_at),
        )

    @classmethod
    def from_vllm_counters(
        cls, num_drafts: int, num_draft_tokens: int, num_accepted_tokens: int, accepted_per_pos: Sequence[int]
    ) -> AcceptanceStats:
        """Build stats from vLLM's global spec-decode counters.

        vLLM counts ``num_drafts`` rounds, ``num_draft_tokens`` proposed and ``num_accepted_tokens`` accepted
        tokens, and ``accepted_per_pos[k]`` = rounds whose position k + 1 was accepted.  These counters carry
        no per-round draft length, so they only determine the stats for a fixed K = len(accepted_per_pos)
        (every round drafted K tokens); anything else raises, rather than silently mixing denominators.
        Then tau = 1 + num_accepted_tokens / num_drafts.
        """
        acc = np.asarray(accepted_per_pos, dtype=np.int64)
        k = int(acc.shape[0])
        if num_drafts < 0 or num_draft_tokens < 0 or num_accepted_tokens < 0 or (acc < 0).any():
            raise ValueError("vLLM counters must be non-negative")
        if num_draft_tokens != num_drafts * k:
            raise ValueError(
                f"num_draft_tokens={num_draft_tokens} != num_drafts * len(accepted_per_pos) = {num_drafts} * {k}: "
                "rounds drafted a variable number of tokens, which vLLM's counters cannot resolve per position"
            )
        if int(acc.sum()) != num_accepted_tokens:
            raise ValueError(f"sum(accepted_per_pos)={int(acc.sum())} != num_accepted_tokens={num_accepted_tokens}")
        if (acc > num_drafts).any() or (k > 1 and (np.diff(acc) > 0).any()):
            raise ValueError(f"accepted_per_pos={acc.tolist()} must be non-increasing and <= num_drafts={num_drafts}")
        drafted_at = np.full(k, num_drafts, dtype=np.int64)
        reached_at = np.concatenate([[num_drafts], acc[:-1]]).astype(np.int64) if k else acc.copy()
        return cls(
            num_rounds=int(num_drafts),
            tau=1.0 + num_accepted_tokens / num_drafts if num_drafts else float("nan"),
            drafted_at=drafted_at,
            accepted_at=acc,
            reached_at=reached_at,
            survival=_safe_div(acc, drafted_at),
            conditional=_safe_div(acc, reached_at),
        )

    def to_dict(self) -> dict:
        """JSON-ready dict (nan stays nan; callers that need strict JSON should map it to null)."""
        return {
            "num_rounds": self.num_rounds,
            "tau": self.tau,
            "drafted_at": self.drafted_at.tolist(),
            "accepted_at": self.accepted_at.tolist(),
            "reached_at": self.reached_at.tolist(),
            "survival": self.survival.tolist(),
            "conditional": self.conditional.tolist(),
        }


def conditional_from_survival(survival) -> np.ndarray:
    """[K] survival P(>= k accepted) -> [K] conditional P(k accepted | k-1 accepted) = s_k / s_{k-1}.

    s_0 = 1.  Where s_{k-1} == 0 the conditional is undefined and returned as nan.
    """
    s = _as_1d(survival, "survival")
    prev = np.concatenate([[1.0], s[:-1]])
    return _safe_div(s, prev)


def survival_from_conditional(conditional) -> np.ndarray:
    """[K] conditional acceptance -> [K] survival, s_k = prod_{i<=k} c_i."""
    return np.cumprod(_as_1d(conditional, "conditional"))


def per_category_tau(categories: Sequence[Hashable], drafted, accepted) -> dict:
    """tau (mean accepted + 1 per round) per category, e.g. per benchmark or per prompt domain.

    Returns ``{category: tau}`` in order of first appearance.
    """
    d = _as_1d(drafted, "drafted", np.int64)
    a = _as_1d(accepted, "accepted", np.int64)
    cats = list(categories)
    if not (len(cats) == d.shape[0] == a.shape[0]):
        raise ValueError(f"categories, drafted, accepted lengths differ: {len(cats)}, {d.shape[0]}, {a.shape[0]}")
    if (a > d).any():
        raise ValueError("accepted exceeds drafted in some round")
    sums: dict = {}
    counts: dict = {}
    for c, n in zip(cats, a.tolist()):
        sums[c] = sums.get(c, 0) + n + 1
        counts[c] = counts.get(c, 0) + 1
    return {c: sums[c] / counts[c] for c in sums}


def expected_speedup(
    conditional, t_target_1: float, t_draft: float, t_verify: float | Callable[[int], float]
) -> float:
    """Expected wall-clock speedup over plain decoding (dspark.md §6, per-position form).

    tokens per round = 1 + sum_k prod_{i<=k} alpha_k;
    speedup = tokens per round * T_target(1) / (T_draft + T_verify(gamma + 1)).

    Args:
        conditional: [gamma] conditional acceptance alpha_k per draft position.
        t_target_1:  seconds for one plain decoding step (1 token).
        t_draft:     seconds to draft one block.
        t_verify:    seconds to verify gamma + 1 tokens, or a callable num_tokens -> seconds.
    """
    alpha = _as_1d(conditional, "conditional")
    tokens = 1.0 + float(np.cumprod(alpha).sum())
    tv = t_verify(alpha.shape[0] + 1) if callable(t_verify) else float(t_verify)
    denom = float(t_draft) + tv
    if denom <= 0:
        raise ValueError(f"t_draft + t_verify must be positive, got {denom}")
    return tokens * float(t_target_1) / denom


# --------------------------------------------------------------------------------------------------------
# Calibration


class ReliabilityBins(NamedTuple):
    """Equal-width reliability diagram data; empty bins have nan accuracy/confidence."""

    centers: np.ndarray  # [num_bins]
    accuracy: np.ndarray  # [num_bins] mean label in the bin
    confidence: np.ndarray  # [num_bins] mean predicted probability in the bin
    counts: np.ndarray  # [num_bins] int


def _bin_index(p: np.ndarray, num_bins: int) -> np.ndarray:
    # Equal-width bins on [0, 1]; p == 1 goes into the last bin.
    return np.clip((p * num_bins).astype(np.int64), 0, num_bins - 1)


def _check_prob_label(prob, label, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    p = _as_1d(prob, "prob")
    y = _as_1d(label, "label")
    if p.shape != y.shape:
        raise ValueError(f"prob and label must have the same length, got {p.shape[0]} and {y.shape[0]}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("prob must lie in [0, 1]")
    return p, y


def reliability_bins(prob, label, num_bins: int = 10) -> ReliabilityBins:
    """Per-bin accuracy (mean label) and confidence (mean prob) over equal-width bins of [0, 1]."""
    p, y = _check_prob_label(prob, label, num_bins)
    idx = _bin_index(p, num_bins)
    counts = np.bincount(idx, minlength=num_bins)
    acc = _safe_div(np.bincount(idx, weights=y, minlength=num_bins), counts)
    conf = _safe_div(np.bincount(idx, weights=p, minlength=num_bins), counts)
    centers = (np.arange(num_bins) + 0.5) / num_bins
    return ReliabilityBins(centers, acc, conf, counts)


def expected_calibration_error(prob, label, num_bins: int = 10) -> float:
    """ECE = sum_b (n_b / N) * |mean(label in b) - mean(prob in b)| over equal-width bins of [0, 1].

    nan for empty input.
    """
    p, y = _check_prob_label(prob, label, num_bins)
    if p.size == 0:
        return float("nan")
    idx = _bin_index(p, num_bins)
    gap = np.bincount(idx, weights=y - p, minlength=num_bins)  # n_b * (acc_b - conf_b)
    return float(np.abs(gap).sum() / p.size)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start index of each run of equal values.
    starts = np.flatnonzero(np.concatenate([[True], xs[1:] != xs[:-1]]))
    ends = np.concatenate([starts[1:], [xs.size]])
    run_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1..ends
    ranks = np.empty(x.size)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def auroc(score, label) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney, ties averaged).

    nan when one class is absent.
    """
    s = _as_1d(score, "score")
    y = _as_1d(label, "label").astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"score and label must have the same length, got {s.shape[0]} and {y.shape[0]}")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def calibration_report(survival_pred, accepted_len, drafted=None, num_bins: int = 10) -> dict:
    """Per-position calibration of predicted survival against what the target accepted.

    For position k the label is ``accepted_len >= k`` and the prediction ``survival_pred[:, k-1]``; only
    rounds that drafted at least k tokens count (a position never drafted was never judged).

    Args:
        survival_pred: [N, K] predicted survival a_k = prod_{i<=k} c_i.
        accepted_len:  [N] accepted drafts per round.
        drafted:       [N] drafted tokens per round (default: K for every round).
    Returns:
        {"ece": [K], "auroc": [K], "count": [K], "mean_pred": [K], "observed": [K], "ece_mean": float}
        where ``ece_mean`` is the count-weighted mean ECE over positions.
    """
    if hasattr(survival_pred, "detach"):
        survival_pred = survival_pred.detach().cpu().numpy()
    s = np.asarray(survival_pred, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"survival_pred must be [N, K], got shape {s.shape}")
    n, k_max = s.shape
    a = _as_1d(accepted_len, "accepted_len", np.int64)
    d = np.full(n, k_max, dtype=np.int64) if drafted is None else _as_1d(drafted, "drafted", np.int64)
    if not (a.shape[0] == d.shape[0] == n):
        raise ValueError(f"survival_pred, accepted_len, drafted lengths differ: {n}, {a.shape[0]}, {d.shape[0]}")
    out: dict = {"ece": [], "auroc": [], "count": [], "mean_pred": [], "observed": []}
    for k in range(1, k_max + 1):
        m = d >= k
        p, y = s[m, k - 1], (a[m] >= k).astype(np.float64)
        out["ece"].append(expected_calibration_error(p, y, num_bins))
        out["auroc"].append(auroc(p, y))
        out["count"].append(int(m.sum()))
        out["mean_pred"].append(float(p.mean()) if p.size else float("nan"))
        out["observed"].append(float(y.mean()) if y.size else float("nan"))
    ece, cnt = np.asarray(out["ece"]), np.asarray(out["count"], dtype=np.float64)
    ok = cnt > 0
    out["ece_mean"] = float((ece[ok] * cnt[ok]).sum() / cnt[ok].sum()) if ok.any() else float("nan")
    return out
