"""Offline generation with DSpark: SmolLM2-135M-Instruct + drafters/smollm2-135m-dspark (CPU, float32).

    .venv/bin/python examples/offline_llm.py
"""
import os
from pathlib import Path

DRAFTER = Path(os.environ.get("DRAFTER", Path(__file__).resolve().parents[1] / "drafters" / "smollm2-135m-dspark"))

if __name__ == "__main__":  # vLLM's engine uses spawn: keep the entry point guarded
    if not (DRAFTER / "config.json").exists():
        raise SystemExit(f"no drafter at {DRAFTER}: train one with scripts/train_smollm2_drafter.sh "
                         "(or set DRAFTER=DIR; `vllm-dspark init` writes an untrained one)")
    from vllm import LLM, SamplingParams

    from vllm_dspark.assets import smollm2_path

    llm = LLM(str(smollm2_path()), dtype="float32", max_model_len=2048,
              speculative_config={"method": "custom_class", "model": "vllm_dspark.DSparkProposer",
                                  "num_speculative_tokens": 7},
              additional_config={"dspark": {"drafter": str(DRAFTER)}}, disable_log_stats=False)
    out = llm.chat([{"role": "user", "content": "Write a haiku about speculative decoding."}],
                   SamplingParams(max_tokens=96, temperature=0))
    print(out[0].outputs[0].text)
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num"):
            print(m.name, getattr(m, "value", None) or getattr(m, "values", None))
