"""Greedy acceptance of drafting variants, replayed offline on the target's own greedy answers (paired).

For each MT-Bench turn-1 prompt the target (HF transformers, float32) writes its greedy answer once; one
forward over prompt + answer gives the drafter's context rows. At every answer position the drafter then
drafts, per variant, from exactly the context vLLM would hand it, and a draft position counts as accepted
while it equals the target's next token (greedy verification). Rounds are replayed as a fixed-K engine runs
them (a round at anchor n accepting a drafts moves the anchor to n + a + 1), so tau and the conditional
acceptance per position are what ``vllm-dspark eval --mode fixed -k g`` measures, on the same answers for
every variant. Variants:

  short g     a pass of g draft slots (the proposer before ``full_block``)
  full g      the full trained block, first g drafts kept (``full_block``, the default)
  f32 g       as full, LM head in float32 instead of the bfloat16 copy (``head_dtype`` float32 vs auto)

"differs": the share of anchors whose g drafts differ from the full bfloat16 block's first g (paired, so far
more sensitive than tau on a small sample). The table is printed (and ``--out`` rewritten) after each prompt.

    .venv/bin/python benchmarks/offline_acceptance.py --num-prompts 80 --max-tokens 128
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vllm_dspark.checkpoint import load_drafter
from vllm_dspark.context import ContextBatch, ContextStore
from vllm_dspark.drafting import draft_block

TARGET = Path.home() / ".cache/vllm-dspark/smollm2-135m-instruct"
DRAFTER = Path(__file__).resolve().parents[1] / "drafters/smollm2-135m-dspark"


def accepted(drafts: np.ndarray, seq: list[int], start: int) -> np.ndarray:
    """drafts [N, g] drafted at anchors start..start+N-1 -> accepted prefix length per anchor (greedy)."""
    out = np.zeros(len(drafts), dtype=np.int64)
    for i, row in enumerate(drafts):
        n = start + i
        for j, t in enumerate(row):
            if n + 1 + j >= len(seq) or seq[n + 1 + j] != t:
                break
            out[i] += 1
    return out


def replay(acc: np.ndarray, g: int) -> list[int]:
    """Accepted drafts per round of a fixed-g engine over one answer (acc: per anchor, capped at g);
    rounds whose g drafts would run past the answer's end are not verified and not counted."""
    rounds, n = [], 0
    while n + g < len(acc) + 1:
        a = int(min(acc[n], g)) if n < len(acc) else 0
        rounds.append(a)
        n += a + 1
    return rounds


def summarize(rounds: list[int], g: int) -> dict:
    a = np.asarray(rounds)
    survival = [float((a > k).mean()) for k in range(g)]
    cond = [survival[0]] + [survival[k] / survival[k - 1] if survival[k - 1] else float("nan") for k in range(1, g)]
    return {"rounds": len(a), "tau": float(1 + a.mean()), "conditional": cond, "accepted": int(a.sum())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=str(TARGET))
    ap.add_argument("--drafter", default=str(DRAFTER))
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--out", default=None, help="JSON file for the per-variant results")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_dspark.eval.prompts import load_prompts

    tok = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    drafter = load_drafter(args.drafter, target)
    K = drafter.cfg.max_draft_tokens
    rounds: dict[str, list[int]] = {}
    differ: dict[str, int] = {}
    blocks = 0
    for p_i, p in enumerate(load_prompts("mtbench", args.num_prompts)):
        text = tok.apply_chat_template([{"role": "user", "content": p.turns[0]}], tokenize=False,
                                       add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False).input_ids
        with torch.inference_mode():
            out = target.generate(torch.tensor([prompt]), max_new_tokens=args.max_tokens, do_sample=False,
                                  pad_token_id=tok.eos_token_id)
            seq = out[0].tolist()
            hs = target(torch.tensor([seq]), output_hidden_states=True).hidden_states
        store = ContextStore(drafter)
        store.append([("r", 0, torch.cat([hs[i + 1][0] for i in drafter.cfg.target_layer_ids], -1))])
        full = store.gather(["r"])
        # anchors: every answer token but the last (position n drafts from rows 0..n-1)
        anchors = list(range(len(prompt), len(seq) - 1))
        n = len(anchors)
        ctx = ContextBatch(full.k.expand(n, *full.k.shape[1:]), full.v.expand(n, *full.v.shape[1:]),
                           torch.tensor(anchors))
        ids = torch.tensor([seq[a] for a in anchors])
        start = anchors[0]

        def drafts(g: int, block: int | None, head: torch.dtype) -> np.ndarray:
            drafter.set_head_dtype(head)
            return draft_block(drafter, ctx, ids, g, topk=args.topk, block_drafts=block).tokens.numpy()

        full_k = drafts(K, None, torch.bfloat16)
        f32_k = drafts(K, None, torch.float32)
        acc_full, acc_f32 = accepted(full_k, seq, start), accepted(f32_k, seq, start)
        for g in range(1, K + 1):
            rounds.setdefault(f"full {g}", []).extend(replay(acc_full, g))
            rounds.setdefault(f"f32 {g}", []).extend(replay(acc_f32, g))
            short_g = full_k if g == K else drafts(g, None, torch.bfloat16)
            rounds.setdefault(f"short {g}", []).extend(replay(accepted(short_g, seq, start), g))
            # paired: blocks (anchors) whose first g drafts differ from the full bfloat16 block's
            differ[f"short {g}"] = differ.get(f"short {g}", 0) + int((short_g != full_k[:, :g]).any(1).sum())
            differ[f"f32 {g}"] = differ.get(f"f32 {g}", 0) + int((f32_k[:, :g] != full_k[:, :g]).any(1).sum())
        blocks += n
        print(f"prompt {p_i + 1}: {len(prompt)} + {len(seq) - len(prompt)} tokens", flush=True)
        report(rounds, differ, blocks, K, args.out)
    return 0


def report(rounds: dict[str, list[int]], differ: dict[str, int], blocks: int, K: int, out: str | None) -> None:
    results = {name: dict(summarize(r, int(name.split()[1])), differs_from_full=differ.get(name, 0) / blocks)
               for name, r in rounds.items()}
    print(f"{'variant':<9} {'rounds':>6} {'tau':>6} {'differs':>7}  conditional acceptance by position")
    for g in range(1, K + 1):
        for kind in ("short", "full", "f32"):
            r = results[f"{kind} {g}"]
            cond = " ".join(f"{c:.3f}" for c in r["conditional"])
            print(f"{kind + ' ' + str(g):<9} {r['rounds']:>6} {r['tau']:>6.3f} {r['differs_from_full']:>7.3f}  {cond}")
    if out:
        Path(out).write_text(json.dumps(dict(results, blocks=blocks), indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
