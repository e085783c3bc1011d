"""DSpark on the real SmolLM2-135M-Instruct target: greedy output token-identical to no speculation for 16
MT-Bench prompts x 64 tokens batched together, also when a tiny KV cache forces preemption."""
from __future__ import annotations

import gc
from pathlib import Path

import pytest

from vllm_dspark.assets import load_mtbench
from vllm_dspark.integration.compat import proposer_of

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SHIPPED = Path(__file__).resolve().parents[2] / "drafters" / "smollm2-135m-dspark"


@pytest.fixture(scope="module")
def smollm2_drafter(smollm2_dir, tmp_path_factory) -> Path:
    """The trained drafter in drafters/ when present, else a fresh one (losslessness holds for any drafter)."""
    if (SHIPPED / "config.json").exists():
        return SHIPPED
    from vllm_dspark.checkpoint import init_drafter

    out = tmp_path_factory.mktemp("smollm2-drafter")
    init_drafter(smollm2_dir, out, num_layers=1, markov_rank=64, block_size=7)
    return out


def _run(target, drafter=None, **kw):
    from vllm import LLM, SamplingParams

    args = dict(dtype="float32", enforce_eager=True, max_model_len=512, seed=0, disable_log_stats=False)
    args.update(kw)
    if drafter is not None:
        args.update(speculative_config={"method": "custom_class", "model": "vllm_dspark.DSparkProposer",
                                        "num_speculative_tokens": 5},
                    additional_config={"dspark": {"drafter": str(drafter), "mode": "fixed"}})
    llm = LLM(str(target), **args)
    messages = [[{"role": "user", "content": q.turns[0]}] for q in load_mtbench()[::5]]  # 16, all categories
    outs = llm.chat(messages, SamplingParams(max_tokens=64, temperature=0), use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    prop = proposer_of(llm)
    preempted = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    stats = None if prop is None else (prop.stats.num_rounds, prop.stats.skipped_gap, preempted)
    del llm
    gc.collect()
    return tokens, stats


def test_smollm2_greedy_identical_batched_and_under_preemption(vllm_env, smollm2_dir, smollm2_drafter):
    base, _ = _run(smollm2_dir)
    assert len(base) == 16 and all(len(t) > 0 for t in base)
    spec, (rounds, gaps, _) = _run(smollm2_dir, smollm2_drafter)
    assert spec == base
    assert rounds > 16 and gaps == 0
    # 8 blocks of 128 tokens for 16 requests of up to ~200 tokens: the scheduler preempts and recomputes.
    tight, (rounds, gaps, preempted) = _run(smollm2_dir, smollm2_drafter, num_gpu_blocks_override=8,
                                            block_size=128)
    assert preempted > 0
    assert tight == base
    assert gaps == 0
