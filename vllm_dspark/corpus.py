"""The suffix corpus: text the target wrote before (a server's past answers, a drafter's training data), tokenized
once and indexed for suffix drafts next to each request's own text (setting ``suffix_corpus``).

SmolLM2's answers to other prompts share much of their phrasing with its answers to new ones, so copying from
7k earlier answers drafts on ~3 in 4 decode steps where a request's own text drafts on 1 in 5
(benchmarks/README.md, "Session 17"). Sources: ``.jsonl`` / ``.jsonl.gz`` files of conversations (the assistant
turns of ``{"messages": [{"role", "content"}, ...]}``, as `vllm-dspark gen-data` writes them) or of
``{"text": ...}`` rows, and ``.txt`` files (one text each); a directory stands for the files in it. Token ids are
cached under ``~/.cache/vllm-dspark/suffix-corpus`` by content and tokenizer.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from .config import DSparkConfigError

logger = logging.getLogger("vllm_dspark")

SUFFIXES = (".jsonl", ".jsonl.gz", ".txt")
FORMAT = 1  # bump when the tokenization below changes: old cache entries are then ignored


def corpus_files(spec: str) -> list[Path]:
    """The files ``spec`` names (comma-separated files and directories), or a DSparkConfigError saying which
    path is wrong."""
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(SUFFIXES))
            if not found:
                raise DSparkConfigError(f'additional_config["dspark"]["suffix_corpus"]={spec!r}: directory {part!r} '
                                        f"has no {' / '.join(SUFFIXES)} files")
            files += found
        elif path.is_file() and path.name.endswith(SUFFIXES):
            files.append(path)
        else:
            what = "not a .jsonl, .jsonl.gz or .txt file" if path.is_file() else "no such file or directory"
            raise DSparkConfigError(f'additional_config["dspark"]["suffix_corpus"]={spec!r}: {part!r}: {what}; '
                                    "expected comma-separated .jsonl / .jsonl.gz / .txt files or directories")
    return files


def read_texts(path: Path) -> list[str]:
    """The target-written texts of one corpus file."""
    if path.name.endswith(".txt"):
        return [path.read_text(encoding="utf-8")]
    opener = gzip.open if path.name.endswith(".gz") else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DSparkConfigError(f'additional_config["dspark"]["suffix_corpus"]: {path}: line {i + 1}: '
                                        f"not JSON ({e})") from None
            if isinstance(row, dict) and isinstance(row.get("messages"), list):
                texts += [m["content"] for m in row["messages"]
                          if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str)]
            elif isinstance(row, dict) and isinstance(row.get("text"), str):
                texts.append(row["text"])
            else:
                raise DSparkConfigError(f'additional_config["dspark"]["suffix_corpus"]: {path}: line {i + 1}: '
                                        'expected {"messages": [{"role", "content"}, ...]} or {"text": str}')
    return texts


def tokenize(texts: list[str], tokenizer) -> list[list[int]]:
    """Each text as the target would have written it after a prompt: the generation prompt's last token (what a
    request's first output token follows), the text, then end-of-sequence."""
    head: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                               tokenize=False)
        head = tokenizer.encode(prompt, add_special_tokens=False)[-1:]
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bodies = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [head + list(b) + tail for b in bodies]


def cache_dir() -> Path:
    from .assets import cache_root

    return cache_root() / "suffix-corpus"


def corpus_tokens(spec: str, tokenizer_path: str) -> list[np.ndarray]:
    """Token ids of every text in ``spec``, tokenized with the tokenizer at ``tokenizer_path`` (cached)."""
    files = corpus_files(spec)
    key = hashlib.sha256(f"{FORMAT}\0{Path(tokenizer_path).expanduser().resolve()}".encode())
    for f in files:
        key.update(f.read_bytes())
    cached = cache_dir() / f"{key.hexdigest()[:24]}.npz"
    if cached.is_file():
        with np.load(cached) as z:
            return np.split(z["tokens"], z["ends"][:-1])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    texts = [t for f in files for t in read_texts(f)]
    seqs = tokenize(texts, tokenizer)
    tokens = np.array([x for s in seqs for x in s], dtype=np.int32)
    ends = np.cumsum([len(s) for s in seqs], dtype=np.int64)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp.npz")
    np.savez(tmp, tokens=tokens, ends=ends)
    tmp.replace(cached)  # whole or not at all: a crash mid-write leaves no half entry
    logger.info("vllm-dspark: suffix corpus %s: %d texts, %d tokens (cached in %s)", spec, len(seqs), len(tokens),
                cached)
    return np.split(tokens, ends[:-1])
