#!/usr/bin/env bash
# Trains the SmolLM2-135M-Instruct DSpark drafter and its Markov-less ablation with the same budget (same data,
# steps and seed). Every step is resumable: rerun the script to continue.
#
# RECIPE=mix (default; the shipped drafters/smollm2-135m-dspark, STEPS=3000, ~1 h 45 min on 2 cores): the
#   target's own greedy answers to 256 ShareGPT prompts (gen-data; MT-Bench questions excluded), twice, mixed with
#   1500 of ShareGPT's original answers (cheap extra contexts: the L1 term distils the target's own next-token
#   distribution at every position). MT-Bench turn-1 tau 1.41 (ablation 1.36); 1.43 at 4500 steps.
# RECIPE=own (STEPS=2000, ~1 h 25 min incl. 21 min of gen-data and 16 of feature cache): only the target's own
#   answers, to 2600 ShareGPT prompts (2371 fit a 256-token prompt budget). Tau 1.37 (ablation 1.34) at 2000
#   steps: at this budget the drafter is compute-bound, not data-bound (teacher-forced greedy acceptance on its
#   own training data is ~0.30 at position 1 after 1000 steps with either recipe).
# RECIPE=campaign (the drafter in training, issue 21; INSTALL=0 until it beats the shipped one): the target's own
#   answers from scripts/gen_smollm2_data.sh (run it first, in the background: it keeps writing while this trains;
#   each restart of this script reads what is there), plus ShareGPT's human answers with the target's greedy
#   token as the CE label; every supervised position an anchor; a held-out set of 64 target-written conversations
#   (frozen in data/smollm2/heldout.jsonl.gz) evaluated every 25 steps into the run's
#   learning_curve.png. One thread pinned to CORES (default 1: gen-data holds core 0), or RANKS=2 DDP ranks (both
#   cores, nothing else running). Checkpoints every 10 steps;
#   rerun to resume. The Markov-less ablation runs once the main run has reached STEPS, at equal steps.
# RECIPE=warm (STEPS=300, ~1.5 h on one core beside gen-data): continues the committed drafter on the corpus so far
#   (x2) and 3000 human conversations with target labels; step 0 of its learning curve is where the drafter starts.
#   GROW=N deepens it to N layers first (new layers from the target's top ones, drafting unchanged at step 0);
#   LOSS=ce|kl changes the loss (default dspark); EXTRA passes more train flags. RANKS=2 BATCH=4: both cores
#   (~86 blocks/s with the shipped 8192-token draft vocabulary).
# INSTALL=0: leave drafters/ as it is (the shipped weights are committed; only RECIPE=mix installs by default).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin
TARGET=$($PY/python -c "from vllm_dspark.assets import smollm2_path; print(smollm2_path())")
RUNS=${RUNS:-runs}
RECIPE=${RECIPE:-mix}
mkdir -p "$RUNS/data"

gen() {  # gen-data OUT N MAX_MODEL_LEN CONCURRENCY
  VLLM_CPU_KVCACHE_SPACE=4 VLLM_ENABLE_V1_MULTIPROCESSING=0 $PY/vllm-dspark gen-data --target "$TARGET" \
    --prompts sharegpt --out "$1" --num-prompts "$2" --max-turns 1 --max-tokens 256 --max-model-len "$3" --concurrency "$4"
}
# RANKS=2 (campaign, warm): both cores as two DDP ranks (gloo), one thread each, instead of one thread pinned to
# CORES; the global batch is the same, split across the ranks.
if [ "${RANKS:-1}" -gt 1 ]; then
  TRAIN=(env OMP_NUM_THREADS=1 $PY/python -m torch.distributed.run --nproc_per_node "$RANKS"
         --master_addr 127.0.0.1 --master_port "${PORT:-29561}" -m vllm_dspark.train.trainer)
else
  TRAIN=(env OMP_NUM_THREADS=1 taskset -c "${CORES:-1}" $PY/vllm-dspark train)
fi
case "$RECIPE" in
  mix)
    N_GEN=${N_GEN:-256}; STEPS=${STEPS:-3000}; SUFFIX=""; INSTALL=${INSTALL:-1}
    gen "$RUNS/data/sharegpt_smollm2.jsonl" "$N_GEN" 1024 128
    $PY/vllm-dspark gen-data --target "$TARGET" --prompts sharegpt --original-answers \
      --out "$RUNS/data/sharegpt_original.jsonl"
    DATA="$RUNS/data/train_mix.jsonl"
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
    ;;
  own)
    N_GEN=${N_GEN:-2600}; STEPS=${STEPS:-2000}; SUFFIX="-own"; INSTALL=${INSTALL:-0}
    gen "$RUNS/data/sharegpt_smollm2_own.jsonl" "$N_GEN" 512 256
    DATA="$RUNS/data/train_own.jsonl"
    $PY/python - "$RUNS" <<'PY'
import random, sys
runs = sys.argv[1]
rows = open(f"{runs}/data/sharegpt_smollm2_own.jsonl").read().splitlines()
random.Random(0).shuffle(rows)
open(f"{runs}/data/train_own.jsonl", "w").write("\n".join(rows) + "\n")
print(f"train_own: {len(rows)} conversations answered by the target")
PY
    ;;
  campaign)
    GEN="$RUNS/data/sharegpt_smollm2_mt.jsonl"; HUMAN="$RUNS/data/sharegpt_original.jsonl"
    HELD="$RUNS/data/heldout.jsonl"; STEPS=${STEPS:-4000}; CORES=${CORES:-1}
    # The target-written corpus listed GEN_REPEAT times: its share of the batches while it is still small.
    DATA=$(for _ in $(seq "${GEN_REPEAT:-3}"); do printf '%s,' "$GEN"; done)$HUMAN
    [ -s "$HUMAN" ] || $PY/vllm-dspark gen-data --target "$TARGET" --prompts sharegpt --original-answers --out "$HUMAN"
    RUNS=$RUNS scripts/smollm2_corpus.sh restore  # the corpus and the frozen held-out set from data/smollm2/
    COMMON=(--target "$TARGET" --data "$DATA" --heldout "$HELD" --eval-every 25 --layers 2 --block-size 7
            --draft-vocab 16384 --steps "$STEPS" --batch-size 4 --micro-batch-size 2 --anchors-per-seq 0
            --max-len 512 --lr 6e-4 --min-lr-frac 0.1 --ce-labels target --save-every 10 --threads 1
            --save-dtype bfloat16)
    resume() { [ -d "$1/checkpoints" ] && echo --resume "$1" || true; }
    OUT="$RUNS/smollm2-campaign"; ABL="$RUNS/smollm2-campaign-ablation"
    "${TRAIN[@]}" "${COMMON[@]}" --markov-rank 256 --loss dspark ${EXTRA:-} \
      --out "$OUT" $(resume "$OUT") 2>> "$RUNS/train-campaign.log"
    "${TRAIN[@]}" "${COMMON[@]}" --markov-rank 0 --loss ce ${EXTRA:-} \
      --out "$ABL" $(resume "$ABL") 2>> "$RUNS/train-campaign-ablation.log"
    if [ "${INSTALL:-0}" = 1 ]; then
      mkdir -p drafters/smollm2-135m-dspark
      cp "$OUT/config.json" "$OUT/model.safetensors" drafters/smollm2-135m-dspark/
    fi
    exit 0
    ;;
  warm)
    # One session's share of the campaign: a machine keeps nothing between sessions but git, so training goes on
    # from the committed drafter (--init) instead of a checkpoint. Data as in the campaign (HUMAN_N human rows).
    GEN="$RUNS/data/sharegpt_smollm2_mt.jsonl"; HUMAN="$RUNS/data/sharegpt_original.jsonl"
    HELD="$RUNS/data/heldout.jsonl"; STEPS=${STEPS:-300}; CORES=${CORES:-1}; OUT=${OUT:-$RUNS/smollm2-warm}
    RUNS=$RUNS scripts/smollm2_corpus.sh restore
    [ -s "$HUMAN" ] || $PY/vllm-dspark gen-data --target "$TARGET" --prompts sharegpt --original-answers --out "$HUMAN"
    head -"${HUMAN_N:-3000}" "$HUMAN" > "$RUNS/data/human_part.jsonl"
    cp "$GEN" "$RUNS/data/gen_snapshot.jsonl"  # gen-data may be appending; train on a fixed copy
    DATA=$(for _ in $(seq "${GEN_REPEAT:-2}"); do printf '%s,' "$RUNS/data/gen_snapshot.jsonl"; done)$RUNS/data/human_part.jsonl
    "${TRAIN[@]}" --target "$TARGET" --init "${INIT:-drafters/smollm2-135m-dspark}" \
      --data "$DATA" --heldout "$HELD" --eval-every "${EVAL_EVERY:-10}" --steps "$STEPS" --batch-size "${BATCH:-2}" --micro-batch-size 2 \
      --anchors-per-seq "${ANCHORS:-0}" --max-len 512 --lr "${LR:-3e-4}" --warmup-frac 0.02 --min-lr-frac 0.1 --ce-labels target \
      --save-every 10 --threads 1 --save-dtype bfloat16 --out "$OUT" $([ -d "$OUT/checkpoints" ] && echo --resume "$OUT") \
      --loss "${LOSS:-dspark}" $([ -n "${GROW:-}" ] && echo --grow-layers "$GROW") ${EXTRA:-} 2>> "$RUNS/train-warm.log"
    exit 0
    ;;
  *) echo "RECIPE=$RECIPE: expected mix, own, campaign or warm" >&2; exit 2 ;;
esac

# Cost knobs for 2 CPU cores: the 8192 most frequent assistant tokens as the draft vocabulary (d2t; ~97% of the
# regenerated answers' tokens), target features computed once into an on-disk cache (2 processes in parallel),
# then both runs (1 thread each) read the cache; the target's logits are recomputed only at supervised rows.
CACHE="$RUNS/feature-cache"
COMMON=(--target "$TARGET" --data "$DATA" --layers 2 --block-size 7 --num-target-layers 5
        --draft-vocab 8192 --steps "$STEPS" --batch-size 4 --micro-batch-size 4 --anchors-per-seq 32 --max-len 320
        --lr 1e-3 --seed 0 --save-every 100 --threads 1 --save-dtype bfloat16 --feature-cache "$CACHE")
DONE="$CACHE/.complete-$(sha256sum "$DATA" | cut -c1-16)"
if [ ! -f "$DONE" ]; then
  for shard in 0/2 1/2; do
    $PY/vllm-dspark train "${COMMON[@]}" --markov-rank 128 --out "$RUNS/cache-fill" --cache-only \
      --cache-shard $shard > "$RUNS/cache-fill-${shard%/*}.log" 2>&1 &
  done
  wait
  touch "$DONE"
fi
resume() { [ -d "$1/checkpoints" ] && echo --resume "$1" || true; }
OUT="$RUNS/smollm2-dspark$SUFFIX"
ABL="$RUNS/smollm2-ablation$SUFFIX"
$PY/vllm-dspark train "${COMMON[@]}" --markov-rank 128 --loss dspark --out "$OUT" $(resume "$OUT") \
  > "$RUNS/train-dspark$SUFFIX.log" 2>&1 &
$PY/vllm-dspark train "${COMMON[@]}" --markov-rank 0 --loss ce --out "$ABL" $(resume "$ABL") \
  > "$RUNS/train-ablation$SUFFIX.log" 2>&1 &
wait
if [ "$INSTALL" = 1 ]; then
  mkdir -p drafters/smollm2-135m-dspark
  cp "$OUT/config.json" "$OUT/model.safetensors" drafters/smollm2-135m-dspark/
fi
