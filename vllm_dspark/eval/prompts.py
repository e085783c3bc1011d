"""Prompt sets for `vllm-dspark eval` and `bench`: MT-Bench or copy-heavy requests (packaged) or a file of one's
own."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    turns: list[str]  # user turns; turn 2 follows the model's own turn-1 answer


def load_prompts(spec: str, num_prompts: int | None = None, turn: int = 1) -> list[Prompt]:
    """``mtbench`` (the 80 packaged questions), ``copy`` (80 requests whose answer repeats the prompt, built from
    ShareGPT answers: see copy_prompts.py), a ``.jsonl`` file (rows ``{"prompt" or "turns", "category"?,
    "id"?}``) or a text file (one prompt per non-empty line, category "default").

    With ``num_prompts``, MT-Bench questions are taken round-robin over its 8 categories (so a small sample
    still covers all of them); ``copy`` is always in round-robin order over its 5 categories; files are cut in
    order.
    """
    if spec == "mtbench":
        from vllm_dspark.assets import load_mtbench

        prompts = [Prompt(str(q.question_id), q.category, list(q.turns)) for q in load_mtbench()]
        if num_prompts is not None:
            prompts = _round_robin(prompts)
    elif spec == "copy":
        from vllm_dspark.eval.copy_prompts import copy_prompts

        prompts = copy_prompts()
    else:
        path = Path(spec)
        if not path.is_file():
            raise SystemExit(f"--prompts {spec!r}: expected 'mtbench', 'copy' or an existing .jsonl / text file")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            prompts = [_jsonl_prompt(json.loads(line), i, path) for i, line in enumerate(lines)]
        else:
            prompts = [Prompt(str(i), "default", [line]) for i, line in enumerate(lines)]
    if num_prompts is not None:
        prompts = prompts[:num_prompts]
    if not prompts:
        raise SystemExit(f"--prompts {spec!r}: no prompts")
    short = [p.id for p in prompts if len(p.turns) < turn]
    if short:
        raise SystemExit(f"--turn {turn}: prompt(s) {short[:5]} of {spec!r} have fewer than {turn} turns")
    return prompts


def _jsonl_prompt(row: Any, i: int, path: Path) -> Prompt:
    turns = row.get("turns") if isinstance(row, dict) else None
    if turns is None and isinstance(row, dict) and isinstance(row.get("prompt"), str):
        turns = [row["prompt"]]
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
        raise SystemExit(f"{path}: line {i + 1}: expected {{\"prompt\": str}} or {{\"turns\": [str, ...]}}")
    return Prompt(str(row.get("id", i)), str(row.get("category", "default")), turns)


def _round_robin(prompts: list[Prompt]) -> list[Prompt]:
    by_cat: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    out = []
    for i in range(max(map(len, by_cat.values()))):
        out += [ps[i] for ps in by_cat.values() if i < len(ps)]
    return out
