"""Where an engine's time went, from its step log (the ``step_log`` setting): per batch size, the plain steps'
and the speculative steps' tokens per second of wall clock, and the share of time each took.

    python -m vllm_dspark.eval.step_log runs/steps.jsonl [--min-steps 8]

A step's tokens per second is what its requests gained (accepted drafts + one each) over its period (its start to
the next step's start: the forward, the drafter and everything else). Prefill steps are left out (their cost is
not a decode step's), and so are steps whose time outside the forward and the drafter is over 4x the median of
their kind at their batch size: the engine was waiting (`vllm-dspark bench` runs its engines in time slices).
Per step that planned drafts: how many, how many of them the policy expected to be accepted, and how many the
next step accepted (its tokens gained less one per request): an overconfident plan verifies too much.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path


def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def kind(row: dict) -> str:
    return "spec" if row["verified"] or row["drafted"] else "plain"


def busy(rows: list[dict]) -> list[dict]:
    """Decode steps, without the ones where the engine waited."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if not r["prefill"] and r["batch"] > 0:
            groups[(r["batch"], kind(r))].append(r)
    out = []
    for group in groups.values():
        rest = [r["period"] - r["forward"] - r["drafter"] for r in group]
        cut = 4 * statistics.median(rest)
        out += [r for r, x in zip(group, rest) if x <= cut]
    return out


def summary(rows: list[dict], min_steps: int = 8) -> list[dict]:
    """One dict per batch size with either kind measured at least ``min_steps`` times."""
    # a plan's drafts are verified in the step after it (copies: the caller's rows stay as they were)
    rows = [dict(r, realized=nxt["emitted"] - nxt["batch"] if nxt is not None and nxt["step"] == r["step"] + 1 else 0)
            for r, nxt in zip(rows, rows[1:] + [None])]
    decode = busy(rows)
    by: dict[int, dict[str, list[dict]]] = defaultdict(lambda: {"plain": [], "spec": []})
    for r in decode:
        by[r["batch"]][kind(r)].append(r)
    total = sum(r["period"] for r in decode) or 1.0
    table = []
    for batch in sorted(by):
        plain, spec = by[batch]["plain"], by[batch]["spec"]
        line = {"batch": batch, "plain_steps": len(plain), "spec_steps": len(spec),
                "time_share": sum(r["period"] for r in plain + spec) / total}
        for name, group in (("plain", plain), ("spec", spec)):
            seconds = sum(r["period"] for r in group)
            line[f"{name}_tps"] = sum(r["emitted"] for r in group) / seconds if seconds else float("nan")
            line[f"{name}_ms"] = 1e3 * seconds / len(group) if group else float("nan")
        line["spec_tokens"] = statistics.fmean(r["emitted"] / batch for r in spec) if spec else float("nan")
        line["drafter_ms"] = 1e3 * statistics.fmean(r["drafter"] for r in spec) if spec else float("nan")
        line["ratio"] = line["spec_tps"] / line["plain_tps"] if plain and spec else float("nan")
        planned = [r for r in plain + spec if r.get("planned")]
        line["expected"] = sum(r.get("expected", 0.0) for r in planned) / max(1, len(planned))
        line["accepted"] = sum(r["realized"] for r in planned) / max(1, len(planned))
        line["planned"] = sum(r["planned"] for r in planned) / max(1, len(planned))
        if len(plain) >= min_steps or len(spec) >= min_steps:
            table.append(line)
    return table


def attach(specs: dict[str, dict], out: Path) -> dict[str, Path]:
    """Give every DSpark engine in ``specs`` (name -> LLM kwargs) a fresh step log in ``out``; name -> its path."""
    paths = {}
    for name, kwargs in specs.items():
        dspark = kwargs.get("additional_config", {}).get("dspark")
        if dspark is not None:
            paths[name] = out / f"steps-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.jsonl"
            paths[name].parent.mkdir(parents=True, exist_ok=True)
            paths[name].unlink(missing_ok=True)
            dspark["step_log"] = str(paths[name])
    return paths


def format_summary(table: list[dict]) -> str:
    lines = ["batch | time share | plain steps, ms, tok/s | spec steps, ms, tok/s, tokens/request, drafter ms | "
             "spec/plain | drafts per step: verified, expected accepted, accepted"]
    for t in table:
        lines.append(f"{t['batch']:5d} | {t['time_share']:9.1%} | {t['plain_steps']:5d} {t['plain_ms']:7.1f} "
                     f"{t['plain_tps']:7.1f} | {t['spec_steps']:5d} {t['spec_ms']:7.1f} {t['spec_tps']:7.1f} "
                     f"{t['spec_tokens']:5.2f} {t['drafter_ms']:6.1f} | {t['ratio']:5.2f} | {t['planned']:5.1f} "
                     f"{t['expected']:5.1f} {t['accepted']:5.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="step logs (JSON lines)")
    ap.add_argument("--min-steps", type=int, default=8, help="leave out batch sizes seen fewer times")
    args = ap.parse_args()
    print(format_summary(summary(load(args.paths), args.min_steps)))


if __name__ == "__main__":
    main()
