"""CPU cost of one DSpark draft block, and the share of it spent in the Markov head.

A SmolLM2-135M-sized drafter (2 layers, hidden 576, 9 heads x 64 / 3 KV heads, MLP 1536, Markov rank 256,
V = 49152; context from 5 target layers of hidden 576), random weights, float32. B requests with ~300 context
rows each draft a block of 7 (greedy by default; --sampled drafts at T=1 and returns q).

Per case (batch x torch threads x dense / top-k) the timed calls are interleaved, so load drift on a shared
machine hits them alike:
  block        draft_block as the proposer runs it (context gather + block pass + Markov head + confidence)
  block/argmax the same draft_block with the Markov step replaced by a plain argmax of the base logits
  markov_head  the Markov head call alone, on the base logits of this block
  argmax       the plain argmax alone (what the Markov-less ablation pays instead)
Markov share = markov_head / block; marginal = (markov_head - argmax) / block, the cost the head adds over a
Markov-less drafter. Target: <= 5% of drafter time (the paper measures 0.2-1.3% of a round on GPU).

    .venv/bin/python benchmarks/bench_drafter.py                  # B 16 and 1, 1 and 2 threads, dense/top-32/top-64
    .venv/bin/python benchmarks/bench_drafter.py --iters 5 --warmup 1   # quick look
    .venv/bin/python benchmarks/bench_drafter.py --markov-rank 128 --draft-vocab 8192   # the shipped drafter's shape
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

import vllm_dspark.drafting as drafting
from vllm_dspark.checkpoint import init_weights
from vllm_dspark.config import DSparkConfig
from vllm_dspark.context import ContextStore
from vllm_dspark.model.drafter import DSparkDrafter, block_attention_mask
from vllm_dspark_kernels import MarkovHeadOutput, markov_head

GAMMA = 7


def smollm2_sized_config(markov_rank: int = 256, draft_vocab: int = 0) -> DSparkConfig:
    """SmolLM2-135M shapes (30 target layers, hidden 576); 5 target layers spread like DeepSpec's."""
    return DSparkConfig(
        hidden_size=576, num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        intermediate_size=1536, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0, block_size=GAMMA,
        mask_token_id=49151, target_layer_ids=[1, 8, 14, 21, 28], num_target_layers=30, target_hidden_size=576,
        markov_rank=markov_rank, draft_vocab_size=draft_vocab or None,
    )


def build(batch: int, context: int, seed: int = 0, markov_rank: int = 256, draft_vocab: int = 0):
    """(drafter, filled ContextStore, request ids, anchors [B]); context lengths vary around ``context``."""
    torch.manual_seed(seed)
    drafter = DSparkDrafter(smollm2_sized_config(markov_rank, draft_vocab))
    if drafter.d2t is not None:  # a reduced draft vocabulary: a sorted random subset of the target ids
        ids = torch.randperm(drafter.cfg.vocab_size)[:draft_vocab].sort().values
        drafter.d2t.copy_(ids - torch.arange(draft_vocab))
    init_weights(drafter)
    with torch.no_grad():
        for p in (drafter.embed_tokens.weight, drafter.lm_head.weight, drafter.markov_head.markov_w2.weight):
            p.normal_(std=0.02)  # init_weights zeroes w2 and leaves the frozen copies at nn defaults
    drafter.eval()
    store = ContextStore(drafter)
    ids = [f"r{i}" for i in range(batch)]
    width = drafter.fc.in_features
    lengths = torch.randint(context - 20, context + 21, (batch,)).tolist()
    store.append([(rid, 0, torch.randn(n, width)) for rid, n in zip(ids, lengths)])
    anchors = torch.randint(0, drafter.cfg.vocab_size, (batch,))
    return drafter, store, ids, anchors


def plain_argmax_head(base_logits, w1, w2, anchor, temperature, seed, *, topk=0, conf_w=None, return_q=True,
                      d2t=None):
    """Stand-in for markov_head without the Markov step: tokens = argmax of the base logits (no q)."""
    conf = base_logits.new_zeros(base_logits.shape[:2]) if conf_w is not None else None
    return MarkovHeadOutput(tokens=base_logits.argmax(-1), conf_markov=conf)


@contextlib.contextmanager
def markov_step_replaced():
    original = drafting.markov_head
    drafting.markov_head = plain_argmax_head
    try:
        yield
    finally:
        drafting.markov_head = original


@dataclass
class Row:
    batch: int
    threads: int
    mode: str
    block: float  # median ms
    block_min: float
    block_argmax: float
    head: float
    argmax: float

    @property
    def share(self) -> float:
        return self.head / self.block

    @property
    def marginal(self) -> float:
        return (self.head - self.argmax) / self.block


def measure(drafter, store, ids, anchors, *, topk: int, sampled: bool, warmup: int, iters: int):
    """Interleaved timings (ms) of the four calls; returns {name: [ms, ...]}."""
    B = len(ids)
    temperature = torch.full((B,), 1.0 if sampled else 0.0)
    seed = torch.arange(B, dtype=torch.int64)
    kw = dict(temperature=temperature, seed=seed, topk=topk, return_q=sampled)

    def block():
        return drafting.draft_block(drafter, store.gather(ids), anchors, GAMMA, **kw)

    def block_argmax():
        with markov_step_replaced():
            return drafting.draft_block(drafter, store.gather(ids), anchors, GAMMA, **kw)

    # The head's inputs exactly as draft_block builds them.
    cfg = drafter.cfg
    with torch.inference_mode():
        ctx = store.gather(ids)
        query_ids = drafter.query_ids(anchors, GAMMA)
        pos = ctx.lengths[:, None] + torch.arange(query_ids.shape[1])[None, :]
        mask = block_attention_mask(ctx.lengths, ctx.k.shape[1], query_ids.shape[1])
        base = drafter.base_logits(drafter.prediction_rows(drafter.block_hidden(query_ids, pos, ctx.k, ctx.v, mask)))
    w1, w2 = drafter.markov_head.markov_w1.weight.detach(), drafter.markov_head.markov_w2.weight.detach()
    conf_w = drafter.confidence_head.split_weights(cfg.hidden_size)[1].detach().float()

    def head():
        return markov_head(base, w1, w2, anchors, temperature, seed, topk=topk, conf_w=conf_w, return_q=sampled,
                           d2t=drafter.d2t)

    def argmax():
        return base.argmax(-1)

    fns = {"block": block, "block_argmax": block_argmax, "head": head, "argmax": argmax}
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for i in range(warmup + iters):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def run(batches, threads_list, topks, *, context: int, sampled: bool, warmup: int, iters: int,
        markov_rank: int = 256, draft_vocab: int = 0) -> list[Row]:
    rows = []
    for batch in batches:
        drafter, store, ids, anchors = build(batch, context, markov_rank=markov_rank, draft_vocab=draft_vocab)
        for threads in threads_list:
            torch.set_num_threads(threads)
            for topk in topks:
                t = measure(drafter, store, ids, anchors, topk=topk, sampled=sampled, warmup=warmup, iters=iters)
                med = {k: statistics.median(v) for k, v in t.items()}
                rows.append(Row(batch, threads, "dense" if topk == 0 else f"top-{topk}", med["block"],
                                min(t["block"]), med["block_argmax"], med["head"], med["argmax"]))
                print(format_row(rows[-1]), flush=True)
        del drafter, store
    return rows


HEADER = (f"{'B':>3} {'thr':>3} {'mode':<7} {'block ms':>9} {'(min)':>7} {'blk/argmax':>10} {'markov ms':>9} "
          f"{'argmax ms':>9} {'share':>6} {'marginal':>8}")


def format_row(r: Row) -> str:
    return (f"{r.batch:>3} {r.threads:>3} {r.mode:<7} {r.block:9.2f} {r.block_min:7.2f} {r.block_argmax:10.2f} "
            f"{r.head:9.2f} {r.argmax:9.3f} {r.share:6.1%} {r.marginal:8.1%}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[16, 1], help="requests drafting together")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op threads")
    p.add_argument("--topk", type=int, nargs="+", default=[0, 32, 64], help="0 = dense Markov head")
    p.add_argument("--context", type=int, default=300, help="context rows per request (+-20)")
    p.add_argument("--sampled", action="store_true", help="draft at T=1 and return q (default: greedy)")
    p.add_argument("--markov-rank", type=int, default=256, help="Markov head rank (DeepSpec: 256)")
    p.add_argument("--draft-vocab", type=int, default=0, help="reduced draft vocabulary size (d2t); 0 = all 49152")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20, help="timed rounds per case (median reported)")
    args = p.parse_args(argv)

    cfg = smollm2_sized_config(args.markov_rank, args.draft_vocab)
    print(f"draft block of {GAMMA}, SmolLM2-sized drafter ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"r={cfg.markov_rank}, V={cfg.vocab_size}, draft V={cfg.draft_vocab}), ~{args.context} context rows, "
          "float32, "
          f"{'T=1 with q' if args.sampled else 'greedy'}; median of {args.iters} after {args.warmup} warmup")
    print(HEADER)
    rows = run(args.batch, args.threads, args.topk, context=args.context, sampled=args.sampled,
               warmup=args.warmup, iters=args.iters, markov_rank=args.markov_rank, draft_vocab=args.draft_vocab)
    for mode in dict.fromkeys(r.mode for r in rows):
        mine = [r for r in rows if r.mode == mode]
        worst = max(mine, key=lambda r: r.share)
        over = [r for r in mine if r.share > 0.05]
        note = " (the proposer's default)" if mode == "top-32" else (
            " (reads the r x V matrix w2 once per position; the top-k modes exist to avoid it)" if mode == "dense"
            else "")
        print(f"Markov head share, {mode}{note}: {min(r.share for r in mine):.1%} .. {worst.share:.1%}; "
              "target <= 5%: " + ("met" if not over else "missed for " + ", ".join(
                  f"B={r.batch}/{r.threads}thr ({r.share:.1%})" for r in over)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
