"""Draft-vocabulary coverage: the share of held-out target-written answer tokens inside a draft vocabulary.

A draft position whose right token lies outside the draft vocabulary can never be accepted, so coverage caps
acceptance at every position. Compares the shipped drafter's vocabulary with the most frequent target ids counted
on the target-written corpus (held-out conversations excluded) at several sizes.

    .venv/bin/python benchmarks/draft_vocab_coverage.py [--corpus runs/data/sharegpt_smollm2_mt.jsonl]
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer

from vllm_dspark.assets import smollm2_path
from vllm_dspark.checkpoint import read_target_config, read_weights, select_draft_vocab
from vllm_dspark.train.examples import end_token_ids, load_examples, read_ids, token_counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="runs/data/sharegpt_smollm2_mt.jsonl")
    ap.add_argument("--heldout", default="runs/data/heldout.jsonl")
    ap.add_argument("--drafter", default="drafters/smollm2-135m-dspark")
    ap.add_argument("--sizes", default="4096,8192,16384,32768")
    args = ap.parse_args()
    target = smollm2_path()
    tok = AutoTokenizer.from_pretrained(target)
    config = read_target_config(target)
    held_ids = read_ids(args.heldout)
    train, _ = load_examples(args.corpus, tok, 4096, exclude=held_ids)
    held, _ = load_examples(args.heldout, tok, 4096)
    counts = token_counts(train, config)
    held_counts = token_counts(held, config)
    total = float(held_counts.sum())
    print(f"counted on {len(train)} target-written conversations ({int(counts.sum())} answer tokens); "
          f"held-out: {len(held)} conversations ({int(total)} answer tokens)")
    d2t = read_weights(args.drafter)["d2t"].long()
    shipped = torch.arange(d2t.numel()) + d2t
    print(f"shipped drafter ({d2t.numel()} ids): {float(held_counts[shipped].sum()) / total:.3f}")
    always = sorted(end_token_ids(tok))
    for size in [int(s) for s in args.sizes.split(",")]:
        ids = select_draft_vocab(counts, size, always)
        print(f"{size:6d} most frequent on the corpus: {float(held_counts[ids].sum()) / total:.3f}")


if __name__ == "__main__":
    main()
