"""The proposer's counters -> snapshot file -> read_metrics -> Prometheus families (no server)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_dspark.integration import metrics
from vllm_dspark.integration.proposer import ProposerStats


def test_snapshots_sum_and_reach_the_collector(tmp_path, monkeypatch):
    pytest.importorskip("prometheus_client")
    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(tmp_path))
    stats = ProposerStats(steps=10, length_hist={2: 3, 1: 1}, faults=1)
    # a drafter round (2 drafted, 1 accepted), a copied one (2, 2), a splice (3 drafted: 2 copied then 1 of the
    # drafter's; 0 accepted), a drafter round of 1 (1 accepted)
    for drafted, accepted, kind, copied in [(2, 1, "drafter", 0), (2, 2, "suffix", 2), (3, 0, "splice", 2),
                                            (1, 1, "drafter", 0)]:
        stats.observe_round("r", drafted, accepted, None, keep=False, kind=kind, copied=copied)
    metrics.publish(SimpleNamespace(stats=stats, num_active_requests=2), force=True)
    m = metrics.read_metrics()
    assert (m["rounds"], m["drafted_at"], m["accepted_at"], m["steps"]) == (4, [4, 3, 1], [3, 1, 0], 10)
    assert m["source_drafted"] == {"drafter": [2, 1, 1], "suffix": [2, 2]}
    assert m["source_accepted"] == {"drafter": [2, 0, 0], "suffix": [1, 1]}
    assert m["kind_rounds"] == {"drafter": 2, "suffix": 1, "splice": 1} and m["faults"] == 1
    families = {f.name: f for f in metrics.DSparkCollector().collect()}
    value = {name: f.samples[0].value for name, f in families.items() if len(f.samples) == 1}
    by_source = {(s.labels["source"], s.labels["position"]): s.value
                 for s in families["vllm_dspark:source_accepted_tokens"].samples}
    assert by_source == {("drafter", "1"): 2, ("drafter", "2"): 0, ("drafter", "3"): 0, ("suffix", "1"): 1,
                         ("suffix", "2"): 1}
    rounds = {s.labels["source"]: s.value for s in families["vllm_dspark:source_rounds"].samples}
    assert rounds == {"drafter": 2, "suffix": 1, "splice": 1}
    assert value["vllm_dspark:rounds"] == 4 and value["vllm_dspark:drafter_faults"] == 1
    assert value["vllm_dspark:active_requests"] == 2
    cond = {s.labels["position"]: s.value for s in families["vllm_dspark:acceptance_conditional"].samples}
    assert cond == {"1": 0.75, "2": pytest.approx(1 / 3), "3": 0.0}
