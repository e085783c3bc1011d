#!/usr/bin/env bash
# The SmolLM2 drafter's training corpus: the target's own greedy answers to every ShareGPT conversation
# (MT-Bench excluded), up to 3 user turns each, written as the target answers them. Resumable: rerun to go on
# (finished conversations are kept; `scripts/smollm2_corpus.sh save` commits them as a shard for the next machine). CORES=0 (default) pins it to core 0 with one thread and leaves the other core
# to the trainer: one thread per job beats two jobs sharing two threads (an OpenMP barrier stalls whenever either
# core is taken by someone else). vLLM binds threads only for engines in worker processes: in-process, the thread
# count and placement come from OMP_NUM_THREADS and taskset here. NICE=-5 (as root) keeps it ahead of other work.
# Throughput by concurrency: benchmarks/gen_data_throughput.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
RUNS=${RUNS:-runs}
CORES=${CORES:-0}
TARGET=$($PY/python -c "from vllm_dspark.assets import smollm2_path; print(smollm2_path())")
mkdir -p "$RUNS/data"
RUNS=$RUNS scripts/smollm2_corpus.sh restore  # the committed shards first: a new machine goes on where git left off
THREADS=$(taskset -c "$CORES" nproc)
OMP_NUM_THREADS=$THREADS VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_ENABLE_V1_MULTIPROCESSING=0 \
  exec nice -n "${NICE:--5}" taskset -c "$CORES" $PY/vllm-dspark gen-data --target "$TARGET" \
  --prompts sharegpt --out "$RUNS/data/sharegpt_smollm2_mt.jsonl" --max-turns "${MAX_TURNS:-3}" --max-tokens 256 \
  --max-model-len 1536 --concurrency "${CONCURRENCY:-128}" --kv-cache-gib "${KV_GIB:-4}" "$@"
