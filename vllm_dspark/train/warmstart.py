"""Optional starting points for training a drafter on a small budget.

- ``copy_target_layers``: the draft layers start as the target's top layers (same shapes when the drafter is
  sized for the target), the final norm as the target's, and ``fc`` passes the last target feature layer
  through, so the first context the drafter sees is the residual stream a top layer of the target reads.
- ``feature_scale``: one constant per target layer, 1 / RMS of that layer's features over some training
  sequences. The target's late layers are an order of magnitude larger than its early ones; Adam moves every
  ``fc`` weight by about the learning rate whatever its input's size, so unscaled, the large layers dominate
  the projection's early training. The scale is applied to the features during training and folded into
  ``fc.weight`` in every saved drafter (``folded``), so checkpoints stay in the DeepSpec layout.
- ``grow_layers``: a trained drafter made deeper without changing what it computes: new layers (the target's
  top layers, their output projections zero, so each adds nothing to the residual stream yet) on top of its own,
  for when a warm start stops improving because the drafter, not the data, is too small.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch

from ..model.drafter import DSparkDrafter


def _target_layers(target_model) -> torch.nn.ModuleList:
    return target_model.get_decoder().layers


@torch.no_grad()
def copy_target_layers(drafter: DSparkDrafter, target_model) -> list[int]:
    """Initialise draft layer i from target layer L - Ld + i; -> the target layer ids copied."""
    layers = _target_layers(target_model)
    ids = list(range(len(layers) - len(drafter.layers), len(layers)))
    for mine, tid in zip(drafter.layers, ids):
        theirs = dict(layers[tid].named_parameters())
        for name, p in mine.named_parameters():
            if name in theirs:
                if theirs[name].shape != p.shape:
                    raise ValueError(f"copy_target_layers: {name} of target layer {tid} is {tuple(theirs[name].shape)}"
                                     f", the drafter's is {tuple(p.shape)}: expected a drafter sized for the target")
                p.copy_(theirs[name].float())
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(1.0)  # Llama has no q/k norm: start as a plain RMS normalisation
    drafter.norm.weight.copy_(target_model.get_decoder().norm.weight.float())
    # Context = the last feature layer as the first copied layer would read it (its input norm).
    n_feat, ht = len(drafter.cfg.target_layer_ids), drafter.cfg.ctx_hidden_size
    if ht != drafter.cfg.hidden_size:
        raise ValueError(f"copy_target_layers: target hidden {ht} != drafter hidden {drafter.cfg.hidden_size}")
    drafter.fc.weight.zero_()
    drafter.fc.weight[:, (n_feat - 1) * ht:] = torch.eye(ht)
    drafter.hidden_norm.weight.copy_(layers[ids[0]].input_layernorm.weight.float())
    return ids


@torch.no_grad()
def feature_scale(target, batches: list[tuple[torch.Tensor, torch.Tensor]], num_layers: int) -> torch.Tensor:
    """[L*Ht] 1 / RMS of each target layer's features over the real tokens of ``batches`` (ids, attention)."""
    sq, n = None, 0
    for ids, attn in batches:
        f = target(ids, attn).features[attn.bool()]  # [N, L*Ht]
        per_layer = f.unflatten(-1, (num_layers, -1)).double().pow(2).mean(-1).sum(0)  # [L]
        sq = per_layer if sq is None else sq + per_layer
        n += f.shape[0]
    rms = (sq / max(1, n)).sqrt().clamp(min=1e-6)
    ht = f.shape[-1] // num_layers
    return (1.0 / rms).float().repeat_interleave(ht)


@contextmanager
def folded(drafter: DSparkDrafter, scale: torch.Tensor | None):
    """Inside: ``fc.weight`` includes the feature scale (what a saved drafter must hold); restored exactly after."""
    if scale is None:
        yield drafter
        return
    original = drafter.fc.weight.detach().clone()
    drafter.fc.weight.data.mul_(scale.to(original)[None, :])
    try:
        yield drafter
    finally:
        drafter.fc.weight.data.copy_(original)


@torch.no_grad()
def grow_layers(drafter: DSparkDrafter, num_layers: int, target_model) -> DSparkDrafter:
    """A copy of ``drafter`` with ``num_layers`` layers: its own first, then layers initialised from the target's
    top layers with ``o_proj`` and ``down_proj`` zero (the residual passes through them unchanged), so the grown
    drafter drafts exactly what ``drafter`` did until training moves them."""
    have = len(drafter.layers)
    if num_layers <= have:
        raise ValueError(f"grow_layers: num_layers={num_layers}: expected more than the drafter's {have}")
    grown = DSparkDrafter(dataclasses.replace(drafter.cfg, num_hidden_layers=num_layers))
    missing, unexpected = grown.load_state_dict(drafter.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("layers.") for k in missing), (missing, unexpected)
    layers = _target_layers(target_model)
    for i in range(have, num_layers):
        theirs = dict(layers[len(layers) - num_layers + i].named_parameters())
        for name, p in grown.layers[i].named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
            elif name in theirs and theirs[name].shape == p.shape:
                p.copy_(theirs[name].float())
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(1.0)
    return grown.to(next(drafter.parameters()).dtype)
