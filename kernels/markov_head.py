"""The sequential part of a DSpark draft block: the Markov head (math, torch reference, public entry point).

Per request row b and draft position k = 1..g (0-based ``k`` in code):

    e_k      = w1[t(x_{k-1})]                              # [r]   (x_0 = anchor[b], t(anchor) = anchor)
    logits_k = base[b, k] + w2 @ e_k                       # [V]
    x_k      = argmax(logits_k)                            if T_b <= 0 (greedy)
             = argmax(logits_k / T_b + Gumbel(seed_b, k, v))   otherwise (Gumbel-max sampling)
    q_k      = one-hot(x_k)            if greedy,  softmax(logits_k / T_b)  otherwise

q_k is the distribution x_k was actually drawn from (Markov-conditioned), which is what lossless speculative
verification needs (p = target, q = draft). With ``conf_w`` the Markov part of the confidence head's logit,
dot(e_k, conf_w), comes out too. Top-k (vLLM's ``dspark_draft_topk``): candidates are the top-k vocab ids of
the *base* logits of each position, the Markov bias is computed for those rows of w2 only, and x_k and q_k
live on the candidates (q_probs/q_ids); tokens are still vocab ids.

Vocabularies: base_logits, w2, q and the drawn tokens use the draft vocabulary (V); w1 and the anchor use the
target's. They are the same unless a reduced draft vocabulary comes with ``d2t`` (EAGLE-3/vLLM convention:
target id = draft id + d2t[draft id]); t() above is that map (the identity without d2t). Tokens are returned
as draft ids, like q; map them with d2t before handing them to the target.

Three entry points share one set of semantics: ``markov_head_reference`` (plain torch, batched over rows,
any device), the Triton kernels in ``markov_head_triton.py`` (grid, tiling and why: see their docstrings),
and ``markov_head``, which checks arguments and dispatches.
Sampling noise comes from ``counter_rng`` (a pure function of seed, position and vocab id), so both
implementations draw the same tokens; ties of the perturbed score go to the lowest vocab id in both. (The
logits themselves are summed in different orders, so a draw can differ only where the two best perturbed
scores are within float rounding of each other.)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from . import counter_rng

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # imported only when a kernel runs


@dataclass(frozen=True)
class MarkovHeadOutput:
    """What the Markov head drew and from which distribution."""

    tokens: torch.Tensor  # [B, g] int64 vocab ids
    q: torch.Tensor | None = None  # [B, g, V] float32 (dense, return_q)
    q_probs: torch.Tensor | None = None  # [B, g, k] float32 (top-k, return_q)
    q_ids: torch.Tensor | None = None  # [B, g, k] int64 vocab ids of q_probs (top-k, return_q)
    conf_markov: torch.Tensor | None = None  # [B, g] float32 dot(w1[x_{k-1}], conf_w), when conf_w given


# --------------------------------------------------------------------------------------------------- checks
def _describe(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)} dtype {t.dtype} on {t.device}"


def _check_args(base_logits, w1, w2, anchor, temperature, seed, topk, conf_w, d2t) -> tuple[int, int, int, int]:
    """Validate shapes, dtypes and devices; return (B, g, V, r). Values are not read (no device sync)."""

    def need(ok: bool, name: str, t, expected: str):
        if not ok:
            got = _describe(t) if isinstance(t, torch.Tensor) else f"{type(t).__name__} {t!r}"
            raise ValueError(f"markov_head: {name} must be {expected}; got {got}")

    need(isinstance(base_logits, torch.Tensor) and base_logits.dim() == 3 and base_logits.dtype in _FLOATS,
         "base_logits", base_logits, "a [B, g, V] float32/bfloat16/float16 tensor")
    B, g, V = base_logits.shape
    need(g >= 1 and V >= 1, "base_logits", base_logits, "[B, g, V] with g >= 1 and V >= 1")
    if d2t is None:
        need(isinstance(w1, torch.Tensor) and w1.dim() == 2 and w1.dtype in _FLOATS and w1.shape[0] == V,
             "w1", w1, f"a [V, r] = [{V}, r] float tensor (markov_w1; a reduced draft vocabulary needs d2t)")
    else:
        need(isinstance(w1, torch.Tensor) and w1.dim() == 2 and w1.dtype in _FLOATS,
             "w1", w1, "a [V_target, r] float tensor (markov_w1)")
        need(isinstance(d2t, torch.Tensor) and tuple(d2t.shape) == (V,) and d2t.dtype == torch.int64,
             "d2t", d2t, f"None or a [V] = [{V}] int64 tensor of draft-to-target id offsets")
    r = w1.shape[1]
    need(r >= 1, "w1", w1, "[V, r] with r >= 1")
    need(isinstance(w2, torch.Tensor) and w2.dtype in _FLOATS and tuple(w2.shape) == (V, r),
         "w2", w2, f"a [V, r] = [{V}, {r}] float tensor (markov_w2.weight)")
    need(isinstance(anchor, torch.Tensor) and tuple(anchor.shape) == (B,) and anchor.dtype == torch.int64,
         "anchor", anchor, f"a [B] = [{B}] int64 tensor")
    need(isinstance(temperature, torch.Tensor) and tuple(temperature.shape) == (B,)
         and temperature.dtype == torch.float32, "temperature", temperature, f"a [B] = [{B}] float32 tensor")
    need(isinstance(seed, torch.Tensor) and tuple(seed.shape) == (B,) and seed.dtype == torch.int64,
         "seed", seed, f"a [B] = [{B}] int64 tensor")
    need(isinstance(topk, int) and not isinstance(topk, bool) and 0 <= topk <= V,
         "topk", topk, f"an int in [0, V={V}] (0 = dense)")
    if conf_w is not None:
        need(isinstance(conf_w, torch.Tensor) and tuple(conf_w.shape) == (r,) and conf_w.dtype in _FLOATS,
             "conf_w", conf_w, f"None or an [r] = [{r}] float tensor")
    for name, t in (("w1", w1), ("w2", w2), ("anchor", anchor), ("temperature", temperature), ("seed", seed),
                    ("conf_w", conf_w), ("d2t", d2t)):
        if t is not None and t.device != base_logits.device:
            raise ValueError(f"markov_head: {name} is on {t.device} but base_logits is on {base_logits.device}; "
                             "all tensors must be on one device")
    return B, g, V, r


def empty_output(B, g, V, topk, return_q, conf_w, device) -> MarkovHeadOutput:
    """Outputs allocated for the caller (tokens, and q / q_probs / conf when asked for)."""
    dense_q = return_q and topk == 0
    return MarkovHeadOutput(
        tokens=torch.empty(B, g, dtype=torch.int64, device=device),
        q=torch.empty(B, g, V, dtype=torch.float32, device=device) if dense_q else None,
        q_probs=torch.empty(B, g, topk, dtype=torch.float32, device=device) if return_q and topk else None,
        conf_markov=torch.empty(B, g, dtype=torch.float32, device=device) if conf_w is not None else None,
    )


def _inv_temperature(temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] bool sampled = T > 0, [B] float32 1/T for sampled rows and 1 for greedy ones)."""
    sampled = temperature > 0
    return sampled, torch.where(sampled, 1.0 / torch.where(sampled, temperature, 1.0), 1.0)


# ------------------------------------------------------------------------------------------------ candidates
def top_candidates(base_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of the base logits per [B, g] row: (values [B, g, k], vocab ids [B, g, k]), ids ascending.

    Ascending ids make "the first maximum" of any score over the candidates the lowest vocab id among the
    maxima (the tie rule of the head). On CPU the selection is ``_select_top`` (~3x faster than torch.topk
    at V = 49152, k = 32, where torch.topk alone was ~9% of a draft block); on GPU it is torch.topk.
    """
    V = base_logits.shape[-1]
    if base_logits.is_cuda or V <= 8 * k:
        vals, ids = base_logits.topk(k, dim=-1)
    else:
        rows = base_logits.reshape(-1, V)
        vals, ids = _select_top(rows, k)
        vals, ids = vals.view(*base_logits.shape[:-1], k), ids.view(*base_logits.shape[:-1], k)
    ids, order = ids.sort(dim=-1)
    return vals.gather(-1, order), ids


def _select_top(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row of [R, N] (ties at the k-th value aside), by chunk maxima, recursively.

    The k chunks with the largest maxima hold every top-k value (a chunk holding one has a maximum at least
    that large, and at most k chunks do), so: chunk maxima (one vectorised pass), the top-k of the maxima
    (recursively), then the top-k of the k x c values of those chunks (recursively). torch.topk runs only on
    rows of <= 8k values, where it is cheap; the big rows see one amax.
    """
    R, N = rows.shape
    if N <= 8 * k:
        return rows.topk(k, dim=-1)
    c = 64 if N >= 512 * k else 8
    pad = (-N) % c
    if pad:  # -inf is never chosen: N > 8k gives >= k chunks, each with a real maximum
        rows = torch.nn.functional.pad(rows, (0, pad), value=float("-inf"))
    n = rows.shape[1] // c
    chunks = rows.view(R, n, c)
    _, best = _select_top(chunks.amax(dim=-1), k)  # [R, k] chunk numbers
    flat = (best + torch.arange(R, device=rows.device)[:, None] * n).flatten()
    vals, j = _select_top(chunks.reshape(R * n, c).index_select(0, flat).view(R, k * c), k)
    return vals, best.gather(1, j // c) * c + j % c


# ----------------------------------------------------------------------------------------------- reference
def markov_head_reference(
    base_logits: torch.Tensor,  # [B, g, V] float32 | bfloat16 | float16
    w1: torch.Tensor,  # [V_target, r] (= [V, r] without d2t)
    w2: torch.Tensor,  # [V, r]
    anchor: torch.Tensor,  # [B] int64 target id
    temperature: torch.Tensor,  # [B] float32; <= 0 means greedy
    seed: torch.Tensor,  # [B] int64, fresh per request and round
    *,
    topk: int = 0,
    conf_w: torch.Tensor | None = None,  # [r]
    return_q: bool = True,
    d2t: torch.Tensor | None = None,  # [V] int64
) -> MarkovHeadOutput:
    """The Markov head in plain torch (float32 math), batched over rows; a Python loop over the g positions only."""
    B, g, V, r = _check_args(base_logits, w1, w2, anchor, temperature, seed, topk, conf_w, d2t)
    if topk:
        return _topk_reference(base_logits, w1, w2, anchor, temperature, seed, topk, conf_w, return_q, d2t)
    out = empty_output(B, g, V, topk, return_q, conf_w, base_logits.device)
    sampled, inv_t = _inv_temperature(temperature)
    samp_rows = sampled.nonzero().squeeze(1)  # [Bs] rows that sample: only they need noise and a softmax
    greedy_rows = (~sampled).nonzero().squeeze(1)  # [Bg] rows whose q is a one-hot
    conf_wf = conf_w.float() if conf_w is not None else None
    w2t = w2.float().t()  # [r, V] (a copy per call unless w2 is float32 already)
    vocab = torch.arange(V, device=base_logits.device)  # [V]
    x_target = anchor  # [B] target id feeding the next step
    for k in range(g):
        e = w1[x_target].float()  # [B, r]
        if conf_wf is not None:
            out.conf_markov[:, k] = e @ conf_wf
        scaled = torch.addmm(base_logits[:, k].float(), e, w2t) * inv_t[:, None]  # [B, V]
        perturbed = scaled
        if samp_rows.numel():
            noise = counter_rng.gumbel(counter_rng.row_keys(seed[samp_rows], k), vocab)
            perturbed = scaled.index_add(0, samp_rows, noise)
        x = perturbed.argmax(dim=-1)  # first maximum = lowest vocab id
        out.tokens[:, k] = x
        x_target = x if d2t is None else x + d2t[x]
        if out.q is not None:
            q_k = out.q[:, k]  # [B, V] view
            if samp_rows.numel():
                q_k.copy_(torch.softmax(scaled, dim=-1))
            if greedy_rows.numel():
                q_k[greedy_rows] = (vocab == x[greedy_rows, None]).float()
    return out


def _topk_reference(base_logits, w1, w2, anchor, temperature, seed, topk, conf_w, return_q, d2t):
    """Top-k head: what does not depend on the chain is batched over the g positions (candidates, their target
    ids, the sampling noise); the loop per position gathers the K rows of w2 and one row of w1 per request, takes
    a [K, r] x [r] product per row and an argmax over the K candidates (ids ascending: the first maximum is the
    lowest vocab id)."""
    B, g, V = base_logits.shape
    r = w1.shape[1]
    dev = base_logits.device
    sampled, inv_t = _inv_temperature(temperature)
    samp_rows = sampled.nonzero().squeeze(1)
    any_sampled = bool(samp_rows.numel())
    cand_val, q_ids = top_candidates(base_logits, topk)  # [B, g, K] each
    pos_ids = q_ids.transpose(0, 1)  # [g, B, K] so that each position's slices are contiguous
    pos_val = cand_val.transpose(0, 1).float().contiguous()
    target_ids = pos_ids if d2t is None else pos_ids + d2t[pos_ids]  # [g, B, K] what w1 reads next
    if any_sampled:  # the noise of every (position, candidate) at once: it does not depend on the chain
        Bs = samp_rows.numel()
        keys = counter_rng.block_row_keys(seed[samp_rows], g)  # [g, Bs]
        noise = counter_rng.gumbel(keys.flatten(), pos_ids[:, samp_rows].reshape(g * Bs, topk)).view(g, Bs, topk)
    rows = torch.arange(B, device=dev)
    picks = torch.empty(g, B, dtype=torch.int64, device=dev)  # index of the drawn candidate
    scores = torch.empty(g, B, topk, dtype=torch.float32, device=dev) if return_q and any_sampled else None
    prev = torch.empty(g, B, dtype=torch.int64, device=dev)  # target id feeding each step (for conf)
    x_target = anchor
    for k in range(g):
        prev[k] = x_target
        w2k = w2.index_select(0, pos_ids[k].flatten()).view(B, topk, r).float()  # [B, K, r] (per step: memory)
        bias = (w2k * w1[x_target].float()[:, None, :]).sum(-1)  # [B, K]; ~6x faster than bmm with N = 1
        scaled = pos_val[k] + bias
        if any_sampled:
            scaled = scaled * inv_t[:, None]
        if scores is not None:
            scores[k] = scaled
        if any_sampled:
            scaled = scaled.index_add(0, samp_rows, noise[k])
        picks[k] = idx = scaled.argmax(dim=-1)
        x_target = target_ids[k, rows, idx]
    tokens = pos_ids.gather(2, picks[..., None]).squeeze(-1).t().contiguous()  # [B, g]
    conf = None
    if conf_w is not None:
        conf = (w1[prev].float() @ conf_w.float()).t().contiguous()  # [B, g]
    if not return_q:
        return MarkovHeadOutput(tokens, conf_markov=conf)
    q = (torch.arange(topk, device=dev) == picks[..., None]).float()  # [g, B, K] one-hot (greedy rows)
    if scores is not None:
        q[:, samp_rows] = torch.softmax(scores[:, samp_rows], dim=-1)
    return MarkovHeadOutput(tokens, None, q.transpose(0, 1).contiguous(), q_ids, conf)


# ------------------------------------------------------------------------------------------------- wrapper
def markov_head(
    base_logits: torch.Tensor,  # [B, g, V] float32 | bfloat16 | float16
    w1: torch.Tensor,  # [V_target, r] markov_w1 (embedding); [V, r] without d2t
    w2: torch.Tensor,  # [V, r] markov_w2.weight
    anchor: torch.Tensor,  # [B] int64 last target token per row
    temperature: torch.Tensor,  # [B] float32; <= 0 means greedy
    seed: torch.Tensor,  # [B] int64, fresh per request and drafting round
    *,
    topk: int = 0,
    conf_w: torch.Tensor | None = None,  # [r] Markov slice of the confidence head's weight
    return_q: bool = True,
    d2t: torch.Tensor | None = None,  # [V] int64 draft -> target id offsets (reduced draft vocabulary)
    impl: str = "auto",
) -> MarkovHeadOutput:
    """Run the Markov head over a draft block; see the module docstring for the math.

    impl: "auto" = the Triton kernel for CUDA tensors (when triton is installed), else the torch reference;
    "triton" = the kernel (CUDA tensors, or any tensors under TRITON_INTERPRET=1); "torch" = the reference.
    Greedy callers pass return_q=False and skip the [B, g, V] write.
    """
    _check_args(base_logits, w1, w2, anchor, temperature, seed, topk, conf_w, d2t)
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"markov_head: impl must be 'auto', 'triton' or 'torch'; got {impl!r}")
    if impl == "auto":
        impl = "triton" if base_logits.is_cuda and _HAS_TRITON else "torch"
    if impl == "torch":
        return markov_head_reference(base_logits, w1, w2, anchor, temperature, seed, topk=topk, conf_w=conf_w,
                                     return_q=return_q, d2t=d2t)
    if not _HAS_TRITON:
        raise ValueError("markov_head: impl='triton' needs the triton package, which is not installed")
    from . import markov_head_triton as kernels  # imports triton, once

    if not base_logits.is_cuda and not kernels.kernels_interpreted():
        raise ValueError(f"markov_head: impl='triton' needs CUDA tensors (base_logits is on {base_logits.device}) "
                         "or TRITON_INTERPRET=1 set before triton is first imported")
    return kernels.markov_head_triton(base_logits, w1, w2, anchor, temperature, seed, topk=topk, conf_w=conf_w,
                                      return_q=return_q, d2t=d2t)
