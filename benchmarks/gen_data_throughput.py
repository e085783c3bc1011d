"""Answer-generation throughput of `vllm-dspark gen-data` by concurrency, measured side by side in one process.

For each concurrency, one engine (float32, enforce_eager) runs gen-data's feed over the same shuffled ShareGPT
conversations: WARMUP seconds to fill the batch, then SECONDS measured (answer tokens per second, in-flight
ones counted). Engines are built one after another; nothing else should run on the machine.

    C=32,64,128,256 SECONDS=60 WARMUP=30 .venv/bin/python benchmarks/gen_data_throughput.py
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "8")


def main() -> None:
    from vllm import LLM

    from vllm_dspark.assets import smollm2_path
    from vllm_dspark.train.data import _Feed, load_dialogues

    conc = [int(c) for c in os.environ.get("C", "32,64,128,256").split(",")]
    seconds, warmup = float(os.environ.get("SECONDS", 60)), float(os.environ.get("WARMUP", 30))
    pairs = load_dialogues("sharegpt")
    random.Random(0).shuffle(pairs)
    rows = []
    for c in conc:
        args = argparse.Namespace(max_turns=3, max_tokens=256, temperature=0.0, seed=0, concurrency=c,
                                  max_model_len=1536)
        llm = LLM(model=str(smollm2_path()), dtype="float32", max_model_len=1536, seed=0, enforce_eager=True,
                  max_num_seqs=c)
        feed = _Feed(llm, pairs[: 20 * c], args)
        feed.run(lambda d: None, warmup)
        start, t0 = feed.generated, time.perf_counter()
        feed.run(lambda d: None, seconds)
        tps = (feed.generated - start) / (time.perf_counter() - t0)
        rows.append((c, tps))
        print(f"concurrency {c}: {tps:.1f} answer tokens/s", flush=True)
        del llm, feed
        gc.collect()
    best = max(t for _, t in rows)
    print("\n| concurrency | tokens/s | vs best |\n|---|---|---|")
    for c, t in rows:
        print(f"| {c} | {t:.1f} | {t / best:.2f} |")


if __name__ == "__main__":
    main()
