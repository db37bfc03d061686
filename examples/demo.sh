#!/usr/bin/env bash
# The main job on the embedded defaults: zero-shot, prompt-based fine-tuning, evaluation, prediction.
set -euo pipefail
cd "$(dirname "$0")/.."
FS="${FSSERVE:-.venv/bin/fsserve}"
OUT="${DEMO_OUT:-runs/demo}"
TEMPLATE="{sent_0} It was {mask}."
WORDS="0:terrible,1:great"

echo "== 1/8 zero-shot: the embedded Gemma 3 270M with the prompt, no training (first run converts the model, about a minute)"
"$FS" eval embedded --file examples/sentiment_dev.jsonl --template "$TEMPLATE" --label-words "$WORDS"

echo "== 2/8 prompt-based fine-tuning on examples/sentiment_train.jsonl (32 sentences), best checkpoint on dev"
"$FS" train --train examples/sentiment_train.jsonl --dev examples/sentiment_dev.jsonl \
  --template "$TEMPLATE" --label-words "$WORDS" \
  --steps 24 --eval-steps 8 --lr 1e-5 --batch-size 8 --freeze-embeddings --out "$OUT/model"

echo "== 3/8 evaluate the trained model"
"$FS" eval "$OUT/model" --file examples/sentiment_dev.jsonl

echo "== 4/8 predict sentences it has never seen"
"$FS" predict "$OUT/model" --input examples/sentiment_new.txt

echo "== 5/8 export a self-contained ONNX bundle (graph outputs only the label logits; validated against torch; its size printed)"
"$FS" export "$OUT/model" "$OUT/bundle"

echo "== 6/8 its int8 twin (per-token int8, calibrated on the training sentences): about half the size again; its label agreement with fp32 on the dev sentences is measured (and warned about below 99%)"
"$FS" export "$OUT/model" "$OUT/bundle-int8" --quantize int8 --calibration-file examples/sentiment_train.jsonl --validation-file examples/sentiment_dev.jsonl

echo "== 7/8 the same predictions from the bundle on onnxruntime, in a process where torch cannot even be imported"
.venv/bin/python -c "import sys; sys.modules['torch'] = None; from fsserve.cli import main; sys.exit(main(sys.argv[1:]))" \
  predict "$OUT/bundle" --input examples/sentiment_new.txt
"$FS" predict "$OUT/model" --backend torch --input examples/sentiment_new.txt | tail -n 1

echo "== 8/8 serve the bundle over KServe v2 gRPC, classify through the client, stop the server cleanly"
PORT="$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
LOG="$OUT/serve.log"
"$FS" serve "demo=$OUT/bundle" --port "$PORT" --metrics-port -1 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q "^serving" "$LOG" && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$LOG"; echo "the server exited early"; exit 1; }
  sleep 0.2
done
grep "^serving" "$LOG"
"$FS" client "A delightful surprise from start to finish." "Two hours I will never get back." --url "127.0.0.1:$PORT" --model demo
kill -TERM "$SERVER"
wait "$SERVER"
trap - EXIT
tail -n 1 "$LOG"
echo "demo finished: model in $OUT/model, bundle in $OUT/bundle"
