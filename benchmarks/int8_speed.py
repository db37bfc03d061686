"""Issue 17: interleaved p50 latency of several graphs of one task (onnxruntime, 2 threads), batch 1 and 32 of its eval texts.

    .venv/bin/python benchmarks/int8_speed.py trec runs/q/trec/fp32/model.onnx runs/q/trec/int8-v2/model.onnx ...
Stop other work on the machine first (the numbers in RESULTS.md were taken with the study paused: kill -STOP).
"""
import json, sys, time
import numpy as np
import onnxruntime as ort
from fsserve.data import load_examples
from fsserve.exporters import onnx as ox
from fsserve.sampling import stratified_sample
from fsserve.modeling import PromptModel
task, graphs = sys.argv[1], sys.argv[2:]
model = PromptModel.from_pretrained(f"runs/q/{task}/model").eval()
ex = load_examples(f"runs/q/{task}/eval.jsonl")
b1 = ox.text_batches(model, ex[::len(ex) // 24][:24], 1)
b32 = ox.text_batches(model, stratified_sample(ex, 96, 0).examples, 32)  # seeded, class-stratified
sessions = []
for g in graphs:
    o = ort.SessionOptions(); o.intra_op_num_threads = 2
    sessions.append(ort.InferenceSession(g, o, providers=["CPUExecutionProvider"]))
for s in sessions:  # warm-up
    s.run(None, b1[0]); s.run(None, b32[0])
t1 = [[] for _ in graphs]; t32 = [[] for _ in graphs]
for rep in range(5):
    for i, s in enumerate(sessions):
        for b in b1:
            t = time.perf_counter(); s.run(None, b); t1[i].append(time.perf_counter() - t)
        for b in b32:
            t = time.perf_counter(); s.run(None, b); t32[i].append(time.perf_counter() - t)
for g, a, b in zip(graphs, t1, t32):
    print(json.dumps({"graph": g, "b1_p50_ms": round(1000 * float(np.median(a)), 2), "b32_p50_ms": round(1000 * float(np.median(b)), 1)}))
