"""Issue 17: per-token int8 with some MatMuls left in float, dev agreement with fp32 (one calibration per task, reused).

Needs the task folders of benchmarks/int8_tasks.sh (runs/q/TASK: model, fp32 bundle, calibration and eval files).
    .venv/bin/python benchmarks/int8_keep_float.py sst-5 "" down_proj "down_proj+o_proj"   # "" = all int8
CENTRED_ONLY=1 skips the symmetric graphs. Each variant's graph stays in runs/q/TASK/keep-float/ for int8_speed.py.
"""
import json
import os
import sys
import time
from pathlib import Path

from fsserve.data import load_examples
from fsserve.exporters import onnx as ox
from fsserve.exporters.bundle import CALIBRATION_BATCH, split_calibration
from fsserve.exporters.per_token import quantize_per_token
from fsserve.modeling import PromptModel

task = sys.argv[1]
variants = [v.split("+") if v else [] for v in sys.argv[2:]] or [[]]
D = Path("runs/q") / task
source = D / "fp32-folded.onnx" if (D / "fp32-folded.onnx").exists() else D / "fp32" / "model.onnx"  # new exports are folded already
model = PromptModel.from_pretrained(D / "model").eval()
calibration, _ = split_calibration(load_examples(D / "calibration.jsonl"))  # the export's own split: the held-out part unused
batches = ox.text_batches(model, calibration, CALIBRATION_BATCH)
evals = ox.text_batches(model, load_examples(D / "eval.jsonl"))
(D / "keep-float").mkdir(exist_ok=True)
reuse: dict = {}
for keep in variants:
    for centred in ((True,) if os.environ.get("CENTRED_ONLY") else (False, True)):
        start = time.time()
        out = D / "keep-float" / f"{'_'.join(keep).replace('/', '') or 'none'}-{'centred' if centred else 'symmetric'}.onnx"
        record = quantize_per_token(source, out, batches, centred=centred, reuse=reuse, keep_float=keep)
        agreement = ox.agreement(D / "fp32" / "model.onnx", out, evals)
        print(json.dumps({"task": task, "keep_float": keep, "centred": centred, "kept": record["kept_float"],
                          "s": round(time.time() - start), "eval": agreement}), flush=True)
