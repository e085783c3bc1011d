"""The DSpark drafter: context projection, one parallel block pass, base logits.

Shapes: B batch rows, Q query tokens per row, C context rows, H drafter hidden, Ld draft layers,
kvh/d KV heads/head dim, V target vocab, Vd draft vocab.

One round for a request whose verified prefix has n tokens and whose newest token (the anchor, emitted by the
target, no hidden state yet) sits at position n:
- context = hidden_norm(fc(concat of target layers' hidden states)) for positions 0..n-1, turned into K/V by
  each draft layer once, when the rows arrive (``context_kv``);
- queries = [anchor, MASK x (Q-1)] at positions n .. n+Q-1, non-causal inside the block;
- with ``sample_from_anchor`` query j predicts position n+1+j (g = Q drafts); otherwise the anchor's output is
  unused and MASK j (j >= 1) predicts position n+j (g = Q-1 drafts).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import DSparkConfig
from .heads import ConfidenceHead, MarkovHead
from .layers import DraftLayer, RMSNorm
from .rope import Rope


def block_attention_mask(ctx_lengths: torch.Tensor, ctx_capacity: int, num_queries: int) -> torch.Tensor:
    """[B, Q, C + Q] bool: each query sees its row's valid context and the whole block (non-causal)."""
    valid_ctx = torch.arange(ctx_capacity, device=ctx_lengths.device)[None, :] < ctx_lengths[:, None]  # [B, C]
    block = torch.ones(ctx_lengths.shape[0], num_queries, dtype=torch.bool, device=ctx_lengths.device)
    return torch.cat([valid_ctx, block], dim=1)[:, None, :].expand(-1, num_queries, -1)


class DSparkDrafter(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.fc = nn.Linear(cfg.ctx_hidden_size * len(cfg.target_layer_ids), h, bias=False)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.rope = Rope(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab, bias=False)
        self.markov_head = MarkovHead(cfg.vocab_size, cfg.draft_vocab, cfg.markov_rank) if cfg.has_markov else None
        self.confidence_head = (ConfidenceHead(h, cfg.markov_rank, cfg.confidence_head_with_markov)
                                if cfg.enable_confidence_head else None)
        # Frozen copies of the target's: never trained, may be omitted from checkpoints.
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)
        # Reduced draft vocabulary (EAGLE-3/vLLM convention): target id = draft id + d2t[draft id]. lm_head
        # rows are then the target's rows at those ids; markov_w1 stays indexed by target ids.
        reduced = cfg.draft_vocab < cfg.vocab_size
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab, dtype=torch.int64) if reduced else None)
        self._head_t: torch.Tensor | None = None  # inference copy of the LM head, see set_head_dtype

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids (any shape) -> target ids (the identity without a reduced vocabulary)."""
        return draft_ids if self.d2t is None else draft_ids + self.d2t[draft_ids]

    @property
    def draft_token_ids(self) -> torch.Tensor | None:
        """[Vd] int64 target id of each draft-vocabulary entry; None without a reduced vocabulary."""
        if self.d2t is None:
            return None
        return torch.arange(self.cfg.draft_vocab, device=self.d2t.device) + self.d2t

    # ------------------------------------------------------------------ context
    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, L*Ht] (target layers concatenated in target_layer_ids order) -> ctx [N, H]."""
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    def context_kv(self, features: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [N, L*Ht], positions [N] -> k, v [N, Ld, kvh, d] (per draft layer, normed and rotated)."""
        ctx = self.project_context(features)
        cos, sin = self.rope.cos_sin(positions, ctx.dtype)
        kv = [layer.self_attn.context_kv(ctx, cos, sin) for layer in self.layers]
        return torch.stack([k for k, _ in kv], dim=1), torch.stack([v for _, v in kv], dim=1)

    # ------------------------------------------------------------------ block
    @property
    def queries_per_draft(self) -> int:
        """Extra query slots beyond the drafts: 0 with sample_from_anchor, else 1 (the unused anchor output)."""
        return 0 if self.cfg.sample_from_anchor else 1

    def query_ids(self, anchor: torch.Tensor, num_drafts: int) -> torch.Tensor:
        """anchor [B] -> [B, Q] = [anchor, MASK, ...]."""
        q = num_drafts + self.queries_per_draft
        ids = anchor.new_full((anchor.shape[0], q), self.cfg.mask_token_id)
        ids[:, 0] = anchor
        return ids

    def block_hidden(self, query_ids: torch.Tensor, query_pos: torch.Tensor, ctx_k: torch.Tensor,
                     ctx_v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        query_ids [B, Q], query_pos [B, Q]
        ctx_k/v   [B, C, Ld, kvh, d]
        mask      [B, Q, C + Q] bool (True = attend)
        -> h      [B, Q, H] after the final norm
        """
        x = self.embed_tokens(query_ids).to(self.fc.weight.dtype)
        cos, sin = self.rope.cos_sin(query_pos, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, ctx_k[:, :, i], ctx_v[:, :, i], mask)
        return self.norm(x)

    def prediction_rows(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, Q, H] -> the rows that predict draft tokens [B, g, H]."""
        return h[:, self.queries_per_draft:]

    def base_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., H] -> U [..., Vd] float32 (the frozen target LM head)."""
        if self._head_t is not None:
            return (h.to(self._head_t.dtype) @ self._head_t).float()
        return self.lm_head(h).float()

    def set_head_dtype(self, dtype: torch.dtype | None, release: bool = False) -> None:
        """Inference only: compute the base logits from a transposed copy of the LM head in ``dtype`` (None:
        the plain ``lm_head``). On CPU the draft block's LM head reads Vd x H weights for a handful of rows:
        memory-bound, and its weights no longer sit in cache after a target step. Measured on an AVX2 CPU with
        cold caches, [7, 576] x [576, 8192]: float32 ``lm_head`` 4.8 ms, float32 transposed 2.7 ms, bfloat16
        transposed 1.0 ms (a third of the drafter's time at concurrency 1). The target's LM head weights are
        bfloat16 in most checkpoints, so bfloat16 loses nothing there; the logits get bfloat16's precision,
        which may reorder near-ties among drafts (verification keeps the output exact either way).

        ``release``: free ``lm_head``'s own weight once the copy exists (inference never reads it again): the
        float32 head of a full-vocabulary drafter on a large target is GBs (152k x 2560: 1.5 GB). A later call
        then derives from the copy, and ``None`` (back to ``lm_head``) is refused."""
        weight = self.lm_head.weight
        released = weight.numel() == 0
        if dtype is None:
            if released:
                raise RuntimeError("set_head_dtype(None): lm_head's weight was released by an earlier "
                                   "set_head_dtype(..., release=True); reload the drafter to use it")
            self._head_t = None
            return
        source = self._head_t if released else weight.detach().t()
        self._head_t = source.to(dtype).contiguous()
        if release and not released:
            weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)

    # ------------------------------------------------------------------ weights
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything except the frozen target copies (what a checkpoint must carry)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("embed_tokens.", "lm_head."))}
