"""draft_block: one DSpark round for many requests at once (one backbone pass, then the Markov head).

Convention: p is the target's distribution, q the drafter's. ``q`` returned here is exactly the distribution
each draft token was sampled from (after temperature, Markov bias and top-k truncation), so a speculative
sampler that accepts x with probability min(1, p(x)/q(x)) stays lossless. Greedy rows (temperature 0) draft
the argmax chain and their q is one-hot.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from vllm_dspark_kernels import markov_head

from .context import ContextBatch
from .model.drafter import DSparkDrafter, block_attention_mask


@dataclass
class DraftBlock:
    tokens: torch.Tensor  # [B, g] int64 (target vocab ids)
    confidence_logit: torch.Tensor | None  # [B, g] float32 pre-sigmoid; c_k = P(k accepted | k-1 accepted)
    q: torch.Tensor | None = None  # [B, g, V] float32 over the target vocab (dense drafting with return_q)
    q_probs: torch.Tensor | None = None  # [B, g, k] float32 (top-k drafting with return_q)
    q_ids: torch.Tensor | None = None  # [B, g, k] int64 target ids

    @property
    def confidence(self) -> torch.Tensor | None:
        return None if self.confidence_logit is None else torch.sigmoid(self.confidence_logit)

    def dense_q(self, vocab_size: int) -> torch.Tensor:
        """q as [B, g, V] float32 rows (top-k q scattered into zeros), as vLLM's rejection sampler takes it."""
        if self.q is not None:
            return self.q.float().contiguous()
        q = torch.zeros(*self.q_probs.shape[:2], vocab_size, dtype=torch.float32, device=self.q_probs.device)
        return q.scatter_(2, self.q_ids, self.q_probs.float())


def noise_keys(req_ids: list[str], seeds: list[int | None], positions: list[int], step: int) -> list[int]:
    """Draft-noise key per request: a seeded request's from (seed, position), the same in every run and batch;
    the others' from the request id and the engine step (fresh each round)."""
    return [seed_key(s, p) if s is not None else (zlib.crc32(r.encode()) * 1_000_003 + step) & 0x7FFFFFFF
            for r, s, p in zip(req_ids, seeds, positions)]


def seed_key(seed: int, position: int) -> int:
    """The draft-noise key of a seeded request drafting from ``position``: distinct per (seed, position), the
    same in every run, batch and process (``markov_head`` mixes both 32-bit halves)."""
    return (((int(seed) & 0x7FFFFFFF) + 1) << 32) | (position & 0xFFFFFFFF)


@torch.inference_mode()
def draft_block(
    drafter: DSparkDrafter,
    ctx: ContextBatch,
    anchor: torch.Tensor,  # [B] int64, the newest token of each request (sits at position ctx.lengths[b])
    num_drafts: int,
    *,
    temperature: torch.Tensor | None = None,  # [B] float32, 0 = greedy; None = all greedy
    seed: torch.Tensor | None = None,  # [B] int64 per-request seeds for the Gumbel-max draw
    topk: int = 0,  # 0 = dense Markov head; k > 0 = bias only the top-k base candidates
    return_q: bool = False,
    block_drafts: int | None = None,  # draft slots the backbone runs (default num_drafts); first num_drafts kept
    prefix: list[list[int]] | None = None,  # per request, its first drafts, given (target ids, < num_drafts)
) -> DraftBlock:
    """``block_drafts`` > ``num_drafts``: the backbone runs the longer block and its first ``num_drafts``
    rows are kept. Attention inside a block is non-causal, so a shorter block changes every row's output:
    running the trained block and cutting it drafts what the drafter was trained to draft.

    ``prefix`` (a splice): request b's first m_b drafts are given (copied from its text, say); the Markov head
    continues from them, as it continues from its own draws, over the backbone rows m_b.. (the backbone does not
    see drafts, only the anchor). The given positions have q one-hot and a confidence logit of +30."""
    cfg = drafter.cfg
    bsz = anchor.shape[0]
    device = anchor.device
    query_ids = drafter.query_ids(anchor, max(num_drafts, block_drafts or 0))  # [B, Q]
    q_len = query_ids.shape[1]
    lengths = ctx.lengths.to(device)
    query_pos = lengths[:, None] + torch.arange(q_len, device=device)[None, :]  # [B, Q]
    mask = block_attention_mask(lengths, ctx.k.shape[1], q_len)
    h = drafter.prediction_rows(drafter.block_hidden(query_ids, query_pos, ctx.k, ctx.v, mask))
    h = h[:, :num_drafts]  # [B, g, H]; the Markov head and LM head only see the rows kept
    base = drafter.base_logits(h)  # [B, g, Vd]

    if temperature is None:
        temperature = torch.zeros(bsz, dtype=torch.float32, device=device)
    if seed is None:
        seed = torch.zeros(bsz, dtype=torch.int64, device=device)
    conf_w_h = conf_w_e = conf_b = None
    if drafter.confidence_head is not None:
        conf_w_h, conf_w_e, conf_b = drafter.confidence_head.split_weights(cfg.hidden_size)

    shift = _Shift(prefix, anchor, num_drafts) if prefix is not None and any(prefix) else None
    start = anchor
    if shift is not None:  # row j of the sequential head is backbone row m_b + j, its first input the last given
        base, h, start = shift.forward(base), shift.forward(h), shift.start
    if drafter.markov_head is not None:
        w1, w2 = drafter.markov_head.markov_w1.weight, drafter.markov_head.markov_w2.weight
    else:  # the Markov-less ablation: a zero bias of rank 1 keeps one sampling path for both
        w1 = base.new_zeros((cfg.vocab_size, 1))
        w2 = base.new_zeros((cfg.draft_vocab, 1))
        conf_w_e = None
    out = markov_head(base, w1, w2, start, temperature.float(), seed, topk=topk,
                      conf_w=None if conf_w_e is None else conf_w_e.float(), return_q=return_q, d2t=drafter.d2t)
    tokens, q, q_ids = drafter.to_target_ids(out.tokens), out.q, out.q_ids
    if drafter.d2t is not None:  # hand the target only target ids: q over the target vocabulary
        q_ids = None if q_ids is None else drafter.to_target_ids(q_ids)
        if q is not None:
            q = q.new_zeros(*q.shape[:2], cfg.vocab_size).index_copy_(2, drafter.draft_token_ids, q)

    logit = None
    if conf_w_h is not None:
        logit = h.float() @ conf_w_h.float() + conf_b.float()  # [B, g]
        if out.conf_markov is not None:
            logit = logit + out.conf_markov
    if shift is None:
        return DraftBlock(tokens, logit, q, out.q_probs, q_ids)
    if return_q:
        q = shift.back(DraftBlock(tokens, None, q, out.q_probs, q_ids).dense_q(cfg.vocab_size),
                       torch.nn.functional.one_hot(shift.given, cfg.vocab_size).float())
    return DraftBlock(shift.back(tokens, shift.given), None if logit is None else
                      shift.back(logit, torch.full_like(logit, 30.0)), q)


class _Shift:
    """Splice bookkeeping: request b's rows m_b.. of the block move to the front for the sequential head, and
    back behind its m_b given tokens afterwards."""

    def __init__(self, prefix: list[list[int]], anchor: torch.Tensor, g: int):
        dev = anchor.device
        if any(len(p) >= g for p in prefix):
            raise ValueError(f"draft_block: prefix lengths {[len(p) for p in prefix]}: expected < num_drafts={g}")
        self.m = torch.tensor([len(p) for p in prefix], dtype=torch.int64, device=dev)
        j = torch.arange(g, device=dev)[None, :]
        self.fwd = (self.m[:, None] + j).clamp(max=g - 1)  # [B, g]; rows past g - m_b are padding
        self.bwd = (j - self.m[:, None]).clamp(min=0)
        self.keep = j >= self.m[:, None]  # [B, g]: drafted, not given
        self.given = torch.tensor([p + [0] * (g - len(p)) for p in prefix], dtype=torch.int64, device=dev)
        self.start = torch.where(self.m > 0, self.given.gather(1, (self.m - 1).clamp(min=0)[:, None])[:, 0], anchor)

    @staticmethod
    def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.gather(1, idx.view(*idx.shape, *[1] * (x.dim() - 2)).expand(*idx.shape, *x.shape[2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._take(x, self.fwd)

    def back(self, x: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        keep = self.keep.view(*self.keep.shape, *[1] * (x.dim() - 2))
        return torch.where(keep, self._take(x, self.bwd), given.to(x.dtype))
