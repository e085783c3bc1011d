"""Rotary position embedding of the draft layers, for every RoPE type the drafter's config may name.

The drafter must rotate its queries and keys exactly as its trainer did, and its trainer rotated them as the
target does (DeepSpec's drafter config is a copy of the target's). ``rope`` is the drafter config's
normalised RoPE dict (:attr:`DSparkConfig.rope`: ``rope_type``, ``rope_theta`` and the type's keys, read as
transformers reads them); inverse frequencies and the cos/sin scale follow vLLM's ``get_rope`` classes
(``RotaryEmbedding``, ``LinearScalingRotaryEmbedding``, ``DynamicNTKScalingRotaryEmbedding``,
``YaRNScalingRotaryEmbedding``, ``Llama3RotaryEmbedding``), neox style (rotate half), whole head dim.
Angles are computed in float64 (exact at long positions) and cast to the model dtype once.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _yarn_inv_freq(rope: Mapping[str, Any], dim: int) -> tuple[torch.Tensor, float]:
    base, factor = float(rope["rope_theta"]), float(rope["factor"])
    original = float(rope["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # vLLM's guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high frequencies), 0: interpolate
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.get("attention_factor") is not None:
        scale = float(rope["attention_factor"])
    elif rope.get("mscale") and rope.get("mscale_all_dim"):
        scale = mscale(factor, float(rope["mscale"])) / mscale(factor, float(rope["mscale_all_dim"]))
    else:
        scale = mscale(factor)
    return inv_freq, scale


def _llama3_inv_freq(rope: Mapping[str, Any], dim: int) -> torch.Tensor:
    inv_freq = _default_inv_freq(float(rope["rope_theta"]), dim)
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low) if low != high else torch.zeros_like(inv_freq)
    return torch.where(wavelen < original / high, inv_freq,
                       torch.where(wavelen > original / low, inv_freq / factor,
                                   (1 - smooth) * inv_freq / factor + smooth * inv_freq))


def rope_frequencies(rope: Mapping[str, Any], head_dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [head_dim // 2] float64, scale applied to cos and sin). ``max_position``: the drafter's
    ``max_position_embeddings`` (vLLM's ``max_position``, which its dynamic-NTK base depends on)."""
    kind, base = rope["rope_type"], float(rope["rope_theta"])
    if kind == "default":
        return _default_inv_freq(base, head_dim), 1.0
    if kind == "linear":  # positions / factor == frequencies / factor
        return _default_inv_freq(base, head_dim) / float(rope["factor"]), 1.0
    if kind == "dynamic":
        # vLLM's static form; with max_trained_positions == max_position (the default) the base is unchanged,
        # as in transformers' dynamic NTK for sequences within max_position_embeddings.
        factor = float(rope["factor"])
        trained = float(rope.get("max_trained_positions", max_position))
        base = base * (factor * max_position / trained - (factor - 1)) ** (head_dim / (head_dim - 2))
        return _default_inv_freq(base, head_dim), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(rope, head_dim)
    if kind == "llama3":
        return _llama3_inv_freq(rope, head_dim), 1.0
    raise ValueError(f"rope_type={kind!r}: no implementation (DSparkConfig.validate refuses it first)")


class Rope:
    """cos/sin at given positions for one RoPE configuration (inverse frequencies computed once)."""

    def __init__(self, rope: Mapping[str, Any], head_dim: int, max_position: int):
        self.inv_freq, self.scale = rope_frequencies(rope, head_dim, max_position)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [*positions.shape, head_dim] (neox style: each frequency twice, halves concatenated)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.to(torch.float64)[..., None] * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)
