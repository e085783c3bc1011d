"""Triton kernels of the Markov head (see ``markov_head.py`` for the math, the torch reference and the
public ``markov_head``) and their launcher.

Importing this module imports triton; ``vllm_dspark_kernels`` only does so when a kernel is asked for, so
the package (and the drafter that imports it) stays importable, and cheap, without triton. The kernels are
built in interpreter mode when TRITON_INTERPRET=1 is set before triton is first imported in the process.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .counter_rng import MIX_C1, MIX_C2, ONE_THIRD, POS_ADD, POS_MUL, SEED_XOR, SERIES_BELOW, VOCAB_MUL, W_MAX, W_MIN
from .markov_head import MarkovHeadOutput, empty_output, top_candidates

_MAX_TRITON_RANK = 512  # top-k holds [BLOCK_K, next_pow2(r)] gathered w2 values in registers; DSpark uses r <= 256


# ------------------------------------------------------------------------------------- counter RNG, Triton side
# Twins of counter_rng.row_keys / counter_rng.gumbel (same integer ops, same float formula). jit functions may
# only read globals that are constexpr.
_C1 = tl.constexpr(MIX_C1)
_C2 = tl.constexpr(MIX_C2)
_VOCAB_MUL = tl.constexpr(VOCAB_MUL)
_SEED_XOR = tl.constexpr(SEED_XOR)
_POS_MUL = tl.constexpr(POS_MUL)
_POS_ADD = tl.constexpr(POS_ADD)
_W_MIN = tl.constexpr(W_MIN)
_W_MAX = tl.constexpr(W_MAX)
_SERIES_BELOW = tl.constexpr(SERIES_BELOW)
_ONE_THIRD_TL = tl.constexpr(ONE_THIRD)


@triton.jit
def mix32_tl(x):
    """lowbias32 on uint32 values (shifts of unsigned ints are logical)."""
    x ^= x >> 16
    x *= _C1
    x ^= x >> 15
    x *= _C2
    x ^= x >> 16
    return x


@triton.jit
def row_key_tl(seed, position):
    """seed: int64 (any shape), position: int scalar -> uint32 key, bit-equal to ``row_keys``."""
    lo = seed.to(tl.uint32)
    hi = (seed >> 32).to(tl.uint32)
    h = mix32_tl(lo ^ _SEED_XOR)
    h = mix32_tl(h ^ hi)
    return mix32_tl(h ^ (tl.cast(position, tl.uint32) * _POS_MUL + _POS_ADD))


@triton.jit
def gumbel_tl(key, vocab_id):
    """key: uint32, vocab_id: integer (broadcastable) -> float32 Gumbel noise, as ``gumbel``."""
    h = mix32_tl(key ^ (vocab_id.to(tl.uint32) * _VOCAB_MUL))
    w = (h >> 8).to(tl.float32) * 5.9604644775390625e-08 + (h & 255).to(tl.float32) * 2.3283064365386963e-10
    w = tl.minimum(tl.maximum(w, _W_MIN), _W_MAX)
    # -log1p(-w) without libdevice (the interpreter lacks it): log(1 - w) is accurate once 1 - w is far
    # from 1; below 2^-7 the series keeps the relative precision that log(1 - w) would lose.
    series = w * (1.0 + w * (0.5 + w * (_ONE_THIRD_TL + w * 0.25)))
    e = tl.where(w < _SERIES_BELOW, series, -tl.log(1.0 - w))
    return -tl.log(e)


# ------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dense_logits_tile(
    base_ptr,  # [B, g, V] (last dim contiguous)
    w1_ptr,  # [V, r] (last dim contiguous)
    w2_ptr,  # [V, r] (last dim contiguous)
    x,  # [BLOCK_B] int64 tokens feeding this step: e = w1[x]
    rows,  # [BLOCK_B] int64
    row_ok,  # [BLOCK_B]
    k,  # draft position
    offs_v,  # [BLOCK_V] vocab ids of this tile
    v_ok,  # [BLOCK_V]
    R,
    stride_bb,
    stride_bk,
    stride_w1,
    stride_w2,
    BLOCK_R: tl.constexpr,
    BLOCK_RK: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """logits[b, v] = base[b, k, v] + (w2 @ w1[x_b])[v] for one [BLOCK_B, BLOCK_V] tile; -inf outside V.

    The r dimension is walked in BLOCK_RK slices, which keeps fewer w2 values live (ptxas, sm_90, bf16,
    r = 256: no spills, 164/215 registers at BLOCK_B = 16/64 against 168 + spills/234 for one slice). The
    w1[x] slices are re-read per tile; they are BLOCK_B * r values that stay in L1.
    """
    acc = tl.load(base_ptr + rows[:, None] * stride_bb + k * stride_bk + offs_v[None, :],
                  mask=row_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    for r0 in tl.static_range(0, BLOCK_R, BLOCK_RK):
        offs_r = r0 + tl.arange(0, BLOCK_RK)
        r_ok = offs_r < R
        e = tl.load(w1_ptr + x[:, None] * stride_w1 + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :],
                    other=0.0)  # [BLOCK_B, BLOCK_RK]
        w2t = tl.load(w2_ptr + offs_v[None, :].to(tl.int64) * stride_w2 + offs_r[:, None],
                      mask=r_ok[:, None] & v_ok[None, :], other=0.0)  # [BLOCK_RK, BLOCK_V]
        if DOT_FP32:
            acc = tl.dot(e.to(tl.float32), w2t.to(tl.float32), acc, input_precision="ieee")
        else:  # bf16/fp16 operands give exact products; accumulation is fp32
            acc = tl.dot(e.to(w2t.dtype), w2t, acc)
    return tl.where(v_ok[None, :], acc, float("-inf"))


@triton.jit
def _markov_dense_kernel(
    base_ptr,  # [B, g, V] float32 | bfloat16 | float16, last dim contiguous
    w1_ptr,  # [V, r] last dim contiguous
    w2_ptr,  # [V, r] last dim contiguous
    anchor_ptr,  # [B] int64
    temp_ptr,  # [B] float32
    seed_ptr,  # [B] int64
    conf_w_ptr,  # [r] (read only if HAS_CONF)
    d2t_ptr,  # [V] int64 draft -> target id offsets (read only if HAS_D2T)
    tokens_ptr,  # [B, g] int64 out (draft ids)
    q_ptr,  # [B, g, V] float32 out (written only if RETURN_Q)
    conf_ptr,  # [B, g] float32 out (written only if HAS_CONF)
    part_f_ptr,  # [3, n_split, B, g] float32 per-split partials: best perturbed score, max and sum-exp of logits/T
    part_i_ptr,  # [n_split, B, g] int32 per-split argmax vocab id
    counter_ptr,  # [n_row_blocks, g] int32 zeros (GRID_SYNC only): arrivals per row block and step
    B, V, R, G,
    chunk,  # vocab ids per split, a multiple of BLOCK_V
    k_begin, k_end,  # this launch runs iterations k_begin..k_end (see the launcher)
    stride_bb, stride_bk, stride_w1, stride_w2,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_RK: tl.constexpr,
    RETURN_Q: tl.constexpr, HAS_CONF: tl.constexpr, HAS_D2T: tl.constexpr, GRID_SYNC: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Dense Markov head. Grid = (row blocks of BLOCK_B rows, n_split vocab chunks).

    Program (rb, sp) owns rows [rb*BLOCK_B, +BLOCK_B) and vocab ids [sp*chunk, +chunk), tiled by BLOCK_V.
    The bias of a tile is one tensor-core GEMM, [BLOCK_B, r] x [r, BLOCK_V], so a w2 tile is loaded once
    for BLOCK_B rows, and splitting V over programs spreads the w2 stream (V*r per step, the largest read
    for small batches) over the SMs. A program that owned whole rows would stream all of w2 per row per
    step through one SM.

    Iteration j (k_begin <= j <= k_end, j in 0..G):
      1. j > 0: combine the n_split partials of step j-1 (online max/argmax and log-sum-exp), giving x_{j-1}
         and lse_{j-1} for every program of the row block alike (same order, so same result). With
         RETURN_Q, normalise q of step j-1 on this chunk by recomputing its logits: re-reading base and w2
         costs less HBM traffic than storing fp32 logits and reading them back, since the fp32 q write
         dominates and the w2 chunk is shared by the row blocks through L2.
      2. j < G: one pass over the chunk for step j: logits, logits/T (+ Gumbel noise for sampled rows), a
         tile max/argmax folded into a running best (strict >, tiles in vocab order: ties go to the lowest
         id) and a running max/sum-exp of logits/T; write this split's partials.
    Step j needs x_{j-1} from all splits, so splits meet between steps: GRID_SYNC=True runs all iterations
    in one launch with a per-row-block arrival counter (all programs must be co-resident: grid <= #SMs);
    otherwise the launcher issues one launch per iteration (G+1 launches, no spinning), and x_{j-2} comes
    back from ``tokens``.
    """
    rb = tl.program_id(0)
    sp = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows = rb * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows = rows.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    v_lo = sp * chunk
    v_hi = tl.minimum(v_lo + chunk, V)

    temp = tl.load(temp_ptr + rows, mask=row_ok, other=0.0)
    sampled = temp > 0
    inv_t = tl.where(sampled, tl.math.div_rn(1.0, tl.where(sampled, temp, 1.0)), 1.0)
    any_sampled = tl.max(sampled.to(tl.int32), axis=0) > 0
    seed = tl.load(seed_ptr + rows, mask=row_ok, other=0)
    if HAS_CONF:
        conf_w = tl.load(conf_w_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)

    # x_in at the top of iteration j: the target id that fed step j-1 (the anchor while j <= 1)
    x_in = tl.load(anchor_ptr + rows, mask=row_ok, other=0)
    if k_begin > 1:
        x_in = _to_target(tl.load(tokens_ptr + rows * G + (k_begin - 2), mask=row_ok, other=0), row_ok, d2t_ptr,
                          HAS_D2T)

    for j in range(k_begin, k_end + 1):
        if j > 0:
            k = j - 1
            if GRID_SYNC:
                _arrive_and_wait(counter_ptr + rb * G + k, n_split)
            best = tl.full([BLOCK_B], float("-inf"), tl.float32)
            best_id = tl.zeros([BLOCK_B], tl.int32)
            m = tl.full([BLOCK_B], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK_B], tl.float32)
            for t in range(0, n_split):  # split order = vocab order, strict > keeps the lowest id on ties
                off = (t * B + rows) * G + k
                p_best = tl.load(part_f_ptr + off, mask=row_ok, other=0.0, volatile=GRID_SYNC)
                p_m = tl.load(part_f_ptr + n_split * B * G + off, mask=row_ok, other=0.0, volatile=GRID_SYNC)
                p_s = tl.load(part_f_ptr + 2 * n_split * B * G + off, mask=row_ok, other=1.0,
                              volatile=GRID_SYNC)
                p_id = tl.load(part_i_ptr + off, mask=row_ok, other=0, volatile=GRID_SYNC)
                take = p_best > best
                best = tl.where(take, p_best, best)
                best_id = tl.where(take, p_id, best_id)
                m_new = tl.maximum(m, p_m)
                s = s * tl.exp(m - m_new) + p_s * tl.exp(p_m - m_new)
                m = m_new
            x_out = best_id.to(tl.int64)
            if sp == 0:
                tl.store(tokens_ptr + rows * G + k, x_out, mask=row_ok)
            if RETURN_Q:
                lse = m + tl.log(s)
                for v0 in range(v_lo, v_hi, BLOCK_V):
                    offs_v = v0 + tl.arange(0, BLOCK_V)
                    v_ok = offs_v < v_hi
                    logits = _dense_logits_tile(base_ptr, w1_ptr, w2_ptr, x_in, rows, row_ok, k, offs_v, v_ok, R,
                                                stride_bb, stride_bk, stride_w1, stride_w2,
                                                BLOCK_R, BLOCK_RK, DOT_FP32)
                    probs = tl.exp(logits * inv_t[:, None] - lse[:, None])
                    one_hot = (offs_v[None, :] == x_out[:, None]).to(tl.float32)
                    q = tl.where(sampled[:, None], probs, one_hot)
                    tl.store(q_ptr + (rows[:, None] * G + k) * V + offs_v[None, :], q,
                             mask=row_ok[:, None] & v_ok[None, :])
            x_in = _to_target(x_out, row_ok, d2t_ptr, HAS_D2T)
        if j < G:
            if HAS_CONF:
                if sp == 0:
                    e = tl.load(w1_ptr + x_in[:, None] * stride_w1 + offs_r[None, :],
                                mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
                    conf = tl.sum(e * conf_w[None, :], axis=1)
                    tl.store(conf_ptr + rows * G + j, conf, mask=row_ok)
            key = row_key_tl(seed, j)
            best = tl.full([BLOCK_B], float("-inf"), tl.float32)
            best_id = tl.zeros([BLOCK_B], tl.int32)
            m = tl.full([BLOCK_B], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK_B], tl.float32)
            for v0 in range(v_lo, v_hi, BLOCK_V):
                offs_v = v0 + tl.arange(0, BLOCK_V)
                v_ok = offs_v < v_hi
                logits = _dense_logits_tile(base_ptr, w1_ptr, w2_ptr, x_in, rows, row_ok, j, offs_v, v_ok, R,
                                            stride_bb, stride_bk, stride_w1, stride_w2,
                                            BLOCK_R, BLOCK_RK, DOT_FP32)
                scaled = logits * inv_t[:, None]
                perturbed = scaled
                if any_sampled:  # greedy-only blocks skip the hashing
                    noise = gumbel_tl(key[:, None], offs_v[None, :])
                    perturbed = tl.where(sampled[:, None] & v_ok[None, :], scaled + noise, scaled)
                t_best, t_arg = tl.max(perturbed, axis=1, return_indices=True, return_indices_tie_break_left=True)
                take = t_best > best
                best = tl.where(take, t_best, best)
                best_id = tl.where(take, v0 + t_arg, best_id)
                m_new = tl.maximum(m, tl.max(scaled, axis=1))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(scaled - m_new[:, None]), axis=1)
                m = m_new
            off = (sp * B + rows) * G + j
            tl.store(part_f_ptr + off, best, mask=row_ok)
            tl.store(part_f_ptr + n_split * B * G + off, m, mask=row_ok)
            tl.store(part_f_ptr + 2 * n_split * B * G + off, s, mask=row_ok)
            tl.store(part_i_ptr + off, best_id, mask=row_ok)


@triton.jit
def _arrive_and_wait(counter_ptr, n):
    """Grid barrier among the n programs sharing ``counter_ptr`` (one thread spins; the CTA waits on it)."""
    tl.debug_barrier()  # every thread's partial stores are issued before the release
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < n:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _to_target(x, ok, d2t_ptr, HAS_D2T: tl.constexpr):
    """Draft ids -> target ids (the rows of w1)."""
    if HAS_D2T:
        x = x + tl.load(d2t_ptr + x, mask=ok, other=0)
    return x


@triton.jit
def _markov_topk_kernel(
    cand_val_ptr,  # [B, g, K] base logits of the candidates (any float dtype), contiguous
    cand_id_ptr,  # [B, g, K] int64 candidate vocab ids, contiguous
    w1_ptr,  # [V, r] last dim contiguous
    w2_ptr,  # [V, r] last dim contiguous
    anchor_ptr,  # [B] int64
    temp_ptr,  # [B] float32
    seed_ptr,  # [B] int64
    conf_w_ptr,  # [r] (read only if HAS_CONF)
    d2t_ptr,  # [V] int64 draft -> target id offsets (read only if HAS_D2T)
    tokens_ptr,  # [B, g] int64 out (draft ids)
    q_ptr,  # [B, g, K] float32 out (RETURN_Q)
    conf_ptr,  # [B, g] float32 out (HAS_CONF)
    G, K, R, V,
    stride_w1, stride_w2,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, RETURN_Q: tl.constexpr, HAS_CONF: tl.constexpr,
    HAS_D2T: tl.constexpr,
):
    """Top-k Markov head. Grid = (B,): one program per row runs all g steps.

    Rows share nothing here (each row gathers its own k rows of w2, k*r per step), so there is no reason
    to split a row over programs. Candidates are tiled by BLOCK_K: pass 1 writes logits/T to q (a [K]
    slice, cheap to re-read) while folding a running best (ties -> lowest vocab id) and max/sum-exp;
    pass 2 turns the slice into probabilities (or a one-hot for greedy rows).
    """
    b = tl.program_id(0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    temp = tl.load(temp_ptr + b)
    is_sampled = temp > 0
    inv_t = tl.where(is_sampled, tl.math.div_rn(1.0, tl.where(is_sampled, temp, 1.0)), 1.0)
    seed = tl.load(seed_ptr + b)
    if HAS_CONF:
        conf_w = tl.load(conf_w_ptr + offs_r, mask=r_ok, other=0.0).to(tl.float32)
    x_t = tl.load(anchor_ptr + b)  # target id feeding the next step
    for k in range(0, G):
        e = tl.load(w1_ptr + x_t * stride_w1 + offs_r, mask=r_ok, other=0.0).to(tl.float32)  # [BLOCK_R]
        if HAS_CONF:
            tl.store(conf_ptr + b * G + k, tl.sum(e * conf_w, axis=0))
        key = row_key_tl(seed, k)
        row = (b * G + k) * K
        best = tl.full([], float("-inf"), tl.float32)
        best_id = tl.zeros([], tl.int64) + V
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        for c0 in range(0, K, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            c_ok = offs_c < K
            ids = tl.load(cand_id_ptr + row + offs_c, mask=c_ok, other=0)
            vals = tl.load(cand_val_ptr + row + offs_c, mask=c_ok, other=0.0).to(tl.float32)
            w2c = tl.load(w2_ptr + ids[:, None] * stride_w2 + offs_r[None, :],
                          mask=c_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_R]
            scaled = tl.where(c_ok, (vals + tl.sum(w2c * e[None, :], axis=1)) * inv_t, float("-inf"))
            perturbed = scaled
            if is_sampled:
                perturbed = tl.where(c_ok, scaled + gumbel_tl(key, ids), float("-inf"))
            t_best = tl.max(perturbed, axis=0)
            t_id = tl.min(tl.where(perturbed == t_best, ids, V), axis=0)
            take = (t_best > best) | ((t_best == best) & (t_id < best_id))
            best = tl.where(take, t_best, best)
            best_id = tl.where(take, t_id, best_id)
            m_new = tl.maximum(m, tl.max(scaled, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(scaled - m_new), axis=0)
            m = m_new
            if RETURN_Q:
                tl.store(q_ptr + row + offs_c, scaled, mask=c_ok)
        tl.store(tokens_ptr + b * G + k, best_id)
        x_t = best_id
        if HAS_D2T:
            x_t = best_id + tl.load(d2t_ptr + best_id)
        if RETURN_Q:
            tl.debug_barrier()  # pass 2 reads what other threads wrote in pass 1
            lse = m + tl.log(s)
            for c0 in range(0, K, BLOCK_K):
                offs_c = c0 + tl.arange(0, BLOCK_K)
                c_ok = offs_c < K
                scaled = tl.load(q_ptr + row + offs_c, mask=c_ok, other=0.0)
                ids = tl.load(cand_id_ptr + row + offs_c, mask=c_ok, other=0)
                q = tl.where(is_sampled, tl.exp(scaled - lse), (ids == best_id).to(tl.float32))
                tl.store(q_ptr + row + offs_c, q, mask=c_ok)


# ------------------------------------------------------------------------------------------------ launcher
def kernels_interpreted() -> bool:
    """Whether the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 when this module loaded)."""
    return type(_markov_dense_kernel).__name__ == "InterpretedFunction"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def markov_head_triton(
    base_logits, w1, w2, anchor, temperature, seed, *, topk=0, conf_w=None, return_q=True, d2t=None,
    block_b: int | None = None, block_v: int | None = None, block_k: int | None = None,
    block_rk: int = 64, n_split: int | None = None, sync: str | None = None, num_warps: int | None = None,
    num_stages: int = 2,
) -> MarkovHeadOutput:
    """Launch the kernels (arguments already checked). Tuning knobs are for tests and the benchmark.

    sync: "grid" = one launch with a spinning barrier between steps; "step" = g+1 launches. Default: env
    VLLM_DSPARK_MARKOV_SYNC, else "grid" when a single vocab split makes it free of spinning, else "step"
    (grid mode is opt-in until it has been validated on hardware).
    """
    B, g, V = base_logits.shape
    r = w1.shape[1]
    out = empty_output(B, g, V, topk, return_q, conf_w, base_logits.device)
    if B == 0:
        return MarkovHeadOutput(out.tokens, out.q, out.q_probs,
                                torch.empty(0, g, topk, dtype=torch.int64, device=base_logits.device)
                                if out.q_probs is not None else None, out.conf_markov)
    if r > _MAX_TRITON_RANK:
        raise ValueError(f"markov_head: impl='triton' supports Markov rank r <= {_MAX_TRITON_RANK}; got r={r}")
    interpreted = kernels_interpreted()
    w1, w2 = _contiguous_rows(w1), _contiguous_rows(w2)
    anchor, temperature, seed = anchor.contiguous(), temperature.contiguous(), seed.contiguous()
    conf_arg = conf_w.contiguous() if conf_w is not None else temperature  # placeholder pointer when absent
    conf_out = out.conf_markov if out.conf_markov is not None else out.tokens
    d2t_arg = d2t.contiguous() if d2t is not None else anchor  # placeholder pointer when absent
    block_r = max(16, _next_pow2(r))

    if topk:
        cand_val, cand_id = top_candidates(base_logits, topk)  # [B, g, K], ids ascending; as the reference
        cand_val, cand_id = cand_val.contiguous(), cand_id.contiguous()
        q_arg = out.q_probs if out.q_probs is not None else out.tokens
        # a [BLOCK_K, BLOCK_R] fp32 tile of gathered w2 rows lives in registers: keep it <= 8K values
        bk = block_k or max(16, min(_next_pow2(topk), 8192 // block_r))
        _markov_topk_kernel[(B,)](
            cand_val, cand_id, w1, w2, anchor, temperature, seed, conf_arg, d2t_arg, out.tokens, q_arg, conf_out,
            g, topk, r, V, w1.stride(0), w2.stride(0),
            BLOCK_K=bk, BLOCK_R=block_r, RETURN_Q=return_q, HAS_CONF=conf_w is not None, HAS_D2T=d2t is not None,
            num_warps=num_warps or 4,
        )
        return MarkovHeadOutput(out.tokens, None, out.q_probs, cand_id if return_q else None, out.conf_markov)

    base = _contiguous_rows(base_logits)
    # Defaults: no register spills at r = 256 for bf16 on sm_90 (checked with ptxas); untuned on hardware.
    bb = block_b or (16 if B <= 16 else 32 if B <= 32 else 64)  # tl.dot needs >= 16 rows
    bv = block_v or 64
    num_warps = num_warps or (4 if bb <= 16 else 8)
    n_rb = _cdiv(B, bb)
    num_sms = torch.cuda.get_device_properties(base.device).multi_processor_count if base.is_cuda else 1
    if n_split is None:
        n_split = max(1, min(num_sms // n_rb, _cdiv(V, 4 * bv)))  # >= 4 tiles per split
    chunk = _cdiv(_cdiv(V, n_split), bv) * bv
    n_split = _cdiv(V, chunk)  # every split non-empty
    sync = sync or os.environ.get("VLLM_DSPARK_MARKOV_SYNC") or ("grid" if n_split == 1 else "step")
    if sync not in ("grid", "step"):
        raise ValueError(f"markov_head: sync must be 'grid' or 'step'; got {sync!r}")
    if sync == "grid" and n_split > 1 and (interpreted or n_rb * n_split > num_sms):
        sync = "step"  # spinning needs every program resident at once (the interpreter runs them one by one)
    dev = base.device
    part_f = torch.empty(3, n_split, B, g, dtype=torch.float32, device=dev)
    part_i = torch.empty(n_split, B, g, dtype=torch.int32, device=dev)
    counter = torch.zeros(n_rb, g, dtype=torch.int32, device=dev) if sync == "grid" else part_i
    q_arg = out.q if out.q is not None else out.tokens
    # fp32 operands (exact, no tensor-core speed) unless w1 and w2 share a 16-bit dtype; the interpreter always,
    # since its bf16 tl.dot returns garbage (triton 3.9)
    dot_fp32 = interpreted or w1.dtype != w2.dtype or w2.dtype == torch.float32

    def launch(k_begin: int, k_end: int) -> None:
        _markov_dense_kernel[(n_rb, n_split)](
            base, w1, w2, anchor, temperature, seed, conf_arg, d2t_arg, out.tokens, q_arg, conf_out, part_f, part_i,
            counter, B, V, r, g, chunk, k_begin, k_end,
            base.stride(0), base.stride(1), w1.stride(0), w2.stride(0),
            BLOCK_B=bb, BLOCK_V=bv, BLOCK_R=block_r, BLOCK_RK=min(block_r, block_rk), RETURN_Q=return_q,
            HAS_CONF=conf_w is not None, HAS_D2T=d2t is not None, GRID_SYNC=sync == "grid", DOT_FP32=dot_fp32,
            num_warps=num_warps, num_stages=num_stages,
        )

    if sync == "grid":
        launch(0, g)
    else:
        for j in range(g + 1):
            launch(j, j)
    return out
