"""DSpark's two small heads: the low-rank Markov transition bias and the acceptance-confidence head.

Weight names follow DeepSpec/vLLM (``markov_head.markov_w1``, ``markov_head.markov_w2``,
``confidence_head.proj``) so checkpoints interoperate.
"""
from __future__ import annotations

import torch
from torch import nn


class MarkovHead(nn.Module):
    """logits_k = U_k + w2(w1[x_{k-1}]): a rank-r bias from the previously drafted token.

    w1: Embedding(V, r) over the target vocabulary; w2: Linear(r, Vd) onto the draft vocabulary.
    """

    def __init__(self, vocab_size: int, draft_vocab_size: int, rank: int):
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, draft_vocab_size, bias=False)

    def embed(self, prev_ids: torch.Tensor) -> torch.Tensor:
        """prev_ids [...] -> e [..., r]."""
        return self.markov_w1(prev_ids)

    def bias(self, e: torch.Tensor) -> torch.Tensor:
        """e [..., r] -> dense bias [..., Vd]."""
        return self.markov_w2(e)


class ConfidenceHead(nn.Module):
    """c_k = sigmoid(proj([h_k ; w1[x_{k-1}]])): estimated P(position k accepted | k-1 accepted)."""

    def __init__(self, hidden_size: int, rank: int, with_markov: bool):
        super().__init__()
        self.with_markov = with_markov and rank > 0
        self.proj = nn.Linear(hidden_size + (rank if self.with_markov else 0), 1, bias=True)

    def logit(self, h: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        """h [..., H], e [..., r] or None -> pre-sigmoid logit [...]."""
        x = torch.cat([h, e], dim=-1) if self.with_markov else h
        return self.proj(x.float() if self.proj.weight.dtype == torch.float32 else x).squeeze(-1).float()

    def split_weights(self, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(w_h [H], w_e [r] or None, b []) so callers can add the Markov part inside the sequential loop."""
        w = self.proj.weight[0]
        return w[:hidden_size], (w[hidden_size:] if self.with_markov else None), self.proj.bias[0]
