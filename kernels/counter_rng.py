"""Counter-based Gumbel noise that Triton kernels and their torch references compute alike.

Noise for a draft token is a pure function of integers: ``gumbel(row_key(seed, position), vocab_id)``.
Nothing is stateful, so a kernel and the torch reference (on any device, in any batch order) see the
same noise for the same (seed, position, vocab id):

- ``row_key`` mixes the request's 64-bit seed and the draft position into a 32-bit key. The batch row is
  deliberately NOT part of the counter: a request draws the same tokens whatever slot it occupies in the
  batch. Callers must therefore pass a seed that is fresh per request and per drafting round (derive it
  from the request seed and the number of tokens generated so far); two rows with the same seed and the
  same logits draw the same tokens.
- ``gumbel`` mixes the key with the vocab id (never a tile index or a top-k slot, so dense and top-k
  sampling agree on the noise of a token), turns the 32-bit hash into w in (0, 1) exactly, and returns
  ``-log(-log1p(-w))``.

All integer steps are exact (uint32 in Triton; int32 with wrap-around multiply and masked shifts in torch),
so the hashes are bit-identical. The float steps are exact up to the last ``log``: w is built from two
exactly representable halves with one rounding, and ``-log1p(-w)`` (a short series below 2^-7, else
``-log(1 - w)``, the same formula on both sides) keeps full relative precision for small w, which decides
the winners of Gumbel-max (a plain ``-log(u)`` with u near 1 would quantise the largest Gumbel values).
The logs may differ by an ulp between libm and the GPU, which can only matter on an exact tie of the
perturbed scores.

The mixer is Chris Wellons' ``lowbias32`` (two multiplies, three xor-shifts). The Triton twins of
``row_keys`` and ``gumbel`` live in ``markov_head_triton.py`` (this module never imports triton).
"""

from __future__ import annotations

import torch

MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B
VOCAB_MUL = 0x9E3779B1  # odd, so vocab_id -> vocab_id * VOCAB_MUL is a bijection of uint32
SEED_XOR = 0x9E3779B9
POS_MUL = 0x85EBCA77
POS_ADD = 0x27D4EB2F
# w = (h >> 8) * 2^-24 + (h & 255) * 2^-32, clamped to [2^-33, 1 - 2^-24] so -log1p(-w) is finite and > 0.
W_MIN = 2.0**-33
W_MAX = 1.0 - 2.0**-24
SERIES_BELOW = 2.0**-7  # under this, -log1p(-w) = w + w^2/2 + w^3/3 + w^4/4 to fp32 precision
ONE_THIRD = 0.3333333432674408  # float32(1/3), exactly

_U32 = 0xFFFFFFFF


def _i32(c: int) -> int:
    """The int32 with the same 32 bits as the uint32 ``c`` (torch has no wrapping uint32 arithmetic)."""
    c &= _U32
    return c - (1 << 32) if c >= (1 << 31) else c


def _to_i32(x: torch.Tensor) -> torch.Tensor:
    """int64 tensor holding values in [0, 2^32) -> int32 tensor with the same low 32 bits."""
    return (x - ((x >> 31) << 32)).to(torch.int32)


def mix32_(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on an int32 tensor (logical shifts emulated by masking arithmetic shifts)."""
    h ^= (h >> 16) & 0xFFFF
    h *= _i32(MIX_C1)
    h ^= (h >> 15) & 0x1FFFF
    h *= _i32(MIX_C2)
    h ^= (h >> 16) & 0xFFFF
    return h


def _seed_hash(seed: torch.Tensor) -> torch.Tensor:
    """[B] int64 seeds -> [B] int32: the position-independent part of the row key."""
    lo = _to_i32(seed & _U32)
    hi = _to_i32((seed >> 32) & _U32)
    return mix32_(mix32_(lo ^ _i32(SEED_XOR)) ^ hi)


def row_keys(seed: torch.Tensor, position: int) -> torch.Tensor:
    """Per-row 32-bit keys for one draft position.

    seed: [B] int64 -> [B] int32 (the uint32 key's bits).
    """
    return mix32_(_seed_hash(seed) ^ _i32(position * POS_MUL + POS_ADD))


def block_row_keys(seed: torch.Tensor, g: int) -> torch.Tensor:
    """``row_keys`` for positions 0..g-1 at once: [B] int64 -> [g, B] int32 (row k = row_keys(seed, k))."""
    pos = torch.tensor([_i32(k * POS_MUL + POS_ADD) for k in range(g)], dtype=torch.int32, device=seed.device)
    return mix32_(_seed_hash(seed)[None, :] ^ pos[:, None])


def gumbel(keys: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for (row key, vocab id) pairs.

    keys: [N] int32 from ``row_keys``; vocab_ids: [K] or [N, K] integer -> [N, K] float32.
    """
    h = keys[:, None] ^ (vocab_ids.to(torch.int32) * _i32(VOCAB_MUL))
    mix32_(h)
    w = ((h >> 8) & 0xFFFFFF).to(torch.float32).mul_(2.0**-24)
    w += (h & 0xFF).to(torch.float32).mul_(2.0**-32)
    w.clamp_(W_MIN, W_MAX)
    # -log1p(-w) by the same formula as the kernel (torch's CPU log1p is also several times slower than log)
    series = w * 0.25
    series += ONE_THIRD
    series *= w
    series += 0.5
    series *= w
    series += 1.0
    series *= w
    e = torch.where(w < SERIES_BELOW, series, (1.0 - w).log_().neg_())
    return e.log_().neg_()
