#!/usr/bin/env bash
# Trains the SmolLM2-135M-Instruct DSpark drafter (copied to drafters/smollm2-135m-dspark) and its Markov-less
# ablation trained with the same budget. Every step is resumable: rerun the script to continue.
# Data: the target's own greedy answers to ShareGPT prompts (gen-data; MT-Bench questions excluded) mixed with
# ShareGPT's original answers (cheap extra contexts: the L1 term distils the target's distribution anyway).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
TARGET=$($PY/python -c "from vllm_dspark.assets import smollm2_path; print(smollm2_path())")
RUNS=${RUNS:-runs}
N_GEN=${N_GEN:-256}           # regenerated answers to aim for (gen-data resumes where it stopped)
STEPS=${STEPS:-3000}
mkdir -p "$RUNS/data"

VLLM_CPU_KVCACHE_SPACE=4 VLLM_ENABLE_V1_MULTIPROCESSING=0 $PY/vllm-dspark gen-data --target "$TARGET" \
  --prompts sharegpt --out "$RUNS/data/sharegpt_smollm2.jsonl" --num-prompts "$N_GEN" --max-tokens 256 --chunk 128
$PY/vllm-dspark gen-data --target "$TARGET" --prompts sharegpt --original-answers \
  --out "$RUNS/data/sharegpt_original.jsonl"
# Mix: regenerated answers twice, then 1500 original conversations, shuffled with a fixed seed.
$PY/python - "$RUNS" <<'PY'
import json, random, sys
runs = sys.argv[1]
gen = open(f"{runs}/data/sharegpt_smollm2.jsonl").read().splitlines()
orig = open(f"{runs}/data/sharegpt_original.jsonl").read().splitlines()[:1500]
rows = gen + gen + orig
random.Random(0).shuffle(rows)
open(f"{runs}/data/train_mix.jsonl", "w").write("\n".join(rows) + "\n")
print(f"train_mix: {len(rows)} conversations ({len(gen)} regenerated x2 + {len(orig)} original)")
PY

# Cost knobs for 2 CPU cores: the 8192 most frequent assistant tokens as the draft vocabulary (d2t; ~97% of the
# regenerated answers' tokens), target features computed once into an on-disk cache (2 processes in parallel),
# then both runs (1 thread each) read the cache; the target's logits are recomputed only at supervised rows.
CACHE="$RUNS/feature-cache"
COMMON=(--target "$TARGET" --data "$RUNS/data/train_mix.jsonl" --layers 2 --block-size 7 --num-target-layers 5
        --draft-vocab 8192 --steps "$STEPS" --batch-size 4 --micro-batch-size 4 --anchors-per-seq 32 --max-len 320
        --lr 1e-3 --seed 0 --save-every 100 --threads 1 --save-dtype bfloat16 --feature-cache "$CACHE")
if [ ! -f "$CACHE/.complete" ]; then
  for shard in 0/2 1/2; do
    $PY/vllm-dspark train "${COMMON[@]}" --markov-rank 128 --out "$RUNS/cache-fill" --cache-only \
      --cache-shard $shard > "$RUNS/cache-fill-${shard%/*}.log" 2>&1 &
  done
  wait
  touch "$CACHE/.complete"
fi
resume() { [ -d "$1/checkpoints" ] && echo --resume "$1" || true; }
$PY/vllm-dspark train "${COMMON[@]}" --markov-rank 128 --loss dspark --out "$RUNS/smollm2-dspark" \
  $(resume "$RUNS/smollm2-dspark") > "$RUNS/train-dspark.log" 2>&1 &
$PY/vllm-dspark train "${COMMON[@]}" --markov-rank 0 --loss ce --out "$RUNS/smollm2-ablation" \
  $(resume "$RUNS/smollm2-ablation") > "$RUNS/train-ablation.log" 2>&1 &
wait
mkdir -p drafters/smollm2-135m-dspark
cp "$RUNS/smollm2-dspark/config.json" "$RUNS/smollm2-dspark/model.safetensors" drafters/smollm2-135m-dspark/
