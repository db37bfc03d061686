"""Issue 18: how long are the prompts with demonstrations, and what would a maximum length cut?

    .venv/bin/python studies/demos/lengths.py [--tasks SST-2,sst-5,trec,RTE] [--seeds 13,21,42] \
        [--per-class 1,2] [--out studies/demos/lengths.json]

Tokens only (no LM runs): for every task and seed, the untruncated length of each dev and test-sample
prompt (the experiment's template alone (per_class 0), or with demonstrations: the template for the embedded decoder, each class's most similar training example
as its demonstration, as the study's top1 draw picks them; per_class 2 for the two-per-class level),
and the share of prompts longer than 128, 256, 384 and 512 tokens: a maximum length below a prompt's
length truncates its sentences (demonstrations first), so this says which settings cut anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
LIMITS = (128, 256, 384, 512)


def main(argv: list[str] | None = None) -> int:
    """Measure the prompt lengths and write them as JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="SST-2,sst-5,trec,RTE")
    p.add_argument("--seeds", default="13,21,42")
    p.add_argument("--per-class", default="0,1,2", help="demonstrations per class to measure (0: the plain prompt)")
    p.add_argument("--max-test", type=int, default=500, help="the test sample's size (seed 0, stratified, as phase 2)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "k-shot"))
    p.add_argument("--out", default=str(ROOT / "studies" / "demos" / "lengths.json"))
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from fsserve.config import PromptConfig
    from fsserve.data import get_task, load_kshot
    from fsserve.demos import DemoIndex
    from fsserve.demos.prompting import DemoPrompt
    from fsserve.embedded import resolve_model_path
    from fsserve.prompts import Prompt, decoder_template
    from fsserve.sampling import stratified_sample
    from fsserve.utils.atomic import write_json_atomic

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded"))
    rows = []
    for name in args.tasks.split(","):
        task = get_task(name)
        config = PromptConfig(template=decoder_template(task.template), label_words=dict(task.label_words),
                              labels=list(task.labels), max_length=100_000)
        prompt = Prompt(config, tokenizer, "causal")
        for seed in (int(s) for s in args.seeds.split(",")):
            train = load_kshot(task, args.data, 16, seed, "train")
            queries = load_kshot(task, args.data, 16, seed, "dev")
            queries += stratified_sample(load_kshot(task, args.data, 16, seed, "test"), args.max_test, 0, task).examples
            index = DemoIndex(train, labels=list(task.labels), task=task)
            for per_class in (int(k) for k in args.per_class.split(",")):
                if per_class == 0:  # the plain prompt, no demonstrations
                    encoded = prompt.encode(queries)
                else:
                    encoded = DemoPrompt(prompt, per_class=per_class).encode_selected(index, queries, "top1", 0.5)
                lengths = np.array([len(e.input_ids) for e in encoded])
                row = {"task": name, "seed": seed, "per_class": per_class, "prompts": len(lengths),
                       "median": int(np.median(lengths)), "p99": int(np.percentile(lengths, 99)), "max": int(lengths.max())}
                row.update({f"over_{n}": round(float((lengths > n).mean()), 4) for n in LIMITS})
                rows.append(row)
                print(json.dumps(row))
    write_json_atomic(Path(args.out), {"limits": list(LIMITS), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
