"""`make demo`: SmolLM2-135M-Instruct with and without DSpark on MT-Bench prompts, on this machine's CPU.

Prints the acceptance length (tau), the per-position acceptance and decode tokens/s side by side. Uses the
drafter in drafters/smollm2-135m-dspark (written by scripts/train_smollm2_drafter.sh); without it, an
untrained drafter is written to ~/.cache/vllm-dspark (lossless, but it accepts almost nothing). DSpark also
copies from SmolLM2's earlier answers in data/smollm2 (setting suffix_corpus), as a server that has answered
other questions before would.

    python examples/demo.py [--num-prompts 6] [--max-tokens 128] [--rounds 2] [--out runs/demo]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "drafters" / "smollm2-135m-dspark"
CORPUS = REPO / "data" / "smollm2"  # the target's answers to ShareGPT conversations (MT-Bench excluded)


def drafter_dir(target: Path) -> Path:
    if (SHIPPED / "config.json").exists():
        return SHIPPED
    from vllm_dspark.assets import cache_root
    from vllm_dspark.checkpoint import init_drafter

    out = cache_root() / "drafters" / "smollm2-untrained"
    if not (out / "config.json").exists():
        init_drafter(target, out, num_layers=2, markov_rank=64, block_size=7)
    print(f"demo: no trained drafter in {SHIPPED}; using an UNTRAINED one ({out}): expect tau ~ 1", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "runs" / "demo"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the demo's own tables

    from vllm_dspark.assets import smollm2_path
    from vllm_dspark.eval import bench, evaluate

    target = smollm2_path()
    drafter = drafter_dir(target)
    out = Path(args.out)
    common = ["--target", str(target), "--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens)]
    print("== acceptance (MT-Bench turn 1, greedy, K = the drafter's block) ==", flush=True)
    evaluate.main(common + ["--drafter", str(drafter), "--out", str(out / "eval")])
    print("\n== speed: no speculation vs DSpark, concurrency 1, interleaved rounds ==", flush=True)
    method, corpus = ("dspark-corpus", ["--suffix-corpus", str(CORPUS)]) if CORPUS.is_dir() else ("dspark", [])
    bench.main(common + ["--drafter", str(drafter), "--methods", f"none,{method}", "--concurrency", "1",
                         "--rounds", str(args.rounds), "--out", str(out / "bench")] + corpus)

    acc = json.loads((out / "eval" / "report.json").read_text())
    speed = json.loads((out / "bench" / "report.json").read_text())
    run = next(iter(acc["drafters"].values())) if isinstance(acc.get("drafters"), dict) else acc["drafters"][0]
    tps = {r["method"]: r["tokens_per_s"] for r in speed["results"] if r["concurrency"] == 1}
    cond = " ".join(f"{c:.2f}" if c is not None else "-" for c in run["acceptance_conditional"])
    print("\n== SmolLM2-135M-Instruct, float32, this CPU ==")
    print(f"{'':28}{'no speculation':>16}{'DSpark':>12}")
    print(f"{'decode tokens/s':28}{tps.get('none', float('nan')):>16.1f}{tps.get(method, float('nan')):>12.1f}")
    print(f"{'speedup':28}{'1.00x':>16}{speed['ratios'].get(method, {}).get('1', float('nan')):>11.2f}x")
    print(f"{'acceptance length tau':28}{'1.00':>16}{run['tau']:>12.2f}")
    print(f"{'acceptance by position':28}{'':>16}  {cond}")
    print(f"{'outputs identical':28}{str(speed.get('outputs_identical')):>16}")
    print(f"\nreports and plots: {out}/eval, {out}/bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
