#!/usr/bin/env bash
# The main job on the embedded defaults: zero-shot, prompt-based fine-tuning, evaluation, prediction.
set -euo pipefail
cd "$(dirname "$0")/.."
FS="${FSSERVE:-.venv/bin/fsserve}"
OUT="${DEMO_OUT:-runs/demo}"
TEMPLATE="{sent_0} It was {mask}."
WORDS="0:terrible,1:great"

echo "== 1/4 zero-shot: the embedded Gemma 3 270M with the prompt, no training (first run converts the model, about a minute)"
"$FS" eval embedded --file examples/sentiment_dev.jsonl --template "$TEMPLATE" --label-words "$WORDS"

echo "== 2/4 prompt-based fine-tuning on examples/sentiment_train.jsonl (32 sentences), best checkpoint on dev"
"$FS" train --train examples/sentiment_train.jsonl --dev examples/sentiment_dev.jsonl \
  --template "$TEMPLATE" --label-words "$WORDS" \
  --steps 24 --eval-steps 8 --lr 1e-5 --batch-size 8 --freeze-embeddings --out "$OUT/model"

echo "== 3/4 evaluate the trained model"
"$FS" eval "$OUT/model" --file examples/sentiment_dev.jsonl

echo "== 4/4 predict sentences it has never seen"
"$FS" predict "$OUT/model" --input examples/sentiment_new.txt
