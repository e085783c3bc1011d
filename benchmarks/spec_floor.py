"""The floor of speculative decoding on this backend: tokens/s of an engine with DSpark loaded that never drafts,
against no speculation, in one process so that drift cancels. What remains is the fixed cost of vLLM's
speculative path (the target's hidden-state outputs, spec bookkeeping, our context rows): the adaptive policy
cannot go above it where drafting does not pay.

    C=4 NP=16 R=7 .venv/bin/python benchmarks/spec_floor.py             # 1 s time slices: A B A B ...
    LOCKSTEP=1 C=4 NP=16 R=2 .venv/bin/python benchmarks/spec_floor.py  # engine steps interleaved: A B A B ...

By default the two engines' closed loops take turns in 1-second time slices, as ``vllm-dspark bench`` runs a
round's methods (whole cells in turn spread 4-9% on these 2-core machines). LOCKSTEP=1 steps the two engines
alternately, one engine step each, each with its own closed loop over the same prompts: drift cancels at the
step, and since neither engine drafts both run the same steps (an adaptive engine would see every gap between
its steps as a pause and measure none of its steps). It also prints our hooks' milliseconds per step.
"""
import collections
import functools
import os
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_dspark.assets import smollm2_path
    from vllm_dspark.eval.bench import generate_closed_loop, generate_interleaved
    from vllm_dspark.eval.evaluate import dspark_spec
    from vllm_dspark.eval.prompts import load_prompts
    from vllm_dspark.integration import proposer

    hooks: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()  # on_finished: one call per engine step

    def timed(name):
        original = getattr(proposer.DSparkProposer, name)

        @functools.wraps(original)
        def run(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                hooks[name] += time.perf_counter() - t0
                calls[name] += 1
        setattr(proposer.DSparkProposer, name, run)

    def never_draft(self, sampled_token_ids, *args, **kwargs):
        self.stats.steps += 1
        return [[] for _ in sampled_token_ids]

    proposer.DSparkProposer._propose = never_draft
    for name in ("on_finished", "ingest", "propose"):
        timed(name)
    c, n, rounds = (int(os.environ.get(k, d)) for k, d in (("C", 4), ("NP", 16), ("R", 7)))
    lockstep = os.environ.get("LOCKSTEP") == "1"
    drafter = os.environ.get("DRAFTER", "drafters/smollm2-135m-dspark")
    common = dict(model=str(smollm2_path()), dtype="float32", max_model_len=1024, seed=0, enforce_eager=True)
    engines = {"none": LLM(**common), "never-drafting": LLM(**common, **dspark_spec(drafter, 7))}
    tok = engines["none"].get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": p.turns[0]}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)} for p in load_prompts("mtbench", n)]
    params = SamplingParams(temperature=0, max_tokens=128)
    for engine in engines.values():  # warm-up
        generate_closed_loop(engine, prompts[:c], SamplingParams(temperature=0, max_tokens=16), c)
    hooks.clear()
    calls.clear()
    rates: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(rounds):
        order = list(engines)[r % 2:] + list(engines)[:r % 2]  # who goes first alternates
        # LOCKSTEP: slices of 0 s = one step each in turn
        cells = generate_interleaved({k: engines[k] for k in order}, prompts, params, c, 0.0 if lockstep else 1.0)
        for name, (outputs, seconds) in cells.items():
            rates[name].append(sum(len(o.outputs[0].token_ids) for o in outputs) / seconds)
        print(f"round {r}: seconds {({k: round(v[1], 2) for k, v in cells.items()})}", flush=True)
    ratios = [a / b for a, b in zip(rates["never-drafting"], rates["none"])]
    print("tokens/s:", {k: [round(x, 1) for x in v] for k, v in rates.items()})
    per_step = {k: round(v / calls["on_finished"] * 1e3, 3) for k, v in hooks.items()}
    print(f"our hooks, ms per step: {per_step}")
    print(f"never-drafting / none at c={c}{' (lockstep)' if lockstep else ''}: median of rounds "
          f"{statistics.median(ratios):.3f} (rounds {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
