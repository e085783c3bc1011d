"""The proposer's own bookkeeping, without an engine: requests it cannot draft for, prompt lookup's gate."""

import numpy as np
import pytest


def _bare_proposer(k: int = 4):
    """A DSparkProposer with only the state these methods read (no engine, no drafter)."""
    from vllm_dspark.integration.metrics import ProposerStats
    from vllm_dspark.integration.proposer import DSparkProposer

    prop = DSparkProposer.__new__(DSparkProposer)
    prop.stats, prop.num_spec_tokens, prop._budget, prop.max_model_len = ProposerStats(), k, k, 10_000
    return prop


def test_requests_without_context_are_counted_and_the_first_few_logged(caplog):
    from vllm_dspark.integration.metrics import ProposerStats

    stats = ProposerStats()
    with caplog.at_level("INFO", logger="vllm_dspark"):
        for req_id in ["a", "a", "b", "c", "d", "e"]:
            why = "vLLM's prefix cache served its first 64 tokens" if req_id == "a" else "rows were not delivered"
            stats.skip(req_id, 5, 9, why)
    assert stats.skipped_gap == 6
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == stats.GAP_LOG_REQUESTS == 3  # one line per request, three requests at most
    assert lines[0] == ("vllm-dspark: request a does not draft: its drafter context has 5 rows, 9 expected "
                        "(vLLM's prefix cache served its first 64 tokens)")
    assert lines[1].startswith("vllm-dspark: request b does not draft") and "were not delivered" in lines[1]


def test_prompt_lookup_only_in_small_all_greedy_batches():
    from vllm_dspark.integration.proposer import DSparkSettings

    prop = _bare_proposer()
    prop.settings = DSparkSettings(drafter="d", lookup=True, lookup_max_batch=2)
    text = np.array([[5, 1, 2, 3, 9, 8, 7, 6, 1, 2, 3]] * 3)
    n = np.array([11, 11, 11])
    rows, caps = [0, 1, 2], [4, 2, 4]
    assert prop._lookup([0, 1], rows, caps, [0.0] * 3, n, text) == {0: [9, 8, 7, 6], 1: [9, 8]}  # capped
    assert prop._lookup([0, 1, 2], rows, caps, [0.0] * 3, n, text) == {}  # a batch of 3: the drafter serves it
    assert prop._lookup([0, 1], rows, caps, [0.0, 0.7, 0.0], n, text) == {}  # a sampled request: q for all or none
    prop.settings = DSparkSettings(drafter="d", lookup=False)
    assert prop._lookup([0], rows, caps, [0.0] * 3, n, text) == {}


def test_draft_pause_and_probe_settings_are_checked():
    from vllm_dspark.config import DSparkConfigError
    from vllm_dspark.integration.proposer import DSparkSettings

    ok = DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "probe_interval": 8}})
    assert (ok.probe_interval, ok.probe_interval_max) == (8, 1024)
    with pytest.raises(DSparkConfigError, match=r'\["probe_interval_max"\]=16: expected >= probe_interval \(32\)'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "probe_interval_max": 16}})
    with pytest.raises(DSparkConfigError, match=r'\["probe_interval"\]=0: expected an integer >= 1'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "probe_interval": 0}})
    assert DSparkSettings.from_additional_config({"dspark": {"drafter": "d"}}).head_dtype == "auto"
    with pytest.raises(DSparkConfigError, match=r'\["lookup"\]=\'yes\': expected true or false'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "lookup": "yes"}})
    with pytest.raises(DSparkConfigError, match=r'\["lookup_max"\]=1: expected >= lookup_min \(2\)'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "lookup": True, "lookup_max": 1}})
    with pytest.raises(DSparkConfigError, match=r'\["lookup_min"\]=0: expected an integer >= 1'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "lookup_min": 0}})
    with pytest.raises(DSparkConfigError, match=r'\["head_dtype"\]=\'int8\': expected auto\|same\|float32'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "head_dtype": "int8"}})
