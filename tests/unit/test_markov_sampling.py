"""The Markov sampling step inside draft_block, against the formula written out by hand (reference/dspark.md §1):

    logits_k = U_k + w2 @ w1[x_{k-1}],  x_0 = anchor,  x_k = argmax(logits_k)       (greedy)
    q_k      = softmax(logits_k / T)   (dense),  the same restricted to the base top-k candidates (top-k)
    c_k      = sigmoid(w_h . h_k + w_e . w1[x_{k-1}] + b)

U_k (base logits) comes from the drafter's block pass; everything after it is recomputed here in float64 from
the weights, one request and one position at a time.
"""
from __future__ import annotations

import pytest
import torch

from test_drafter import run_block, tiny_drafter
from vllm_dspark.context import ContextStore
from vllm_dspark.drafting import draft_block
from vllm_dspark_kernels import counter_rng


pytestmark = pytest.mark.usefixtures("one_torch_thread")


LENGTHS = [3, 11, 1, 6]  # context rows per request
ANCHORS = [5, 17, 99, 0]


def make_case(seed=0, markov_scale=0.5, **cfg):
    """A float32 tiny drafter whose Markov bias is about as large as the base logits (both decide the argmax),
    its context store filled for len(LENGTHS) requests, and the base logits U [B, g, V] of the block pass."""
    m = tiny_drafter(seed, **cfg).float()
    if m.markov_head is not None:
        torch.manual_seed(seed + 1)
        m.markov_head.markov_w2.weight.data = markov_scale * torch.randn_like(m.markov_head.markov_w2.weight)
    torch.manual_seed(seed + 2)
    store = ContextStore(m)
    ids = [f"r{i}" for i in range(len(LENGTHS))]
    store.append([(rid, 0, torch.randn(n, 96)) for rid, n in zip(ids, LENGTHS)])
    g = m.cfg.max_draft_tokens
    h = m.prediction_rows(run_block(m, store, ids, ANCHORS, g))  # [B, g, H]
    U = m.base_logits(h)  # [B, g, V]
    return m, store.gather(ids), h, U, g


def weights(m):
    """w1 [V, r], w2 [V, r] in float64 (zero rank-1 stand-ins for the Markov-less ablation)."""
    if m.markov_head is None:
        return torch.zeros(m.cfg.vocab_size, 1, dtype=torch.float64), torch.zeros(m.cfg.vocab_size, 1,
                                                                                  dtype=torch.float64)
    return m.markov_head.markov_w1.weight.detach().double(), m.markov_head.markov_w2.weight.detach().double()


def logits_by_hand(m, U, b, k, x_prev):
    """logits_k = U_k + w2 @ w1[x_{k-1}]  ->  [V] float64."""
    w1, w2 = weights(m)
    return U[b, k].double() + w2 @ w1[x_prev]


def greedy_chain_by_hand(m, U, topk=0):
    """[B, g] tokens: x_k = argmax over the vocabulary (or over the base top-k of U_k) of logits_k."""
    B, g, _ = U.shape
    tokens = torch.empty(B, g, dtype=torch.int64)
    for b in range(B):
        x = ANCHORS[b]
        for k in range(g):
            logits = logits_by_hand(m, U, b, k, x)
            cand = U[b, k].topk(topk).indices if topk else torch.arange(U.shape[-1])
            if len(cand) > 1:
                best = logits[cand].topk(2).values
                assert best[0] - best[1] > 1e-4, "near-tie: the check would hinge on float rounding"
            x = int(cand[logits[cand].argmax()])
            tokens[b, k] = x
    return tokens


# ------------------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("sample_from_anchor", [True, False])
def test_greedy_dense_tokens_are_the_markov_argmax_chain(sample_from_anchor):
    m, ctx, _, U, g = make_case(sample_from_anchor=sample_from_anchor)
    block = draft_block(m, ctx, torch.tensor(ANCHORS), g)
    expected = greedy_chain_by_hand(m, U)
    assert torch.equal(block.tokens, expected)
    # The check discriminates: both terms decide tokens (neither plain argmax of U nor of the bias alone).
    assert not torch.equal(expected, U.argmax(-1))
    assert not torch.equal(expected, greedy_chain_by_hand(m, torch.zeros_like(U)))


@pytest.mark.parametrize("topk", [1, 2, 4])
def test_greedy_topk_picks_among_the_base_top_k_only(topk):
    m, ctx, _, U, g = make_case()
    block = draft_block(m, ctx, torch.tensor(ANCHORS), g, topk=topk)
    expected = greedy_chain_by_hand(m, U, topk=topk)
    assert torch.equal(block.tokens, expected)
    top = U.topk(topk, dim=-1).indices  # [B, g, topk]
    assert (top == block.tokens[..., None]).any(-1).all()
    if topk == 1:
        assert torch.equal(block.tokens, U.argmax(-1))
    else:  # somewhere the dense chain leaves the base top-k: the truncation matters
        dense = greedy_chain_by_hand(m, U)
        assert not (top == dense[..., None]).any(-1).all()


# ------------------------------------------------------------------------------------------ probabilistic
TEMPS = [0.7, 0.0, 1.3, 1.0]  # one greedy row in the batch


def sampled_block(m, ctx, g, topk):
    seed = torch.tensor([11, 12, 2**40 + 3, 7], dtype=torch.int64)
    block = draft_block(m, ctx, torch.tensor(ANCHORS), g, temperature=torch.tensor(TEMPS), seed=seed, topk=topk,
                        return_q=True)
    return block, seed


def test_dense_q_is_the_softmax_of_the_markov_logits_over_temperature():
    m, ctx, _, U, g = make_case()
    block, seed = sampled_block(m, ctx, g, topk=0)
    assert block.q.shape == (len(ANCHORS), g, m.cfg.vocab_size)
    for b, T in enumerate(TEMPS):
        x = ANCHORS[b]
        for k in range(g):
            logits = logits_by_hand(m, U, b, k, x)  # conditioned on the token actually drawn at k-1
            if T > 0:
                want = torch.softmax(logits / T, dim=-1)
                torch.testing.assert_close(block.q[b, k].double(), want, rtol=1e-5, atol=1e-7)
                # The draw itself: Gumbel-max on the same scores with the request's counter-based noise.
                noise = counter_rng.gumbel(counter_rng.row_keys(seed[b:b + 1], k), torch.arange(U.shape[-1]))[0]
                assert int(block.tokens[b, k]) == int((logits / T + noise.double()).argmax())
            else:
                assert int(block.tokens[b, k]) == int(logits.argmax())
                assert torch.equal(block.q[b, k], torch.nn.functional.one_hot(block.tokens[b, k], U.shape[-1]).float())
            x = int(block.tokens[b, k])
    assert block.q_probs is None and block.q_ids is None


@pytest.mark.parametrize("topk", [4, 16])
def test_topk_q_is_the_truncated_softmax_over_base_candidates(topk):
    m, ctx, _, U, g = make_case()
    block, _ = sampled_block(m, ctx, g, topk=topk)
    V = U.shape[-1]
    assert block.q is None and block.q_probs.shape == block.q_ids.shape == (len(ANCHORS), g, topk)
    for b, T in enumerate(TEMPS):
        x = ANCHORS[b]
        for k in range(g):
            cand = U[b, k].topk(topk).indices
            assert sorted(block.q_ids[b, k].tolist()) == sorted(cand.tolist())
            assert int(block.tokens[b, k]) in cand.tolist()
            logits = logits_by_hand(m, U, b, k, x)
            want = torch.zeros(V, dtype=torch.float64)
            if T > 0:
                want[cand] = torch.softmax(logits[cand] / T, dim=-1)
            else:
                want[int(block.tokens[b, k])] = 1.0
                assert int(block.tokens[b, k]) == int(cand[logits[cand].argmax()])
            got = torch.zeros(V, dtype=torch.float64).index_add_(0, block.q_ids[b, k], block.q_probs[b, k].double())
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
            x = int(block.tokens[b, k])


# -------------------------------------------------------------------------------------------- confidence
@pytest.mark.parametrize("with_markov", [True, False])
def test_confidence_is_sigmoid_of_hidden_and_previous_token_terms(with_markov):
    m, ctx, h, _, g = make_case(confidence_head_with_markov=with_markov)
    block = draft_block(m, ctx, torch.tensor(ANCHORS), g)
    w = m.confidence_head.proj.weight[0].detach().double()
    bias = float(m.confidence_head.proj.bias.detach()[0])
    H = m.cfg.hidden_size
    w_h, w_e = w[:H], w[H:]
    assert w_e.numel() == (m.cfg.markov_rank if with_markov else 0)
    w1, _ = weights(m)
    for b in range(len(ANCHORS)):
        prev = [ANCHORS[b]] + block.tokens[b, :-1].tolist()  # x_{k-1}
        for k in range(g):
            logit = float(w_h @ h[b, k].double()) + bias
            if with_markov:
                logit += float(w_e @ w1[prev[k]])
            want = torch.sigmoid(torch.tensor(logit, dtype=torch.float64))
            assert abs(float(block.confidence[b, k]) - float(want)) < 1e-5, (b, k)


# ---------------------------------------------------------------------------------- Markov-less ablation
@pytest.mark.parametrize("topk", [0, 5])
def test_markov_rank_zero_is_plain_argmax_of_the_base_logits(topk):
    m, ctx, h, U, g = make_case(markov_rank=0)
    assert m.markov_head is None
    block = draft_block(m, ctx, torch.tensor(ANCHORS), g, topk=topk)
    assert torch.equal(block.tokens, U.argmax(-1))
    # Its confidence has no Markov term: sigmoid(w_h . h_k + b).
    proj = m.confidence_head.proj
    want = torch.sigmoid(h.double() @ proj.weight[0].detach().double() + float(proj.bias.detach()[0]))
    torch.testing.assert_close(block.confidence.double(), want, rtol=0, atol=1e-5)


def test_markov_rank_zero_samples_from_the_base_softmax():
    m, ctx, _, U, g = make_case(markov_rank=0)
    block, _ = sampled_block(m, ctx, g, topk=0)
    for b, T in enumerate(TEMPS):
        if T > 0:
            torch.testing.assert_close(block.q[b].double(), torch.softmax(U[b].double() / T, -1), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------- full block, then cut
@pytest.mark.parametrize("sample_from_anchor", [True, False])
def test_full_block_then_cut_drafts_the_first_g_tokens_of_the_full_block(sample_from_anchor):
    m, ctx, _, _, K = make_case(sample_from_anchor=sample_from_anchor)
    seed = torch.tensor([11, 12, 2**40 + 3, 7], dtype=torch.int64)
    kw = dict(temperature=torch.tensor(TEMPS), seed=seed, topk=4, return_q=True)
    full = draft_block(m, ctx, torch.tensor(ANCHORS), K, **kw)
    short_differs = False
    for g in range(1, K):
        cut = draft_block(m, ctx, torch.tensor(ANCHORS), g, block_drafts=K, **kw)
        assert torch.equal(cut.tokens, full.tokens[:, :g])
        # float32 rounding only: the LM head runs on g rows instead of K
        torch.testing.assert_close(cut.q_probs, full.q_probs[:, :g], rtol=0, atol=1e-6)
        torch.testing.assert_close(cut.confidence_logit, full.confidence_logit[:, :g], rtol=0, atol=1e-5)
        # A block of g slots is another computation (non-causal attention inside the block).
        short = draft_block(m, ctx, torch.tensor(ANCHORS), g, **kw)
        short_differs |= not torch.allclose(short.confidence_logit, full.confidence_logit[:, :g])
    assert short_differs


# ------------------------------------------------------------------------------------------------- splice
def test_splice_continues_the_markov_chain_from_the_given_tokens():
    """prefix (a splice): request b's first m_b drafts are given; the chain goes on from its last given token over
    the backbone rows m_b.. (logits_{m+j} = U_{m+j} + w2 w1[x_{m+j-1}]), the given positions have q one-hot and a
    confidence logit of +30, and requests without a prefix draft as before."""
    m, ctx, h, U, g = make_case()
    prefix = [[7, 3], [], [1], [4, 4, 4]]
    seed = torch.tensor([11, 12, 13, 7], dtype=torch.int64)
    block = draft_block(m, ctx, torch.tensor(ANCHORS), g, prefix=prefix, return_q=True, seed=seed)
    plain = draft_block(m, ctx, torch.tensor(ANCHORS), g)
    w = m.confidence_head.proj.weight[0].detach().double()
    bias, H = float(m.confidence_head.proj.bias.detach()[0]), m.cfg.hidden_size
    w1, _ = weights(m)
    for b, given in enumerate(prefix):
        assert block.tokens[b, :len(given)].tolist() == given
        x = given[-1] if given else ANCHORS[b]
        for k in range(len(given), g):
            want = int(logits_by_hand(m, U, b, k, x).argmax())
            assert int(block.tokens[b, k]) == want, (b, k)
            logit = float(w_h_dot(w[:H], h[b, k])) + bias + float(w[H:] @ w1[x])
            assert abs(float(block.confidence_logit[b, k]) - logit) < 1e-4, (b, k)
            x = want
        assert torch.all(block.confidence_logit[b, :len(given)] == 30.0)
        q = block.dense_q(m.cfg.vocab_size)[b]
        for k, t in enumerate(given):
            assert float(q[k, t]) == 1.0 and float(q[k].sum()) == 1.0
    assert torch.equal(block.tokens[1], plain.tokens[1])  # no prefix: unchanged
    # the given tokens steer the chain: somewhere it differs from the drafter's own after the same positions
    assert any(not torch.equal(block.tokens[b, len(p):], plain.tokens[b, len(p):]) for b, p in enumerate(prefix) if p)
    with pytest.raises(ValueError, match=r"prefix lengths \[4, 0, 0, 0\]: expected < num_drafts=4"):
        draft_block(m, ctx, torch.tensor(ANCHORS), 4, prefix=[[1, 2, 3, 4], [], [], []])


def w_h_dot(w_h, h_row):
    return w_h @ h_row.double()
