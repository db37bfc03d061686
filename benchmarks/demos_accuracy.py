"""SST-2 16-shot accuracy of prompt FT without demonstrations, with random ones and with similar ones.

Runs the embedded Gemma 3 270M (or --model) on ../shared/data/k-shot/SST-2/16-<seed>; each variant
starts from the same pretrained weights with the same seed and budget. Prints a markdown table and
writes JSON. Takes several minutes on a 2-core CPU (demonstrations triple the sequence length).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fsserve.config import DemoConfig, PromptConfig, TrainingArguments
from fsserve.data import default_data_dir, get_task, load_kshot
from fsserve.demos import DemoIndex
from fsserve.modeling import PromptModel
from fsserve.sampling import describe_sample, stratified_sample
from fsserve.training import Trainer, evaluate_model, set_seed


def run(variant: str, args: argparse.Namespace) -> dict:
    """Train and evaluate one variant: 'none', 'random' or 'similar' demonstrations."""
    task = get_task("SST-2")
    data = Path(args.data)
    train = load_kshot(task, data, k=16, seed=args.seed, split="train")
    dev = load_kshot(task, data, k=16, seed=args.seed, split="dev")
    sample = stratified_sample(load_kshot(task, data, k=16, seed=args.seed, split="test"), args.max_test, args.sample_seed, task)
    set_seed(args.seed)
    prompt = PromptConfig(task.template, dict(task.label_words), labels=list(task.labels), max_length=args.max_length)
    model = PromptModel.from_pretrained(args.model, prompt=prompt)
    if variant != "none":
        eval_mode, num_sample = ("top1", 1) if variant == "similar" else ("random", args.num_sample)
        model.attach_demos(DemoIndex(train, labels=model.labels), DemoConfig(train_mode=variant, eval_mode=eval_mode, num_sample=num_sample))
    targs = TrainingArguments(max_steps=args.steps, eval_steps=args.eval_steps, learning_rate=args.lr, batch_size=8,
                              freeze_embeddings=True, seed=args.seed, progress=False)
    start = time.perf_counter()
    result = Trainer(model, targs, train, dev, metric=task.metric).train()
    score = evaluate_model(model, sample.examples, task.metric)["score"]
    return {"variant": variant, "accuracy": score, "test_sample": sample.record(), "best_dev": result.best_score, "best_step": result.best_step,
            "seconds": time.perf_counter() - start}


def main() -> None:
    """Run the three variants and report them side by side."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="embedded")
    p.add_argument("--data", default=str(default_data_dir() / "k-shot"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--max-test", type=int, default=300, help="a stratified sample of this many test sentences (not the first N)")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--num-sample", type=int, default=4, help="evaluation draws averaged for random demonstrations")
    p.add_argument("--variants", default="none,random,similar")
    p.add_argument("--out", default="out/demos_accuracy.json")
    args = p.parse_args()
    rows = [run(v, args) for v in args.variants.split(",")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "results": rows}, indent=2))
    print(f"| variant | accuracy (test: {describe_sample(rows[0]['test_sample'])}) | best dev | seconds |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| prompt FT + {r['variant']} demos | {r['accuracy']:.4f} | {r['best_dev']:.4f} (step {r['best_step']}) | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
