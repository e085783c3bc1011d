"""The draft layers' RoPE against vLLM's own get_rope (the classes the target runs with), every supported type."""
from __future__ import annotations

import pytest
import torch

from tests.unit.test_rope import CASES, D, MAX_POS
from vllm_dspark.model.rope import Rope


@pytest.mark.parametrize("case", list(CASES))
def test_rope_matches_vllm_get_rope(case):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        theirs = get_rope(D, MAX_POS, True, dict(CASES[case]), torch.float32)
    # vLLM's cache is float32 (angles rounded at ~6e-8 x position): compare where that stays below 1e-5
    positions = torch.arange(64)
    cos, sin = Rope(CASES[case], D, MAX_POS).cos_sin(positions, torch.float64)
    cache = theirs.cos_sin_cache[positions].double()
    torch.testing.assert_close(cos[:, : D // 2], cache[:, : D // 2], rtol=0, atol=1e-5)
    torch.testing.assert_close(sin[:, : D // 2], cache[:, D // 2:], rtol=0, atol=1e-5)
    torch.testing.assert_close(cos[:, D // 2:], cos[:, : D // 2], rtol=0, atol=0)  # neox: halves repeat
