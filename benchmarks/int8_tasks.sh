#!/usr/bin/env bash
# Issue 17: per-token int8 on prompt models trained on sst-5, trec and RTE (16-shot seed 42), agreement with fp32 on their dev data.
set -euo pipefail
cd "$(dirname "$0")/.."
FS=.venv/bin/fsserve
OUTL=${OUTL:-32}
TAG=${TAG:-k$OUTL}  # the int8 bundle is int8-$TAG: a new tag re-exports with the current recipe
TASKS=${TASKS:-sst-5 trec RTE}
for T in $TASKS; do
  D=runs/q/$T
  mkdir -p $D
  [ -f $D/model/fsserve.json ] || $FS train --task $T --seed 42 --steps 60 --eval-steps 20 --lr 1e-5 --batch-size 8 --freeze-embeddings --out $D/model > $D/train.log 2>&1
  .venv/bin/python benchmarks/int8_texts.py $T $D
  [ -f $D/fp32/manifest.json ] || $FS export $D/model $D/fp32 > $D/export_fp32.log 2>&1
  $FS export $D/model $D/int8-$TAG --quantize int8 --calibration-file $D/calibration.jsonl --int8-outliers $OUTL > $D/export_int8-$TAG.log 2>&1
  .venv/bin/python benchmarks/int8_agree.py $D/fp32/model.onnx $D/int8-$TAG/model.onnx $D/model $D/eval.jsonl | tee $D/agree-$TAG.json
done
