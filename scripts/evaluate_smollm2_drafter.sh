#!/usr/bin/env bash
# Measures the SmolLM2 drafter trained by scripts/train_smollm2_drafter.sh (run it on an otherwise idle machine):
#  1. acceptance on MT-Bench turn 1 (greedy, block 7, fixed K so every position is measured): DSpark vs the
#     Markov-less ablation trained with the same budget -> $RUNS/eval/report.json (+ plots);
#  2. confidence calibration on MT-Bench turn 2 (not the benchmark's prompts), saved next to the drafter;
#  3. end-to-end tokens/s through vLLM at concurrency 1, 4, 16, 32: no speculation, ngram, DSpark adaptive and
#     fixed K = 3 and 7, interleaved -> $RUNS/bench/report.json (+ plots).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
TARGET=$($PY/python -c "from vllm_dspark.assets import smollm2_path; print(smollm2_path())")
RUNS=${RUNS:-runs}
DRAFTER=${DRAFTER:-$RUNS/smollm2-dspark}
ABLATION=${ABLATION:-$RUNS/smollm2-ablation}
ROUNDS=${ROUNDS:-2}

$PY/vllm-dspark eval --target "$TARGET" --drafter "$DRAFTER" --label dspark --drafter "$ABLATION" --label ablation \
  --num-prompts 32 --max-tokens 128 -k 7 --out "$RUNS/eval"
$PY/vllm-dspark calibrate --target "$TARGET" --drafter "$DRAFTER" --turn 2 --num-prompts 32 --max-tokens 128 -k 7 \
  --out "$RUNS/calibrate"
$PY/vllm-dspark bench --target "$TARGET" --drafter "$DRAFTER" --methods none,ngram,dspark,dspark-k3,dspark-k7 \
  --concurrency 1,4,16,32 --num-prompts 64 --min-prompts 8 --max-tokens 128 --rounds "$ROUNDS" --out "$RUNS/bench"
# The shipped copy (drafters/smollm2-135m-dspark, written by the training script) gets the same calibration.
if [ -f "$DRAFTER/dspark_calibration.json" ] && [ -d drafters/smollm2-135m-dspark ]; then
  cp "$DRAFTER/dspark_calibration.json" drafters/smollm2-135m-dspark/
fi
