"""DSpark inside a real vLLM CPU engine (no mocks): lossless greedy output, hidden-state plumbing checked
against HF transformers, prefix caching, preemption, Qwen3 as well as Llama, and startup validation."""
from __future__ import annotations

import gc
import json
import shutil
from itertools import zip_longest

import numpy as np
import pytest
import torch

from vllm_dspark.checkpoint import init_drafter, load_drafter
from vllm_dspark.context import ContextStore, RawBlock
from vllm_dspark.drafting import draft_block

pytestmark = pytest.mark.vllm

SPEC = {"method": "custom_class", "model": "vllm_dspark.DSparkProposer"}
# Prompts longer than one 32-token KV block sharing their first block: the second pass hits vLLM's prefix cache.
SHARED = "Once upon a time in a small town there was a man who said that the water was good and the day was long "


def _prompts(n: int) -> list[str]:
    words = "time water people word number sound place home name line end thought".split()
    return [SHARED + f"and the {words[i % len(words)]} of {i} was" for i in range(n)]


@pytest.fixture(scope="module")
def drafters(tmp_path_factory, request):
    out = {}
    for arch in ("llama", "qwen3"):
        target = request.getfixturevalue(f"tiny_{arch}_dir")
        d = tmp_path_factory.mktemp(f"drafter-{arch}")
        init_drafter(target, d, num_layers=1, markov_rank=16, block_size=4, num_target_layer_ids=2)
        out[arch] = (target, d)
    return out


def _llm(target, drafter=None, k=3, extra=None, **kw):
    from vllm import LLM

    args = dict(enforce_eager=True, dtype="float32", max_model_len=256, seed=0, block_size=32)
    args.update(kw)
    if drafter is not None:
        args["speculative_config"] = dict(SPEC, num_speculative_tokens=k)
        args["additional_config"] = {"dspark": dict({"drafter": str(drafter), "record": True}, **(extra or {}))}
        args["disable_log_stats"] = False
    return LLM(str(target), **args)


def _proposer(llm):
    from vllm_dspark.integration.compat import proposer_of

    return proposer_of(llm)


def _generate(llm, prompts, max_tokens=24):
    from vllm import SamplingParams

    return llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)


def _close(llm):
    del llm
    gc.collect()


def _spec_counters(llm) -> dict[str, object]:
    return {m.name: getattr(m, "values", None) or getattr(m, "value", None)
            for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode")}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_lossless_and_drafts_match_hf_hidden_states(vllm_env, drafters, arch):
    target, drafter_dir = drafters[arch]
    prompts = _prompts(6)
    base = _generate(_llm(target, enable_prefix_caching=False), prompts)
    gc.collect()
    llm = _llm(target, drafter_dir, enable_prefix_caching=True, extra={"mode": "fixed"})
    # Requests that end before drafting ever read their rows (drafting paused, as the adaptive policy does under
    # load): their blocks reach the drafter's prefix cache unprojected; the next pass takes its prompt blocks
    # from those.
    prop = _proposer(llm)
    prop._propose = lambda sampled, *args, **kwargs: [[] for _ in sampled]
    cache, puts = prop.store.prefix_cache, []
    put = cache.put

    def spy(key, entry, replace=False):
        puts.append((type(entry), replace))
        put(key, entry, replace=replace)
    cache.put = spy
    warm = _generate(llm, prompts[:1], max_tokens=4)  # alone: nothing cached yet, so nothing read early
    del prop._propose
    first = _generate(llm, prompts)  # its first step frees the warm request, then takes its blocks
    assert (RawBlock, False) in puts and (tuple, True) in puts  # offered raw, projected when taken
    second = _generate(llm, prompts)  # prefix-cache hits: vLLM delivers no rows for the cached block
    for b, a, c in zip(base, first, second):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
        assert list(c.outputs[0].token_ids) == list(b.outputs[0].token_ids)
    prop = _proposer(llm)
    counters = _spec_counters(llm)
    assert prop.stats.skipped_gap == 0, "prefix-cache hits must be filled from the drafter's own prefix cache"
    assert len(prop.store.prefix_cache.blocks) > 0
    records = prop.records
    assert len(records) >= 6 * 2 * 5  # most steps of every request drafted
    assert 0 < counters["vllm:spec_decode_num_drafts"] <= len(records)
    assert counters["vllm:spec_decode_num_draft_tokens"] == 3 * counters["vllm:spec_decode_num_drafts"]

    # Recompute every proposal offline from HF transformers' hidden states: same drafts means the rows the
    # compat wrappers delivered (prefill chunks, accepted tokens, cached prefixes) were exactly right.
    from transformers import AutoModelForCausalLM

    from vllm_dspark.integration.compat import external_request_id

    hf = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    drafter = load_drafter(drafter_dir, target)
    drafter.set_head_dtype(torch.bfloat16)  # the plugin's default LM head on CPU (head_dtype "auto")
    seqs = {o.request_id: list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in warm + first + second}
    mismatches = 0
    for rec in records[::3]:
        seq = seqs[external_request_id(rec["req_id"])]
        n = rec["position"]
        assert seq[n] == rec["anchor"]
        with torch.no_grad():
            hs = hf(torch.tensor([seq[:n]]), output_hidden_states=True).hidden_states
        store = ContextStore(drafter)
        store.append([("r", 0, torch.cat([hs[i + 1][0] for i in drafter.cfg.target_layer_ids], -1))])
        block = draft_block(drafter, store.gather(["r"]), torch.tensor([rec["anchor"]]), 3, topk=32,
                            block_drafts=drafter.cfg.max_draft_tokens)  # full_block (the default)
        mismatches += block.tokens[0].tolist() != rec["drafts"]
    assert mismatches == 0
    _close(llm)


def test_adaptive_block_lengths_stay_lossless(vllm_env, drafters, tmp_path):
    """Adaptive mode (the default): per-request lengths follow the confidence head and the profiled cost. The step
    log accounts for every step but the last (its line is written when the next step starts)."""
    target, drafter_dir = drafters["qwen3"]
    prompts = _prompts(8)
    base = _generate(_llm(target, enable_prefix_caching=False), prompts)
    gc.collect()
    log = tmp_path / "steps.jsonl"
    llm = _llm(target, drafter_dir, enable_prefix_caching=False, extra={"step_log": str(log)})
    spec = _generate(llm, prompts)
    assert [list(o.outputs[0].token_ids) for o in spec] == [list(o.outputs[0].token_ids) for o in base]
    prop = _proposer(llm)
    assert prop.adaptive and len(prop.policy.cost) > 0  # the cost model learned from real steps
    lengths = prop.stats.length_hist
    assert sum(lengths.values()) > 0 and max(lengths) <= 3
    counters = _spec_counters(llm)
    assert counters["vllm:spec_decode_num_draft_tokens"] == sum(prop.stats.drafted_at)
    assert counters["vllm:spec_decode_num_accepted_tokens"] == sum(prop.stats.accepted_at)
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    generated = sum(len(o.outputs[0].token_ids) for o in spec)
    assert 1 <= generated - sum(s["emitted"] for s in steps) <= len(prompts) * 4  # the last step's tokens
    assert steps[0]["prefill"] and not any(s["verified"] for s in steps[:1])
    assert sum(s["planned"] for s in steps) >= counters["vllm:spec_decode_num_draft_tokens"] > 0
    verifying = [s for s in steps if s["verified"]]
    assert all(s["tokens"] > s["batch"] for s in verifying) and sum(s["rounds"] for s in steps) > 0
    assert sum(s["accepted"] for s in steps) <= counters["vllm:spec_decode_num_accepted_tokens"]
    assert all(0 <= s["expected"] <= s["planned"] for s in steps) and sum(s["expected"] for s in steps) > 0
    _close(llm)


@pytest.mark.parametrize("sources,mode,k", [("hybrid", "adaptive", 3), ("suffix", "fixed", 3),
                                            ("hybrid", "adaptive", 9), ("suffix", "fixed", 9)])
def test_suffix_drafts_stay_lossless_and_are_counted_by_source(vllm_env, drafters, sources, mode, k):
    """Hybrid drafting: requests whose text repeats get drafts copied from it (alone, or spliced before the
    drafter's), the others the drafter's; sources=suffix never runs the drafter. Greedy output unchanged, every
    copied draft starts with a token that followed an earlier occurrence of the text's last two tokens, and the
    counts per source add up to vLLM's. K = 9 > the drafter's block (4): only copies run past it."""
    target, drafter_dir = drafters["qwen3"]
    prompts = [SHARED + "and the water was good and the day was long and the water was"] + _prompts(3)
    base = _generate(_llm(target, enable_prefix_caching=False), prompts, max_tokens=32)
    gc.collect()
    llm = _llm(target, drafter_dir, k=k, enable_prefix_caching=False, extra={"sources": sources, "mode": mode})
    spec = _generate(llm, prompts, max_tokens=32)
    assert [list(o.outputs[0].token_ids) for o in spec] == [list(o.outputs[0].token_ids) for o in base]
    prop = _proposer(llm)
    kinds = {r["source"] for r in prop.records if r["drafts"]}
    assert "suffix" in kinds and kinds <= ({"drafter", "suffix", "splice"} if sources == "hybrid" else {"suffix"})
    from vllm_dspark.integration.compat import external_request_id

    seqs = {o.request_id: list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in spec}
    copied = [r for r in prop.records if r["source"] in ("suffix", "splice") and r["drafts"]]
    for rec in copied:
        text = seqs[external_request_id(rec["req_id"])][: rec["position"] + 1]
        assert text[-1] == rec["anchor"]
        followers = {text[i + 1] for i in range(1, len(text) - 1) if text[i - 1:i + 1] == text[-2:]}
        followers |= {t for out in seqs.values() for i, t in enumerate(out[2:], 2) if out[i - 2:i] == text[-2:]}
        assert rec["drafts"][0] in followers, rec
    counters = _spec_counters(llm)
    assert counters["vllm:spec_decode_num_draft_tokens"] == sum(prop.stats.drafted_at)
    assert counters["vllm:spec_decode_num_accepted_tokens"] == sum(prop.stats.accepted_at)
    assert sum(prop.stats.kind_rounds.values()) == prop.stats.num_rounds == len(prop.stats.round_log)
    assert [sum(x) for x in zip_longest(*prop.stats.source_drafted.values(), fillvalue=0)] == prop.stats.drafted_at
    assert prop.stats.kind_rounds.get("suffix", 0) > 0
    if sources == "suffix":
        assert set(prop.stats.kind_rounds) == {"suffix"}
    block = prop.cfg.max_draft_tokens
    assert all(len(r["drafts"]) <= min(k, block) for r in prop.records if r["source"] == "drafter")
    assert all(len(r["drafts"]) <= k for r in prop.records)
    if k > block and mode == "fixed":  # fixed: a copy is verified whole (the adaptive plan may cut it)
        assert max(len(r["drafts"]) for r in copied) > block
    _close(llm)


def test_drafts_copied_from_a_corpus_of_earlier_answers_stay_lossless(vllm_env, drafters, tmp_path, monkeypatch):
    """suffix_corpus: the target's answers, written as text to a .jsonl, are tokenized and copied from. Asked
    again, the requests draft from the corpus from their first decode step on (their own text has no repeat
    yet), most of it is accepted, and the output is unchanged."""
    monkeypatch.setenv("VLLM_DSPARK_CACHE", str(tmp_path / "cache"))
    target, drafter_dir = drafters["qwen3"]
    prompts = _prompts(3)
    base = _generate(_llm(target, enable_prefix_caching=False), prompts, max_tokens=32)
    gc.collect()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target))
    with open(tmp_path / "answers.jsonl", "w") as f:
        for p, o in zip(prompts, base):
            f.write(json.dumps({"messages": [{"role": "user", "content": p},
                                             {"role": "assistant", "content": o.outputs[0].text}]}) + "\n")
    llm = _llm(target, drafter_dir, k=3, enable_prefix_caching=False,
               extra={"sources": "suffix", "mode": "fixed", "suffix_corpus": str(tmp_path / "answers.jsonl")})
    spec = _generate(llm, [{"prompt_token_ids": list(o.prompt_token_ids)} for o in base], max_tokens=32)
    assert [list(o.outputs[0].token_ids) for o in spec] == [list(o.outputs[0].token_ids) for o in base]
    prop = _proposer(llm)
    assert prop.suffix.corpus.n == sum(len(tok.encode(o.outputs[0].text, add_special_tokens=False)) + 3 for o in base)
    corpus = [r for r in prop.records if r["origin"] == "corpus" and r["drafts"]]
    firsts = {r["req_id"] for r in corpus if r["position"] == len(base[0].prompt_token_ids)}
    assert len(corpus) >= 6 and firsts  # drafting from the first decode step on
    from vllm_dspark.integration.compat import external_request_id

    seqs = {o.request_id: list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in spec}
    right = [r["drafts"][0] == seqs[external_request_id(r["req_id"])][r["position"] + 1] for r in corpus]
    # the corpus holds these very answers (where answers share a bigram, the most frequent continuation may be
    # another answer's)
    assert sum(right) >= 0.6 * len(right)
    _close(llm)


def test_parallel_sampling_children_draft_from_the_shared_prompt(vllm_env, drafters):
    """n > 1: vLLM schedules the children together and serves each one's prompt from the prefix cache, in part
    from blocks another child computes in that very step; every child must still get a complete context."""
    from vllm import SamplingParams

    target, drafter_dir = drafters["llama"]
    llm = _llm(target, drafter_dir, enable_prefix_caching=True, extra={"mode": "fixed"})
    _generate(llm, [SHARED + "and the first"], max_tokens=4)  # the shared first block is cached now
    prompt = SHARED + "and then " * 20  # ~3 blocks: the first cached, the rest computed this step
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.8, seed=3, n=3), use_tqdm=False)
    assert len(out[0].outputs) == 3
    prop = _proposer(llm)
    assert prop.stats.skipped_gap == 0 and not prop._gap_reqs
    drafted = {r["req_id"].split("_", 1)[0] for r in prop.records if "_" in r["req_id"]}
    assert drafted == {"0", "1", "2"}, drafted  # every child drafted
    _close(llm)


def test_preemption_keeps_output_identical(vllm_env, drafters):
    target, drafter_dir = drafters["llama"]
    prompts = _prompts(12)
    base = _generate(_llm(target, enable_prefix_caching=False), prompts, max_tokens=48)
    gc.collect()
    # 10 blocks of 32 tokens for 12 requests of ~80 tokens: the scheduler must preempt and recompute.
    llm = _llm(target, drafter_dir, enable_prefix_caching=False, num_gpu_blocks_override=10)
    spec = _generate(llm, prompts, max_tokens=48)
    assert [list(o.outputs[0].token_ids) for o in spec] == [list(o.outputs[0].token_ids) for o in base]
    assert _proposer(llm).stats.skipped_gap == 0
    _close(llm)


def test_steps_without_drafts_use_the_plain_sampler(vllm_env, drafters, monkeypatch):
    """Drafting paused for good: vLLM's rejection sampler never runs (the compat ``_sample`` bypass), and
    greedy and seeded sampled outputs equal those of an engine without speculation."""
    from vllm import SamplingParams
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    from vllm_dspark.integration.proposer import DSparkProposer
    from vllm_dspark.policy import SpeedPolicy

    target, drafter_dir = drafters["llama"]
    prompts = _prompts(6)
    params = [SamplingParams(max_tokens=16, temperature=0.0 if i % 2 else 0.9, seed=i) for i in range(6)]
    base = _llm(target, enable_prefix_caching=False).generate(prompts, params, use_tqdm=False)
    gc.collect()
    calls = {"n": 0}
    real = RejectionSampler.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RejectionSampler, "forward", counted)
    monkeypatch.setattr(SpeedPolicy, "begin", lambda self, report, batch: 0)
    # Seeded requests draft through pauses (so that their text does not depend on timing): hide their seeds from
    # the proposer here, which then pauses them too, while vLLM still samples them with their generators.
    set_batch = DSparkProposer.set_batch
    monkeypatch.setattr(DSparkProposer, "set_batch",
                        lambda self, req_ids, metadata, budget, seeds=None: set_batch(self, req_ids, metadata, budget))
    # copying (suffix drafts) would still draft while the drafter pauses: the drafter alone here
    llm = _llm(target, drafter_dir, enable_prefix_caching=False, extra={"sources": "drafter"})
    spec = llm.generate(prompts, params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in spec] == [list(o.outputs[0].token_ids) for o in base]
    assert _proposer(llm).stats.drafted_requests == 0
    assert calls["n"] == 0
    _proposer(llm).adaptive = False  # fixed K: every decode step verifies drafts, through the rejection sampler
    again = llm.generate(prompts[1:2], params[1:2], use_tqdm=False)  # greedy
    assert calls["n"] > 0 and _proposer(llm).stats.num_rounds > 0
    assert list(again[0].outputs[0].token_ids) == list(base[1].outputs[0].token_ids)
    _close(llm)


def _startup_error(target, drafter, k=3, extra=None) -> str:
    with pytest.raises(Exception) as info:
        _llm(target, drafter, k=k, extra=extra)
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    gc.collect()
    return " | ".join(chain)


def test_startup_validation_errors(vllm_env, drafters, tmp_path):
    target, good = drafters["llama"]
    assert "num_speculative_tokens=5: expected an integer in [1, 4]" in _startup_error(
        target, good, k=5, extra={"sources": "drafter"})
    assert "num_speculative_tokens=33: expected an integer in [1, 32]" in _startup_error(target, good, k=33)
    assert "unknown key(s) 'drafterr' (did you mean 'drafter'?)" in _startup_error(target, good, extra={"drafterr": 1})
    missing = tmp_path / "nope"
    assert "nope" in _startup_error(target, missing)
    other = tmp_path / "other-vocab"
    shutil.copytree(good, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (other / "config.json").write_text(json.dumps(cfg))
    msg = _startup_error(target, other)
    assert "vocab_size=1000: expected the target's vocab_size=512" in msg


@pytest.mark.vllm_multiprocessing
def test_default_multiprocess_engine(vllm_env, drafters):
    target, drafter_dir = drafters["qwen3"]
    prompts = _prompts(3)
    from vllm import LLM, SamplingParams

    sp = SamplingParams(max_tokens=16, temperature=0)
    base = LLM(str(target), enforce_eager=True, dtype="float32", max_model_len=256, seed=0, block_size=32)
    want = [list(o.outputs[0].token_ids) for o in base.generate(prompts, sp, use_tqdm=False)]
    del base
    gc.collect()
    llm = LLM(str(target), enforce_eager=True, dtype="float32", max_model_len=256, seed=0, block_size=32,
              speculative_config=dict(SPEC, num_speculative_tokens=3),
              additional_config={"dspark": {"drafter": str(drafter_dir), "mode": "fixed"}}, disable_log_stats=False)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert got == want
    assert _spec_counters(llm)["vllm:spec_decode_num_drafts"] > 0
    del llm
    gc.collect()


def test_drafter_fault_falls_back_to_no_speculation(vllm_env, drafters, monkeypatch, caplog):
    """A drafter that raises mid-run: that step runs without speculation, output unchanged, one warning."""
    import vllm_dspark.integration.proposer as proposer_module

    target, drafter_dir = drafters["llama"]
    prompts = _prompts(4)
    base = _generate(_llm(target, enable_prefix_caching=False), prompts)
    gc.collect()
    calls = {"n": 0}
    real = proposer_module.draft_block

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("injected drafter fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(proposer_module, "draft_block", flaky)
    llm = _llm(target, drafter_dir, enable_prefix_caching=False, extra={"mode": "fixed"})
    with caplog.at_level("WARNING", logger="vllm_dspark"):
        spec = _generate(llm, prompts)
    assert [list(o.outputs[0].token_ids) for o in spec] == [list(o.outputs[0].token_ids) for o in base]
    prop = _proposer(llm)
    assert prop.stats.faults == calls["n"] // 3 >= 3
    warnings = [r for r in caplog.records if "the drafter failed during drafting" in r.getMessage()]
    assert len(warnings) == 1
    assert _spec_counters(llm)["vllm:spec_decode_num_drafts"] > 0  # the other steps still drafted
    _close(llm)


@pytest.mark.slow
@pytest.mark.vllm_multiprocessing
def test_tensor_parallel_2_on_cpu(vllm_env, drafters, monkeypatch):
    """TP=2 on the CPU backend: vLLM's automatic thread binding refuses 2 workers on one NUMA node of 2 cores,
    so bind one core per rank by hand. The drafter is replicated; its embeddings come from the checkpoint."""
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    target, drafter_dir = drafters["llama"]
    prompts, sp = _prompts(2), SamplingParams(max_tokens=16, temperature=0)
    kw = dict(enforce_eager=True, dtype="float32", max_model_len=256, seed=0, block_size=32,
              tensor_parallel_size=2, distributed_executor_backend="mp", disable_log_stats=False)
    base = LLM(str(target), **kw)
    want = [list(o.outputs[0].token_ids) for o in base.generate(prompts, sp, use_tqdm=False)]
    del base
    gc.collect()
    llm = LLM(str(target), speculative_config=dict(SPEC, num_speculative_tokens=3),
              additional_config={"dspark": {"drafter": str(drafter_dir), "mode": "fixed"}}, **kw)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert got == want
    assert _spec_counters(llm)["vllm:spec_decode_num_drafts"] > 0
    del llm
    gc.collect()


def test_a_drafter_without_confidence_head_drafts_for_seeded_and_unseeded_requests(vllm_env, drafters, tmp_path):
    """No confidence head (no adaptive plan): every request, seeded or not, drafts K, without a single fault."""
    from safetensors.torch import load_file, save_file
    from vllm import SamplingParams

    target, good = drafters["llama"]
    bare = tmp_path / "no-confidence"
    shutil.copytree(good, bare)
    cfg = json.loads((bare / "config.json").read_text())
    cfg["enable_confidence_head"] = False
    (bare / "config.json").write_text(json.dumps(cfg))
    weights = {n: t for n, t in load_file(str(bare / "model.safetensors")).items() if "confidence_head" not in n}
    save_file(weights, str(bare / "model.safetensors"))
    prompts = _prompts(4)
    params = [SamplingParams(max_tokens=12, temperature=0.0),
              SamplingParams(max_tokens=12, temperature=0.8, seed=3)] * 2
    llm = _llm(target, bare, enable_prefix_caching=False, enable_chunked_prefill=False)
    llm.generate(prompts, params, use_tqdm=False)
    prop = _proposer(llm)
    assert prop.stats.faults == 0 and prop.stats.num_rounds > 0
    assert {len(r["drafts"]) for r in prop.records} == {3}
    _close(llm)
