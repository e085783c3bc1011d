#!/usr/bin/env bash
# The target-written corpus outlives a machine only in git: its conversations are committed as gzip shards under
# data/smollm2/ (a session's machine starts empty; the corpus takes ~8 h of one core to write).
#   scripts/smollm2_corpus.sh restore   runs/data/ from the shards (gen-data then skips what is there and goes on)
#   scripts/smollm2_corpus.sh save      the conversations no shard holds yet, as the next shard (then git add)
# The held-out set (64 conversations never trained on) is data/smollm2/heldout.jsonl.gz, frozen.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
CORPUS="$RUNS/data/sharegpt_smollm2_mt.jsonl"
SHARDS=data/smollm2
mkdir -p "$RUNS/data" "$SHARDS"
case "${1:-}" in
  restore)
    if [ -s "$CORPUS" ]; then echo "smollm2_corpus: $CORPUS exists; left as it is" >&2
    else
      cat /dev/null > "$CORPUS"
      shopt -s nullglob
      for f in "$SHARDS"/corpus-*.jsonl.gz; do zcat "$f" >> "$CORPUS"; done
    fi
    if [ ! -s "$RUNS/data/heldout.jsonl" ] && [ -e "$SHARDS/heldout.jsonl.gz" ]; then
      zcat "$SHARDS/heldout.jsonl.gz" > "$RUNS/data/heldout.jsonl"
    fi
    echo "smollm2_corpus: $(wc -l < "$CORPUS") conversations in $CORPUS"
    ;;
  save)
    shopt -s nullglob
    shards=("$SHARDS"/corpus-*.jsonl.gz)
    out=$(printf '%s/corpus-%03d.jsonl.gz' "$SHARDS" "${#shards[@]}")
    # New = ids no shard holds; a cut last line (gen-data killed mid-write) is left for the next save.
    python3 - "$CORPUS" "$SHARDS" "$out" <<'PY'
import glob, gzip, json, sys
corpus, shards, out = sys.argv[1:]
have = set()
for f in glob.glob(f"{shards}/corpus-*.jsonl.gz"):
    have.update(json.loads(line)["id"] for line in gzip.open(f, "rt", encoding="utf-8").read().split("\n") if line)
new = []
for line in open(corpus, encoding="utf-8").read().split("\n"):
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        continue
    if row["id"] not in have:
        have.add(row["id"])
        new.append(line)
if new:
    with gzip.open(out, "wt", encoding="utf-8") as f:
        f.write("\n".join(new) + "\n")
print(f"smollm2_corpus: {len(new)} new conversations" + (f" -> {out}" if new else ""))
PY
    ;;
  *) echo "usage: scripts/smollm2_corpus.sh restore|save (got ${1:-nothing})" >&2; exit 2 ;;
esac
