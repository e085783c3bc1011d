"""The packaged ``copy`` prompt set: deterministic, balanced, and each prompt really carries its ShareGPT source."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from vllm_dspark import assets
from vllm_dspark.eval import copy_prompts as cp
from vllm_dspark.eval.prompts import load_prompts


@pytest.fixture(scope="module")
def items() -> list[cp.CopyItem]:
    return cp.copy_items()


def test_load_prompts_copy_is_deterministic_and_the_items_prompts(items):
    prompts = load_prompts("copy")
    assert prompts == [item.prompt for item in items]  # a second, independent build gives the same set
    assert len(prompts) == len(cp.CATEGORIES) * cp.PER_CATEGORY == 80
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(len(p.turns) == 1 and p.id.startswith(p.category + ":") for p in prompts)


def test_a_small_sample_covers_every_category_evenly(items):
    assert Counter(item.prompt.category for item in items) == {c: cp.PER_CATEGORY for c in cp.CATEGORIES}
    sample = load_prompts("copy", num_prompts=8)
    assert [p.id for p in sample] == [item.prompt.id for item in items[:8]]
    assert Counter(p.category for p in sample) == {
        "code-fix": 2, "code-rename": 2, "paragraph-typos": 2, "paragraph-rewrite": 1, "summarize-quote": 1
    }


def test_sources_are_later_sharegpt_answers_never_mtbench(items):
    conversations = {c["id"]: c["conversations"] for c in assets.load_sharegpt(limit=cp.SCAN)}
    mtbench = assets.load_mtbench()
    mtbench_ids, mtbench_turns = {str(q.question_id) for q in mtbench}, [t for q in mtbench for t in q.turns]
    for item in items:
        _, record, turn = item.prompt.id.split(":")
        answer = conversations[record][int(turn)]
        assert int(turn) >= 3 and answer["from"] == "gpt", item.prompt.id
        assert item.source in answer["value"], item.prompt.id
        assert record not in mtbench_ids and not any(t in item.prompt.turns[0] for t in mtbench_turns)
    assert len({item.source for item in items}) == len(items)


def test_prompts_carry_their_source_verbatim(items):
    for item in items:
        prompt = item.prompt.turns[0]
        if item.prompt.category == "paragraph-typos":
            continue
        assert item.text == item.source
        if item.prompt.category.startswith("code-"):
            assert prompt.endswith(f"\n\n```\n{item.source}\n```"), item.prompt.id
        else:
            assert prompt.endswith(f"\n\n{item.source}"), item.prompt.id


def _one_edit(word: str, typo: str) -> bool:
    """typo is word with two adjacent letters swapped, or one letter dropped or added."""
    if len(typo) == len(word):
        diff = [i for i in range(len(word)) if word[i] != typo[i]]
        return len(diff) == 2 and diff[1] == diff[0] + 1 and word[diff[0]] == typo[diff[1]]
    short, long_ = sorted((word, typo), key=len)
    return len(long_) == len(short) + 1 and any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def test_typos_change_exactly_a_known_few_words(items):
    typos = [item for item in items if item.prompt.category == "paragraph-typos"]
    assert len(typos) == cp.PER_CATEGORY
    for item in typos:
        prompt = item.prompt.turns[0]
        assert prompt.endswith(f"\n\n{item.text}") and item.source not in prompt
        words, typo_words = item.source.split(), item.text.split()
        assert len(words) == len(typo_words)
        changed = [(w, t) for w, t in zip(words, typo_words) if w != t]
        assert len(changed) == cp.TYPOS == 4, (item.prompt.id, changed)
        assert all(_one_edit(w, t) for w, t in changed), changed


def test_lengths_and_category_specific_content(items):
    for item in items:
        source, prompt, category = item.source, item.prompt.turns[0], item.prompt.category
        assert sum(c.isascii() for c in prompt) >= 0.99 * len(prompt)  # English, not another script
        if category.startswith("code-"):
            assert 200 <= len(source) <= cp.MAX_CODE_CHARS and len(source.splitlines()) >= 6
        else:
            assert 60 <= len(source.split()) <= 200 and len(source) <= cp.MAX_PARAGRAPH_CHARS
        assert len(prompt) <= len(source) + 150  # the instruction stays short
        if category == "code-rename":
            old, new = re.match(r"Rename `(\w+)` to `(\w+)` everywhere", prompt).groups()
            assert len(re.findall(rf"\b{old}\b", source)) >= 3 and not re.search(rf"\b{new}\b", source)
            assert old.replace("_", "").lower() == new.replace("_", "").lower() != old
        if category == "summarize-quote":
            assert len(re.findall(r"[.!?](?:\s|$)", source)) >= 4
        if category == "paragraph-rewrite":
            assert len(re.findall(r"\b(was|were|had|did)\b", source)) >= 2


def test_unknown_spec_names_both_packaged_sets():
    with pytest.raises(SystemExit, match="expected 'mtbench', 'copy' or an existing .jsonl / text file"):
        load_prompts("no-such-prompts.jsonl")
