#!/usr/bin/env bash
# The SmolLM2 drafter's training corpus: the target's own greedy answers to every ShareGPT conversation
# (MT-Bench excluded), up to 3 user turns each, written as the target answers them. Resumable: rerun to go on
# (finished conversations are kept). THREADS=1 (default) binds vLLM to core 0 and leaves the other core to the
# trainer: one OpenMP thread per job beats two jobs sharing two threads (an OpenMP barrier stalls whenever either
# core is taken by someone else). Throughput by concurrency: benchmarks/gen_data_throughput.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
RUNS=${RUNS:-runs}
THREADS=${THREADS:-1}
TARGET=$($PY/python -c "from vllm_dspark.assets import smollm2_path; print(smollm2_path())")
mkdir -p "$RUNS/data"
BIND=$([ "$THREADS" = 1 ] && echo 0 || echo "0-$((THREADS - 1))")
VLLM_CPU_OMP_THREADS_BIND=$BIND VLLM_ENABLE_V1_MULTIPROCESSING=0 exec $PY/vllm-dspark gen-data --target "$TARGET" \
  --prompts sharegpt --out "$RUNS/data/sharegpt_smollm2_mt.jsonl" --max-turns "${MAX_TURNS:-3}" --max-tokens 256 \
  --max-model-len 1536 --concurrency "${CONCURRENCY:-128}" "$@"
