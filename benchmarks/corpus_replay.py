"""What copying from a corpus of the target's earlier answers could give, replayed offline (no engine timing).

The target's greedy answers to MT-Bench turn 1 (generated once with vLLM, cached next to the corpus cache) are
replayed decode step by decode step through ``SuffixDrafter``: each step proposes, picks the length the policy
would (calibrated survival against a verify cost of 1 + COST per draft token: 8 tokens cost ~1.6 steps in float32
on this CPU, vllm-cpu.md), and advances by the accepted drafts + 1. Printed per corpus size (a learning curve):
steps with a draft, first draft right, tokens per step and the modelled speedup. Then, teacher-forced at every
answer position: how often the corpus's longest match exists, its most frequent continuation is right, and the
right token is among its continuations at all (the ceiling of any better choice among them).

    .venv/bin/python benchmarks/corpus_replay.py [CORPUS=data/smollm2] [COST=0.086]
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
K = 7


def answers(target: Path, cache: Path) -> list[dict]:
    if cache.is_file():
        return json.loads(cache.read_text())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_dspark.eval.prompts import load_prompts

    tok = AutoTokenizer.from_pretrained(str(target))
    prompts = load_prompts("mtbench")
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p.turns[0]}], add_generation_prompt=True,
                                              tokenize=False), add_special_tokens=False) for p in prompts]
    llm = LLM(str(target), dtype="float32", enforce_eager=True, seed=0, max_model_len=2048)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], SamplingParams(max_tokens=128, temperature=0.0))
    rows = [{"id": p.id, "prompt": i, "out": list(o.outputs[0].token_ids)} for p, i, o in zip(prompts, ids, outs)]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(rows))
    return rows


def replay(texts: list, data: list[dict], cost: float) -> dict:
    from vllm_dspark.suffix import SuffixDrafter

    sd = SuffixDrafter()
    sd.load_corpus(texts)
    tokens = spent = steps = first = drafts = 0
    for r in data:
        full = r["prompt"] + r["out"]
        n, j = len(full), len(r["prompt"]) + 1  # the first answer token comes from the prefill
        while j < n:
            d = sd.propose(r["id"], np.array(full[:j]), min(K, n - j))
            length = accepted = 0
            if d is not None:
                s = np.concatenate([[0.0], np.cumsum(d.survival)])
                length = int(np.argmax([(1 + s[x]) / (1 + cost * x) for x in range(len(s))]))
                drafts += 1
                first += d.tokens[0] == full[j]
                for x, y in zip(d.tokens[:length], full[j:]):
                    if x != y:
                        break
                    accepted += 1
                if length:
                    sd.observe(d, length, accepted)
            steps += 1
            tokens += accepted + 1
            spent += 1 + cost * length
            j += accepted + 1
        sd.own.pop(r["id"], None)
    return {"corpus": sd.corpus.n, "with_draft": drafts / steps, "first_right": first / max(drafts, 1),
            "per_step": tokens / steps, "speedup": tokens / spent}


def teacher_forced(texts: list, data: list[dict]) -> tuple[int, int, int, int, Counter, Counter]:
    from vllm_dspark.suffix import SuffixDrafter

    sd = SuffixDrafter()
    sd.load_corpus(texts)
    index, toks = sd.corpus, sd.corpus.tokens
    n = matched = right = covered = 0
    by, by_right = Counter(), Counter()
    for r in data:
        full = r["prompt"] + r["out"]
        for j in range(len(r["prompt"]) + 1, len(full)):
            starts, m = index.matches(full[max(0, j - 24):j], 24, 4096)
            n += 1
            if not starts:
                continue
            counts = Counter(toks[s] for s in starts if s < index.n)
            best = counts.most_common(1)[0][0]
            matched += 1
            right += best == full[j]
            covered += full[j] in counts
            by[min(m, 7)] += 1
            by_right[min(m, 7)] += best == full[j]
    return n, matched, right, covered, by, by_right


def main() -> int:
    from vllm_dspark.assets import cache_root, smollm2_path
    from vllm_dspark.corpus import corpus_tokens

    spec = os.environ.get("CORPUS", str(REPO / "data" / "smollm2"))
    cost = float(os.environ.get("COST", "0.086"))
    target = smollm2_path()
    data = answers(target, cache_root() / "suffix-corpus" / "mtbench-turn1-answers.json")
    texts = corpus_tokens(spec, str(target))
    print(f"corpus {spec}: {len(texts)} texts; MT-Bench turn 1: {len(data)} answers; verify cost 1 + {cost} per draft")
    print("| corpus tokens | decode steps with a draft | first draft right | tokens per step | modelled speedup |")
    print("|---|---|---|---|---|")
    for frac in (0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1):
        r = replay(texts[: int(len(texts) * frac)], data, cost)
        print(f"| {r['corpus']} | {r['with_draft']:.0%} | {r['first_right']:.0%} | {r['per_step']:.3f} | "
              f"{r['speedup']:.3f} |", flush=True)
    n, matched, right, covered, by, by_right = teacher_forced(texts, data)
    print(f"teacher-forced, {n} answer positions: a match at {matched / n:.0%}; its most frequent continuation right "
          f"at {right / n:.1%} ({right / max(matched, 1):.0%} of matched); the right token among the continuations "
          f"at {covered / n:.1%}")
    print("first continuation right by match length (7 = 7 or more): "
          + ", ".join(f"{m}: {by_right[m] / by[m]:.0%} of {by[m]}" for m in sorted(by)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
