"""`vllm-dspark gen-data`: regenerate assistant answers with the target itself, through vLLM.

DeepSpec's recipe: a drafter learns the target's own distribution best from the target's own answers.
Output: JSONL, one conversation per line::

    {"id": "sharegpt-000123", "source": "sharegpt", "messages": [{"role": "user", ...},
                                                                 {"role": "assistant", ...}]}

Resumable (ids already in the output are skipped; lines are appended and flushed chunk by chunk),
deterministic (prompt order shuffled by --seed, each request seeded from --seed and its id), and MT-Bench
evaluation questions are excluded from training prompts unless --include-eval is given.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import zlib
from pathlib import Path
from typing import Any, Mapping

from ..assets import load_mtbench, sharegpt_prompts
from ..cli import HelpFormatter


def token_ids(rendered: Any) -> list[int]:
    """The ids of ``apply_chat_template(..., tokenize=True)``: a list, or (transformers >= 5) a BatchEncoding,
    whose ``len()`` is its number of keys."""
    return list(rendered["input_ids"] if isinstance(rendered, Mapping) else rendered)


def prompt_length(tokenizer, messages: list[dict]) -> int:
    """Tokens of the chat rendered with the generation prompt: what vLLM's ``LLM.chat`` will prefill."""
    return len(token_ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)))


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text).strip().lower()


def load_prompts(spec: str, *, include_eval: bool = False) -> list[tuple[str, str]]:
    """(id, user prompt) pairs for ``sharegpt``, ``mtbench`` (turn 1) or a FILE (.jsonl with "prompt" or
    "messages", or plain text with one prompt per line)."""
    if spec == "sharegpt":
        pairs = [(f"sharegpt-{i:06d}", p) for i, p in enumerate(sharegpt_prompts())]
    elif spec == "mtbench":
        pairs = [(f"mtbench-{q.question_id}", q.turns[0]) for q in load_mtbench()]
        include_eval = True  # asked for explicitly
    else:
        path = Path(spec)
        if not path.is_file():
            raise SystemExit(f"vllm-dspark gen-data: --prompts {spec!r}: expected 'sharegpt', 'mtbench' or a file")
        pairs = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                row = json.loads(line)
                text = row.get("prompt") or next(m["content"] for m in row["messages"] if m["role"] == "user")
                pairs.append((str(row.get("id", f"{path.stem}-{i:06d}")), text))
            else:
                pairs.append((f"{path.stem}-{i:06d}", line))
    if not include_eval:
        eval_texts = {_norm(t) for q in load_mtbench() for t in q.turns}
        pairs = [(i, p) for i, p in pairs if _norm(p) not in eval_texts]
    return pairs


def write_original_answers(args) -> int:
    if args.prompts != "sharegpt":
        raise SystemExit("vllm-dspark gen-data: --original-answers needs --prompts sharegpt")
    from ..assets import load_sharegpt

    eval_texts = set() if args.include_eval else {_norm(t) for q in load_mtbench() for t in q.turns}
    rows = []
    for conv in load_sharegpt():
        turns = conv["conversations"]
        if len(turns) < 2 or turns[0]["from"] != "human" or turns[1]["from"] != "gpt":
            continue
        prompt, answer = turns[0]["value"].strip(), turns[1]["value"].strip()
        if not (16 <= len(prompt) <= 2000) or not answer or _norm(prompt) in eval_texts:
            continue
        if sum(c.isascii() for c in prompt + answer) < 0.95 * len(prompt + answer):
            continue
        rows.append({"id": f"sharegpt-orig-{conv['id']}", "source": "sharegpt-original",
                     "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    random.Random(args.seed).shuffle(rows)
    rows = rows[: args.num_prompts] if args.num_prompts is not None else rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"gen-data: wrote {len(rows)} original ShareGPT conversations to {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vllm-dspark gen-data", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--target", required=True, help="target HF folder")
    ap.add_argument("--prompts", default="sharegpt", help="sharegpt | mtbench | FILE")
    ap.add_argument("--out", required=True, help="output JSONL (appended to; existing ids are skipped)")
    ap.add_argument("--num-prompts", type=int, default=None, help="stop after this many prompts in total")
    ap.add_argument("--max-tokens", type=int, default=256, help="answer length cap (eval uses 128-256)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy: the distribution the greedy MT-Bench eval drafts against")
    ap.add_argument("--seed", type=int, default=0, help="vLLM's sampling seed (matters at --temperature > 0)")
    ap.add_argument("--chunk", type=int, default=64, help="prompts per vLLM call (one flush each)")
    ap.add_argument("--max-model-len", type=int, default=1024, help="prompt + answer tokens at most")
    ap.add_argument("--dtype", default="float32", help="float32 is ~2.5x faster than bf16 on AVX2 CPUs")
    ap.add_argument("--include-eval", action="store_true", help="keep prompts that are MT-Bench questions")
    ap.add_argument("--original-answers", action="store_true",
                    help="sharegpt only: write the dataset's own first answers instead of regenerating them "
                         "(no vLLM; cheap extra contexts: the trainer's L1 term still distils the target's "
                         "own next-token distribution at every position)")
    args = ap.parse_args(argv)
    if args.original_answers:
        return write_original_answers(args)

    pairs = load_prompts(args.prompts, include_eval=args.include_eval)
    random.Random(args.seed).shuffle(pairs)
    if args.num_prompts is not None:
        pairs = pairs[: args.num_prompts]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                done.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by an interrupted run: regenerated below
    todo = [(i, p) for i, p in pairs if i not in done]
    print(f"gen-data: {len(pairs)} prompts, {len(done)} already in {out}, {len(todo)} to generate", file=sys.stderr)
    if not todo:
        return 0

    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.target, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
              enforce_eager=True)
    tokenizer = llm.get_tokenizer()
    budget = args.max_model_len - args.max_tokens
    bar = tqdm(total=len(todo), desc="gen-data", unit="answer")
    with out.open("a") as f:
        for c in range(0, len(todo), args.chunk):
            chunk = []
            for pid, prompt in todo[c: c + args.chunk]:
                msgs = [{"role": "user", "content": prompt}]
                if prompt_length(tokenizer, msgs) <= budget:
                    chunk.append((pid, msgs))
                else:
                    bar.update(1)  # too long for --max-model-len: skipped, not retried
            params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                     seed=(args.seed * 1_000_003 + zlib.crc32(pid.encode())) & 0x7FFFFFFF)
                      for pid, _ in chunk]
            results = llm.chat([m for _, m in chunk], params, use_tqdm=False) if chunk else []
            for (pid, msgs), res in zip(chunk, results):
                answer = res.outputs[0].text
                row = {"id": pid, "source": args.prompts if "/" not in args.prompts else Path(args.prompts).stem,
                       "messages": msgs + [{"role": "assistant", "content": answer}],
                       "num_answer_tokens": len(res.outputs[0].token_ids)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    return 0
