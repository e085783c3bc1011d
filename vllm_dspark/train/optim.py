"""The optimizer's side of training: the learning-rate schedule and AdamW's parameter groups."""
from __future__ import annotations

import math

from ..model.drafter import DSparkDrafter


def get_lr(step: int, total: int, lr: float, warmup_frac: float, min_lr_frac: float = 0.0) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine from lr down to lr * min_lr_frac."""
    warmup = max(1, round(warmup_frac * total))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(drafter: DSparkDrafter, top_layers_lr: str | None) -> list[dict]:
    """AdamW groups: "N:X" trains the top N draft layers at X times the learning rate (e.g. layers just added
    by --grow-layers, which start from zero output projections), everything else at 1x."""
    trainable = [(n, p) for n, p in drafter.named_parameters() if p.requires_grad]
    if not top_layers_lr:
        return [dict(params=[p for _, p in trainable], lr_mult=1.0)]
    try:
        n_top, mult = top_layers_lr.split(":")
        n_top, mult = int(n_top), float(mult)
    except ValueError:
        raise ValueError(f"--top-layers-lr={top_layers_lr!r}: expected N:X, e.g. 2:5 (top 2 layers at 5x the lr)")
    n_layers = len(drafter.layers)
    if not 0 < n_top <= n_layers or mult <= 0:
        raise ValueError(f"--top-layers-lr={top_layers_lr!r}: expected 1 <= N <= {n_layers} (the drafter's layers) "
                         f"and X > 0")
    top = tuple(f"layers.{i}." for i in range(n_layers - n_top, n_layers))
    return [dict(params=[p for n, p in trainable if not n.startswith(top)], lr_mult=1.0),
            dict(params=[p for n, p in trainable if n.startswith(top)], lr_mult=mult)]
