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
    out = empty_output(B, g, V, topk, return_q, conf_w, base_logits.device)
    sampled, inv_t = _inv_temperature(temperature)
    samp_rows = sampled.nonzero().squeeze(1)  # [Bs] rows that sample: only they need noise and a softmax
    greedy_rows = (~sampled).nonzero().squeeze(1)  # [Bg] rows whose q is a one-hot
    conf_wf = conf_w.float() if conf_w is not None else None
    if topk:
        cand_val, q_ids = base_logits.topk(topk, dim=-1)  # [B, g, K] each; candidates do not depend on x
    else:
        w2t = w2.float().t()  # [r, V] (a copy per call unless w2 is float32 already)
        vocab = torch.arange(V, device=base_logits.device)  # [V]
    q_out = out.q_probs if topk else out.q  # [B, g, K or V] or None
    x_target = anchor  # [B] target id feeding the next step
    for k in range(g):
        e = w1[x_target].float()  # [B, r]
        if conf_wf is not None:
            out.conf_markov[:, k] = e @ conf_wf
        if topk:
            ids = q_ids[:, k]  # [B, K]
            bias = torch.bmm(w2[ids].float(), e.unsqueeze(-1)).squeeze(-1)  # [B, K]
            scaled = (cand_val[:, k].float() + bias) * inv_t[:, None]  # [B, K]
        else:
            ids = vocab
            scaled = torch.addmm(base_logits[:, k].float(), e, w2t) * inv_t[:, None]  # [B, V]
        perturbed = scaled
        if samp_rows.numel():
            noise = counter_rng.gumbel(counter_rng.row_keys(seed[samp_rows], k), ids[samp_rows] if topk else ids)
            perturbed = scaled.index_add(0, samp_rows, noise)
        if topk:  # lowest vocab id among the maxima, as in the kernel
            best = perturbed.max(dim=-1, keepdim=True).values
            x = torch.where(perturbed == best, ids, V).min(dim=-1).values
        else:
            x = perturbed.argmax(dim=-1)  # first maximum = lowest vocab id
        out.tokens[:, k] = x
        x_target = x if d2t is None else x + d2t[x]
        if q_out is not None:
            q_k = q_out[:, k]  # [B, K or V] view
            if samp_rows.numel():
                q_k.copy_(torch.softmax(scaled, dim=-1))
            if greedy_rows.numel():
                x_g = x[greedy_rows, None]
                one_hot = (ids[greedy_rows] == x_g) if topk else (vocab == x_g)
                q_k[greedy_rows] = one_hot.float()
    if topk and return_q:
        return MarkovHeadOutput(out.tokens, None, out.q_probs, q_ids, out.conf_markov)
    return out


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
