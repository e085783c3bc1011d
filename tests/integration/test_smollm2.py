"""The converted SmolLM2-135M-Instruct is a real, working target for vLLM on CPU."""
from __future__ import annotations

from collections import Counter

import pytest

from vllm_dspark.assets import load_mtbench

MAX_TOKENS = 48


@pytest.mark.vllm
def test_vllm_generates_coherent_text_from_the_converted_smollm2(smollm2_dir, vllm_env):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(smollm2_dir), **{**vllm_env.llm_kwargs, "max_model_len": 512})
    question = load_mtbench()[0]  # writing: a travel blog post about a trip to Hawaii
    (request,) = llm.chat(
        [{"role": "user", "content": question.turns[0]}],
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
    )
    out = request.outputs[0]
    ids = list(out.token_ids)
    eos = llm.get_tokenizer().eos_token_id

    assert out.finish_reason in ("stop", "length")
    assert len(ids) == MAX_TOKENS if out.finish_reason == "length" else ids[-1] == eos
    assert len(set(ids)) >= 10, out.text
    assert Counter(ids).most_common(1)[0][1] <= len(ids) // 2, out.text
    # Coherent English about the question, not noise.
    words = out.text.split()
    assert sum(w.strip(".,!?:;'\"").isalpha() for w in words) >= 0.8 * len(words), out.text
    # On topic (greedy output today: "As I stepped off the plane ... the breathtaking island of Oahu ...").
    assert any(w in out.text.lower() for w in ("hawaii", "oahu", "maui", "honolulu", "waikiki", "island")), out.text
