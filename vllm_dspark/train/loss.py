"""The DSpark training loss (DeepSpec recipe), all blocks of a batch in one drafter pass.

Convention: p is the target's distribution, q the drafter's. Block layout (``sample_from_anchor``): for an anchor
at position a the queries are [x_a, MASK x (g-1)] at positions a..a+g-1, query k predicts x_{a+1+k}, and the
context is the target features of positions < a (the anchor has no target hidden state yet when drafting).
The Markov head is teacher-forced: the previous token of query k is x_{a+k} (anchor, then ground truth).

Per supervised position k (0-based), with w_k = exp(-k/4):
    dspark: L_k = 0.1 * CE(q_k, x_{a+1+k}) + 0.9 * ||q_k - p_k||_1 + BCE(conf_k, c*_k)
    ce:     L_k = CE(q_k, x_{a+1+k}) + BCE(conf_k, c*_k)       (the DFlash baseline; BCE only with a conf head)
    kl:     L_k = KL(p_k || q_k) + BCE(conf_k, c*_k)          (distillation of the whole distribution; over a
            draft vocabulary, sum_v p_k(v) log(p_k(v) / q_k(v)) over its ids)
where p_k = softmax(target logits at a+k) and c*_k = clamp(1 - ||q_k - p_k||_1 / 2, 0, 1) = 1 - TV, detached (the
probability that a T=1 speculative sampler accepts position k). Supervision of a block stops at its first
position whose label lies outside the loss mask or past the sequence end. The loss is
sum_k w_k L_k / normaliser, the normaliser being the sum of w_k over supervised positions (of this call, or of
a whole global batch when the caller passes it: gradient accumulation and DDP stay exact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.drafter import DSparkDrafter
from ..model.layers import BlockLayout

LOSS_TYPES = ("dspark", "ce", "kl")
CE_LABELS = ("data", "target")
CE_WEIGHT, L1_WEIGHT, BCE_WEIGHT = 0.1, 0.9, 1.0  # DeepSpec's mix
DECAY = 4.0  # w_k = exp(-k / DECAY)


@dataclass
class LossStats:
    """Per-position sums over supervised positions (add them across micro-batches/ranks, then divide)."""

    accept_sum: torch.Tensor  # [g] float64, sum of c* = 1 - TV(p, q): expected T=1 acceptance, teacher-forced
    greedy_sum: torch.Tensor  # [g] float64, sum of [argmax q == argmax p]
    count: torch.Tensor  # [g] float64, supervised positions

    def as_tensor(self) -> torch.Tensor:
        return torch.stack([self.accept_sum, self.greedy_sum, self.count])  # [3, g]

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "LossStats":
        return cls(t[0], t[1], t[2])

    def __add__(self, other: "LossStats") -> "LossStats":
        return LossStats.from_tensor(self.as_tensor() + other.as_tensor())

    @property
    def tokens(self) -> int:
        return int(self.count.sum())

    def acceptance(self) -> list[float]:
        """Mean c* per position (conditional on the teacher-forced prefix)."""
        return (self.accept_sum / self.count.clamp(min=1)).tolist()

    def greedy(self) -> list[float]:
        return (self.greedy_sum / self.count.clamp(min=1)).tolist()


@dataclass
class LossOutput:
    loss: torch.Tensor  # [] weighted_sum / normaliser, differentiable
    weighted_sum: torch.Tensor  # [] sum_k w_k L_k, differentiable
    weight_sum: torch.Tensor  # [] sum of w_k over supervised positions (this call)
    stats: LossStats


def position_weights(g: int, device=None) -> torch.Tensor:
    """[g] w_k = exp(-k/4)."""
    return torch.exp(-torch.arange(g, dtype=torch.float32, device=device) / DECAY)


def sample_anchors(loss_mask: torch.Tensor, num: int, generators: list[torch.Generator]) -> torch.Tensor:
    """Up to ``num`` distinct anchors per row, uniformly among positions a whose next token is supervised.

    loss_mask [B, T] bool; one generator per row (seed it per sequence so a sequence gets the same anchors
    whichever rank or micro-batch it lands in) -> anchors [B, m] int64, sorted, -1 = no anchor; m = the most
    anchors any row got (at least 1).
    """
    device, loss_mask = loss_mask.device, loss_mask.cpu()  # CPU generators
    B, T = loss_mask.shape
    valid = torch.zeros_like(loss_mask)
    valid[:, :-1] = loss_mask[:, 1:]  # a is an anchor iff x_{a+1} is an assistant token
    rows = []
    for b in range(B):
        cand = valid[b].nonzero().flatten()
        if cand.numel() > num:
            pick = torch.randperm(cand.numel(), generator=generators[b])[:num]
            cand = cand[pick].sort().values
        rows.append(cand)
    m = max(1, max(r.numel() for r in rows))
    out = torch.full((B, m), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : r.numel()] = r
    return out.to(device)


def supervision(anchors: torch.Tensor, loss_mask: torch.Tensor, g: int) -> torch.Tensor:
    """anchors [B, m] (-1 = none), loss_mask [B, T] -> sup [B, m, g] bool: position k of block i is trained.

    Depends on data only (not on the model), so a caller can sum the weights of a global batch up front.
    """
    T = loss_mask.shape[1]
    label_pos = anchors[:, :, None] + 1 + torch.arange(g, device=anchors.device)  # [B, m, g]
    inside = (label_pos < T) & (anchors[:, :, None] >= 0)
    labelled = loss_mask.gather(1, label_pos.clamp(max=T - 1).flatten(1)).view_as(label_pos) & inside
    return labelled.long().cumprod(-1).bool()  # stop at the first unsupervised position


def supervised_weight(anchors: torch.Tensor, loss_mask: torch.Tensor, g: int) -> torch.Tensor:
    """[] float32 sum of w_k over the supervised positions (the loss normaliser)."""
    sup = supervision(anchors, loss_mask, g)
    return (sup.float() * position_weights(g, anchors.device)).sum()


def block_layout(anchors: torch.Tensor, T: int, g: int) -> BlockLayout:
    """anchors [B, m] -> block i sees context j < a_i and all of its own g queries (non-causal)."""
    ctx = torch.arange(T, device=anchors.device)[None, None, :] < anchors.clamp(min=0)[:, :, None]  # [B, m, T]
    return BlockLayout(ctx, g)


def packed_block_hidden(drafter: DSparkDrafter, features: torch.Tensor, input_ids: torch.Tensor,
                        anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All anchors' blocks of a row in one drafter pass (block i at row slots i*g .. i*g+g-1).

    features [B, T, L*Ht], input_ids [B, T], anchors [B, m] (-1 = none) -> h [B, m*g, H], query_pos [B, m*g].
    """
    B, T = input_ids.shape
    m, g = anchors.shape[1], drafter.cfg.block_size
    dev = input_ids.device
    a = anchors.clamp(min=0)
    query_pos = (a[:, :, None] + torch.arange(g, device=dev)).view(B, m * g)
    query_ids = drafter.query_ids(input_ids.gather(1, a).flatten(), g).view(B, m * g)
    # Context K/V of every position once per row; the layout hides positions >= each block's anchor.
    ctx_k, ctx_v = drafter.context_kv(features.flatten(0, 1), torch.arange(T, device=dev).repeat(B))
    ctx_k, ctx_v = ctx_k.unflatten(0, (B, T)), ctx_v.unflatten(0, (B, T))  # [B, T, Ld, kvh, d]
    return drafter.block_hidden(query_ids, query_pos, ctx_k, ctx_v, block_layout(anchors, T, g)), query_pos


def dspark_loss(
    drafter: DSparkDrafter,
    features: torch.Tensor,  # [B, T, L*Ht] target features (row t = position t)
    target_logits: torch.Tensor,  # [B, T, V] target logits (row t predicts token t+1)
    input_ids: torch.Tensor,  # [B, T] int64, right-padded
    loss_mask: torch.Tensor,  # [B, T] bool, True on assistant tokens (False on padding)
    anchors: torch.Tensor,  # [B, m] int64, -1 = no anchor (see sample_anchors)
    *,
    loss_type: str = "dspark",
    normaliser: torch.Tensor | float | None = None,
    ce_labels: str = "data",
) -> LossOutput:
    """The loss of every anchor's block in one drafter pass (see the module docstring for the terms).

    ``normaliser`` defaults to this call's supervised weight sum; pass the global batch's to accumulate.
    ``ce_labels``: "data" = the next token of the sequence (DeepSpec); "target" = the target's greedy token
    there, so text the target did not write (human answers) still teaches what the target would say next.
    """
    cfg = drafter.cfg
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {list(LOSS_TYPES)}")
    if ce_labels not in CE_LABELS:
        raise ValueError(f"ce_labels={ce_labels!r}: expected one of {list(CE_LABELS)}")
    if not cfg.sample_from_anchor:
        raise ValueError("sample_from_anchor=False: the trainer implements DeepSpec's anchor-predicts layout only")
    B, m, g = anchors.shape[0], anchors.shape[1], cfg.block_size
    dev = input_ids.device
    h, query_pos = packed_block_hidden(drafter, features, input_ids, anchors)  # [B, m*g, H], [B, m*g]

    # Only supervised rows go through the LM head (the dominant cost): N rows.
    sup = supervision(anchors, loss_mask, g).view(B, m * g)
    b_idx, r_idx = sup.nonzero(as_tuple=True)
    k_idx = r_idx % g
    pos = query_pos[b_idx, r_idx]  # position a+k of each supervised row
    h_sup = h[b_idx, r_idx]  # [N, H]
    labels = input_ids[b_idx, pos + 1]  # [N] x_{a+1+k}
    prev = input_ids[b_idx, pos]  # [N] x_{a+k}: teacher-forced previous token (anchor at k=0)

    logits = drafter.base_logits(h_sup)  # [N, Vd] float32
    e = None
    if drafter.markov_head is not None:
        e = drafter.markov_head.embed(prev)  # [N, r]
        logits = logits + drafter.markov_head.bias(e).float()
    logq = F.log_softmax(logits, dim=-1)
    # Blocks of nearby anchors overlap: the target's distribution (an LM head row and a softmax over the whole
    # vocabulary, the step's largest cost) is computed once per distinct (row, position), U <= N.
    T = input_ids.shape[1]
    uniq, inv = torch.unique(b_idx * T + pos, return_inverse=True)
    p_u = F.softmax(target_logits[uniq // T, uniq % T].float(), dim=-1)  # [U, V]
    p_top = p_u.argmax(-1)[inv]  # [N] the target's greedy token
    if ce_labels == "target":
        labels = p_top
    draft_ids = drafter.draft_token_ids  # [Vd] target ids, None = the whole vocabulary
    if draft_ids is None:
        ce = F.nll_loss(logq, labels, reduction="none")
        p_d = p_u[inv]
        l1 = (logq.exp() - p_d).abs().sum(-1)
    else:  # q is zero outside the draft vocabulary: that part of the L1 is the target's mass there
        p_d = p_u[:, draft_ids][inv]  # [N, Vd]
        l1 = (logq.exp() - p_d).abs().sum(-1) + (1 - p_d.sum(-1)).clamp(min=0)
        t2d = torch.full((cfg.vocab_size,), -1, dtype=torch.int64, device=dev)
        t2d[draft_ids] = torch.arange(draft_ids.numel(), device=dev)
        labels_d = t2d[labels]  # labels outside the draft vocabulary carry no CE (they cannot be drafted)
        ce = F.nll_loss(logq, labels_d.clamp(min=0), reduction="none") * (labels_d >= 0)
    accept = (1 - l1.detach() / 2).clamp(0, 1)  # c* = 1 - TV
    if loss_type == "dspark":
        per = CE_WEIGHT * ce + L1_WEIGHT * l1
    elif loss_type == "kl":
        per = (p_d * (p_d.clamp(min=1e-30).log() - logq)).sum(-1)
    else:
        per = ce
    if drafter.confidence_head is not None:
        conf = drafter.confidence_head.logit(h_sup, e)
        per = per + BCE_WEIGHT * F.binary_cross_entropy_with_logits(conf, accept, reduction="none")

    w = position_weights(g, dev)[k_idx]
    weighted_sum = (w * per).sum()
    weight_sum = w.sum().detach()
    norm = weight_sum if normaliser is None else torch.as_tensor(normaliser, dtype=torch.float32)
    loss = weighted_sum / norm.clamp(min=1e-12)

    with torch.no_grad():
        greedy = (drafter.to_target_ids(logq.argmax(-1)) == p_top).double()
        stats = LossStats(
            accept_sum=torch.zeros(g, dtype=torch.float64).index_add_(0, k_idx.cpu(), accept.double().cpu()),
            greedy_sum=torch.zeros(g, dtype=torch.float64).index_add_(0, k_idx.cpu(), greedy.cpu()),
            count=torch.zeros(g, dtype=torch.float64).index_add_(0, k_idx.cpu(), torch.ones_like(greedy).cpu()),
        )
    return LossOutput(loss, weighted_sum, weight_sum, stats)


def expected_tau(acceptance: list[float]) -> float:
    """1 + sum_k prod_{i<=k} alpha_i: tokens per round if position k is accepted w.p. alpha_k given k-1 was."""
    return 1 + sum(math.prod(acceptance[: k + 1]) for k in range(len(acceptance)))
