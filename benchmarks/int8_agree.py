"""Label agreement of two graphs (and each one's accuracy) on a file's examples, batched as the Predictor batches."""
import json, sys
import numpy as np
from fsserve.data import load_examples
from fsserve.exporters import onnx as ox
from fsserve.modeling import PromptModel
ref, cand, model_dir, path = sys.argv[1:5]
model = PromptModel.from_pretrained(model_dir).eval()
ex = load_examples(path)
batches = ox.text_batches(model, ex)
out = ox.agreement(ref, cand, batches)
print(json.dumps({"eval": path, **out}))
