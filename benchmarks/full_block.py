"""Drafter time of a short pass (g draft slots) against the full trained block cut to g (``full_block``).

Attention inside a draft block is non-causal, so a pass of g < K slots is another computation than the trained
block's; ``full_block`` (the default) runs all K slots and keeps the first g. This measures what that costs:
per g and batch size, the drafter's time for each (draft_block as the proposer runs it: top-32 Markov head,
bfloat16 LM-head copy on CPU), interleaved in one run (the order alternates each repetition) so that load
drift on a shared machine hits both alike. For scale, a target step verifying g drafts of B requests
(HF transformers, float32, KV cache of the prompt) is timed in the same loop: it is what each round costs
besides the drafter, identical for both passes.

Context: the target's real hidden states for the first B MT-Bench turn-1 prompts (chat template).

    .venv/bin/python benchmarks/full_block.py                       # B 1 and 4, 30 repetitions
    .venv/bin/python benchmarks/full_block.py --batch 1 --reps 10   # quick look
    .venv/bin/python benchmarks/full_block.py --threads 1 --no-verify   # drafter only, robust on a loaded machine
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from vllm_dspark.checkpoint import load_drafter
from vllm_dspark.context import ContextStore
from vllm_dspark.drafting import draft_block

TARGET = Path.home() / ".cache/vllm-dspark/smollm2-135m-instruct"
DRAFTER = Path(__file__).resolve().parents[1] / "drafters/smollm2-135m-dspark"


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    from vllm_dspark.eval.prompts import load_prompts

    out = []
    for p in load_prompts("mtbench", n):
        text = tokenizer.apply_chat_template([{"role": "user", "content": p.turns[0]}], tokenize=False,
                                             add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False).input_ids)
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=str(TARGET))
    ap.add_argument("--drafter", default=str(DRAFTER))
    ap.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-verify", action="store_true", help="skip the target step (drafter times only)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    drafter = load_drafter(args.drafter, target)
    drafter.set_head_dtype(torch.bfloat16)  # the plugin's head_dtype "auto" on CPU
    K = drafter.cfg.max_draft_tokens
    batches = [int(b) for b in args.batch.split(",")]
    prompts = prompt_ids(tok, max(batches))
    store = ContextStore(drafter)
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            hs = target(torch.tensor([ids]), output_hidden_states=True).hidden_states
            store.append([(f"r{i}", 0, torch.cat([hs[j + 1][0] for j in drafter.cfg.target_layer_ids], -1))])
    print(f"torch threads {torch.get_num_threads()}, K={K}, topk={args.topk}, "
          f"context rows {[len(p) for p in prompts]}")
    print(f"{'B':>3} {'g':>2} {'short ms':>9} {'full ms':>8} {'full/short':>10} {'verify ms':>9}")
    for B in batches:
        ids = [f"r{i}" for i in range(B)]
        ctx = store.gather(ids)
        anchor = torch.tensor([p[-1] for p in prompts[:B]])
        # Verification stand-in: B copies of the shortest prompt (equal lengths, no padding) as the KV cache.
        n = min(len(p) for p in prompts[:B])
        with torch.inference_mode():
            cache = target(torch.tensor([prompts[0][:n]] * B), use_cache=True).past_key_values

        def verify(g: int) -> None:
            with torch.inference_mode():
                target(torch.tensor([prompts[0][n - g - 1:n]] * B), past_key_values=cache, use_cache=True)
            cache.crop(-(g + 1))

        times = {(g, kind): [] for g in range(1, K + 1) for kind in ("short", "full", "verify")}
        for rep in range(args.warmup + args.reps):
            for g in range(1, K + 1):
                calls = {"short": lambda: draft_block(drafter, ctx, anchor, g, topk=args.topk),
                         "full": lambda: draft_block(drafter, ctx, anchor, g, topk=args.topk, block_drafts=K),
                         "verify": lambda: verify(g)}
                order = ["short", "full"] if rep % 2 else ["full", "short"]
                order += [] if args.no_verify else ["verify"]
                for kind in order:
                    t = timed(calls[kind])
                    if rep >= args.warmup:
                        times[(g, kind)].append(t)
        for g in range(1, K + 1):
            s, f, v = (statistics.median(times[(g, kind)] or [float("nan")]) * 1e3
                       for kind in ("short", "full", "verify"))
            print(f"{B:>3} {g:>2} {s:>9.2f} {f:>8.2f} {f / s:>10.2f} {v:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
