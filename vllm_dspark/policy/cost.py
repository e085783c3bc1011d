"""What an engine step costs, learned online: the one cost model every decision of the policy follows from.

A step's seconds (its start to the next step's start) = the target's forward over B tokens + the drafter over
the D requests it drafts + the rest (the engine's scheduling and output handling, our bookkeeping), which is
larger for steps that speculate. Each part is timed apart by the proposer, so each is fitted on its own
measurements and none has to be untangled from the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["LinearCost", "StepCost", "StepReport"]


@dataclass
class StepReport:
    """What one engine step did and cost, as the proposer timed it."""

    period: float  # seconds from this step's start to the next step's start
    forward: float  # seconds of the target's forward
    tokens: int  # B: tokens the target ran
    batch: int  # requests in the step
    verified: bool = False  # it verified drafts
    prefill: bool = False  # a prompt chunk was part of it (its cost is not a decode step's)
    drafter: float = 0.0  # seconds the drafter ran in it (for the next step)
    drafted: int = 0  # requests the drafter ran for
    rounds: list[tuple[int, int]] = field(default_factory=list)  # (drafted, accepted) of its drafter rounds
    # for the step log only (the policy does not read them)
    emitted: int = 0  # tokens the step's requests gained (accepted drafts + one each)
    copied: int = 0  # requests given a copied draft alone (for the next step)
    planned: int = 0  # draft tokens handed to the next step's verification
    expected: float = 0.0  # of them, accepted as the policy expected (adaptive mode)
    plain: bool = False  # the policy kept the step plain to measure what not speculating costs
    looked: bool = False  # suffix lookups ran at its end (for the next step), whether or not they found drafts

    @property
    def speculative(self) -> bool:
        return self.verified or self.drafted > 0


class LinearCost:
    """y(x) = a + b*x fitted online by exponentially weighted least squares (``half_life`` observations).

    Until observations of clearly different x were seen the slope comes from a prior shape,
    ``overhead_tokens`` = a / b (the fixed cost of a step in token units; ~10 for a float32 target on an AVX2 CPU).
    Each x below MEASURED_MAX also keeps its own average (EMA weight MEASURED_ALPHA), used instead of the line once
    seen MEASURED_MIN times: a CPU's GEMMs are not linear in a handful of rows (verifying 2 tokens can take longer
    than 3), and where the sizes seen barely spread the line's slope is only its prior.
    """

    MEASURED_MAX = 32
    MEASURED_ALPHA = 0.02
    MEASURED_MIN = 4

    def __init__(self, overhead_tokens: float = 10.0, half_life: float = 500.0):
        self.overhead_tokens = float(overhead_tokens)
        self.decay = 0.5 ** (1.0 / half_life)
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.count = 0
        self.measured: dict[int, tuple[float, int]] = {}  # x -> (EMA of y, observations)
        self._fit: tuple[float, float] | None = None  # coefficients() until the next observation

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or not (seconds > 0 and math.isfinite(seconds)):
            return
        self._fit = None
        if num_tokens < self.MEASURED_MAX:
            old, seen = self.measured.get(num_tokens, (seconds, 0))
            alpha = max(self.MEASURED_ALPHA, 1.0 / (seen + 1))  # a plain mean of the first few
            self.measured[num_tokens] = ((1 - alpha) * old + alpha * seconds, seen + 1)
        d, x, y = self.decay, float(num_tokens), float(seconds)
        self.n, self.sx, self.sy = d * self.n + 1, d * self.sx + x, d * self.sy + y
        self.sxx, self.sxy = d * self.sxx + x * x, d * self.sxy + x * y
        self.count += 1

    def coefficients(self) -> tuple[float, float]:
        """(a, b): seconds per step and per token (solved once per observation: the plans ask many times)."""
        if self._fit is None:
            self._fit = self._solve()
        return self._fit

    def _solve(self) -> tuple[float, float]:
        if self.n == 0:
            return 1.0, 1.0 / self.overhead_tokens  # no data: only the shape matters to the policy
        mx, my = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mx * mx
        if var > (0.25 * mx) ** 2:  # sizes spread enough to fit a slope
            return self._clamped(mx, my, (self.sxy / self.n - mx * my) / var)
        # Observations bunched at one size (a policy that always verifies full blocks): the sizes measured
        # apart, each counted once, still tell the slope.
        sizes = [(x, y) for x, (y, seen) in self.measured.items() if seen >= self.MEASURED_MIN]
        if len(sizes) >= 2 and max(x for x, _ in sizes) >= 2 * min(x for x, _ in sizes):
            x, y = np.array(sizes, dtype=np.float64).T
            return self._clamped(x.mean(), y.mean(), float(np.cov(x, y, bias=True)[0, 1] / x.var()))
        b = my / (self.overhead_tokens + mx)
        return self.overhead_tokens * b, b

    @staticmethod
    def _clamped(mx: float, my: float, slope: float) -> tuple[float, float]:
        """The line through (mx, my) with the slope held between flat (on a GPU noise alone can make it negative)
        and proportional (compute-bound)."""
        b = min(max(slope, 0.0), my / mx)
        return my - b * mx, b

    def line(self, num_tokens: int) -> float:
        """a + b*x, without the per-size averages."""
        a, b = self.coefficients()
        return a + b * num_tokens

    def seconds(self, num_tokens: int) -> float:
        return float(self.seconds_many([num_tokens])[0])

    def sps(self, num_tokens: int) -> float:
        return 1.0 / self.seconds(num_tokens)

    __call__ = sps

    def seconds_many(self, num_tokens, extra: float = 0.0) -> np.ndarray:
        """``seconds`` for each x in ``num_tokens`` (the fit solved once), plus ``extra`` seconds each."""
        a, b = self.coefficients()
        sizes = np.asarray(num_tokens)
        out = a + extra + b * sizes.astype(np.float64)
        for i, size in enumerate(sizes.tolist()):
            y, seen = self.measured.get(size, (0.0, 0))
            if seen >= self.MEASURED_MIN:
                out[i] = y + extra
        return out

    def sps_many(self, num_tokens, extra: float = 0.0) -> np.ndarray:
        """Steps per second for each x in ``num_tokens`` when a step also costs ``extra`` seconds."""
        return 1.0 / self.seconds_many(num_tokens, extra)

    def __len__(self) -> int:
        return self.count


class StepCost:
    """Seconds of a step that runs the target over ``tokens``, has ``batch`` requests and drafts for ``drafted``
    of them: forward(tokens) + drafter(drafted) + rest(batch), the rest per kind of step (speculative or plain)."""

    # A step whose rest exceeds this many times the usual rest, and IDLE_FORWARDS forwards, is the engine waiting
    # (idle between generate() calls, or paused while another engine in the process steps: `vllm-dspark bench`
    # interleaves engines in time slices), not what a step costs.
    IDLE_RESTS = 4.0
    IDLE_FORWARDS = 0.5
    MIN_KIND_STEPS = 4  # a kind's forward and rest are its own once measured this often (before: the other kind's)

    def __init__(self, overhead_tokens: float = 10.0):
        # vs tokens the target runs, per kind of step: plain (one token per request) or verifying drafts (several
        # query tokens per request take another attention path on CPU: +50-100% over a plain step's line)
        self.forward = {False: LinearCost(overhead_tokens), True: LinearCost(overhead_tokens)}
        self.drafter = LinearCost(overhead_tokens=4.0)  # vs requests drafted (~4:1 fixed : per request, SmolLM2)
        self.rest = {False: LinearCost(overhead_tokens=4.0), True: LinearCost(overhead_tokens=4.0)}  # vs batch

    def observe(self, report: StepReport) -> None:
        if report.drafted:
            self.drafter.observe(report.drafted, report.drafter)
        if report.prefill:
            # A prompt chunk's forward costs less per token than a decode step's (larger GEMMs: 0.7-1.0 ms per
            # token against ~1.3 for SmolLM2 on this CPU); fitted in, it flattened the line and underpriced
            # verification under load (benchmarks/README.md, session 15).
            return
        self.forward[report.tokens > report.batch].observe(report.tokens, report.forward)
        rest = report.period - report.forward - report.drafter
        kind = report.speculative
        if report.looked and not kind:
            # Lookups that found nothing to verify are neither kind: fitted in as plain they priced not speculating
            # above a plain step without them, by their ~1-2% under load (benchmarks/README.md, session 16).
            return
        usual = self._rest(kind, report.batch)
        if rest > max(self.IDLE_FORWARDS * report.forward, self.IDLE_RESTS * usual) and usual > 0:
            return
        self.rest[kind].observe(report.batch, max(rest, 1e-6))

    def _rest(self, speculative: bool, batch: int) -> float:
        for kind in (speculative, not speculative):
            if len(self.rest[kind]) >= self.MIN_KIND_STEPS:
                return self.rest[kind].seconds(batch)
        return 0.0

    def _forward(self, verifying: bool) -> LinearCost:
        """The kind's own forward line once measured MIN_KIND_STEPS times, else the other kind's."""
        own = self.forward[verifying]
        return own if len(own) >= self.MIN_KIND_STEPS else self.forward[not verifying]

    def seconds_many(self, tokens, batch: int, drafted: int) -> np.ndarray:
        """Seconds of a step for each size in ``tokens``. A step that verifies drafts (more tokens than requests)
        pays the speculative rest whether or not the drafter made them (copied drafts cost it too)."""
        sizes = np.asarray(tokens)
        extra = self.drafter.seconds(drafted) if drafted and len(self.drafter) else 0.0
        rest = np.where((sizes > batch) | (drafted > 0), self._rest(True, batch), self._rest(False, batch))
        forward = np.where(sizes > batch, self._forward(True).seconds_many(sizes, extra),
                           self._forward(False).seconds_many(sizes, extra))
        return forward + rest

    def seconds(self, tokens: int, batch: int, drafted: int = 0) -> float:
        return float(self.seconds_many([tokens], batch, drafted)[0])

    def steps_per_second(self, batch: int, drafted: int) -> _Rate:
        """B -> steps per second of such steps, in the form :func:`plan_block_lengths` takes."""
        return _Rate(self, batch, drafted)

    def __len__(self) -> int:
        return len(self.forward[False]) + len(self.forward[True])


@dataclass
class _Rate:
    cost: StepCost
    batch: int
    drafted: int

    def __call__(self, tokens: int) -> float:
        return 1.0 / self.cost.seconds(tokens, self.batch, self.drafted)

    def sps_many(self, tokens) -> np.ndarray:
        return 1.0 / self.cost.seconds_many(tokens, self.batch, self.drafted)
