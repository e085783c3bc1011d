"""`vllm-dspark gen-data` end to end on the tiny target: the target's own greedy answers, resumable,
deterministic, multi-turn, MT-Bench questions and prompts too long for --max-model-len left out."""
from __future__ import annotations

import json

import pytest

from vllm_dspark.assets import load_mtbench
from vllm_dspark.train.data import main, prompt_length

pytestmark = pytest.mark.vllm

SHORT = ["Once upon a time there was a man who", "Write three words about the long day",
         "What is the number of people in the home", "Tell me about the sound of the water"]
MAX_MODEL_LEN, MAX_TOKENS = 96, 8


def _rows(path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_prompt_length_counts_tokens_not_keys(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    msgs = [{"role": "user", "content": "water " * 200}]
    # transformers 5 returns a BatchEncoding here, whose len() is 2 (its keys): the bug that let a 513-token
    # ShareGPT prompt through a 256-token budget and crashed a whole gen-data run.
    assert prompt_length(tok, msgs) == len(tok(tok.apply_chat_template(msgs, tokenize=False,
                                                                        add_generation_prompt=True),
                                                add_special_tokens=False)["input_ids"]) > 200


def test_gen_data_resumes_and_is_deterministic(vllm_env, tiny_llama_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    eval_question = load_mtbench()[0].turns[0]
    prompts.write_text("\n".join(SHORT[:2] + ["water " * 200, eval_question] + SHORT[2:]) + "\n")
    common = ["--target", str(tiny_llama_dir), "--prompts", str(prompts), "--max-tokens", str(MAX_TOKENS),
              "--max-model-len", str(MAX_MODEL_LEN), "--concurrency", "2"]
    first = tmp_path / "first.jsonl"
    assert main(common + ["--out", str(first), "--num-prompts", "2"]) == 0
    assert 1 <= len(_rows(first)) <= 2  # the first 2 of the shuffled prompts; the long one may be among them
    assert main(common + ["--out", str(first)]) == 0  # resumes: the 2 done are kept, not redone
    lines = first.read_text().splitlines()
    rows = _rows(first)
    assert len(lines) == len(rows) == len(SHORT)  # the long prompt skipped, the MT-Bench question excluded
    assert sorted(r["messages"][0]["content"] for r in rows.values()) == sorted(SHORT)
    for r in rows.values():
        assert r["messages"][1]["role"] == "assistant" and len(r["num_answer_tokens"]) == 1
        assert 0 < r["num_answer_tokens"][0] <= MAX_TOKENS

    again = tmp_path / "again.jsonl"
    assert main(common + ["--out", str(again)]) == 0
    assert _rows(again) == rows  # same answers, whatever the interruption


def test_gen_data_answers_later_turns_with_its_own_history(vllm_env, tiny_llama_dir, tmp_path):
    from vllm import LLM, SamplingParams

    convs = tmp_path / "convs.jsonl"
    turns = [["Tell me about the sound of the water", "Write three words about the long day", "And more?"],
             ["Once upon a time there was a man who"]]
    convs.write_text("".join(json.dumps({"id": f"c{i}", "messages": [{"role": "user", "content": t} for t in u]})
                             + "\n" for i, u in enumerate(turns)))
    out = tmp_path / "multi.jsonl"
    assert main(["--target", str(tiny_llama_dir), "--prompts", str(convs), "--out", str(out), "--max-tokens", "4",
                 "--max-model-len", "256", "--max-turns", "2", "--concurrency", "4", "--temperature", "0"]) == 0
    rows = _rows(out)
    assert [m["role"] for m in rows["c0"]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [m["role"] for m in rows["c1"]["messages"]] == ["user", "assistant"]
    # Each answer is what the target says given the history it was written after (its own earlier answer).
    llm = LLM(str(tiny_llama_dir), **vllm_env.llm_kwargs)
    msgs = rows["c0"]["messages"]
    for k in range(1, len(msgs), 2):
        ref = llm.chat(msgs[:k], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].text
        assert ref == msgs[k]["content"]
    assert msgs[2]["content"] == turns[0][1] and rows["c0"]["num_answer_tokens"] == [4, 4]
