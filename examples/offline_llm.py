"""Offline generation with DSpark: SmolLM2-135M-Instruct + drafters/smollm2-135m-dspark (CPU, float32).

    .venv/bin/python examples/offline_llm.py

The answer goes to stdout, vLLM's log to stderr (``2>/dev/null`` hides it). On CPU the KV cache is sized from
the memory available now (vllm_dspark.memory: a quarter of it, at most 4 GiB); VLLM_CPU_KVCACHE_SPACE=GIB
overrides that.
"""
import os
from pathlib import Path

DRAFTER = Path(os.environ.get("DRAFTER", Path(__file__).resolve().parents[1] / "drafters" / "smollm2-135m-dspark"))


def build_llm(target, drafter, k: int = 7, **overrides):
    from vllm import LLM

    from vllm_dspark import memory

    kwargs = dict(dtype="float32", max_model_len=2048, disable_log_stats=False,
                  speculative_config={"method": "custom_class", "model": "vllm_dspark.DSparkProposer",
                                      "num_speculative_tokens": k},
                  additional_config={"dspark": {"drafter": str(drafter)}}, **memory.llm_kwargs())
    return LLM(str(target), **{**kwargs, **overrides})


def main() -> None:
    if not (DRAFTER / "config.json").exists():
        raise SystemExit(f"no drafter at {DRAFTER}: train one with scripts/train_smollm2_drafter.sh "
                         "(or set DRAFTER=DIR; `vllm-dspark init` writes an untrained one)")
    # Before vLLM is imported (its engine process inherits it): keep stdout for the answer.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from vllm import SamplingParams

    from vllm_dspark.assets import smollm2_path

    llm = build_llm(smollm2_path(), DRAFTER)
    out = llm.chat([{"role": "user", "content": "Write a haiku about speculative decoding."}],
                   SamplingParams(max_tokens=96, temperature=0))
    print(out[0].outputs[0].text)
    counts = {m.name: getattr(m, "value", None) for m in llm.get_metrics()
              if m.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                            "vllm:spec_decode_num_accepted_tokens")}
    if counts.get("vllm:spec_decode_num_draft_tokens"):
        print(f"\n[DSpark: {counts.get('vllm:spec_decode_num_drafts', 0):.0f} blocks, "
              f"{counts['vllm:spec_decode_num_draft_tokens']:.0f} drafted tokens, "
              f"{counts.get('vllm:spec_decode_num_accepted_tokens', 0):.0f} accepted]")


if __name__ == "__main__":  # vLLM's engine uses spawn: keep the entry point guarded
    main()
