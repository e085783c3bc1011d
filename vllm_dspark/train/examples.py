"""Training data: chat-template tokens with an assistant loss mask, read from gen-data JSONL, and the deterministic
batch order (a batch is a pure function of (seed, step); a sequence's anchors of (seed, its sample index)), so a
resumed run sees exactly what the uninterrupted one would have."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .data import prompt_length, token_ids


@dataclass
class Example:
    ids: list[int]  # chat-template tokens, truncated to max_len
    mask: list[bool]  # True on assistant tokens (up to and including each turn's end token)


def end_token_ids(tokenizer) -> set[int]:
    """Ids that end an assistant turn: eos plus the usual chat end markers the vocabulary has."""
    ends = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ends.add(tid)
    return ends


def encode_conversation(tokenizer, messages: list[dict], max_len: int, end_ids: set[int]) -> Example:
    """Tokens of the whole chat and its loss mask: for every assistant turn, the tokens after the prefix rendered
    with ``add_generation_prompt=True`` up to and including the turn's end token. Turns whose rendering is not a
    prefix of the full chat (templates that rewrite history) are left unsupervised."""
    full = token_ids(tokenizer.apply_chat_template(messages, tokenize=True))
    mask = [False] * len(full)
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        start = prompt_length(tokenizer, messages[:i])
        upto = token_ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True))
        if full[: len(upto)] != upto or full[:start] != upto[:start]:
            continue
        stop = len(upto)
        ends = [j for j in range(start, stop) if full[j] in end_ids]
        if ends:
            stop = ends[0] + 1  # the template's trailing newline after the end token is never generated
        mask[start:stop] = [True] * (stop - start)
    return Example(full[:max_len], mask[:max_len])


def read_ids(path: str | Path) -> set[str]:
    """The "id" of every row of a JSONL file."""
    return {json.loads(line).get("id") for line in Path(path).read_text().split("\n") if line.strip()}


def load_examples(path: str | Path, tokenizer, max_len: int, *, exclude: set[str] = frozenset(),
                  limit: int | None = None) -> tuple[list[Example], int]:
    """JSONL from `vllm-dspark gen-data` (several files: comma-separated) -> (examples with at least one anchor,
    number dropped). Rows whose "id" is in ``exclude`` (a held-out set) are skipped; at most ``limit`` kept. A
    last line cut by a writer still appending (gen-data running) is ignored."""
    end_ids = end_token_ids(tokenizer)
    out, dropped = [], 0
    for one in str(path).split(","):
        lines = Path(one).read_text().split("\n")  # not splitlines(): U+2028 may sit inside a JSON string
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                messages = row["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                if lineno == len(lines) and isinstance(e, json.JSONDecodeError):
                    continue
                raise ValueError(f"{one}:{lineno}: expected a JSON object with 'messages' ({e})") from None
            if row.get("id") in exclude:
                continue
            ex = encode_conversation(tokenizer, messages, max_len, end_ids)
            if any(ex.mask[1:]):  # an anchor needs a supervised next token
                out.append(ex)
            else:
                dropped += 1
            if limit is not None and len(out) >= limit:
                return out, dropped
    if not out:
        raise ValueError(f"{path}: no conversation with an assistant turn inside max_len={max_len} tokens")
    return out, dropped


def token_counts(examples: list[Example], target_config: Mapping[str, Any]) -> torch.Tensor:
    """[V] float64 how often each target id is a supervised (assistant) token: picks the draft vocabulary."""
    vocab = (target_config.get("text_config") or target_config)["vocab_size"]
    ids = torch.tensor([t for e in examples for t, m in zip(e.ids, e.mask) if m], dtype=torch.int64)
    return torch.bincount(ids, minlength=vocab).double()


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist())


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Dataset indices of global batch ``step``: a seeded permutation per epoch, batches cut from the stream."""
    return [_epoch_order(n, seed, s // n)[s % n] for s in range(step * batch_size, (step + 1) * batch_size)]


def anchor_generator(seed: int, sample: int) -> torch.Generator:
    """Per-sequence RNG: the same anchors whichever rank, micro-batch or resumed run gets the sequence."""
    return torch.Generator().manual_seed((seed * 2_654_435_761 + sample) % (2**63))


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> input_ids [B, T], attention_mask [B, T], loss_mask [B, T] bool (right-padded to the longest)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n], attn[b, :n], mask[b, :n] = torch.tensor(e.ids), 1, torch.tensor(e.mask)
    return ids, attn, mask
