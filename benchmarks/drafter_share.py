"""Drafter time per engine step and its share of the step, inside a real vLLM CPU engine (SmolLM2 + the
shipped drafter, concurrency 1, MT-Bench turn-1 prompts, greedy).

    MODE=fixed N=3 .venv/bin/python benchmarks/drafter_share.py      # or MODE=adaptive
"""
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
DRAFTER = Path(os.environ.get("DRAFTER", Path(__file__).resolve().parents[1] / "drafters" / "smollm2-135m-dspark"))


def main() -> None:
    if not (DRAFTER / "config.json").exists():
        raise SystemExit(f"no drafter at {DRAFTER}: train one with scripts/train_smollm2_drafter.sh "
                         "(or set DRAFTER=DIR; `vllm-dspark init` writes an untrained one)")
    from vllm import LLM, SamplingParams

    from vllm_dspark.assets import load_mtbench, smollm2_path
    from vllm_dspark.integration.compat import proposer_of

    mode = os.environ.get("MODE", "fixed")
    llm = LLM(str(smollm2_path()), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              speculative_config={"method": "custom_class", "model": "vllm_dspark.DSparkProposer",
                                  "num_speculative_tokens": 7},
              additional_config={"dspark": {"drafter": str(DRAFTER), "mode": mode}})
    questions = load_mtbench()[::10][: int(os.environ.get("N", "4"))]
    params = SamplingParams(max_tokens=64, temperature=0)
    llm.chat([[{"role": "user", "content": "Hi"}]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    p = proposer_of(llm)
    steps0, draft0, ingest0 = p.stats.steps, p.stats.draft_seconds, p.stats.ingest_seconds
    t0 = time.perf_counter()
    for q in questions:  # one request at a time
        llm.chat([[{"role": "user", "content": q.turns[0]}]], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    steps = p.stats.steps - steps0
    draft, ingest = p.stats.draft_seconds - draft0, p.stats.ingest_seconds - ingest0
    print(f"mode={mode} c=1: {steps} steps, drafting {1000 * draft / steps:.1f} ms/step, context update "
          f"{1000 * ingest / steps:.1f} ms/step, whole step {1000 * wall / steps:.1f} ms -> drafter share "
          f"{(draft + ingest) / wall:.1%}")


if __name__ == "__main__":
    main()
