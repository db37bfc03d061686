"""Write a task's calibration texts (512 training texts, labels dropped) and its evaluation sample (dev, or a stratified test sample)."""
import json, random, sys
from pathlib import Path
from fsserve.data import load_split
from fsserve.sampling import stratified_sample
task, out = sys.argv[1], Path(sys.argv[2])
root = Path(__file__).resolve().parents[2] / "shared" / "data" / "original" / task
train = load_split(task, next(root.glob("train.*")))
cal = random.Random(0).sample(train, min(512, len(train)))
with open(out / "calibration.jsonl", "w") as f:
    for e in cal: f.write(json.dumps({"text": e.text} | ({"text_b": e.text_b} if e.text_b else {})) + "\n")
dev = list(root.glob("dev.*"))
ev = load_split(task, dev[0]) if dev else stratified_sample(load_split(task, next(root.glob("test.*"))), 872, seed=0, task=task).examples
with open(out / "eval.jsonl", "w") as f:
    for e in ev: f.write(json.dumps({"text": e.text} | ({"text_b": e.text_b} if e.text_b else {}) | {"label": e.label}) + "\n")
print(task, len(cal), "calibration,", len(ev), "evaluation from", dev[0].name if dev else "test (stratified 872)")
