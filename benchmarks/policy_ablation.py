"""What each rule of the speed policy buys, in the step simulator: the policy with one rule switched off at a time,
against the best fixed plan of each phase (the cases of tests/unit/test_policy.py, plus noisier timings).

    .venv/bin/python benchmarks/policy_ablation.py

Prints, per variant, the worst and the mean phase ratio to the best fixed plan in hindsight (and to no
speculation) over all cases: a rule earns its place if switching it off lowers the worst or the mean.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))
from test_policy import CASES, K  # noqa: E402

from vllm_dspark.policy import LinearCost, SpeedPolicy  # noqa: E402
from vllm_dspark.policy.simulator import FixedPolicy, simulate  # noqa: E402

VARIANTS = {
    "the policy": {},
    "no plain-step measurement (SPEC_STEPS=inf)": {"SPEC_STEPS": 10**9},
    "no online calibration (TRUST_PRIOR=inf)": {"TRUST_PRIOR": 1e12},
    "one probe step (PROBE_STEPS=1)": {"PROBE_STEPS": 1},
    "probes of 4 steps under load too (PROBE_ROWS=64)": {"PROBE_ROWS": 64},
    "pauses never grow (GROW_BELOW=0)": {"GROW_BELOW": 0.0},
    "pauses always grow, to 1024 (GROW_BELOW=2, SMALL_PAUSE=1024)": {"GROW_BELOW": 2.0, "SMALL_PAUSE": 1024},
    "no warm-up (WARMUP_STEPS=0)": {"WARMUP_STEPS": 0},
    "line only, no per-size times (MEASURED_MIN=inf)": {"MEASURED_MIN": 10**9},
}


def run(overrides: dict, seeds=((0, 0.05), (1, 0.15))) -> list[tuple[float, float]]:
    out = []
    for case, (engine, phases) in sorted(CASES.items()):
        for seed, noise in seeds:
            fixed = {n: simulate(FixedPolicy(n), engine, phases, K, seed=seed, noise=noise) for n in range(K + 1)}
            saved = {}
            for name, value in overrides.items():
                owner = LinearCost if name.startswith("MEASURED") else SpeedPolicy
                saved[(owner, name)] = getattr(owner, name)
                setattr(owner, name, value)
            try:
                mine = simulate(SpeedPolicy(K), engine, phases, K, seed=seed, noise=noise)
            finally:
                for (owner, name), value in saved.items():
                    setattr(owner, name, value)
            for i in range(len(phases)):
                best = max(fixed[n][i].throughput for n in fixed)
                out.append((mine[i].throughput / best, mine[i].throughput / fixed[0][i].throughput))
    return out


def main() -> None:
    print(f"{'variant':64s} {'worst/best':>10s} {'mean/best':>10s} {'worst/plain':>11s}")
    for label, overrides in VARIANTS.items():
        r = np.array(run(overrides))
        print(f"{label:64s} {r[:, 0].min():10.3f} {r[:, 0].mean():10.3f} {r[:, 1].min():11.3f}")


if __name__ == "__main__":
    main()
