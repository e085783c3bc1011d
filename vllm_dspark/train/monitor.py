"""What training is doing to acceptance: teacher-forced greedy accuracy per draft position on a fixed held-out set
of target-written answers (never trained on), logged every N steps and drawn as a learning curve.

The training batches' own statistics cannot stand in for it: they mix data sources (human answers among them)
and see each sequence once, while what decides speed is how often the drafter's greedy token equals the target's
on text the target writes. Accuracy at position k is P(draft_k == target argmax | the true prefix), the Markov
head fed the true previous tokens: on greedy target-written text this is the conditional acceptance of
position k when positions < k were accepted, so ``1 + sum_k prod_{i<=k} acc_i`` estimates tau.

The held-out set's target features and argmax labels are computed once (one target forward per sequence) and
kept in memory; an evaluation then costs one drafter pass over its fixed anchors.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .loss import packed_block_hidden, sample_anchors, supervision


class HeldOut:
    """A fixed evaluation set: ``accuracy(drafter)`` -> [g] teacher-forced greedy accuracy per position."""

    def __init__(self, target, examples: list, g: int, *, anchors_per_seq: int = 32, seed: int = 1234):
        from .trainer import collate

        if not examples:
            raise ValueError("held-out set: no conversation with an assistant turn")
        self.items = []  # (features fp16 [1, T, F], ids [1, T], anchors [1, m], sup [1, m, g], labels [1, T])
        for i, ex in enumerate(examples):
            ids, attn, mask = collate([ex], 0)
            anchors = sample_anchors(mask, anchors_per_seq, [torch.Generator().manual_seed(seed + i)])
            if (anchors < 0).all():
                continue
            out = target(ids, attn)
            labels = out.rows[0, :].argmax(-1)[None]  # [1, T]: the target's greedy token after each position
            self.items.append((out.features.half(), ids, anchors, supervision(anchors, mask, g), labels))
        self.g = g
        self.blocks = sum(int((a >= 0).sum()) for _, _, a, _, _ in self.items)

    @torch.no_grad()
    def accuracy(self, drafter) -> list[float]:
        was_training = drafter.training
        drafter.eval()
        g = self.g
        hits, count = torch.zeros(g, dtype=torch.float64), torch.zeros(g, dtype=torch.float64)
        for feats, ids, anchors, sup, labels in self.items:
            h, query_pos = packed_block_hidden(drafter, feats.float(), ids, anchors)  # [1, m*g, H]
            s = sup.view(1, -1)
            b_idx, r_idx = s.nonzero(as_tuple=True)
            pos = query_pos[b_idx, r_idx]
            logits = drafter.base_logits(h[b_idx, r_idx])
            if drafter.markov_head is not None:  # teacher-forced: the true previous token
                logits = logits + drafter.markov_head.bias(drafter.markov_head.embed(ids[b_idx, pos])).float()
            ok = (drafter.to_target_ids(logits.argmax(-1)) == labels[b_idx, pos]).double()
            k = r_idx % g
            hits.index_add_(0, k, ok)
            count.index_add_(0, k, torch.ones_like(ok))
        if was_training:
            drafter.train()
        return (hits / count.clamp(min=1)).tolist()


def tau_estimate(acc: list[float]) -> float:
    """1 + sum_k prod_{i<=k} acc_i (conditional acceptances -> expected tokens per round)."""
    return 1 + sum(math.prod(acc[: k + 1]) for k in range(len(acc)))


def plot_learning_curve(log_path: str | Path, out_path: str | Path) -> Path | None:
    """learning_curve.png from train_log.jsonl's held-out records: accuracy per position vs blocks seen and vs
    training hours, plus the tau estimate. None when the log has no held-out record yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    recs = [r for r in map(json.loads, Path(log_path).read_text().splitlines()) if r.get("heldout")]
    if not recs:
        return None
    acc = torch.tensor([r["heldout"] for r in recs])  # [n, g]
    blocks = [r["blocks"] / 1e6 for r in recs]
    hours = [r["hours"] for r in recs]
    fig = Figure(figsize=(12, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, x, xlabel in ((axes[0], blocks, "blocks seen (millions)"), (axes[1], hours, "training hours")):
        for k in range(acc.shape[1]):
            ax.plot(x, acc[:, k].tolist(), marker="." if len(x) < 40 else None, label=f"position {k + 1}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("teacher-forced greedy accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left", ncol=2)
    axes[2].plot(blocks, [tau_estimate(a) for a in acc.tolist()], marker="." if len(blocks) < 40 else None)
    axes[2].set_xlabel("blocks seen (millions)")
    axes[2].set_ylabel("tau estimate (1 + sum of products)")
    axes[2].grid(alpha=0.3)
    last = recs[-1]
    fig.suptitle(f"held-out target-written answers ({last.get('heldout_blocks', '?')} blocks): step {last['step']}, "
                 f"position 1 {last['heldout'][0]:.3f}, tau~{tau_estimate(last['heldout']):.2f}")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, format="png")
    return out_path
