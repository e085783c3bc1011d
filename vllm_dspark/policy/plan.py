"""Load-aware draft block lengths (DSpark paper, Algorithm 1).

Every request r verifies its bonus token and ``l_r`` drafts on top: B = sum_r (1 + l_r). Expected tokens of
the step tau = sum_r (1 + sum_{j <= l_r} a_{r,j}) with a_{r,j} the survival of draft j, and Theta = tau * SPS(B)
its expected tokens per second. Slots are admitted in order of decreasing survival while Theta rises (or, with
``scan``, the best prefix of that order is kept). Pure numpy; imports no vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..calibration import _to_numpy

__all__ = ["BlockPlan", "choose_block_lengths", "fixed_block_lengths", "plan_block_lengths"]


@dataclass(frozen=True)
class BlockPlan:
    """Outcome of the load-aware policy for one scheduling step.

    lengths:          [R] drafts per request (the bonus token comes on top).
    num_tokens:       B = sum_r (1 + lengths_r), tokens the target verifies.
    expected_tokens:  tau = sum_r (1 + sum_{j <= l_r} a_{r,j}), expected tokens emitted this step.
    throughput:       Theta = tau * SPS(B), expected tokens per second.
    """

    lengths: np.ndarray
    num_tokens: int
    expected_tokens: float
    throughput: float


def _caps(num_requests: int, k: int, max_lengths) -> np.ndarray:
    if max_lengths is None:
        return np.full(num_requests, k, dtype=np.int64)
    caps = _to_numpy(max_lengths, np.int64).reshape(-1)
    if caps.shape[0] != num_requests:
        raise ValueError(f"max_lengths has {caps.shape[0]} entries for {num_requests} requests")
    if (caps < 0).any():
        raise ValueError(f"max_lengths must be >= 0, got {caps.tolist()}")
    return np.minimum(caps, k)


def fixed_block_lengths(num_requests: int, k: int, max_lengths=None) -> np.ndarray:
    """Fixed-K drafting: every request drafts min(K, its cap)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return _caps(num_requests, k, max_lengths)


def plan_block_lengths(
    survival, cost: Callable[[int], float], max_lengths=None, min_length: int = 0,
    scan: bool = False,
) -> BlockPlan:
    """Load-aware draft lengths (paper Algorithm 1).

    Args:
        survival:    [R, K] survival a_{r,j} in [0, 1] of draft slot j of request r (non-increasing along K
                     when it is a product of confidences).
        cost:        any callable B -> steps per second
                     (non-increasing in B unless ``scan``); with a ``sps_many(bs)`` method, that is used.
        max_lengths: [R] per-request cap on drafts (tokens left before max_model_len, a user cap; 0 = none).
        min_length:  drafts every request gets regardless of load (still capped by ``max_lengths``).
        scan:        evaluate Theta after every admission and keep the best prefix of the ranking instead of
                     stopping at the first admission that does not pay: exact for any cost curve, including
                     ones that are not monotone in B (a CPU may verify 3 tokens faster than 2).

    Slots are taken in order of decreasing survival (ties: lower j, then lower r), a slot only after its
    predecessor: ordering uses the running minimum of each row, which equals the survival for well-formed
    input and otherwise defers a slot until its predecessor is in.  The first admission that does not
    strictly increase Theta is undone and the search stops; the decision for a slot depends only on slots
    ranked before it.
    """
    a = _to_numpy(survival)
    if a.ndim != 2:
        raise ValueError(f"survival must be [R, K], got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError("survival contains nan")
    a = np.clip(a, 0.0, 1.0)
    num_requests, k = a.shape
    if min_length < 0:
        raise ValueError(f"min_length must be >= 0, got {min_length}")
    caps = _caps(num_requests, k, max_lengths)
    forced = np.minimum(caps, min_length)

    if num_requests == 0:
        return BlockPlan(np.zeros(0, dtype=np.int64), 0, 0.0, 0.0)

    j = np.arange(k)[None, :]  # 0-based slot index
    is_forced = j < forced[:, None]
    candidate = (j < caps[:, None]) & ~is_forced
    num_tokens0 = num_requests + int(forced.sum())
    tau0 = num_requests + float(a[is_forced].sum())

    # Candidates ranked by (running-min survival desc, j asc, r asc).
    key = np.minimum.accumulate(a, axis=1)
    rr, jj = np.nonzero(candidate)
    order = np.lexsort((rr, jj, -key[rr, jj]))
    rr, jj = rr[order], jj[order]
    n = rr.shape[0]

    bs = num_tokens0 + np.arange(n + 1)  # B after admitting 0..n candidates
    if hasattr(cost, "sps_many"):  # a cost that evaluates many sizes at once
        sps = cost.sps_many(bs)
    elif scan:
        sps = np.asarray([float(cost(int(b))) for b in bs])
    else:
        sps = _lazy_sps(cost, bs, a[rr, jj], tau0)
    tau = tau0 + np.concatenate([[0.0], np.cumsum(a[rr, jj])])
    theta = tau[: sps.shape[0]] * sps
    if scan:  # the best prefix; among equals the shortest (argmax takes the first)
        admitted = int(np.argmax(theta))
    else:
        stop = np.flatnonzero(theta[1:] <= theta[:-1])
        admitted = int(stop[0]) if stop.size else theta.shape[0] - 1

    lengths = forced + np.bincount(rr[:admitted], minlength=num_requests).astype(np.int64)
    return BlockPlan(lengths, int(bs[admitted]), float(tau[admitted]), float(theta[admitted]))


def _lazy_sps(cost: Callable[[int], float], bs: np.ndarray, a_sorted: np.ndarray, tau0: float) -> np.ndarray:
    """Evaluate a user cost callable only up to the stopping point (it may be expensive)."""
    out = [float(cost(int(bs[0])))]
    tau = tau0
    for i in range(1, bs.shape[0]):
        out.append(float(cost(int(bs[i]))))
        new_tau = tau + a_sorted[i - 1]
        if new_tau * out[-1] <= tau * out[-2]:
            break
        tau = new_tau
    return np.asarray(out)


def choose_block_lengths(
    survival, cost: Callable[[int], float], max_lengths=None, min_length: int = 0,
    scan: bool = False,
) -> np.ndarray:
    """[R] draft lengths from :func:`plan_block_lengths`."""
    return plan_block_lengths(survival, cost, max_lengths, min_length, scan).lengths
