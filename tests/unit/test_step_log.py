"""The step log: one JSON line per engine step from the proposer's StepReport, and the summary of it."""
from __future__ import annotations

import json

import pytest

from vllm_dspark.config import DSparkConfigError
from vllm_dspark.eval.step_log import busy, summary
from vllm_dspark.integration.proposer import step_line
from vllm_dspark.policy import StepReport
from vllm_dspark.settings import DSparkSettings


def _row(batch, period, emitted, spec=False, prefill=False, forward=None, drafter=0.0, planned=0, expected=0.0):
    forward = 0.8 * period if forward is None else forward
    return {"batch": batch, "period": period, "forward": forward, "drafter": drafter, "emitted": emitted,
            "verified": spec, "drafted": batch if spec else 0, "prefill": prefill, "planned": planned,
            "expected": expected}


def test_step_line_keeps_the_report_and_sums_its_rounds():
    report = StepReport(period=0.0123456789, forward=0.01, tokens=12, batch=3, verified=True, drafter=0.002,
                        drafted=2, rounds=[(3, 2), (3, 0)], emitted=5, copied=1, planned=9)
    row = json.loads(step_line(report, 17))
    assert row["step"] == 17 and row["period"] == 0.012346 and row["tokens"] == 12 and row["emitted"] == 5
    assert (row["rounds"], row["accepted"], row["copied"], row["planned"]) == (2, 2, 1, 9)
    assert row["verified"] is True and row["prefill"] is False and row["plain"] is False


def test_summary_per_batch_size_by_hand():
    rows = [_row(4, 0.010, 4) for _ in range(10)]  # plain: 400 tok/s
    # spec: 500 tok/s; each plans 12 drafts expecting 6 accepted, and the next step accepts 4 (8 tokens - 4)
    rows += [_row(4, 0.016, 8, spec=True, drafter=0.002, planned=12, expected=6.0) for _ in range(10)]
    rows += [_row(4, 1.0, 4, forward=0.008)]  # the engine waited 0.99 s: left out
    rows += [_row(4, 0.050, 40, prefill=True)]  # a prefill step: left out
    rows += [_row(2, 0.008, 2) for _ in range(3)]  # too few steps for --min-steps 8
    for step, r in enumerate(rows):
        r["step"] = step
    assert len(busy(rows)) == 23
    table = summary(rows, min_steps=8)
    assert [t["batch"] for t in table] == [4]
    t = table[0]
    assert (t["plain_steps"], t["spec_steps"]) == (10, 10)
    assert t["plain_tps"] == pytest.approx(400.0) and t["spec_tps"] == pytest.approx(500.0)
    assert t["ratio"] == pytest.approx(1.25) and t["spec_tokens"] == pytest.approx(2.0)
    assert t["plain_ms"] == pytest.approx(10.0) and t["drafter_ms"] == pytest.approx(2.0)
    assert t["time_share"] == pytest.approx(0.26 / (0.26 + 3 * 0.008))
    # 9 plans were verified by a spec step after them (8 tokens - 4 requests), the 10th by the waiting step (0)
    assert (t["planned"], t["expected"]) == (12, 6.0) and t["accepted"] == pytest.approx(9 * 4 / 10)


def test_step_log_setting_must_be_a_string():
    with pytest.raises(DSparkConfigError) as info:
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "step_log": 1}})
    assert str(info.value) == ('additional_config["dspark"]["step_log"]=1: expected a file path (a string; '
                               'empty = off)')
    assert DSparkSettings.from_additional_config({"dspark": {"drafter": "d"}}).step_log == ""
