"""Target layer id -1 (the embedding output) end to end in a real vLLM engine: the rows vLLM exports for it are
the target's embeddings, so drafts recomputed from HF transformers' embedding output match, and output stays
lossless."""
from __future__ import annotations

import json

import pytest
import torch

from tests.integration.test_proposer import _close, _generate, _llm, _prompts, _proposer
from vllm_dspark.checkpoint import init_drafter, load_drafter
from vllm_dspark.context import ContextStore
from vllm_dspark.drafting import draft_block

pytestmark = pytest.mark.vllm


def test_layer_minus_one_reads_the_embedding_output(vllm_env, tiny_llama_dir, tmp_path):
    d = tmp_path / "drafter"
    init_drafter(tiny_llama_dir, d, num_layers=1, markov_rank=16, block_size=4, num_target_layer_ids=2)
    cfg = json.loads((d / "config.json").read_text())
    cfg["target_layer_ids"] = [-1, 1]  # same count: fc keeps its shape
    (d / "config.json").write_text(json.dumps(cfg))
    prompts = _prompts(4)
    base = _generate(_llm(tiny_llama_dir), prompts)
    llm = _llm(tiny_llama_dir, d, k=3, extra={"mode": "fixed"}, enable_prefix_caching=False)
    out = _generate(llm, prompts)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in base]
    records = _proposer(llm).records
    assert len(records) >= 4 * 5

    from transformers import AutoModelForCausalLM

    from vllm_dspark.integration.compat import external_request_id

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    drafter = load_drafter(d, tiny_llama_dir)
    drafter.set_head_dtype(torch.bfloat16)  # the plugin's default LM head on CPU
    seqs = {o.request_id: list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in out}
    mismatches = wrong_layer = 0
    for rec in records[::2]:
        seq, n = seqs[external_request_id(rec["req_id"])], rec["position"]
        ids = torch.tensor([seq[:n]])
        with torch.no_grad():
            hs = hf(ids, output_hidden_states=True).hidden_states
            embed = hf.get_input_embeddings()(ids)
        torch.testing.assert_close(hs[0], embed, rtol=0, atol=0)
        for first, counter in ((embed[0], "mismatches"), (hs[1][0], "wrong_layer")):
            store = ContextStore(drafter)
            store.append([("r", 0, torch.cat([first, hs[2][0]], -1))])
            block = draft_block(drafter, store.gather(["r"]), torch.tensor([rec["anchor"]]), 3, topk=32,
                                block_drafts=drafter.cfg.max_draft_tokens)
            if counter == "mismatches":
                mismatches += block.tokens[0].tolist() != rec["drafts"]
            else:
                wrong_layer += block.tokens[0].tolist() != rec["drafts"]
    assert mismatches == 0
    assert wrong_layer > 0  # layer 0's output instead of the embeddings drafts other tokens: the check can fail
    _close(llm)
