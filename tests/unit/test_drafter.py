"""The drafter forward against an independent naive reference; batching and incremental context."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vllm_dspark.config import DSparkConfig
from vllm_dspark.context import ContextGapError, ContextStore
from vllm_dspark.model.drafter import DSparkDrafter
from vllm_dspark.checkpoint import init_weights


def tiny_cfg(**kw) -> DSparkConfig:
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=96, vocab_size=101, rms_norm_eps=1e-6, rope_theta=10000.0, block_size=5,
                mask_token_id=100, target_layer_ids=[1, 3], num_target_layers=6, target_hidden_size=48,
                markov_rank=8)
    base.update(kw)
    return DSparkConfig(**base)


def tiny_drafter(seed=0, **kw) -> DSparkDrafter:
    torch.manual_seed(seed)
    m = DSparkDrafter(tiny_cfg(**kw))
    init_weights(m, std=0.2)
    for p in m.parameters():  # exercise every weight, norms and frozen copies included
        p.data.add_(0.05 * torch.randn_like(p))
    return m.double().eval()


# ------------------------------------------------------------------ naive reference
def _rms(x, w, eps):
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _rope(x, pos, theta):
    d = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(d // 2):
        f = pos / theta ** (2 * i / d)
        c, s = math.cos(f), math.sin(f)
        out[..., i] = x[..., i] * c - x[..., i + d // 2] * s
        out[..., i + d // 2] = x[..., i + d // 2] * c + x[..., i] * s
    return out


def naive_block(m: DSparkDrafter, features, query_ids, anchor_pos):
    """One request: features [n, L*Ht] at positions 0..n-1; queries at anchor_pos.. Loops everywhere."""
    cfg, sd = m.cfg, {k: v.double() for k, v in m.state_dict().items()}
    H, nh, kvh, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    ctx = _rms(features.double() @ sd["fc.weight"].T, sd["hidden_norm.weight"], cfg.rms_norm_eps)
    x = sd["embed_tokens.weight"][query_ids]
    Q = len(query_ids)
    for li in range(cfg.num_hidden_layers):
        p = lambda n: sd[f"layers.{li}.{n}"]
        xn = _rms(x, p("input_layernorm.weight"), cfg.rms_norm_eps)
        keys, vals = [], []
        for j in range(ctx.shape[0]):  # context rows: k_proj/v_proj of the projected context, no input norm
            k = (ctx[j] @ p("self_attn.k_proj.weight").T).view(kvh, d)
            k = torch.stack([_rope(_rms(k[h], p("self_attn.k_norm.weight"), cfg.rms_norm_eps), j, cfg.rope_theta)
                             for h in range(kvh)])
            keys.append(k)
            vals.append((ctx[j] @ p("self_attn.v_proj.weight").T).view(kvh, d))
        for i in range(Q):
            pos = anchor_pos + i
            k = (xn[i] @ p("self_attn.k_proj.weight").T).view(kvh, d)
            keys.append(torch.stack([_rope(_rms(k[h], p("self_attn.k_norm.weight"), cfg.rms_norm_eps), pos,
                                           cfg.rope_theta) for h in range(kvh)]))
            vals.append((xn[i] @ p("self_attn.v_proj.weight").T).view(kvh, d))
        attn_out = torch.zeros(Q, nh * d, dtype=torch.float64)
        for i in range(Q):
            q = (xn[i] @ p("self_attn.q_proj.weight").T).view(nh, d)
            for h in range(nh):
                qh = _rope(_rms(q[h], p("self_attn.q_norm.weight"), cfg.rms_norm_eps), anchor_pos + i, cfg.rope_theta)
                g = h // (nh // kvh)
                scores = torch.stack([qh @ kk[g] for kk in keys]) / math.sqrt(d)  # all ctx + whole block
                w = torch.softmax(scores, 0)
                attn_out[i, h * d:(h + 1) * d] = sum(w[t] * vals[t][g] for t in range(len(keys)))
        x = x + attn_out @ p("self_attn.o_proj.weight").T
        xn = _rms(x, p("post_attention_layernorm.weight"), cfg.rms_norm_eps)
        act = torch.nn.functional.silu(xn @ p("mlp.gate_proj.weight").T) * (xn @ p("mlp.up_proj.weight").T)
        x = x + act @ p("mlp.down_proj.weight").T
    return _rms(x, sd["norm.weight"], cfg.rms_norm_eps)


def run_block(m, store, req_ids, anchors, num_drafts):
    from vllm_dspark.model.drafter import block_attention_mask

    ctx = store.gather(req_ids)
    qids = m.query_ids(torch.tensor(anchors), num_drafts)
    qpos = ctx.lengths[:, None] + torch.arange(qids.shape[1])[None]
    mask = block_attention_mask(ctx.lengths, ctx.k.shape[1], qids.shape[1])
    with torch.no_grad():
        return m.block_hidden(qids, qpos, ctx.k, ctx.v, mask)


@pytest.mark.parametrize("sample_from_anchor", [True, False])
def test_block_forward_matches_naive_reference(sample_from_anchor):
    m = tiny_drafter(sample_from_anchor=sample_from_anchor)
    torch.manual_seed(1)
    n = 9
    feats = torch.randn(n, 2 * 48, dtype=torch.float64)
    store = ContextStore(m)
    store.append([("r", 0, feats)])
    h = run_block(m, store, ["r"], [7], 4)[0]
    qids = m.query_ids(torch.tensor([7]), 4)[0]
    ref = naive_block(m, feats, qids, anchor_pos=n)
    assert h.shape == ref.shape == (4 + m.queries_per_draft, 64)
    torch.testing.assert_close(h, ref, atol=1e-9, rtol=1e-9)


def test_batched_equals_one_by_one_with_different_context_lengths():
    m = tiny_drafter()
    torch.manual_seed(2)
    lengths = [3, 11, 1, 6]
    store = ContextStore(m, initial_slots=2, initial_capacity=4)  # forces slot and capacity growth
    feats = {f"r{i}": torch.randn(n, 96, dtype=torch.float64) for i, n in enumerate(lengths)}
    store.append([(rid, 0, f) for rid, f in feats.items()])
    anchors = [5, 17, 99, 0]
    batched = run_block(m, store, list(feats), anchors, 5)
    for i, rid in enumerate(feats):
        alone = ContextStore(m)
        alone.append([(rid, 0, feats[rid])])
        single = run_block(m, alone, [rid], [anchors[i]], 5)
        torch.testing.assert_close(batched[i], single[0], atol=1e-10, rtol=1e-10)


def test_incremental_context_equals_full_recompute():
    m = tiny_drafter()
    torch.manual_seed(3)
    feats = torch.randn(20, 96, dtype=torch.float64)
    full, inc = ContextStore(m), ContextStore(m, initial_capacity=2)
    full.append([("r", 0, feats)])
    for start, stop in [(0, 7), (7, 8), (8, 15), (15, 20)]:  # prefill chunk, decode steps, accepted runs
        inc.append([("r", start, feats[start:stop])])
    a, b = full.gather(["r"]), inc.gather(["r"])
    assert int(b.lengths[0]) == 20
    torch.testing.assert_close(a.k, b.k, atol=1e-12, rtol=0)  # only matmul blocking differs
    torch.testing.assert_close(a.v, b.v, atol=1e-12, rtol=0)
    # Old positions are never recomputed: the projection only sees the new rows.
    calls = []
    orig = m.context_kv
    m.context_kv = lambda f, p: (calls.append(f.shape[0]), orig(f, p))[1]
    inc.append([("r", 20, torch.randn(3, 96, dtype=torch.float64))])
    assert calls == [3]


def test_context_gap_is_refused_and_free_releases_slot():
    m = tiny_drafter()
    store = ContextStore(m)
    store.append([("r", 0, torch.randn(4, 96, dtype=torch.float64))])
    with pytest.raises(ContextGapError, match="rows start at position 6 but its drafter context ends at 4"):
        store.append([("r", 6, torch.randn(2, 96, dtype=torch.float64))])
    assert store.length("r") == 4
    store.free("r")
    assert len(store) == 0 and store.length("r") == 0


def test_deferred_rows_project_once_in_order_and_equal_immediate_ones():
    from vllm_dspark.context import PrefixCache, RawBlock

    m = tiny_drafter()
    torch.manual_seed(4)
    feats = {r: torch.randn(24, 96, dtype=torch.float64) for r in ("a", "b", "gone")}
    now, later = ContextStore(m), ContextStore(m, initial_capacity=2, initial_slots=1)
    calls = []
    orig = m.context_kv
    m.context_kv = lambda f, p: (calls.append(f.shape[0]), orig(f, p))[1]
    steps = [(0, 8), (8, 9), (9, 12), (10, 16), (16, 24)]  # (10, 16) re-delivers rows 10-11 (recompute)
    for start, stop in steps:
        now.append([(r, start, feats[r][start:stop]) for r in feats])
        later.append([(r, start, feats[r][start:stop]) for r in feats], defer=True)
        assert later.length("a") == now.length("a") == stop  # lengths count deferred rows at once
    assert len(calls) == len(steps)  # only the immediate store projected so far
    with pytest.raises(ContextGapError, match="rows start at position 30 but its drafter context ends at 24"):
        later.append([("a", 30, feats["a"][:2])], defer=True)
    later.free("gone")  # its deferred rows are dropped, never projected
    calls.clear()
    later.gather(["a"])
    assert calls == [24 + 2]  # only the gathered request's rows (2 re-sent); b's stay deferred
    assert set(later._pending) == {"b"}  # the freed request's rows are gone too
    step = feats["b"][:4]  # a view of a bigger tensor, as the runner's per-step features are
    other = ContextStore(m)
    other.append([("x", 0, step)], defer=True)  # a deferred copy: the step's whole tensor is not kept alive
    assert other._pending["x"][0][1].untyped_storage().data_ptr() != step.untyped_storage().data_ptr()
    a, b = now.gather(["a", "b"]), later.gather(["a", "b"])
    assert calls == [24 + 2, 24 + 2]  # now b's, in one projection
    torch.testing.assert_close(a.k, b.k, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.v, b.v, atol=1e-12, rtol=0)
    later.gather(["a", "b"])
    assert len(calls) == 2  # nothing left to project

    # Blocks completed while their rows are deferred are offered at once, raw: nothing is projected until a request
    # takes them (then all it takes in one call), and the runner's token buffer is not kept.
    calls.clear()
    store = ContextStore(m, prefix_cache=PrefixCache(block_size=8, max_bytes=2**20))
    tokens = np.arange(100, 124)
    store.append([("p", 0, feats["a"][:20])], defer=True)
    view = tokens[:20].copy()
    store.publish_blocks("p", view)
    view[:] = -1  # the runner reuses its token buffer
    assert [type(e) for e in store.prefix_cache.blocks.values()] == [RawBlock, RawBlock] and not calls
    store.publish_blocks("p", tokens[:20])  # no block completed since: nothing offered again
    assert len(store.prefix_cache.blocks) == 2 and not calls
    store.free("p")  # ends before drafting read its rows: they are never projected
    assert not calls and not store._pending
    assert store.fill_from_prefix_cache("r", tokens[:16]) == 16
    assert calls == [16]  # both raw blocks, one projection
    torch.testing.assert_close(store.gather(["r"]).k[0, :16], b.k[0, :16], atol=1e-12, rtol=0)
    torch.testing.assert_close(store.gather(["r"]).v[0, :16], b.v[0, :16], atol=1e-12, rtol=0)
    calls.clear()
    assert store.fill_from_prefix_cache("r2", tokens[:16]) == 16 and not calls  # projected once, kept so

    # A live request's deferred rows stay deferred when another request takes its blocks (no global flush).
    store = ContextStore(m, prefix_cache=PrefixCache(block_size=8, max_bytes=2**20))
    store.append([("p", 0, feats["a"][:20])], defer=True)
    store.publish_blocks("p", tokens[:20])
    calls.clear()
    assert store.fill_from_prefix_cache("q", tokens[:8]) == 8 and calls == [8]
    assert list(store._pending) == ["p"]
    torch.testing.assert_close(store.gather(["p"]).k[0, :20], b.k[0, :20], atol=1e-12, rtol=0)

    # Projected, mixed and raw blocks: drafting read rows 0-9 before block 0 was offered; block 1 completes with
    # rows 10-15 deferred, one re-delivered (10-12 again, as after a recompute).
    store = ContextStore(m, prefix_cache=PrefixCache(block_size=8, max_bytes=2**20))
    for start, stop in ((0, 10), (10, 13), (11, 20)):
        store.append([("p", start, feats["a"][start:stop])], defer=True)
        if stop == 10:
            store.gather(["p"])  # projects 0-9
        store.publish_blocks("p", tokens[:stop])
    calls.clear()
    store.free("p")
    first, mixed = store.prefix_cache.blocks.values()
    assert isinstance(first, tuple) and isinstance(mixed, RawBlock)
    assert mixed.k.shape[0] == 2 and mixed.feats.shape[0] == 6 and mixed.start == 10
    assert store.fill_from_prefix_cache("r", tokens[:16]) == 16 and calls == [6]
    torch.testing.assert_close(store.gather(["r"]).k[0, :16], b.k[0, :16], atol=1e-12, rtol=0)

    # The cache keeps at most max_bytes, least recently used blocks first out.
    one = 8 * 96 * 8  # bytes of a raw block of 8 float64 rows of 96 features, nothing projected
    store = ContextStore(m, prefix_cache=PrefixCache(block_size=8, max_bytes=2 * one))
    store.append([("p", 0, feats["a"][:24])], defer=True)
    store.publish_blocks("p", tokens[:24])
    assert store.prefix_cache.nbytes == 2 * one and len(store.prefix_cache.blocks) == 2
    assert store.fill_from_prefix_cache("r", tokens[:24]) == 0  # block 0 was evicted: nothing to take
    m.context_kv = orig


def test_deferred_rows_beyond_the_memory_cap_are_projected_at_once():
    m = tiny_drafter()
    store = ContextStore(m)
    store.MAX_PENDING_BYTES = 10 * 96 * 8  # ten float64 rows of 96 features
    rows = torch.randn(12, 96, dtype=torch.float64)
    store.append([("a", 0, rows[:6]), ("b", 0, rows[:4])], defer=True)
    assert store._pending_rows == 10  # at the cap: kept
    store.append([("a", 6, rows[6:7])], defer=True)
    assert store._pending_rows == 0 and store.length("a") == 7 and store.length("b") == 4
    torch.testing.assert_close(store.k[store.slots["a"], :7], m.context_kv(rows[:7], torch.arange(7))[0])


def test_deferred_rows_count_what_reading_a_request_would_project():
    store = ContextStore(tiny_drafter())
    rows = torch.randn(10, 96, dtype=torch.float64)
    store.append([("a", 0, rows[:6]), ("b", 0, rows[:2])], defer=True)
    store.append([("a", 6, rows[6:7])], defer=True)
    assert (store.deferred_rows("a"), store.deferred_rows("b"), store.deferred_rows("c")) == (7, 2, 0)
    store.gather(["a"])
    assert (store.deferred_rows("a"), store.deferred_rows("b")) == (0, 2)


def test_inference_head_copy_in_bfloat16_matches_the_lm_head_to_bfloat16_precision():
    d = tiny_drafter().eval()
    h = torch.randn(2, 3, d.cfg.hidden_size, dtype=d.lm_head.weight.dtype)
    exact = d.base_logits(h)
    d.set_head_dtype(torch.float32)  # transposed copy, same precision
    assert torch.allclose(d.base_logits(h), exact, atol=1e-5)
    d.set_head_dtype(torch.bfloat16)
    fast = d.base_logits(h)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    err = (fast - exact).abs().max().item()
    assert 0 < err < 0.02 * exact.abs().max().item()  # bfloat16 rounding, not a different head
    d.set_head_dtype(None)
    assert torch.equal(d.base_logits(h), exact)
    # The plugin releases lm_head's own weight once the copy exists: same logits, no float32 head left.
    d.set_head_dtype(torch.bfloat16, release=True)
    assert d.lm_head.weight.numel() == 0 and torch.equal(d.base_logits(h), fast)
    d.set_head_dtype(torch.float32)  # derived from the bfloat16 copy now: bfloat16 weights, float32 rows
    assert 0 < (d.base_logits(h) - exact).abs().max().item() <= err
    with pytest.raises(RuntimeError, match=r"set_head_dtype\(None\): lm_head's weight was released"):
        d.set_head_dtype(None)
