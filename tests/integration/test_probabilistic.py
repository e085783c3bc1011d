"""Speculative sampling at T=1 with DSpark drafts in a real vLLM CPU engine (in-process, no mocks of vLLM).

- The output distribution is the target's: N seeded requests of one fixed prompt, with DSpark (K=3, drafts
  sampled at the request's temperature, q handed to vLLM's rejection sampler) against a plain engine
  (chi-square two-sample test per output position) and against the exact target probabilities from HF
  transformers (chi-square goodness of fit at positions 1 and 2).
- The same check has power: with a q that does not match the distribution the drafts were sampled from (a
  flattened q reported), it fails by many orders of magnitude.
- vLLM honours q: the first round's acceptance at draft position 1 matches sum_x min(p, q) computed offline
  (and not sum_x p q, what one-hot treatment of sampled drafts would give).
- Probabilistic drafts accept clearly more than greedy drafts at T=1.

Precondition checked first in each test: vLLM 0.32's CPU fallback for the rejection sampler's expand kernel
returns uninitialised memory for float inputs (vllm-project/vllm#55005), so at T > 0 every speculative step
divides the target's logits by garbage temperatures; the plugin has to patch it (see
``_check_sampler_temperature_expansion``).

Target: the smooth tiny Llama (``build_smooth_llama``) with its LM head x4, so that T=1 distributions have
perplexity ~10-16 instead of ~360 (a near-uniform p over 512 tokens leaves the chi-square bins empty and the
top-k truncated q with little to accept). Drafter: 1 layer, markov rank 16, block 4, trained here for 200 steps
on the target's own T=1 samples (1 - TV ~0.27 per position on held-out prompts).
"""
from __future__ import annotations

import gc
import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm

K = 3  # num_speculative_tokens
N = 2000  # seeded requests per engine run
MAX_TOKENS = 4  # output positions 1..4: position 1 comes from prefill, 2..4 through the rejection sampler
ALPHA = 1e-3  # significance level of every chi-square test
LOGIT_SCALE = 4.0
PROMPT = "the water was good and the day was long"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sharp_target(tmp_path_factory):
    """(folder, in-memory HF model, tokenizer) of the smooth tiny Llama with a x4 LM head."""
    from tiny_models import build_smooth_llama, build_tiny_tokenizer

    out = tmp_path_factory.mktemp("sharp-llama")
    model = build_smooth_llama(logit_scale=LOGIT_SCALE)
    model.save_pretrained(out)
    tokenizer = build_tiny_tokenizer(out)
    return out, model, tokenizer


@pytest.fixture(scope="module")
def trained_drafter(sharp_target, tmp_path_factory) -> Path:
    """A 1-layer drafter distilled from the target's own T=1 answers (~20 s of one CPU thread)."""
    from tiny_models import own_answers, train_in_memory

    from vllm_dspark.checkpoint import save_drafter
    from vllm_dspark.train import trainer
    from vllm_dspark.train.features import TargetFeatures

    _, model, tokenizer = sharp_target
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = own_answers(model, tokenizer, 128, seed=0, new_tokens=32, temperature=1.0)
        drafter = trainer.new_drafter(model, model.config.to_dict(), seed=0, num_layers=1, markov_rank=16,
                                      block_size=4, num_target_layer_ids=2)
        target = TargetFeatures(model, drafter.cfg.target_layer_ids)
        stats = train_in_memory(drafter, target, data, steps=200)
    finally:
        torch.set_num_threads(threads)
    print(f"drafter trained: 1 - TV per position on the last batch {[round(a, 3) for a in stats.acceptance()]}")
    return save_drafter(drafter.eval(), tmp_path_factory.mktemp("drafter"))


@pytest.fixture
def engine_env(vllm_env, monkeypatch):
    """vllm_env plus stable internal request ids (the proposer seeds its draft sampling from them, so the
    samples, and the p-values below, are the same on every run)."""
    import vllm.envs

    vllm.envs.disable_envs_cache()  # an in-process engine freezes the environment it saw (and ours would too)
    monkeypatch.setenv("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "1")
    yield vllm_env
    vllm.envs.disable_envs_cache()


# ----------------------------------------------------------------------------- engine helpers
def _llm(target: Path, drafter: Path | None = None, **settings):
    from vllm import LLM

    from vllm_dspark.integration.proposer import DSparkSettings

    # Seeded requests and chunked prefill crash vLLM 0.32 on CPU (a discarded partial-prefill sample rewinds the
    # request's torch.Generator with set_offset, which CPU generators do not support): prefill whole prompts.
    args = dict(enforce_eager=True, dtype="float32", max_model_len=256, seed=0, block_size=32,
                enable_prefix_caching=False, enable_chunked_prefill=False)
    if drafter is not None:
        dspark = {"drafter": str(drafter), "record": True}
        if "mode" in {f.name for f in fields(DSparkSettings)}:
            dspark["mode"] = "fixed"  # always K drafts: the tests count per-position outcomes
        dspark.update(settings)
        args.update(speculative_config={"method": "custom_class", "model": "vllm_dspark.DSparkProposer",
                                        "num_speculative_tokens": K},
                    additional_config={"dspark": dspark}, disable_log_stats=False)
    return LLM(str(target), **args)


def _proposer(llm):
    from vllm_dspark.integration.compat import proposer_of

    prop = proposer_of(llm)
    assert prop is not None, "the engine must run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)"
    return prop


def _sample(llm, prompt_ids: list[int], seeds, max_tokens: int = MAX_TOKENS) -> tuple[list[str], np.ndarray]:
    """-> (request ids, tokens [n, max_tokens]) for one seeded T=1 request per seed."""
    from vllm import SamplingParams

    params = [SamplingParams(seed=int(s), temperature=1.0, max_tokens=max_tokens, ignore_eos=True) for s in seeds]
    outs = llm.generate([{"prompt_token_ids": prompt_ids}] * len(params), params, use_tqdm=False)
    toks = [list(o.outputs[0].token_ids) for o in outs]
    assert all(len(t) == max_tokens for t in toks)
    return [o.request_id for o in outs], np.array(toks)


def _spec_counters(llm) -> dict:
    return {m.name: getattr(m, "values", None) or getattr(m, "value", None)
            for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode")}


def _check_sampler_temperature_expansion() -> None:
    """vLLM 0.32's CPU fallback for the rejection sampler's ``expand_kernel`` casts its float output buffer to
    int64 and never copies it back (vllm-project/vllm#55005): target logits of draft positions are divided by
    uninitialised memory, so every T > 0 speculative step samples from garbage. The plugin must work around it;
    call after an engine is built in this process."""
    from vllm.v1.sample import rejection_sampler

    temps = torch.tensor([0.7, 1.0, 0.0, 2.5])
    cu = torch.tensor([3, 6, 9, 12], dtype=torch.int32)
    got = rejection_sampler.expand_batch_to_tokens(temps, cu, 12, replace_from=0, replace_to=1)
    want = torch.tensor([0.7, 1.0, 1.0, 2.5]).repeat_interleave(3)
    assert torch.equal(got, want), (
        f"vLLM's rejection sampler expands per-request temperatures [0.7, 1, 0, 2.5] to {got.tolist()} on this "
        "platform (vllm-project/vllm#55005): speculative sampling at T > 0 is not lossless until it is patched")


# ----------------------------------------------------------------------------- statistics
def _merge_small(expected: np.ndarray, *observed: np.ndarray, min_expected: float = 5.0):
    """Keep categories whose expected count is >= min_expected; pool the rest into one bin (folded into the
    smallest kept bin if the pool itself is too small). Returns (expected, *observed) over the new bins."""
    keep = expected >= min_expected
    rest = ~keep
    cols = [np.concatenate([a[keep], [a[rest].sum()]]) for a in (expected, *observed)]
    if cols[0][-1] < min_expected:
        j = int(np.argmin(cols[0][:-1]))
        for c in cols:
            c[j] += c[-1]
        cols = [c[:-1] for c in cols]
    return cols


def gof_pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit of sampled tokens to exact probabilities (bins with expected < 5 merged)."""
    from scipy.stats import chisquare

    observed = np.bincount(tokens, minlength=len(probs)).astype(np.float64)
    expected = probs.astype(np.float64) / probs.sum() * len(tokens)
    exp_m, obs_m = _merge_small(expected, observed)
    return float(chisquare(obs_m, exp_m * obs_m.sum() / exp_m.sum()).pvalue)


def two_sample_pvalue(a: np.ndarray, b: np.ndarray, vocab: int) -> float:
    """Chi-square test that two token samples come from one distribution (2 x bins contingency table; bins
    whose expected count in the smaller sample is < 5 merged)."""
    from scipy.stats import chi2_contingency

    ca = np.bincount(a, minlength=vocab).astype(np.float64)
    cb = np.bincount(b, minlength=vocab).astype(np.float64)
    expected_small = (ca + cb) * min(len(a), len(b)) / (len(a) + len(b))
    _, ma, mb = _merge_small(expected_small, ca, cb)
    return float(chi2_contingency(np.stack([ma, mb]), correction=False).pvalue)


# ----------------------------------------------------------------------------- exact target / drafter maths
@torch.no_grad()
def exact_distributions(model, prompt_ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> p1 [V] (first output token), P [V, V] (P[t] = p(second | first = t)), p2 [V] (second, marginal)."""
    p1 = torch.softmax(model(torch.tensor([prompt_ids])).logits[0, -1].double(), -1)
    vocab = p1.shape[0]
    seqs = torch.cat([torch.tensor([prompt_ids]).expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
    P = torch.cat([torch.softmax(model(chunk).logits[:, -1].double(), -1) for chunk in seqs.split(128)])
    return p1.numpy(), P.numpy(), (p1 @ P).numpy()


@torch.no_grad()
def first_draft_q(drafter_dir: Path, target_dir: Path, model, prompt_ids: list[int]) -> np.ndarray:
    """Q [V, V]: Q[t] = the drafter's q for draft position 1 when the anchor (first output token) is t, as the
    proposer computes it (prompt context from the target's hidden states, K-token block, T=1, top-k 32)."""
    from vllm_dspark.checkpoint import load_drafter
    from vllm_dspark.context import ContextStore
    from vllm_dspark.drafting import draft_block
    from vllm_dspark.integration.proposer import DSparkSettings

    drafter = load_drafter(drafter_dir, target_dir)
    hs = model(torch.tensor([prompt_ids]), output_hidden_states=True).hidden_states
    store = ContextStore(drafter)
    store.append([("prompt", 0, torch.cat([hs[i + 1][0] for i in drafter.cfg.target_layer_ids], -1))])
    vocab = drafter.cfg.vocab_size
    block = draft_block(drafter, store.gather(["prompt"] * vocab), torch.arange(vocab), K,
                        temperature=torch.ones(vocab), seed=torch.zeros(vocab, dtype=torch.int64),
                        topk=DSparkSettings.topk, return_q=True)
    if block.q is not None:
        return block.q[:, 0].double().numpy()
    q = torch.zeros(vocab, vocab, dtype=torch.float64)
    return q.scatter_(1, block.q_ids[:, 0], block.q_probs[:, 0].double()).numpy()


def first_round_accepted(prop, req_ids: list[str]) -> np.ndarray:
    """Per request (in req_ids order): drafts accepted in its first verification round (drafted right after
    prefill, anchored on the first output token, with the prompt as context)."""
    first: dict[str, int] = {}
    for req_id, drafted, accepted, _, _ in prop.stats.round_log:
        if req_id not in first:
            assert drafted == K, (req_id, drafted)
            first[req_id] = accepted
    assert set(req_ids) <= set(first), "every request must have drafted right after its prefill"
    return np.array([first[r] for r in req_ids])


# ----------------------------------------------------------------------------- tests
def test_t1_output_distribution_is_the_targets_and_a_mismatched_q_is_caught(engine_env, sharp_target,
                                                                             trained_drafter):
    target_dir, model, tokenizer = sharp_target
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True,
                                               add_generation_prompt=True)["input_ids"]
    vocab = model.config.vocab_size
    p1, P, p2 = exact_distributions(model, prompt_ids)

    base_llm = _llm(target_dir)
    _, base = _sample(base_llm, prompt_ids, range(N, 2 * N))
    del base_llm
    gc.collect()

    llm = _llm(target_dir, trained_drafter)
    _check_sampler_temperature_expansion()
    prop = _proposer(llm)
    assert prop.settings.probabilistic
    ids, honest = _sample(llm, prompt_ids, range(N))
    accepted = first_round_accepted(prop, ids)
    rounds_honest = prop.stats.num_rounds

    # The biased variant: drafts still sampled from q, but the sampler is told a flattened q' (uniform over the
    # same top-k support, i.e. q at infinite temperature). Accepting with min(1, p/q') and resampling from
    # (p - q')+ then no longer reproduces p: offline, the second token's marginal moves by TV ~0.11 (q told at
    # T=2 instead of T=1 moves it by only ~0.05, which N=2000 cannot reliably detect).
    true_take = prop.take_draft_probs

    def take_flattened():
        out = true_take()
        if out is None:
            return None
        q, req_ids = out
        flat = (q > 0).float()
        return flat / flat.sum(-1, keepdim=True), req_ids

    prop.take_draft_probs = take_flattened
    try:
        _, biased = _sample(llm, prompt_ids, range(2 * N, 3 * N))
    finally:
        del prop.take_draft_probs  # back to the class method
    assert prop.stats.num_rounds > rounds_honest
    del llm, prop
    gc.collect()

    pv = {"honest": {}, "biased": {}}
    for name, sample in (("honest", honest), ("biased", biased)):
        pv[name]["gof1"] = gof_pvalue(sample[:, 0], p1)
        pv[name]["gof2"] = gof_pvalue(sample[:, 1], p2)
        for pos in range(MAX_TOKENS):
            pv[name][f"vs_plain{pos + 1}"] = two_sample_pvalue(sample[:, pos], base[:, pos], vocab)
    pv["plain"] = {"gof1": gof_pvalue(base[:, 0], p1), "gof2": gof_pvalue(base[:, 1], p2)}

    # vLLM uses the q we hand over: position-1 acceptance of each request's first round is sum_x min(p, q)
    # for its anchor (one-hot treatment of the same sampled drafts would give sum_x p q).
    Q = first_draft_q(trained_drafter, target_dir, model, prompt_ids)
    t1 = honest[:, 0]
    a_spec = np.minimum(P, Q).sum(1)[t1]  # per request, given its first token
    a_onehot = (P * Q).sum(1)[t1]
    observed = float((accepted >= 1).mean())
    z = (observed - a_spec.mean()) / (np.sqrt((a_spec * (1 - a_spec)).sum()) / len(a_spec))
    print(f"p-values {json.dumps({k: {kk: float(f'{vv:.3g}') for kk, vv in v.items()} for k, v in pv.items()})}")
    print(f"first-round position-1 acceptance: observed {observed:.4f}, sum min(p,q) {a_spec.mean():.4f} "
          f"(z={z:.2f}), one-hot sum p*q {a_onehot.mean():.4f}")

    assert pv["plain"]["gof1"] > ALPHA and pv["plain"]["gof2"] > ALPHA, pv["plain"]  # the test itself is sound
    assert all(v > ALPHA for v in pv["honest"].values()), pv["honest"]
    # Position 1 is sampled at prefill, before any draft: the bias only shows from position 2 on.
    assert pv["biased"]["gof1"] > ALPHA, pv["biased"]
    assert pv["biased"]["gof2"] < ALPHA * 1e-6, pv["biased"]  # observed ~3e-16
    assert all(pv["biased"][f"vs_plain{pos}"] < ALPHA for pos in range(2, MAX_TOKENS + 1)), pv["biased"]
    assert abs(z) < 4, (observed, a_spec.mean())
    assert observed > a_onehot.mean() + 0.1


def test_probabilistic_drafts_accept_more_than_greedy_drafts(engine_env, sharp_target, trained_drafter):
    import random

    from tiny_models import _WORDS
    from vllm import SamplingParams

    target_dir, _, tokenizer = sharp_target
    rng = random.Random(7)
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": " ".join(rng.choices(_WORDS, k=rng.randint(3, 8)))}],
        tokenize=True, add_generation_prompt=True)["input_ids"] for _ in range(64)]
    llm = _llm(target_dir, trained_drafter)
    _check_sampler_temperature_expansion()
    prop = _proposer(llm)

    def run() -> dict:
        before = (prop.stats.num_rounds, list(prop.stats.accepted_at), _spec_counters(llm))
        params = [SamplingParams(seed=1000 + i, temperature=1.0, max_tokens=32, ignore_eos=True)
                  for i in range(len(prompts))]
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        rounds = prop.stats.num_rounds - before[0]
        acc = [a - (before[1][k] if k < len(before[1]) else 0) for k, a in enumerate(prop.stats.accepted_at)]
        counters = _spec_counters(llm)
        vllm_drafts = counters["vllm:spec_decode_num_drafts"] - before[2].get("vllm:spec_decode_num_drafts", 0)
        vllm_acc = (counters["vllm:spec_decode_num_accepted_tokens"]
                    - before[2].get("vllm:spec_decode_num_accepted_tokens", 0))
        return dict(rounds=rounds, per_round=sum(acc) / rounds, conditional=[
            acc[k] / (acc[k - 1] if k else rounds) for k in range(len(acc))], vllm_rounds=vllm_drafts,
            vllm_per_round=vllm_acc / max(1, vllm_drafts))

    prob = run()
    prop.settings.probabilistic = False
    greedy = run()
    print(f"accepted per round: probabilistic {prob}, greedy {greedy}")
    for r in (prob, greedy):
        assert r["rounds"] >= 500
        assert r["vllm_rounds"] == r["rounds"] and r["vllm_per_round"] == pytest.approx(r["per_round"])
    assert prob["per_round"] > 1.5 * greedy["per_round"] and prob["per_round"] > greedy["per_round"] + 0.1


@pytest.mark.parametrize("probabilistic", [True, False])
def test_a_seeded_request_repeats_alone_in_a_busy_batch_and_after_a_restart(vllm_env, sharp_target, trained_drafter,
                                                                          probabilistic):
    """temperature=0.8, seed=7 gives one text: alone, among unseeded requests, again, and in a new engine. The
    default adaptive policy plans the unseeded requests; the seeded one drafts the full K every step, with draft
    noise keyed by its seed and position (request ids stay randomised here, as in a server)."""
    from vllm import SamplingParams

    from vllm_dspark.integration.compat import external_request_id

    target_dir, _, tokenizer = sharp_target
    seeded = SamplingParams(seed=7, temperature=0.8, max_tokens=32, ignore_eos=True)
    prompt = {"prompt_token_ids": tokenizer(PROMPT)["input_ids"]}
    others = [({"prompt_token_ids": tokenizer(f"the {w} was long and the water")["input_ids"]},
               SamplingParams(temperature=t, max_tokens=m, ignore_eos=True))
              for w, t, m in [("town", 0.8, 40), ("day", 0.0, 24), ("road", 1.0, 48), ("boat", 0.5, 8),
                              ("people", 0.0, 40), ("night", 1.2, 32)]]

    def text(llm, with_others: bool) -> list[int]:
        batch = others[:3] + [(prompt, seeded)] + others[3:] if with_others else [(prompt, seeded)]
        outs = llm.generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False)
        out = outs[3 if with_others else 0]
        return list(out.outputs[0].token_ids), out.request_id

    llm = _llm(target_dir, trained_drafter, mode="adaptive", probabilistic=probabilistic)
    alone, alone_id = text(llm, False)
    busy, busy_id = text(llm, True)
    again, again_id = text(llm, False)
    prop = _proposer(llm)
    ids = (alone_id, busy_id, again_id)
    mine = [r for r in prop.records if external_request_id(r["req_id"]) in ids]
    rounds = [r for r in prop.stats.round_log if external_request_id(r[0]) in ids]
    del llm, prop
    gc.collect()
    restarted, _ = text(_llm(target_dir, trained_drafter, mode="adaptive", probabilistic=probabilistic), False)
    gc.collect()
    assert len(alone) == 32
    assert busy == alone and again == alone and restarted == alone
    # It really speculated: full blocks every step, drafts verified (and, sampled with q, some accepted).
    assert mine and all(len(r["drafts"]) == K for r in mine if r["position"] + 1 + K <= 256)
    assert sum(drafted for _, drafted, _, _, _ in rounds) >= 3 * 8 * K
    assert sum(accepted for _, _, accepted, _, _ in rounds) > 0 or not probabilistic
