"""`vllm-dspark gen-data`: regenerate assistant answers with the target itself, through vLLM.

DeepSpec's recipe: a drafter learns the target's own distribution best from the target's own answers.
Output: JSONL, one conversation per line::

    {"id": "sharegpt-000123", "source": "sharegpt", "messages": [{"role": "user", ...},
                                                                 {"role": "assistant", ...}, ...],
     "num_answer_tokens": [212, 98]}

Multi-turn: a ShareGPT conversation's later user turns are asked too (up to --max-turns), each answered by the
target with its own earlier answers as the history (vLLM's prefix cache reuses that history's KV). One engine is
kept full: whenever a request finishes, the next turn or conversation is added before the next step (no waves).
Resumable (a conversation is written once all its turns are answered; ids already in the output are skipped),
deterministic for a given --concurrency (prompt order shuffled by --seed, each request seeded from --seed and its
id), and MT-Bench evaluation questions are excluded from training prompts unless --include-eval is given.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..assets import load_mtbench, sharegpt_dialogues
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


def load_dialogues(spec: str, *, include_eval: bool = False) -> list[tuple[str, list[str]]]:
    """(id, user turns) for ``sharegpt`` (all user turns), ``mtbench`` (both turns) or a FILE (.jsonl with
    "prompt" or "messages" (its user turns), or plain text with one prompt per line). A conversation whose first
    turn is an MT-Bench question is dropped unless ``include_eval``."""
    if spec == "sharegpt":
        pairs = [(f"sharegpt-{i:06d}", d) for i, d in enumerate(sharegpt_dialogues())]
    elif spec == "mtbench":
        pairs = [(f"mtbench-{q.question_id}", list(q.turns)) for q in load_mtbench()]
        include_eval = True  # asked for explicitly
    else:
        path = Path(spec)
        if not path.is_file():
            raise SystemExit(f"vllm-dspark gen-data: --prompts {spec!r}: expected 'sharegpt', 'mtbench' or a file")
        pairs = []
        for i, line in enumerate(path.read_text().split("\n")):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                row = json.loads(line)
                turns = [row["prompt"]] if row.get("prompt") else \
                    [m["content"] for m in row["messages"] if m["role"] == "user"]
                pairs.append((str(row.get("id", f"{path.stem}-{i:06d}")), turns))
            else:
                pairs.append((f"{path.stem}-{i:06d}", [line]))
    if not include_eval:
        eval_texts = {_norm(t) for q in load_mtbench() for t in q.turns}
        pairs = [(i, d) for i, d in pairs if _norm(d[0]) not in eval_texts]
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


@dataclass
class _Dialogue:
    id: str
    users: list[str]  # the user turns still to ask come from here
    messages: list[dict] = field(default_factory=list)
    answer_tokens: list[int] = field(default_factory=list)


class _Feed:
    """Keeps one vLLM engine at ``concurrency`` requests: each finished answer either asks its conversation's
    next user turn (first in line, so the history is still in the prefix cache) or completes the conversation."""

    def __init__(self, llm, todo: list[tuple[str, list[str]]], args):
        self.engine, self.tokenizer, self.args = llm.llm_engine, llm.get_tokenizer(), args
        self.queue = [_Dialogue(pid, list(users[: args.max_turns])) for pid, users in reversed(todo)]
        self.inflight: dict[str, _Dialogue] = {}
        self.budget = args.max_model_len - args.max_tokens
        self.generated = 0  # answer tokens so far, in-flight ones included
        self._seen: dict[str, int] = {}  # tokens of each in-flight request already counted

    def _ask(self, d: _Dialogue) -> bool:
        """Add d's next user turn to the engine; False when it does not fit the context budget."""
        msgs = d.messages + [{"role": "user", "content": d.users[0]}]
        ids = token_ids(self.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
        if len(ids) > self.budget:
            return False
        turn = len(d.answer_tokens)
        rid = f"{d.id}#{turn}" if turn else d.id
        seed = (self.args.seed * 1_000_003 + zlib.crc32(rid.encode())) & 0x7FFFFFFF
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=self.args.max_tokens, temperature=self.args.temperature, seed=seed)
        self.engine.add_request(rid, {"prompt_token_ids": ids}, params)
        d.messages, d.users = msgs, d.users[1:]
        self.inflight[rid] = d
        return True

    def run(self, on_done, seconds: float = float("inf")) -> None:
        """Step until every conversation is done (or ``seconds`` passed); ``on_done(dialogue)`` for each
        (answered turns >= 1, or none when even its first turn did not fit)."""
        t0 = time.perf_counter()
        while (self.queue or self.inflight) and time.perf_counter() - t0 < seconds:
            while self.queue and len(self.inflight) < self.args.concurrency:
                d = self.queue.pop()
                if not self._ask(d):
                    on_done(d)
            for out in self.engine.step():
                res = out.outputs[0]
                n = len(res.token_ids)  # cumulative outputs
                self.generated += n - self._seen.get(out.request_id, 0)
                self._seen[out.request_id] = n
                if not out.finished:
                    continue
                del self._seen[out.request_id]
                d = self.inflight.pop(out.request_id)
                d.messages = d.messages + [{"role": "assistant", "content": res.text}]
                d.answer_tokens.append(n)
                if d.users:
                    self.queue.append(d)
                else:
                    on_done(d)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vllm-dspark gen-data", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--target", required=True, help="target HF folder")
    ap.add_argument("--prompts", default="sharegpt", help="sharegpt | mtbench | FILE")
    ap.add_argument("--out", required=True, help="output JSONL (appended to; existing ids are skipped)")
    ap.add_argument("--num-prompts", type=int, default=None, help="stop after this many conversations in total")
    ap.add_argument("--max-turns", type=int, default=3, help="user turns asked per conversation (1 = first only)")
    ap.add_argument("--max-tokens", type=int, default=256, help="answer length cap per turn (eval uses 128-256)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy: the distribution the greedy MT-Bench eval drafts against")
    ap.add_argument("--seed", type=int, default=0, help="prompt order and per-request sampling seeds")
    ap.add_argument("--concurrency", type=int, default=128,
                    help="requests in flight (vLLM max_num_seqs); see benchmarks/README.md for tokens/s by value")
    ap.add_argument("--max-model-len", type=int, default=1536, help="context cap: later turns stop when full")
    ap.add_argument("--kv-cache-gib", type=int, default=4,
                    help="VLLM_CPU_KVCACHE_SPACE (whole GiB: vLLM reads an int) unless already set")
    ap.add_argument("--dtype", default="float32", help="float32 is ~2.5x faster than bf16 on AVX2 CPUs")
    ap.add_argument("--include-eval", action="store_true", help="keep prompts that are MT-Bench questions")
    ap.add_argument("--original-answers", action="store_true",
                    help="sharegpt only: write the dataset's own first answers instead of regenerating them "
                         "(no vLLM; cheap extra contexts: the trainer's L1 term still distils the target's "
                         "own next-token distribution at every position)")
    args = ap.parse_args(argv)
    for name in ("max_turns", "max_tokens", "concurrency", "max_model_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
    if args.original_answers:
        return write_original_answers(args)

    pairs = load_dialogues(args.prompts, include_eval=args.include_eval)
    random.Random(args.seed).shuffle(pairs)
    if args.num_prompts is not None:
        pairs = pairs[: args.num_prompts]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().split("\n"):  # not splitlines(): U+2028 may sit inside a JSON string
            try:
                done.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by an interrupted run: regenerated below
    todo = [(i, d) for i, d in pairs if i not in done]
    print(f"gen-data: {len(pairs)} conversations, {len(done)} already in {out}, {len(todo)} to generate",
          file=sys.stderr)
    if not todo:
        return 0

    from tqdm import tqdm
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    llm = LLM(model=args.target, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
              enforce_eager=True, max_num_seqs=args.concurrency)
    feed = _Feed(llm, todo, args)
    source = args.prompts if "/" not in args.prompts else Path(args.prompts).stem
    bar = tqdm(total=len(todo), desc="gen-data", unit="conv", dynamic_ncols=True)
    t0, written, answers = time.perf_counter(), 0, 0
    with out.open("a") as f:
        def on_done(d: _Dialogue) -> None:
            nonlocal written, answers
            if d.answer_tokens:  # a first turn too long for --max-model-len is skipped, not retried
                f.write(json.dumps({"id": d.id, "source": source, "messages": d.messages,
                                    "num_answer_tokens": d.answer_tokens}, ensure_ascii=False) + "\n")
                f.flush()
                written, answers = written + 1, answers + len(d.answer_tokens)
            bar.update(1)
            bar.set_postfix_str(f"{answers} answers, {feed.generated / (time.perf_counter() - t0):.0f} tok/s")

        feed.run(on_done)
    bar.close()
    dt = time.perf_counter() - t0
    print(f"gen-data: {written} conversations, {answers} answers, {feed.generated} tokens in {dt:.0f} s "
          f"({feed.generated / dt:.1f} tokens/s at concurrency {args.concurrency}) -> {out}", file=sys.stderr)
    return 0
