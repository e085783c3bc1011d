"""The floor of speculative decoding on this backend: tokens/s of an engine with DSpark loaded that never drafts,
against no speculation, in one process so that drift cancels. What remains is the fixed cost of vLLM's
speculative path (the target's hidden-state outputs, spec bookkeeping, our context rows): the adaptive policy
cannot go above it where drafting does not pay.

    C=4 NP=16 R=7 .venv/bin/python benchmarks/spec_floor.py             # cells interleaved: A B A B ...
    LOCKSTEP=1 C=4 NP=16 R=2 .venv/bin/python benchmarks/spec_floor.py  # engine steps interleaved: A B A B ...

Cells (each engine's whole closed loop in turn) are what ``vllm-dspark bench`` measures; single cells spread
4-9% on these 2-core machines. LOCKSTEP=1 steps the two engines alternately, one engine step each, each with
its own closed loop over the same prompts: drift cancels at the step, and since neither engine drafts both run
the same steps (the adaptive policy cannot be measured so: it times whole steps, which would then include the
other engine's). It also prints our hooks' milliseconds per step.
"""
import collections
import functools
import os
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def closed_loop_steps(llm, prompts: list[dict], params, concurrency: int):
    """``generate_closed_loop`` one engine step at a time: yields the seconds of each ``step()``."""
    engine = llm.llm_engine
    todo, inflight = list(range(len(prompts)))[::-1], set()
    while todo or inflight:
        while todo and len(inflight) < concurrency:
            rid = f"floor{next(_ids)}"
            engine.add_request(rid, prompts[todo.pop()], params)
            inflight.add(rid)
        t0 = time.perf_counter()
        outputs = engine.step()
        yield time.perf_counter() - t0
        inflight -= {o.request_id for o in outputs if o.finished}


_ids = iter(range(10**9))


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_dspark.assets import smollm2_path
    from vllm_dspark.eval.bench import generate_closed_loop
    from vllm_dspark.eval.evaluate import dspark_spec
    from vllm_dspark.eval.prompts import load_prompts
    from vllm_dspark.integration import proposer

    hooks: dict[str, float] = collections.defaultdict(float)

    def timed(name):
        original = getattr(proposer.DSparkProposer, name)

        @functools.wraps(original)
        def run(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                hooks[name] += time.perf_counter() - t0
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
    rates: dict[str, list[float]] = {k: [] for k in engines}
    steps: dict[str, int] = dict.fromkeys(engines, 0)
    for r in range(rounds):
        if lockstep:  # rates are steps/s of the same steps: their ratio is the tokens/s ratio
            loops = {k: closed_loop_steps(e, prompts, params, c) for k, e in engines.items()}
            seconds = dict.fromkeys(engines, 0.0)
            order = list(engines)[r % 2:] + list(engines)[:r % 2]
            while loops:
                for name in [k for k in order if k in loops]:
                    try:
                        seconds[name] += next(loops[name])
                    except StopIteration:
                        del loops[name]
                        continue
                    steps[name] += 1
            for name in engines:  # tokens are the same for both: steps/s of the same work
                rates[name].append(1.0 / seconds[name])
            print(f"round {r}: seconds {seconds}, steps {steps}", flush=True)
            continue
        for name, engine in engines.items():
            outputs, seconds = generate_closed_loop(engine, prompts, params, c)
            rates[name].append(sum(len(o.outputs[0].token_ids) for o in outputs) / seconds)
    ratios = [a / b for a, b in zip(rates["never-drafting"], rates["none"])]
    if not lockstep:
        print("tokens/s:", {k: [round(x, 1) for x in v] for k, v in rates.items()})
    else:
        per_step = {k: round(v / steps["never-drafting"] * 1e3, 3) for k, v in hooks.items()}
        print(f"our hooks, ms per step: {per_step}")
    print(f"never-drafting / none at c={c}{' (lockstep)' if lockstep else ''}: median of rounds "
          f"{statistics.median(ratios):.3f} (rounds {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
