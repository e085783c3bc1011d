"""The proposer's counters -> snapshot file -> read_metrics -> Prometheus families (no server)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_dspark.integration import metrics
from vllm_dspark.integration.proposer import ProposerStats


def test_snapshots_sum_and_reach_the_collector(tmp_path, monkeypatch):
    pytest.importorskip("prometheus_client")
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(tmp_path))
    stats = ProposerStats(steps=10, num_rounds=4, drafted_at=[4, 3], accepted_at=[3, 1], length_hist={2: 3, 1: 1},
                          lookup_rounds=2, lookup_drafted=5, lookup_accepted=3, faults=1)
    metrics.publish(SimpleNamespace(stats=stats, num_active_requests=2), force=True)
    m = metrics.read_metrics()
    assert (m["rounds"], m["drafted_at"], m["accepted_at"], m["steps"]) == (4, [4, 3], [3, 1], 10)
    assert (m["lookup_rounds"], m["lookup_drafted"], m["lookup_accepted"], m["faults"]) == (2, 5, 3, 1)
    families = {f.name: f for f in metrics.DSparkCollector().collect()}
    value = {name: f.samples[0].value for name, f in families.items() if len(f.samples) == 1}
    assert value["vllm_dspark:lookup_rounds"] == 2 and value["vllm_dspark:lookup_accepted_tokens"] == 3
    assert value["vllm_dspark:rounds"] == 4 and value["vllm_dspark:drafter_faults"] == 1
    assert value["vllm_dspark:active_requests"] == 2
    cond = {s.labels["position"]: s.value for s in families["vllm_dspark:acceptance_conditional"].samples}
    assert cond == {"1": 0.75, "2": pytest.approx(1 / 3)}
