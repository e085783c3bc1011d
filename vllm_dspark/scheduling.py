"""Load-aware draft block lengths (DSpark paper, Algorithm 1) and the tables it needs.

Pure numpy (torch tensors are accepted and converted); imports no vLLM.

The policy trades expected accepted tokens against the target's slower steps at larger batches:

* every request r always verifies its bonus token, and ``l_r`` drafts on top: B = sum_r (1 + l_r);
* expected tokens per step tau = sum_r (1 + sum_{j <= l_r} a_{r,j}), with a_{r,j} the (calibrated)
  survival probability that draft j of request r is accepted;
* Theta = tau * SPS(B) = expected tokens per second, with SPS(B) the target's steps per second when
  verifying B tokens (:class:`CostTable`).

Slots are admitted greedily in order of decreasing survival; the first admission that does not increase
Theta is undone and the search stops.  Survival is calibrated by sequential temperature scaling
(:func:`fit_sequential_temperature`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np


__all__ = [
    "CALIBRATION_FILE",
    "BlockPlan",
    "CostTable",
    "PayoffMeter",
    "apply_temperature",
    "choose_block_lengths",
    "fit_sequential_temperature",
    "fixed_block_lengths",
    "load_calibration",
    "plan_block_lengths",
    "save_calibration",
]

CALIBRATION_FILE = "dspark_calibration.json"


def _to_numpy(x, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# --------------------------------------------------------------------------------------------------------
# Cost table


def _isotonic_increasing(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    vals: list[float] = []
    wts: list[float] = []
    sizes: list[int] = []
    for yi, wi in zip(y.tolist(), w.tolist()):
        vals.append(yi)
        wts.append(wi)
        sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            w2 = wts[-2] + wts[-1]
            v2 = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w2
            s2 = sizes[-2] + sizes[-1]
            del vals[-1], wts[-1], sizes[-1]
            vals[-1], wts[-1], sizes[-1] = v2, w2, s2
    return np.repeat(np.asarray(vals), sizes)


class CostTable:
    """Target steps per second SPS(B) as a function of B, the number of tokens verified in one step.

    Seconds per step are kept per bucket of B (every integer below ``2**significant_bits``, then
    ``significant_bits`` significant bits, i.e. within ~3% of B) as an exponential moving average with
    weight ``alpha`` per new observation.  Queries fit a non-decreasing step time over the buckets
    (pool adjacent violators, so one noisy bucket cannot make a bigger batch look faster), interpolate
    linearly between buckets, hold the smallest bucket's time below it, and above the largest bucket grow at
    least in proportion to B (compute-bound).  Hence ``sps`` is non-increasing in B, which the greedy policy
    needs.  A table with no data returns SPS = 1 for every B (verification treated as free: the policy then
    drafts as much as the caps allow).

    A bucket first observed online starts from the table's current estimate (its prior) and moves towards
    the observations, so one outlier step does not define it.
    """

    def __init__(self, alpha: float = 0.1, significant_bits: int = 6):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if significant_bits < 1:
            raise ValueError(f"significant_bits must be >= 1, got {significant_bits}")
        self.alpha = float(alpha)
        self.significant_bits = int(significant_bits)
        self._seconds: dict[int, float] = {}  # bucket -> EMA seconds per step
        self._counts: dict[int, int] = {}  # bucket -> observations folded in
        self._fit: tuple[np.ndarray, np.ndarray] | None = None  # cached (keys, monotone seconds)

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_profile(cls, profile: Mapping[int, float], **kwargs) -> CostTable:
        """Table from a startup profile ``{num_tokens: seconds_per_step}``."""
        table = cls(**kwargs)
        for b, sec in sorted(profile.items()):
            b, sec = int(b), float(sec)
            table._check(b, sec)
            key = table.bucket(b)
            # Several profile points in one bucket: average them.
            n = table._counts.get(key, 0)
            table._seconds[key] = (table._seconds.get(key, 0.0) * n + sec) / (n + 1)
            table._counts[key] = n + 1
        return table

    def bucket(self, num_tokens: int) -> int:
        """Bucket key of ``num_tokens``: B rounded down to ``significant_bits`` significant bits."""
        shift = max(0, int(num_tokens).bit_length() - self.significant_bits)
        return (int(num_tokens) >> shift) << shift

    @staticmethod
    def _check(num_tokens: int, seconds: float) -> None:
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds must be positive and finite, got {seconds}")

    # -- online update ---------------------------------------------------------------------------------
    def observe(self, num_tokens: int, seconds: float) -> None:
        """Fold in one measured target step that verified ``num_tokens`` tokens in ``seconds``."""
        num_tokens, seconds = int(num_tokens), float(seconds)
        self._check(num_tokens, seconds)
        key = self.bucket(num_tokens)
        if key in self._seconds:
            prior = self._seconds[key]
        elif self._seconds:
            prior = self.seconds(key)
        else:
            prior = seconds
        self._seconds[key] = (1.0 - self.alpha) * prior + self.alpha * seconds
        self._counts[key] = self._counts.get(key, 0) + 1
        self._fit = None

    # -- queries ---------------------------------------------------------------------------------------
    def _monotone(self) -> tuple[np.ndarray, np.ndarray]:
        if self._fit is None:
            keys = np.asarray(sorted(self._seconds), dtype=np.float64)
            secs = np.asarray([self._seconds[int(k)] for k in keys])
            self._fit = (keys, _isotonic_increasing(secs, np.ones_like(secs)))
        return self._fit

    def seconds_many(self, num_tokens) -> np.ndarray:
        """Estimated seconds per step for each B in ``num_tokens`` (non-decreasing in B)."""
        b = np.asarray(num_tokens, dtype=np.float64)
        if not self._seconds:
            return np.ones_like(b)
        keys, secs = self._monotone()
        out = np.interp(b, keys, secs)  # holds the end values outside [keys[0], keys[-1]]
        hi = b > keys[-1]
        if hi.any():
            slope = secs[-1] / keys[-1]
            if keys.size > 1:
                slope = max(slope, (secs[-1] - secs[-2]) / (keys[-1] - keys[-2]))
            out[hi] = secs[-1] + slope * (b[hi] - keys[-1])
        return out

    def seconds(self, num_tokens: int) -> float:
        return float(self.seconds_many([num_tokens])[0])

    def sps_many(self, num_tokens) -> np.ndarray:
        """Steps per second for each B in ``num_tokens`` (non-increasing in B)."""
        return 1.0 / self.seconds_many(num_tokens)

    def sps(self, num_tokens: int) -> float:
        """Steps per second when verifying ``num_tokens`` tokens in one step."""
        return 1.0 / self.seconds(num_tokens)

    __call__ = sps

    def __len__(self) -> int:
        return len(self._seconds)

    # -- serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "significant_bits": self.significant_bits,
            "buckets": {str(k): [self._seconds[k], self._counts[k]] for k in sorted(self._seconds)},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> CostTable:
        table = cls(alpha=data["alpha"], significant_bits=data["significant_bits"])
        for key, (sec, count) in data["buckets"].items():
            table._check(int(key), float(sec))
            table._seconds[int(key)] = float(sec)
            table._counts[int(key)] = int(count)
        return table


# --------------------------------------------------------------------------------------------------------
# Block-length policy


class LinearCost:
    """Step time of verifying B tokens modelled as t(B) = a + b*B, fitted online by exponentially weighted
    least squares over real steps; SPS(B) = 1 / t(B). Until steps of two clearly different sizes were seen,
    the slope comes from a prior: ``overhead_tokens`` = a / b, the fixed cost of a step in token units
    (measured on an AVX2 CPU in float32: verifying 8 tokens costs ~1.6x one, i.e. ~10 tokens; GPUs are far
    flatter). Used by the proposer instead of a bucket table because real steps rarely cover small B under
    load, and a table extrapolated flat below its smallest B never sees the saving of a shorter block.
    """

    # Small steps also keep a correction of their own, measured / line (EMA with weight RESIDUAL_ALPHA), used
    # once seen RESIDUAL_MIN times: the CPU's GEMMs are not linear in a handful of rows (measured with vLLM on
    # this AVX2 CPU: SmolLM2 verifying 2 tokens 40 ms, 1 token 35 ms, 3 tokens 33 ms).
    RESIDUAL_MAX = 32
    RESIDUAL_ALPHA = 0.05
    RESIDUAL_MIN = 4

    def __init__(self, overhead_tokens: float = 10.0, half_life: float = 500.0):
        self.overhead_tokens = float(overhead_tokens)
        self.decay = 0.5 ** (1.0 / half_life)
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.count = 0
        self.residual: dict[int, tuple[float, int]] = {}  # B -> (EMA of measured / line, observations)

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or not (seconds > 0 and math.isfinite(seconds)):
            return
        if num_tokens < self.RESIDUAL_MAX and self.n > 0:
            ratio = seconds / self.line(num_tokens)
            old, seen = self.residual.get(num_tokens, (ratio, 0))
            self.residual[num_tokens] = ((1 - self.RESIDUAL_ALPHA) * old + self.RESIDUAL_ALPHA * ratio, seen + 1)
        d, x, y = self.decay, float(num_tokens), float(seconds)
        self.n, self.sx, self.sy = d * self.n + 1, d * self.sx + x, d * self.sy + y
        self.sxx, self.sxy = d * self.sxx + x * x, d * self.sxy + x * y
        self.count += 1

    def coefficients(self) -> tuple[float, float]:
        """(a, b): seconds per step and per token."""
        if self.n == 0:
            return 1.0, 1.0 / self.overhead_tokens  # no data: only the shape matters to the policy
        mx, my = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mx * mx
        if var > (0.25 * mx) ** 2:  # sizes spread enough to fit a slope
            b = (self.sxy / self.n - mx * my) / var
            a = my - b * mx
            if a > 0 and b > 0:
                return a, b
        b = my / (self.overhead_tokens + mx)
        return self.overhead_tokens * b, b

    def line(self, num_tokens: int) -> float:
        """a + b*B, without the per-size corrections."""
        a, b = self.coefficients()
        return a + b * num_tokens

    def seconds(self, num_tokens: int) -> float:
        ratio, seen = self.residual.get(num_tokens, (1.0, 0))
        return self.line(num_tokens) * (ratio if seen >= self.RESIDUAL_MIN else 1.0)

    def sps(self, num_tokens: int) -> float:
        return 1.0 / self.seconds(num_tokens)

    __call__ = sps

    def seconds_many(self, num_tokens, extra: float = 0.0) -> np.ndarray:
        """``seconds`` for each B in ``num_tokens`` (the fit solved once), plus ``extra`` seconds each."""
        a, b = self.coefficients()
        sizes = np.asarray(num_tokens)
        out = a + extra + b * sizes.astype(np.float64)
        for i, size in enumerate(sizes.tolist()):
            ratio, seen = self.residual.get(size, (1.0, 0))
            if seen >= self.RESIDUAL_MIN:
                out[i] += (ratio - 1.0) * (a + b * size)
        return out

    def sps_many(self, num_tokens, extra: float = 0.0) -> np.ndarray:
        """Steps per second for each B in ``num_tokens`` when a step also costs ``extra`` seconds."""
        return 1.0 / self.seconds_many(num_tokens, extra)

    def __len__(self) -> int:
        return self.count


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
    survival, cost: CostTable | Callable[[int], float], max_lengths=None, min_length: int = 0,
    scan: bool = False,
) -> BlockPlan:
    """Load-aware draft lengths (paper Algorithm 1).

    Args:
        survival:    [R, K] survival a_{r,j} in [0, 1] of draft slot j of request r (non-increasing along K
                     when it is a product of confidences).
        cost:        a :class:`CostTable`, :class:`LinearCost`, or any callable B -> steps per second
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
    if hasattr(cost, "sps_many"):  # CostTable, LinearCost, or any cost that evaluates many sizes at once
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
    survival, cost: CostTable | Callable[[int], float], max_lengths=None, min_length: int = 0,
    scan: bool = False,
) -> np.ndarray:
    """[R] draft lengths from :func:`plan_block_lengths`."""
    return plan_block_lengths(survival, cost, max_lengths, min_length, scan).lengths


class DraftPause:
    """When a plan finds drafting not worth its cost (drafter time included), stop drafting for a while.

    The pause doubles after each further such verdict, from ``base`` up to ``cap`` steps: every probe drafts,
    which under load costs more than it can save, so probing at a fixed interval would cost a fixed share of
    throughput. A verdict for drafting resets it; so does the batch falling to half the size it had
    when the pause began (load fell: probe at once). ``probing`` is true from the first step after a pause
    until the next verdict: the caller may probe with a sample of the batch.
    """

    def __init__(self, base: int, cap: int):
        if not 1 <= base <= cap:
            raise ValueError(f"DraftPause: expected 1 <= base <= cap; got base={base}, cap={cap}")
        self.base, self.cap = base, cap
        self.interval = base  # the length of the next pause
        self.until = 0  # first step allowed to draft
        self.batch = 0  # requests in the batch whose plan began the pause
        self.probing = False

    def active(self, step: int, batch: int) -> bool:
        """Whether step ``step`` with ``batch`` requests should skip drafting."""
        if step >= self.until:
            self.probing = self.probing or self.until > 0
            return False
        if 2 * batch <= self.batch:
            self.until, self.interval, self.probing = 0, self.base, False
            return False
        return True

    def not_worth_it(self, step: int, batch: int, grow: bool = True) -> None:
        """Pause from ``step``; ``grow=False`` keeps the next pause at ``base`` (a small batch: its probes are
        cheap, and whether drafting pays turns on what the requests write, which changes fast)."""
        if not grow:
            self.interval = self.base
        self.until = step + self.interval
        if grow:
            self.interval = min(2 * self.interval, self.cap)
        self.batch = batch
        self.probing = False

    def worth_it(self) -> None:
        self.until, self.interval, self.probing = 0, self.base, False


class PayoffMeter:
    """What drafting pays, measured: tokens per second of whole engine steps that draft against steps that do
    not, per batch size (requests decoding). The ratio of the two corrects the cost model's predicted payoff,
    whose errors (the target's step time is neither linear nor the same with and without drafts on a CPU; the
    drafter's own bookkeeping) are of the size of the gain near break-even.

    Sums decay with ``half_life`` steps of their kind. ``correction(b)`` = measured ratio / the mean predicted
    ratio over the same drafting steps, once ``min_draft`` drafting and ``min_plain`` plain steps of batch b
    were seen (None before), shrunk towards 1 by ``z`` standard errors of the drafting steps' mean tokens (a
    single request's tokens per step vary by ~45%: after 32 steps its rate is known to ~8%, and an unshrunk
    correction paused drafting at concurrency 1 where it paid 11%) and clipped to [1/``clip``, ``clip``].
    ``pays(b)``: the measured ratio is above 1 by more than ``z`` standard errors; ``loses(b, step)``: below 1 by
    more than that, measured by a drafting step at most ``stale_after`` steps ago. ``wants_plain(b, step)``:
    enough drafting steps of batch b but too few plain ones (never measured, or last measured ``refresh`` steps
    ago): the caller should pause drafting for at least ``min_plain`` steps to measure them.
    """

    def __init__(self, max_batch: int = 8, half_life: float = 256.0, min_draft: int = 32, min_plain: int = 16,
                 refresh: int = 4096, clip: float = 2.0, z: float = 2.0, stale_after: int = 1024):
        if max_batch < 1 or min_draft < 1 or min_plain < 1 or half_life <= 0 or clip < 1:
            raise ValueError("PayoffMeter: expected max_batch, min_draft, min_plain >= 1, half_life > 0, clip >= 1")
        self.max_batch, self.min_draft, self.min_plain = max_batch, min_draft, min_plain
        self.refresh, self.clip, self.z, self.stale_after = refresh, clip, z, stale_after
        self.decay = 0.5 ** (1.0 / half_life)
        # batch -> [n, tokens, seconds, predicted ratio, tokens^2] sums for drafting (0) and plain (1) steps
        self._sums: dict[int, list[list[float]]] = {}
        self._seen: dict[int, list[int]] = {}  # batch -> [drafting, plain] steps observed
        self._plain_step: dict[int, int] = {}  # batch -> the step whose plain measurement last came in
        self._draft_step: dict[int, int] = {}  # batch -> the step whose drafting measurement last came in

    def observe(self, batch: int, drafting: bool, tokens: int, seconds: float, predicted: float | None = None,
                step: int = 0) -> None:
        """One decode step (no prefill in it) of ``batch`` requests that emitted ``tokens`` in ``seconds``
        (start to next start); a drafting step also gives the payoff the model predicted for it."""
        if not 1 <= batch <= self.max_batch or not (seconds > 0 and math.isfinite(seconds)):
            return
        if drafting and predicted is None:
            return
        sums = self._sums.setdefault(batch, [[0.0] * 5, [0.0] * 5])[0 if drafting else 1]
        d = self.decay
        for i, x in enumerate((1.0, float(tokens), float(seconds), float(predicted or 0.0), float(tokens) ** 2)):
            sums[i] = d * sums[i] + x
        self._seen.setdefault(batch, [0, 0])[0 if drafting else 1] += 1
        (self._draft_step if drafting else self._plain_step)[batch] = step

    def count(self, batch: int) -> tuple[int, int]:
        """(drafting, plain) steps measured at ``batch``."""
        return tuple(self._seen.get(batch, (0, 0)))

    def measured(self, batch: int) -> float | None:
        """Measured tokens/s of drafting steps / of plain steps at ``batch`` (None before enough of each)."""
        n_d, n_p = self.count(batch)
        if n_d < self.min_draft or n_p < self.min_plain:
            return None
        d, p = self._sums[batch]
        return (d[1] / d[2]) / (p[1] / p[2])

    def _stderr(self, batch: int) -> float:
        """Relative standard error of the drafting steps' rate at ``batch`` (from their tokens per step)."""
        d = self._sums[batch][0]
        mean = d[1] / d[0]
        return math.sqrt(max(d[4] / d[0] - mean * mean, 0.0) / d[0]) / mean

    def pays(self, batch: int) -> bool:
        """Whether drafting at ``batch`` measurably pays: the measured ratio ``z`` standard errors below is > 1."""
        m = self.measured(batch)
        return m is not None and m * (1.0 - self.z * self._stderr(batch)) > 1.0

    def loses(self, batch: int, step: int) -> bool:
        """Whether drafting at ``batch`` measurably does not pay (``z`` standard errors above the measured ratio
        is < 1), measured by drafting steps the last of which is at most ``stale_after`` steps before ``step``."""
        m = self.measured(batch)
        if m is None or step - self._draft_step.get(batch, step) > self.stale_after:
            return False
        return m * (1.0 + self.z * self._stderr(batch)) < 1.0

    def correction(self, batch: int) -> float | None:
        m = self.measured(batch)
        if m is None:
            return None
        d = self._sums[batch][0]
        predicted = d[3] / d[0]
        if predicted <= 0:
            return None
        stderr = self._stderr(batch)
        c = m / predicted
        c = max(c - self.z * stderr, 1.0) if c > 1.0 else min(c + self.z * stderr, 1.0)
        return min(self.clip, max(1.0 / self.clip, c))

    def wants_plain(self, batch: int, step: int) -> bool:
        if not 1 <= batch <= self.max_batch:
            return False
        n_d, n_p = self.count(batch)
        stale = step - self._plain_step.get(batch, step) > self.refresh
        return n_d >= self.min_draft and (n_p < self.min_plain or stale)


# --------------------------------------------------------------------------------------------------------
# Calibration: sequential temperature scaling (STS)

_DEFAULT_GRID = np.geomspace(0.05, 20.0, 200)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def _ece_rows(p: np.ndarray, y: np.ndarray, num_bins: int) -> np.ndarray:
    """ECE of each row of p [G, N] against labels y [N] (same equal-width bins as the metric)."""
    g, n = p.shape
    idx = np.clip((p * num_bins).astype(np.int64), 0, num_bins - 1) + num_bins * np.arange(g)[:, None]
    gap = np.bincount(idx.ravel(), weights=(y[None, :] - p).ravel(), minlength=g * num_bins)
    return np.abs(gap.reshape(g, num_bins)).sum(1) / n


def fit_sequential_temperature(
    z, accepted_len, num_bins: int = 10, drafted=None, grid=None, min_reached: int = 30
) -> np.ndarray:
    """Per-position temperatures t_1..t_K by sequential temperature scaling.

    c_k = sigmoid(z_k / t_k) and survival a_k = prod_{i<=k} c_i.  Left to right, t_k is the grid value that
    minimises the ECE of a_k against the label ``accepted_len >= k`` with t_1..t_{k-1} already fixed.
    Among equally good temperatures the one closest to 1 (in log space) wins, so a position with no signal
    is left alone.

    Args:
        z:            [N, K] confidence logits (pre-sigmoid) per draft position.
        accepted_len: [N] accepted drafts per round (0..K).
        num_bins:     ECE bins.
        drafted:      [N] drafts per round (default K); position k is fitted only on rounds with drafted >= k.
        grid:         candidate temperatures (default 200 log-spaced points in [0.05, 20]).
        min_reached:  a position reached (its predecessors accepted) by fewer rounds keeps 1.0: with a handful
                      of rounds the ECE is noise and the best temperature lands on the grid's bounds
                      (SmolLM2's drafter: 0.05 and 20 at positions 5-7, reached by < 10 of ~1000 rounds).
    Returns:
        [K] temperatures (1.0 for a position too few rounds reached).
    """
    zz = _to_numpy(z)
    if zz.ndim != 2:
        raise ValueError(f"z must be [N, K], got shape {zz.shape}")
    n, k_max = zz.shape
    acc = _to_numpy(accepted_len, np.int64).reshape(-1)
    dr = np.full(n, k_max, dtype=np.int64) if drafted is None else _to_numpy(drafted, np.int64).reshape(-1)
    if acc.shape[0] != n or dr.shape[0] != n:
        raise ValueError(f"z has {n} rows but accepted_len has {acc.shape[0]} and drafted {dr.shape[0]}")
    temps_grid = _DEFAULT_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    if temps_grid.ndim != 1 or temps_grid.size == 0 or (temps_grid <= 0).any():
        raise ValueError("grid must be a non-empty 1-D array of positive temperatures")
    closeness = np.abs(np.log(temps_grid))

    temps = np.ones(k_max)
    prefix = np.ones(n)  # a_{k-1} per round with the temperatures fitted so far
    for k in range(k_max):
        m = dr >= k + 1
        if int((m & (acc >= k)).sum()) >= min_reached:
            y = (acc[m] >= k + 1).astype(np.float64)
            zk, pk = zz[m, k], prefix[m]
            # Chunk the grid so the [G, N] matrix stays small for large N.
            step = max(1, 2_000_000 // max(1, zk.size))
            eces = np.concatenate([
                _ece_rows(pk[None, :] * _sigmoid(zk[None, :] / temps_grid[i:i + step, None]), y, num_bins)
                for i in range(0, temps_grid.size, step)
            ])
            best = np.flatnonzero(eces <= eces.min() + 1e-12)
            temps[k] = temps_grid[best[np.argmin(closeness[best])]]
        prefix = prefix * _sigmoid(zz[:, k] / temps[k])
    return temps


def apply_temperature(z, temps):
    """[N, K] logits -> [N, K] calibrated survival cumprod(sigmoid(z / t)).

    Accepts numpy or torch (result on the same device).  ``z`` may have fewer positions than ``temps``.
    """
    t = np.asarray(temps, dtype=np.float64).reshape(-1)
    k = z.shape[-1]
    if k > t.shape[0]:
        raise ValueError(f"z has {k} positions but only {t.shape[0]} temperatures")
    t = t[:k]
    if hasattr(z, "sigmoid"):  # torch
        return (z / z.new_tensor(t)).sigmoid().cumprod(-1)
    return np.cumprod(_sigmoid(_to_numpy(z) / t), axis=-1)


def save_calibration(path: str | os.PathLike, temps, meta: Mapping | None = None) -> str:
    """Write temperatures (and free-form metadata) as JSON; a directory gets ``CALIBRATION_FILE``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CALIBRATION_FILE)
    t = np.asarray(temps, dtype=np.float64).reshape(-1)
    _check_temps(t, path)
    with open(path, "w") as f:
        json.dump({"format": "dspark-sts", "version": 1, "temperatures": t.tolist(), "meta": dict(meta or {})},
                  f, indent=2)
    return path


def load_calibration(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read ``(temperatures [K], meta)`` written by :func:`save_calibration`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CALIBRATION_FILE)
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != "dspark-sts":
        raise ValueError(f"{path}: format={data.get('format')!r}, expected 'dspark-sts'")
    t = np.asarray(data["temperatures"], dtype=np.float64)
    _check_temps(t, path)
    return t, dict(data.get("meta", {}))


def _check_temps(t: np.ndarray, where: str) -> None:
    if t.ndim != 1 or not np.isfinite(t).all() or (t <= 0).any():
        raise ValueError(f"{where}: temperatures must be positive and finite, got {t.tolist()}")
