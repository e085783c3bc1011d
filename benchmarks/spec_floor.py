"""The floor of speculative decoding on this backend: tokens/s of an engine with DSpark loaded that never drafts,
against no speculation, interleaved (A B A B ...) in one process so that drift cancels. What remains is the fixed
cost of vLLM's speculative path (the target's hidden-state outputs, spec bookkeeping, our context rows): the
adaptive policy cannot go above it where drafting does not pay.

    C=4 NP=16 R=7 .venv/bin/python benchmarks/spec_floor.py    # SmolLM2, closed loop at 4 in flight
"""
import os
import statistics

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_dspark.assets import smollm2_path
    from vllm_dspark.eval.bench import generate_closed_loop
    from vllm_dspark.eval.evaluate import dspark_spec
    from vllm_dspark.eval.prompts import load_prompts
    from vllm_dspark.integration import proposer

    def never_draft(self, sampled_token_ids, *args, **kwargs):
        self.stats.steps += 1
        return [[] for _ in sampled_token_ids]

    proposer.DSparkProposer._propose = never_draft
    c, n, rounds = (int(os.environ.get(k, d)) for k, d in (("C", 4), ("NP", 16), ("R", 7)))
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
    rates: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            outputs, seconds = generate_closed_loop(engine, prompts, params, c)
            rates[name].append(sum(len(o.outputs[0].token_ids) for o in outputs) / seconds)
    ratios = [a / b for a, b in zip(rates["never-drafting"], rates["none"])]
    print("tokens/s:", {k: [round(x, 1) for x in v] for k, v in rates.items()})
    print(f"never-drafting / none at c={c}: median of rounds {statistics.median(ratios):.3f} "
          f"(rounds {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
