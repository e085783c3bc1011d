"""Markov head: the Triton kernels (interpreted on CPU) against the torch reference and naive loops; seeded
sampling (same tokens, right frequencies); argument errors. See conftest.py for TRITON_INTERPRET."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_dspark_kernels import counter_rng, markov_head_triton as mht
from vllm_dspark_kernels.markov_head import markov_head, markov_head_reference

MIXED_T = (1.0, 0.0, 0.7, 1.5)  # every batch mixes greedy and sampled rows


def make_inputs(B, g, V, r, *, dtype=torch.float32, temps=MIXED_T, seed=0, base_scale=3.0):
    """Random head inputs as markov_head keyword arguments, plus an [r] conf_w."""
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(
        base_logits=(torch.randn(B, g, V, generator=gen) * base_scale).to(dtype),  # [B, g, V]
        w1=(torch.randn(V, r, generator=gen) * 0.5).to(dtype),  # [V, r]
        w2=(torch.randn(V, r, generator=gen) * (2 / math.sqrt(r))).to(dtype),  # [V, r]
        anchor=torch.randint(0, V, (B,), generator=gen),  # [B]
        temperature=torch.tensor([temps[i % len(temps)] for i in range(B)], dtype=torch.float32),  # [B]
        seed=torch.randint(-(2**62), 2**62, (B,), generator=gen),  # [B]
    )
    return inputs, torch.randn(r, generator=gen).to(dtype)


def assert_same_draws(out, ref, *, q_atol):
    assert torch.equal(out.tokens, ref.tokens)
    for name in ("q", "q_probs", "conf_markov"):
        a, b = getattr(out, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=q_atol, rtol=0, msg=name)
    if ref.q_ids is not None:
        assert torch.equal(out.q_ids, ref.q_ids)


def assert_valid_q(out, temperature):
    """q is a distribution and the drawn token is in its support (one-hot for greedy rows)."""
    q = out.q if out.q is not None else out.q_probs
    torch.testing.assert_close(q.sum(-1), torch.ones(q.shape[:2]), atol=1e-5, rtol=0)
    assert (q >= 0).all()
    if out.q is not None:
        q_tok = q.gather(-1, out.tokens[..., None]).squeeze(-1)
    else:
        assert (out.q_ids == out.tokens[..., None]).sum(-1).eq(1).all(), "token not among the candidates"
        q_tok = (q * (out.q_ids == out.tokens[..., None])).sum(-1)
    assert (q_tok > 0).all()
    greedy = temperature <= 0
    assert torch.equal(q_tok[greedy], torch.ones_like(q_tok[greedy]))


# ------------------------------------------------------------------------------------------ kernel == reference
DENSE_CASES = [
    # B, g, V, r, launcher knobs
    (1, 1, 97, 64, dict(block_v=32, n_split=1, sync="grid")),
    (5, 7, 300, 256, dict(block_v=64, n_split=2, sync="step")),
    (33, 15, 300, 64, dict(block_b=16, block_v=128, n_split=2, sync="step")),
    (5, 15, 1000, 48, dict(block_v=128, block_rk=32, n_split=1, sync="grid")),
    (33, 7, 97, 64, dict(block_v=32, n_split=3, sync="step")),
]


@pytest.mark.parametrize("B,g,V,r,knobs", DENSE_CASES, ids=[f"B{B}-g{g}-V{V}-r{r}" for B, g, V, r, _ in DENSE_CASES])
def test_dense_kernel_matches_reference_fp32(B, g, V, r, knobs):
    inputs, conf_w = make_inputs(B, g, V, r)
    ref = markov_head_reference(**inputs, conf_w=conf_w)
    out = mht.markov_head_triton(**inputs, conf_w=conf_w, **knobs)
    assert_same_draws(out, ref, q_atol=1e-5)
    assert_valid_q(out, inputs["temperature"])


TOPK_CASES = [
    # B, g, V, r, k, block_k
    (1, 1, 97, 64, 1, None),
    (5, 15, 300, 256, 40, 32),
    (17, 4, 1000, 64, 64, 32),
    (5, 3, 97, 64, 97, 32),
]
TOPK_IDS = [f"B{B}-g{g}-V{V}-r{r}-k{k}" for B, g, V, r, k, _ in TOPK_CASES]


@pytest.mark.parametrize("B,g,V,r,k,block_k", TOPK_CASES, ids=TOPK_IDS)
def test_topk_kernel_matches_reference_fp32(B, g, V, r, k, block_k):
    inputs, conf_w = make_inputs(B, g, V, r)
    ref = markov_head_reference(**inputs, topk=k, conf_w=conf_w)
    out = mht.markov_head_triton(**inputs, topk=k, conf_w=conf_w, block_k=block_k)
    assert_same_draws(out, ref, q_atol=1e-5)
    assert_valid_q(out, inputs["temperature"])
    # candidates = the top-k of base, in ascending id order
    assert torch.equal(out.q_ids, inputs["base_logits"].topk(k, dim=-1).indices.sort(dim=-1).values)


def perturbed_scores(inputs, tokens, topk=0):
    """[B, g, V or k] scores the draws maximise, teacher-forced along ``tokens`` (float32, like the reference)."""
    base, w1, w2 = inputs["base_logits"].float(), inputs["w1"].float(), inputs["w2"].float()
    T = inputs["temperature"]
    inv_t = torch.where(T > 0, 1 / torch.where(T > 0, T, 1.0), 1.0)
    prev = torch.cat([inputs["anchor"][:, None], tokens[:, :-1]], dim=1)
    cand = inputs["base_logits"].topk(topk, dim=-1).indices if topk else None
    scores = []
    for k in range(base.shape[1]):
        e = w1[prev[:, k]]
        if topk:
            ids = cand[:, k]
            s = (base[:, k].gather(1, ids) + torch.einsum("bkr,br->bk", w2[ids], e)) * inv_t[:, None]
        else:
            ids = torch.arange(base.shape[2]).expand(base.shape[0], -1)
            s = (base[:, k] + e @ w2.T) * inv_t[:, None]
        noise = torch.stack([counter_rng.gumbel(counter_rng.row_keys(inputs["seed"][b : b + 1], k), ids[b])[0]
                             for b in range(base.shape[0])])
        scores.append(torch.where((T > 0)[:, None], s + noise, s))
    return torch.stack(scores, dim=1)


@pytest.mark.parametrize("topk", [0, 40])
def test_kernel_matches_reference_bf16(topk):
    """bf16 inputs: both sides compute in fp32 from the same bf16 values. Tolerances: q 1e-2; tokens equal at
    every position whose chain so far had a top-2 score margin above 1e-3 (a closer race may flip on the
    summation order)."""
    inputs, conf_w = make_inputs(5, 7, 300, 256, dtype=torch.bfloat16)
    ref = markov_head_reference(**inputs, topk=topk, conf_w=conf_w)
    out = mht.markov_head_triton(**inputs, topk=topk, conf_w=conf_w, block_v=64, n_split=2)
    top2 = perturbed_scores(inputs, ref.tokens, topk).topk(2, dim=-1).values
    decided = ((top2[..., 0] - top2[..., 1]) > 1e-3).long().cumprod(dim=1).bool()  # [B, g]
    assert decided.float().mean() > 0.9, "test data too close to ties to say anything"
    assert torch.equal(out.tokens[decided], ref.tokens[decided])
    q_comparable = torch.cat([torch.ones_like(decided[:, :1]), decided[:, :-1]], dim=1)  # q_k needs x_{k-1} equal
    q, q_ref = (out.q_probs, ref.q_probs) if topk else (out.q, ref.q)
    torch.testing.assert_close(q[q_comparable], q_ref[q_comparable], atol=1e-2, rtol=0)
    torch.testing.assert_close(out.conf_markov[q_comparable], ref.conf_markov[q_comparable], atol=1e-2, rtol=0)


# ------------------------------------------------------------------------------------------------ greedy chain
def naive_greedy_chain(inputs, topk=0, d2t=None):
    """x_k = argmax(base[b, k] + w2 @ w1[t(x_{k-1})]) row by row in float64 (top-k: over top-k of base;
    t = draft -> target id map, the identity without d2t)."""
    base, w1, w2 = (inputs[n].double() for n in ("base_logits", "w1", "w2"))
    B, g, V = base.shape
    tokens = torch.empty(B, g, dtype=torch.int64)
    for b in range(B):
        x_target = int(inputs["anchor"][b])
        for k in range(g):
            cand = torch.topk(base[b, k], topk).indices if topk else torch.arange(V)
            logits = base[b, k, cand] + w2[cand] @ w1[x_target]
            tokens[b, k] = x = int(cand[torch.argmax(logits)])
            x_target = x if d2t is None else x + int(d2t[x])
    return tokens


@pytest.mark.parametrize("topk", [0, 16])
def test_greedy_is_the_argmax_chain(topk):
    inputs, _ = make_inputs(5, 15, 300, 64, temps=(0.0,))
    expected = naive_greedy_chain(inputs, topk)
    ref = markov_head_reference(**inputs, topk=topk, return_q=False)
    out = mht.markov_head_triton(**inputs, topk=topk, return_q=False, block_v=64, n_split=2)
    assert torch.equal(ref.tokens, expected)
    assert torch.equal(out.tokens, expected)
    assert out.q is None and out.q_probs is None and out.q_ids is None


# ----------------------------------------------------------------------------------------------------- seeding
def test_draws_do_not_depend_on_launch_shape_or_batch_order():
    inputs, conf_w = make_inputs(20, 7, 300, 64, temps=(1.0, 0.8))
    first = mht.markov_head_triton(**inputs, block_b=16, block_v=32, n_split=3, sync="step").tokens
    assert torch.equal(mht.markov_head_triton(**inputs, block_v=128, n_split=1, sync="grid").tokens, first)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    shuffled = {n: (t[perm] if n not in ("w1", "w2") else t) for n, t in inputs.items()}
    assert torch.equal(markov_head(**shuffled, impl="triton").tokens, first[perm])
    assert torch.equal(markov_head_reference(**shuffled).tokens, first[perm])


@pytest.mark.parametrize("topk", [0, 32])
def test_another_seed_draws_other_tokens(topk):
    inputs, _ = make_inputs(8, 7, 97, 64, temps=(1.0,), base_scale=1.0)
    other = dict(inputs, seed=inputs["seed"] + 1)
    a = markov_head_reference(**inputs, topk=topk).tokens
    b = markov_head_reference(**other, topk=topk).tokens
    assert (a != b).float().mean() > 0.5  # near-flat distributions over >= 32 tokens: few coincidences
    assert torch.equal(mht.markov_head_triton(**other, topk=topk).tokens, b)


def test_full_topk_draws_like_dense():
    """Noise is keyed by vocab id, so top-k with k = V is the dense head with q permuted."""
    inputs, _ = make_inputs(6, 5, 97, 64)
    dense = mht.markov_head_triton(**inputs, block_v=32, n_split=2)
    full = mht.markov_head_triton(**inputs, topk=97)
    assert torch.equal(full.tokens, dense.tokens)
    torch.testing.assert_close(dense.q.gather(-1, full.q_ids), full.q_probs, atol=1e-5, rtol=0)


def reduced_vocab_inputs(B, g, Vd, Vt, r, temps=MIXED_T):
    """A draft vocabulary of Vd ids mapped (d2t) onto a sorted random subset of Vt target ids."""
    inputs, conf_w = make_inputs(B, g, Vd, r, temps=temps)
    gen = torch.Generator().manual_seed(5)
    target_ids = torch.randperm(Vt, generator=gen)[:Vd].sort().values
    inputs["w1"] = torch.randn(Vt, r, generator=gen) * 0.5  # [Vt, r] rows are target ids
    inputs["anchor"] = target_ids[inputs["anchor"]]  # the anchor is a target token
    return inputs, conf_w, target_ids - torch.arange(Vd)  # d2t: target id = draft id + d2t[draft id]


@pytest.mark.parametrize("topk", [0, 24])
def test_reduced_draft_vocabulary_feeds_target_ids_to_w1(topk):
    inputs, conf_w, d2t = reduced_vocab_inputs(6, 5, 97, 250, 64, temps=(0.0,))
    ref = markov_head_reference(**inputs, topk=topk, conf_w=conf_w, d2t=d2t)
    assert torch.equal(ref.tokens, naive_greedy_chain(inputs, topk, d2t))
    out = mht.markov_head_triton(**inputs, topk=topk, conf_w=conf_w, d2t=d2t, block_v=32, n_split=2)
    assert_same_draws(out, ref, q_atol=1e-5)


def test_reduced_draft_vocabulary_kernel_matches_reference_sampled():
    inputs, conf_w, d2t = reduced_vocab_inputs(9, 7, 97, 250, 64)
    ref = markov_head_reference(**inputs, conf_w=conf_w, d2t=d2t)
    assert_same_draws(mht.markov_head_triton(**inputs, conf_w=conf_w, d2t=d2t, block_v=32, n_split=3), ref,
                      q_atol=1e-5)


# ------------------------------------------------------------------------------------------ sampling statistics
def sample_counts(tokens, n):
    return torch.bincount(tokens, minlength=n).double().numpy()


def chisquare_p(observed, expected) -> float:
    return pytest.importorskip("scipy.stats").chisquare(observed, expected).pvalue


def fixed_row_inputs(logits, n_seeds, g, temperature):
    """Every row: the same base logits at every position and w2 = 0, so each draw is from softmax(logits / T)."""
    V = logits.numel()
    return dict(
        base_logits=logits.expand(n_seeds, g, V).contiguous(),
        w1=torch.randn(V, 16),
        w2=torch.zeros(V, 16),
        anchor=torch.zeros(n_seeds, dtype=torch.int64),
        temperature=torch.full((n_seeds,), temperature),
        seed=torch.arange(n_seeds, dtype=torch.int64) * 1_000_003 + 17,
    )


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2, -2.0, 0.8])


@pytest.mark.parametrize("position", [0, 1])
def test_sampling_frequencies_match_softmax(position):
    T = 0.7
    inputs = fixed_row_inputs(LOGITS, 20000, 2, T)
    tokens = markov_head_reference(**inputs, return_q=False).tokens[:, position]
    p = torch.softmax(LOGITS.double() / T, -1).numpy()
    assert chisquare_p(sample_counts(tokens, 10), p * len(tokens)) > 1e-3


def test_positions_are_independent():
    logits = torch.tensor([0.3, -0.2, 0.0, 0.5, -0.4, 0.1])
    inputs = fixed_row_inputs(logits, 20000, 2, 1.0)
    tokens = markov_head_reference(**inputs, return_q=False).tokens
    p = torch.softmax(logits.double(), -1)
    expected = (p[:, None] * p[None, :]).flatten().numpy() * len(tokens)
    assert chisquare_p(sample_counts(tokens[:, 0] * 6 + tokens[:, 1], 36), expected) > 1e-3


def test_topk_sampling_frequencies_match_truncated_softmax():
    inputs = fixed_row_inputs(LOGITS, 20000, 1, 1.0)
    out = markov_head_reference(**inputs, topk=4)
    cand = LOGITS.topk(4).indices.sort().values  # q_ids come in ascending id order
    p = torch.softmax(LOGITS[cand].double(), -1).numpy()
    counts = sample_counts(out.tokens[:, 0], 10)
    assert counts.sum() == counts[cand.numpy()].sum()  # never off the candidates
    assert chisquare_p(counts[cand.numpy()], p * 20000) > 1e-3
    torch.testing.assert_close(out.q_probs[0, 0].double(), torch.from_numpy(p), atol=1e-6, rtol=0)


def test_kernel_sampling_frequencies_match_softmax():
    T = 1.3
    inputs = fixed_row_inputs(LOGITS, 3000, 1, T)
    tokens = mht.markov_head_triton(**inputs, return_q=False, block_v=16).tokens[:, 0]
    p = torch.softmax(LOGITS.double() / T, -1).numpy()
    assert chisquare_p(sample_counts(tokens, 10), p * len(tokens)) > 1e-3


# ---------------------------------------------------------------------------------------------------------- rng
def py_mix32(x):
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * counter_rng.MIX_C1) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * counter_rng.MIX_C2) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_torch_hash_matches_python_integers():
    seeds = [0, 1, -1, 2**32 + 5, -(2**62), 2**63 - 1, 123456789012345]
    keys = counter_rng.row_keys(torch.tensor(seeds), 3)
    for s, key in zip(seeds, keys.tolist()):
        lo, hi = s & 0xFFFFFFFF, (s >> 32) & 0xFFFFFFFF
        h = py_mix32(lo ^ counter_rng.SEED_XOR)
        h = py_mix32(h ^ hi)
        h = py_mix32(h ^ ((3 * counter_rng.POS_MUL + counter_rng.POS_ADD) & 0xFFFFFFFF))
        assert key & 0xFFFFFFFF == h
    block = counter_rng.block_row_keys(torch.tensor(seeds), 5)  # every position at once, as the top-k head uses
    assert torch.equal(block, torch.stack([counter_rng.row_keys(torch.tensor(seeds), k) for k in range(5)]))


def test_triton_noise_matches_torch_noise():
    import triton
    import triton.language as tl

    @triton.jit
    def noise_kernel(seed_ptr, out_ptr, V, POS: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        key = mht.row_key_tl(tl.load(seed_ptr + b), POS)
        tl.store(out_ptr + b * V + offs, mht.gumbel_tl(key, offs), mask=offs < V)

    seeds = torch.tensor([0, 7, -3, 2**40 + 1])
    out = torch.empty(4, 1000)
    noise_kernel[(4,)](seeds, out, 1000, POS=2, BLOCK=1024)
    torch.testing.assert_close(out, counter_rng.gumbel(counter_rng.row_keys(seeds, 2), torch.arange(1000)),
                               atol=1e-6, rtol=1e-6)


def test_noise_is_standard_gumbel():
    g = counter_rng.gumbel(counter_rng.row_keys(torch.arange(64), 0), torch.arange(16384)).double()
    assert abs(g.mean().item() - 0.5772157) < 0.005
    assert abs(g.var().item() - math.pi**2 / 6) < 0.01
    assert torch.isfinite(g).all()


# --------------------------------------------------------------------------------------------- api and errors
def test_auto_and_torch_impls_on_cpu_are_the_reference():
    inputs, conf_w = make_inputs(4, 3, 97, 64)
    ref = markov_head_reference(**inputs, conf_w=conf_w)
    for impl in ("auto", "torch"):
        assert_same_draws(markov_head(**inputs, conf_w=conf_w, impl=impl), ref, q_atol=0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("topk", [0, 5])
def test_empty_batch(impl, topk):
    inputs, conf_w = make_inputs(0, 3, 97, 64)
    out = markov_head(**inputs, topk=topk, conf_w=conf_w, impl=impl)
    assert out.tokens.shape == (0, 3) and out.conf_markov.shape == (0, 3)
    assert (out.q.shape == (0, 3, 97)) if not topk else (out.q_probs.shape == out.q_ids.shape == (0, 3, 5))


def _bad(name, value):
    return pytest.param(name, value, id=f"{name}-{value if isinstance(value, (int, str)) else tuple(value.shape)}")


BAD_ARGS = [
    _bad("base_logits", torch.zeros(2, 97)),
    _bad("base_logits", torch.zeros(2, 3, 97, dtype=torch.int64)),
    _bad("w1", torch.zeros(96, 64)),
    _bad("w2", torch.zeros(97, 32)),
    _bad("anchor", torch.zeros(2, dtype=torch.int32)),
    _bad("anchor", torch.zeros(3, dtype=torch.int64)),
    _bad("temperature", torch.zeros(2, dtype=torch.float64)),
    _bad("seed", torch.zeros(2, 1, dtype=torch.int64)),
    _bad("topk", 98),
    _bad("d2t", torch.zeros(96, dtype=torch.int64)),
    _bad("topk", -1),
    _bad("conf_w", torch.zeros(63)),
    _bad("impl", "cuda"),
]


@pytest.mark.parametrize("name,value", BAD_ARGS)
def test_bad_arguments_are_named(name, value):
    inputs, conf_w = make_inputs(2, 3, 97, 64)
    kwargs = dict(inputs, conf_w=conf_w, topk=0, impl="auto")
    kwargs[name] = value
    with pytest.raises(ValueError, match=rf"\b{name}\b") as err:
        markov_head(**kwargs)
    if isinstance(value, torch.Tensor):
        assert str(list(value.shape)) in str(err.value)  # says what it got


def test_tensors_on_another_device_are_rejected():
    inputs, _ = make_inputs(2, 3, 97, 64)
    with pytest.raises(ValueError, match="w2 is on meta"):
        markov_head(**dict(inputs, w2=inputs["w2"].to("meta")))


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(mht, "kernels_interpreted", lambda: False)
    inputs, _ = make_inputs(2, 3, 97, 64)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        markov_head(**inputs, impl="triton")


# ------------------------------------------------------------------------------------------- compiles for H200
AOT_SCRIPT = textwrap.dedent(
    """
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from vllm_dspark_kernels import markov_head_triton as mh

    def compile_for_h200(fn, types, consts, num_warps):
        sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                   if n not in consts and (types[n].startswith("*") or n.startswith("stride") or n in ("R", "V"))}
        src = ASTSource(fn, sig, constexprs=consts, attrs=aligned)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))

    common = dict(w1_ptr="*bf16", w2_ptr="*bf16", anchor_ptr="*i64", temp_ptr="*fp32", seed_ptr="*i64",
                  conf_w_ptr="*bf16", d2t_ptr="*i64", tokens_ptr="*i64", q_ptr="*fp32", conf_ptr="*fp32",
                  R="i32", V="i32", G="i32", stride_w1="i32", stride_w2="i32")
    compile_for_h200(mh._markov_dense_kernel, dict(common, base_ptr="*bf16", part_f_ptr="*fp32",
                     part_i_ptr="*i32", counter_ptr="*i32", B="i32", chunk="i32", k_begin="i32", k_end="i32",
                     stride_bb="i64", stride_bk="i32"),
                     dict(BLOCK_B=64, BLOCK_V=64, BLOCK_R=256, BLOCK_RK=64, RETURN_Q=True, HAS_CONF=True,
                          HAS_D2T=True, GRID_SYNC=True, DOT_FP32=False), 8)
    compile_for_h200(mh._markov_topk_kernel, dict(common, cand_val_ptr="*bf16", cand_id_ptr="*i64", K="i32"),
                     dict(BLOCK_K=32, BLOCK_R=256, RETURN_Q=True, HAS_CONF=True, HAS_D2T=True), 4)
    print("compiled")
    """
)


def test_kernels_compile_for_h200():
    """The interpreter accepts code the compiler rejects (type mismatches across branches, ...): compile the
    bf16 kernels for sm_90 ahead of time, without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------- benchmark
def test_benchmark_cpu_mode_runs(capsys):
    from vllm_dspark_kernels.bench_markov_head import main

    assert main(["--cpu", "--cpu-batch", "2", "--cpu-vocab", "300", "--rank", "16", "--topk", "8",
                 "--cpu-iters", "1"]) == 0
    assert "top-8 greedy" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_benchmark_gpu_mode_says_no_cuda(capsys):
    from vllm_dspark_kernels.bench_markov_head import main

    assert main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("V", [49152, 20037])  # a multiple of the chunk, and one padded with -inf
def test_chunked_top_candidates_are_the_top_k(V):
    """The CPU two-stage selection (chunk maxima, then the best chunks) returns torch.topk's set, ids ascending."""
    from vllm_dspark_kernels.markov_head import top_candidates

    base = torch.randn(3, 7, V, generator=torch.Generator().manual_seed(V))
    base[0, 0, :64] = 5.0 + torch.arange(64) / 100  # all of the top-k in one chunk
    base[1, 2, ::97] += 4.0  # the top-k spread over many chunks
    vals, ids = top_candidates(base, 32)
    ref_vals, ref_ids = base.topk(32, dim=-1)
    assert torch.equal(ids, ref_ids.sort(dim=-1).values)
    assert torch.equal(vals, base.gather(-1, ids))
    assert torch.equal(ids[0, 0], torch.arange(32, 64))


def test_chunked_top_candidates_with_ties_keep_the_top_values():
    """bf16 logits tie often: the chosen ids may differ from torch.topk's among equal values, never the values."""
    from vllm_dspark_kernels.markov_head import top_candidates

    base = torch.randn(4, 7, 49152, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    vals, ids = top_candidates(base, 32)
    assert torch.equal(vals.sort(dim=-1).values, base.topk(32, dim=-1).values.sort(dim=-1).values)
    assert torch.equal(vals, base.gather(-1, ids))
    assert (ids.diff(dim=-1) > 0).all()
