"""Qwen3-style draft layers whose attention also sees injected context K/V.

Convention: context rows come from the target's hidden states; they never run through the draft layers.
Each layer turns them into K/V with its own k_proj/v_proj (+ k_norm, + RoPE at the target position) once,
when they arrive (:meth:`DraftAttention.context_kv`; cos/sin from :mod:`.rope`); queries then attend to
[context K/V ; block K/V].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DSparkConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # bf16/fp16 normalise in fp32
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., n, heads, d]; cos/sin [..., n, d]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class BlockLayout:
    """Training's packed blocks, instead of a dense mask: the queries of a row are m blocks of g; block i sees the
    context positions where ``ctx_mask[b, i]`` is True and its own g queries (non-causal), nothing else. Scores
    are computed only there: O(m g (C + g)) per row instead of a dense mask's O(m g (C + m g)), which is what
    lets training use every position of a sequence as an anchor."""

    ctx_mask: torch.Tensor  # [B, m, C] bool
    g: int


def packed_attention(q, k, v, ctx_k, ctx_v, layout: BlockLayout) -> torch.Tensor:
    """q [B, m*g, nh, d], k/v [B, m*g, kvh, d] (the blocks'), ctx_k/v [B, C, kvh, d] -> [B, m*g, nh, d]."""
    B, Q, nh, d = q.shape
    kvh, g = k.shape[2], layout.g
    m, rep = Q // g, nh // kvh
    # Query heads grouped by their KV head (GQA): head h reads KV head h // rep.
    qg = q.view(B, m, g, kvh, rep, d).permute(0, 3, 4, 1, 2, 5)  # [B, kvh, rep, m, g, d]
    kb = k.view(B, m, g, kvh, d).permute(0, 3, 1, 2, 4)  # [B, kvh, m, g, d]
    vb = v.view(B, m, g, kvh, d).permute(0, 3, 1, 2, 4)
    kc, vc = ctx_k.permute(0, 2, 1, 3), ctx_v.permute(0, 2, 1, 3)  # [B, kvh, C, d]
    scale = d ** -0.5
    s_ctx = (qg.reshape(B, kvh, rep * m * g, d) @ kc.transpose(-1, -2)).view(B, kvh, rep, m, g, -1) * scale
    s_ctx = s_ctx.masked_fill(~layout.ctx_mask[:, None, None, :, None, :], float("-inf"))
    s_blk = torch.einsum("bkrmgd,bkmhd->bkrmgh", qg, kb) * scale  # [B, kvh, rep, m, g, g]
    p = torch.softmax(torch.cat([s_ctx, s_blk], dim=-1), dim=-1)
    C = s_ctx.shape[-1]
    out = (p[..., :C].reshape(B, kvh, rep * m * g, C) @ vc).view(B, kvh, rep, m, g, d)
    out = out + torch.einsum("bkrmgh,bkmhd->bkrmgd", p[..., C:], vb)
    return out.permute(0, 3, 4, 1, 2, 5).reshape(B, Q, nh, d)


class DraftAttention(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def _kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [..., n, H] -> k, v [..., n, kvh, d] (k normed and rotated)."""
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return apply_rope(self.k_norm(k), cos, sin), v

    def context_kv(self, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """ctx [N, H] (projected, normed context rows); cos/sin [N, d] at their positions -> k, v [N, kvh, d]."""
        return self._kv(ctx, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx_k: torch.Tensor,
                ctx_v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        x      [B, Q, H]      query-block hidden states
        cos/sin [B, Q, d]     RoPE at the queries' true positions
        ctx_k/v [B, C, kvh, d] injected context (already normed/rotated), padded per batch row
        mask   [B, Q, C + Q]  bool, True = may attend (context validity + block structure); or a BlockLayout
        """
        q = apply_rope(self.q_norm(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))), cos, sin)
        k, v = self._kv(x, cos, sin)
        if isinstance(mask, BlockLayout):
            return self.o_proj(packed_attention(q, k, v, ctx_k, ctx_v, mask).flatten(-2))
        k = torch.cat([ctx_k, k], dim=1).transpose(1, 2)  # [B, kvh, C+Q, d]
        v = torch.cat([ctx_v, v], dim=1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask.unsqueeze(1),
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class DraftMLP(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.self_attn = DraftAttention(cfg)
        self.mlp = DraftMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx_k, ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))
