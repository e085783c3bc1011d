"""Where a speculating engine loses time against no speculation: every ``engine.step()`` of both engines timed
from outside vLLM (the same clock for both), split by kind of step, with the engines' closed loops taking turns
in time slices as `vllm-dspark bench` runs them.

    C=32 NP=64 R=2 PROMPTS=mtbench .venv/bin/python benchmarks/step_gap.py
    RAMP=1 C=32 ...   # requests join one per step (bench --ramp)
    SETTINGS=step_log=runs/steps.jsonl C=32 ...   # DSpark settings, comma-separated key=value

Kinds: "admit" (a request joined before the step: its prompt is in it), "decode" (no new request). Per kind and
batch size (requests in flight): steps, seconds, tokens gained, tokens/s. The first step of each time slice is
reported apart (it pays for the pause before it).
"""
import collections
import os
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_dspark.assets import smollm2_path
    from vllm_dspark.eval import bench
    from vllm_dspark.eval.evaluate import dspark_spec
    from vllm_dspark.eval.loop import generate_interleaved
    from vllm_dspark.eval.prompts import load_prompts

    c, n, rounds = (int(os.environ.get(k, d)) for k, d in (("C", 32), ("NP", 64), ("R", 2)))
    ramp = os.environ.get("RAMP") == "1"
    drafter = os.environ.get("DRAFTER", "drafters/smollm2-135m-dspark")
    settings = dict(x.split("=", 1) for x in os.environ.get("SETTINGS", "").split(",") if x)
    common = dict(model=str(smollm2_path()), dtype="float32", max_model_len=2048, seed=0, enforce_eager=True)
    engines = {"none": LLM(**common), "dspark": LLM(**common, **dspark_spec(drafter, 7, settings=settings))}
    tok = engines["none"].get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": p.turns[0]}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)} for p in load_prompts(os.environ.get("PROMPTS", "mtbench"), n)]
    params = SamplingParams(temperature=0, max_tokens=128)
    for engine in engines.values():
        bench.generate_closed_loop(engine, prompts[:c], SamplingParams(temperature=0, max_tokens=8), c)

    totals = {name: collections.defaultdict(lambda: [0, 0.0, 0]) for name in engines}
    rates: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(rounds):
        order = list(engines)[r % 2:] + list(engines)[:r % 2]
        trace: dict[str, list] = {}
        for engine in engines.values():
            bench.forget_outputs(engine)  # the same prompts again: no copying of last round's answers
        cells = generate_interleaved({k: engines[k] for k in order}, prompts, params, c, 1.0, ramp, trace)
        for name, (outputs, seconds) in cells.items():
            rates[name].append(sum(len(o.outputs[0].token_ids) for o in outputs) / seconds)
        for name, steps in trace.items():
            for dt, batch, admitted, gained, first in steps:
                key = ("first" if first else "admit" if admitted else "decode", batch if not first else 0)
                t = totals[name][key]
                t[0] += 1
                t[1] += dt
                t[2] += gained
        print(f"round {r}: tokens/s {({k: round(v[-1], 1) for k, v in rates.items()})}", flush=True)
    print(f"dspark / none at c={c}{' (ramped)' if ramp else ''}: rounds {[round(a / b, 3) for a, b in zip(rates['dspark'], rates['none'])]}, "
          f"median {statistics.median(a / b for a, b in zip(rates['dspark'], rates['none'])):.3f}")
    keys = sorted(set(totals["none"]) | set(totals["dspark"]))
    print("kind    batch | none: steps s tokens tok/s | dspark: steps s tokens tok/s | extra s (dspark - none)")
    for kind in ("admit", "decode", "first"):
        for key in [k for k in keys if k[0] == kind]:
            a, b = totals["none"][key], totals["dspark"][key]
            if a[0] + b[0] < 4:
                continue
            print(f"{kind:7s} {key[1]:5d} | {a[0]:5d} {a[1]:7.2f} {a[2]:6d} {a[2] / max(a[1], 1e-9):7.1f} | "
                  f"{b[0]:5d} {b[1]:7.2f} {b[2]:6d} {b[2] / max(b[1], 1e-9):7.1f} | {b[1] - a[1]:+7.2f}")
        sa = [sum(v[i] for k, v in totals["none"].items() if k[0] == kind) for i in (0, 1, 2)]
        sb = [sum(v[i] for k, v in totals["dspark"].items() if k[0] == kind) for i in (0, 1, 2)]
        print(f"{kind:7s} total | {sa[0]:5d} {sa[1]:7.2f} {sa[2]:6d} | {sb[0]:5d} {sb[1]:7.2f} {sb[2]:6d} | "
              f"{sb[1] - sa[1]:+7.2f}")


if __name__ == "__main__":
    main()
