"""The proposer's own bookkeeping, without an engine: requests it cannot draft for, settings."""

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
    with pytest.raises(DSparkConfigError, match=r'\["sources"\]=\'copy\': expected hybrid\|drafter\|suffix'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "sources": "copy"}})
    assert DSparkSettings.from_additional_config({"dspark": {"drafter": "d"}}).sources == "hybrid"
    # the old prompt-lookup keys say what replaced them
    with pytest.raises(DSparkConfigError, match=r'\["lookup"\]: no longer a setting: prompt lookup is now suffix '
                                                r'drafting, on by default \(sources = hybrid; sources = drafter'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "lookup": True}})
    with pytest.raises(DSparkConfigError, match=r'\["head_dtype"\]=\'int8\': expected auto\|same\|float32'):
        DSparkSettings.from_additional_config({"dspark": {"drafter": "d", "head_dtype": "int8"}})


def test_copied_drafts_hand_one_hot_q_next_to_the_drafters():
    """In a sampling batch vLLM takes q for every drafting request or for none: copied drafts get one-hot rows."""
    import torch

    from vllm_dspark.drafting import DraftBlock

    prop = _bare_proposer(k=3)
    prop.cfg = type("Cfg", (), {"vocab_size": 6})()
    q = torch.softmax(torch.randn(1, 3, 6), -1)
    block = DraftBlock(torch.tensor([[1, 2, 3]]), None, q=q)
    probs, ids = prop._draft_probs(block, ["a"], [("b", [4, 0]), ("c", [5, 5, 5])], 3)
    assert ids == ["a", "b", "c"] and probs.shape == (3, 3, 6)
    assert torch.equal(probs[0], q[0])
    assert probs[1].argmax(-1).tolist()[:2] == [4, 0] and probs[1, :2].sum().item() == 2.0
    assert probs[1, 2].sum().item() == 0.0  # past the copied draft: never read (vLLM reads num_draft rows)
    assert probs[2].argmax(-1).tolist() == [5, 5, 5] and (probs[2].max(-1).values == 1.0).all()


def test_copies_past_the_drafters_block_get_q_rows_that_long():
    """K = 5 with a drafter block of 2: the drafter's q is padded with zero rows (never read: it drafted 2), a
    copied draft of 5 gets all 5 one-hot rows."""
    import torch

    from vllm_dspark.drafting import DraftBlock

    prop = _bare_proposer(k=5)
    prop.cfg = type("Cfg", (), {"vocab_size": 6})()
    q = torch.softmax(torch.randn(1, 2, 6), -1)
    probs, ids = prop._draft_probs(DraftBlock(torch.tensor([[1, 2]]), None, q=q), ["a"], [("b", [4, 3, 2, 1, 0])], 5)
    assert ids == ["a", "b"] and probs.shape == (2, 5, 6)
    assert torch.equal(probs[0, :2], q[0]) and probs[0, 2:].sum().item() == 0.0
    assert probs[1].argmax(-1).tolist() == [4, 3, 2, 1, 0] and probs[1].sum().item() == 5.0
