"""``fsserve train``, ``fsserve eval`` and ``fsserve predict``: a classifier from data to predictions."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fsserve.cli.args import (add_data_args, add_prompt_args, add_torch_device_args, add_training_args, check_model_source, demo_format,
                              eval_examples, load_train_dev, model_kind, prompt_config, task_and_data, training_args)


def build_and_train(args: argparse.Namespace, task: Any, data: Path) -> tuple[Any, Any, str]:
    """Load the LM with its prompt, train it per the arguments, and return (model, result, metric)."""
    from fsserve.modeling import PromptModel
    from fsserve.training import Trainer, set_seed

    targs = training_args(args)
    kind = model_kind(args.model)
    prompt = prompt_config(args, task, kind)
    metric = task.metric if task is not None else "acc"
    set_seed(targs.seed)
    from fsserve.config import ADAPTATION_METHODS

    method_config = None
    if args.method in ADAPTATION_METHODS:
        from fsserve.methods import MethodConfig

        method_config = MethodConfig.from_options(args.method_option)
    model = PromptModel.from_pretrained(args.model, prompt=prompt, method=args.method, method_config=method_config)
    use_demos = args.demos != "none"
    train, dev = load_train_dev(args, task, data) if targs.max_steps > 0 or use_demos else ([], [])
    if use_demos:
        from fsserve.config import DemoConfig
        from fsserve.demos import DemoIndex

        index = DemoIndex(train, labels=None if prompt.is_regression else model.labels, task=task, encoder=args.demo_encoder)
        config = DemoConfig(train_mode=args.demos, eval_mode=args.demo_eval, num_sample=args.num_sample, filter_rate=args.filter_rate,
                            **demo_format(args))
        model.attach_demos(index, config)
    result = Trainer(model, targs, train, dev, metric=metric).train()
    return model, result, metric


# -- commands -----------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    """Train a prompt-based (or standard fine-tuned) classifier and save it."""
    check_model_source(args.model)
    task, data = task_and_data(args)
    model, result, metric = build_and_train(args, task, data)
    model.save_pretrained(args.out)
    best = "n/a" if result.best_score is None else f"{result.best_score:.4f} at step {result.best_step}"
    print(f"trained {result.steps} steps in {result.seconds:.1f}s ({result.trainable_parameters:,} trainable parameters); best dev {metric}: {best}")
    print(f"saved to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a saved model, or a pretrained LM zero-shot / after training, on a k-shot split or a file."""
    from fsserve.modeling import MODEL_CONFIG, PromptModel
    from fsserve.training import evaluate_model

    check_model_source(args.model)
    if getattr(args, "methods", None):
        from fsserve.cli.methods import cmd_compare

        # `fsserve eval --methods a/b/c` is `fsserve compare`: one table, each method with its default rate.
        for name, value in (("lr", None), ("export_dir", "compare-bundles"), ("no_export", False), ("validate_export", False)):
            setattr(args, name, value)
        return cmd_compare(args)
    task, data = task_and_data(args)
    if (Path(args.model) / MODEL_CONFIG).is_file():
        model = PromptModel.from_pretrained(args.model)
        what = f"saved model {args.model}"
    else:
        model, result, _ = build_and_train(args, task, data)
        what = f"{args.model} ({args.method}{'' if args.method == 'zero-shot' else f', {result.steps} steps'})"
    metric = task.metric if task is not None else "acc"
    sample = eval_examples(args, task, data, model.labels, model.prompt_config.is_regression)
    start = time.perf_counter()
    report = evaluate_model(model, sample.examples, metric)
    seconds = time.perf_counter() - start
    where = args.file or f"{task.name} {args.k}-{args.seed}/{args.split}"
    print(f"{what} on {where} ({report['n']} examples): {metric} = {report['score']:.4f}  [{seconds:.1f}s]")
    if sample.seed is not None:
        print(f"  sample: {sample}")
    if args.json:
        print(json.dumps({"model": args.model, "data": where, "n": report["n"], "sample": sample.record(), "metric": metric,
                          "score": report["score"]}))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify texts given on the command line or in a file, one per line."""
    from fsserve.predictor import Predictor

    check_model_source(args.model, saved=True)
    texts = list(args.texts)
    if args.input:
        texts += [line.strip() for line in Path(args.input).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError("give texts to classify, or --input FILE with one text per line")
    if args.backend == "auto":
        args.backend = "onnx" if (Path(args.model) / "manifest.json").is_file() else "torch"
    options: dict[str, Any] = {}
    if args.backend == "torch":
        options = {k: v for k, v in (("cuda_graphs", False if args.no_cuda_graphs else None), ("dtype", args.dtype), ("compile", args.compile))
                   if v is not None}
    elif args.no_cuda_graphs or args.dtype or args.compile:
        raise ValueError("--no-cuda-graphs, --dtype and --compile apply to --backend torch")
    predictor = Predictor.from_pretrained(args.model, backend=args.backend, device=args.device, batch_size=args.batch_size, **options)
    start = time.perf_counter()
    probs = predictor.predict_proba(texts)
    labels = predictor.labels_from_proba(probs)
    ms = (time.perf_counter() - start) * 1000
    for text, label, p in zip(texts, labels, probs):
        if args.json:
            print(json.dumps({"text": text, "label": label, "probs": [round(float(x), 6) for x in p]}))
        else:
            shown = " ".join(f"{name}={float(x):.3f}" for name, x in zip(predictor.labels, p))
            print(f"{label}\t[{shown}]\t{text}")
    if not args.json:
        print(f"({len(texts)} texts, {args.backend} backend, {ms:.0f} ms)")
    return 0


def add_train_parsers(sub: Any) -> None:
    """Add ``train``, ``eval`` and ``predict`` to the main parser's subcommands."""
    p = sub.add_parser("train", help="train a classifier and save it")
    p.add_argument("--model", default="embedded", help="HF name or folder of an encoder MLM or decoder LM (default: embedded Gemma 3 270M)")
    p.add_argument("--train", help="training file (CSV/JSONL: text, optional text_b, label)")
    p.add_argument("--dev", help="dev file for checkpoint selection")
    p.add_argument("--out", required=True, help="folder to save the trained model")
    add_data_args(p, None)
    add_prompt_args(p)
    add_training_args(p, "prompt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved model, or a pretrained LM zero-shot or after training")
    p.add_argument("model", help="saved fsserve model folder, or an LM name/folder (then --method decides)")
    p.add_argument("--train", help="training file when MODEL is an LM and --method trains")
    p.add_argument("--dev", help="dev file for checkpoint selection")
    p.add_argument("--json", action="store_true", help="also print a JSON line")
    p.add_argument("--methods", help="compare adaptation methods in one table (as `fsserve compare --methods`), e.g. zero-shot/probe/lora/prompt")
    add_data_args(p, "test")
    add_prompt_args(p)
    add_training_args(p, "zero-shot")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="classify texts with a saved model or bundle")
    p.add_argument("model", help="saved model folder or exported bundle")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--input", help="file with one text per line")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"], help="auto: onnx for a bundle, torch for a saved model")
    p.add_argument("--device", help="cpu, cuda[:N] or (onnx) tensorrt[:N] (default: cuda when available)")
    add_torch_device_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_predict)
