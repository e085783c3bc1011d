"""The suffix corpus: which files it reads, what it indexes (assistant turns, as the target wrote them after a
prompt), its cache, and its errors; drafts copied from it."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from tiny_models import build_tiny_tokenizer
from vllm_dspark.config import DSparkConfigError
from vllm_dspark.corpus import corpus_files, corpus_tokens, read_texts
from vllm_dspark.suffix import CORPUS, OWN, SuffixDrafter


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(out)
    return out


def _conversations(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_corpus_reads_assistant_turns_and_texts_and_tokenizes_them_as_answers(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_DSPARK_CACHE", str(tmp_path / "cache"))
    from transformers import AutoTokenizer

    d = tmp_path / "corpus"
    d.mkdir()
    _conversations(d / "a.jsonl.gz", [{"messages": [{"role": "user", "content": "Not indexed"},
                                                    {"role": "assistant", "content": "The water was good."},
                                                    {"role": "user", "content": "More"},
                                                    {"role": "assistant", "content": "And the day was long."}]}],
                   gz=True)
    (d / "b.txt").write_text("People said the name.", encoding="utf-8")
    (d / "notes.md").write_text("ignored", encoding="utf-8")
    assert [f.name for f in corpus_files(str(d))] == ["a.jsonl.gz", "b.txt"]
    assert read_texts(d / "a.jsonl.gz") == ["The water was good.", "And the day was long."]

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    head = tok.encode(rendered, add_special_tokens=False)[-1]  # what a first output token follows
    want = [[head] + tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]
            for t in ("The water was good.", "And the day was long.", "People said the name.")]
    got = corpus_tokens(str(d), str(tokenizer_dir))
    assert [g.tolist() for g in got] == want

    # the second load reads the cache: no tokenizer is needed
    def no_tokenizer(*a, **k):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_tokenizer)
    assert [g.tolist() for g in corpus_tokens(str(d), str(tokenizer_dir))] == want
    assert len(list((tmp_path / "cache" / "suffix-corpus").glob("*.npz"))) == 1


def test_corpus_errors_name_the_setting_the_path_and_what_was_expected(tmp_path):
    with pytest.raises(DSparkConfigError, match=r'\["suffix_corpus"\]=.*nope.*no such file or directory'):
        corpus_files(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DSparkConfigError, match=r"directory .*empty.* has no \.jsonl / \.jsonl\.gz / \.txt files"):
        corpus_files(str(tmp_path / "empty"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DSparkConfigError, match=r"x\.csv.*not a \.jsonl, \.jsonl\.gz or \.txt file"):
        corpus_files(str(tmp_path / "x.csv"))
    _conversations(tmp_path / "bad.jsonl", [{"messages": []}, {"prompt": "no answer here"}])
    with pytest.raises(DSparkConfigError, match=r"bad\.jsonl: line 2: expected \{\"messages\""):
        read_texts(tmp_path / "bad.jsonl")


def test_drafts_copy_from_the_corpus_which_outlives_forgotten_outputs():
    drafter = SuffixDrafter()
    drafter.load_corpus([np.array([5, 6, 7, 8, 9, 10]), [40, 41, 6, 7, 30]])
    # (6, 7) occurred twice, followed by 8 9 10 and by 30 (then the text ends): a tie goes to the newest
    d = drafter.propose("r", np.array([1, 2, 3, 6, 7]), 4)
    assert (d.tokens, d.ratio, d.support, d.origin) == ([30], [0.5], [2], CORPUS)
    # a longer match in the corpus wins over a shorter one
    d = drafter.propose("s", np.array([2, 5, 6, 7]), 3)
    assert (d.tokens, d.match, d.origin) == ([8, 9, 10], 3, CORPUS)
    drafter.forget_outputs()
    assert drafter.propose("t", np.array([40, 41, 6]), 2).tokens == [7, 30]
    # the request's own text is still preferred where it repeats more reliably (a loop)
    loop = np.array([21, 22, 6, 7, 23, 21, 22, 6, 7, 23, 21, 22, 6, 7])
    assert drafter.propose("u", loop, 3).origin == OWN
