"""A fake engine for testing speed policies: known step costs, known acceptance, noise, drift and load changes.

One simulated step runs the target over the batch's tokens (verifying the drafts of the step before), then asks
the policy whether to draft for the next step and how long each block is, exactly in the order the proposer
does. Each request's drafts have their own acceptance probabilities around the phase's per-position mean; the
drafter's confidence sees them (a calibrated head), so a per-request plan can beat any fixed length.
Deterministic for a seed; no vLLM, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .cost import StepReport

__all__ = ["CPU_SMOLLM2", "GPU_FLAT", "EngineModel", "FixedPolicy", "Phase", "PhaseResult", "simulate"]


@dataclass(frozen=True)
class EngineModel:
    """Seconds of a step's parts: forward(B tokens), drafter(D requests), the rest (per kind, vs batch)."""

    forward_points: dict[int, float]  # B -> seconds, interpolated linearly (extrapolated from the last two)
    drafter: tuple[float, float]  # fixed, per request drafted
    rest_plain: tuple[float, float]  # fixed, per request in the batch
    rest_spec: tuple[float, float]

    def forward(self, tokens: int) -> float:
        xs = sorted(self.forward_points)
        ys = [self.forward_points[x] for x in xs]
        if tokens > xs[-1]:
            return ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (tokens - xs[-1])
        return float(np.interp(tokens, xs, ys))


# SmolLM2-135M fp32 under vLLM on this project's 2-core AVX2 CPU (benchmarks/README.md: verifying 3 tokens is
# faster than 2; the bench's plain steps at c=1/4/16/32; the drafter ~7 ms at c=1, ~4:1 fixed : per request).
CPU_SMOLLM2 = EngineModel(
    forward_points={1: 0.035, 2: 0.040, 3: 0.033, 4: 0.036, 8: 0.056, 16: 0.070, 32: 0.120, 64: 0.220, 128: 0.42},
    drafter=(0.006, 0.0015), rest_plain=(0.0005, 0.00002), rest_spec=(0.002, 0.0005))
# A GPU-like engine: a verified block costs about one decode step until the batch is large.
GPU_FLAT = EngineModel(
    forward_points={1: 0.012, 64: 0.0125, 256: 0.016, 1024: 0.040},
    drafter=(0.0015, 0.00002), rest_plain=(0.0003, 0.00001), rest_spec=(0.0006, 0.00001))


@dataclass(frozen=True)
class Phase:
    """``steps`` steps of ``batch`` requests whose drafts are accepted with conditional probability
    ``acceptance[j]`` at position j on average, drifting linearly to ``drift_to`` by the phase's end."""

    steps: int
    batch: int
    acceptance: Sequence[float]
    drift_to: Sequence[float] | None = None


@dataclass
class PhaseResult:
    tokens: int = 0
    seconds: float = 0.0
    drafting_steps: int = 0
    drafted: list[int] | None = None  # per step of the phase: whether it drafted

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds


class FixedPolicy:
    """Every request always drafts and verifies ``length`` drafts (0: no speculation)."""

    def __init__(self, length: int):
        self.length = length

    def begin(self, report: StepReport | None, batch: int) -> int:
        return self.length

    def lengths(self, survival, caps, batch: int, drafted: int | None = None) -> list[int]:
        return [min(self.length, int(c)) for c in caps]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def simulate(policy, engine: EngineModel, phases: Sequence[Phase], k: int, seed: int = 0, noise: float = 0.05,
             spread: float = 1.5, confidence_bias: float = 0.0) -> list[PhaseResult]:
    """Run ``policy`` (``begin`` / ``lengths``, as :class:`SpeedPolicy`) through ``phases``.

    noise:  log-normal sigma of every measured time.
    spread: sigma (in logits) of one block's acceptance around the phase's mean at each position: what the
            drafter's confidence can tell apart.
    confidence_bias: logits the confidence adds to the truth (> 0: an overconfident head).
    """
    rng = np.random.default_rng(seed)
    results = []
    report: StepReport | None = None
    pending = np.zeros(0, dtype=np.int64)  # drafts each request verifies this step
    probs = np.zeros((0, k))  # their true conditional acceptance
    for phase in phases:
        res = PhaseResult(drafted=[])
        start = _logit(np.asarray(phase.acceptance, dtype=np.float64)[:k])
        end = start if phase.drift_to is None else _logit(np.asarray(phase.drift_to, dtype=np.float64)[:k])
        b = phase.batch
        if pending.shape[0] != b:  # requests left or joined: their drafts are dropped
            pending, probs = np.zeros(b, dtype=np.int64), np.zeros((b, k))
        for i in range(phase.steps):
            jitter = lambda: float(np.exp(noise * rng.standard_normal()))  # noqa: E731
            tokens = b + int(pending.sum())
            fwd = engine.forward(tokens) * jitter()
            rounds, emitted = [], b
            for r in np.flatnonzero(pending):
                ok = rng.random(pending[r]) < probs[r, :pending[r]]
                accepted = int(pending[r]) if ok.all() else int(np.argmin(ok))
                rounds.append((int(pending[r]), accepted))
                emitted += accepted
            width = policy.begin(report, b)
            drafter, lengths = 0.0, np.zeros(b, dtype=np.int64)
            if width > 0:
                drafter = (engine.drafter[0] + engine.drafter[1] * b) * jitter()
                mean = start + (end - start) * (i / max(1, phase.steps - 1))
                probs = 1.0 / (1.0 + np.exp(-(mean[None, :] + spread * rng.standard_normal((b, k)))))
                conf = probs if not confidence_bias else 1.0 / (1.0 + np.exp(-(_logit(probs) + confidence_bias)))
                survival = np.cumprod(conf[:, :width], axis=1)
                lengths = np.asarray(policy.lengths(survival, np.full(b, width), b), dtype=np.int64)
            spec = bool(rounds) or width > 0
            fixed, per = engine.rest_spec if spec else engine.rest_plain
            rest = (fixed + per * b) * jitter()
            period = fwd + drafter + rest
            report = StepReport(period=period, forward=fwd, tokens=tokens, batch=b, verified=bool(rounds),
                                drafter=drafter, drafted=b if width > 0 else 0, rounds=rounds)
            res.tokens += emitted
            res.seconds += period
            res.drafting_steps += width > 0
            res.drafted.append(int(width > 0))
            pending = lengths
        results.append(res)
    return results
