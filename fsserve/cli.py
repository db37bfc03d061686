"""The ``fsserve`` command line: train, eval, predict (the library never prints; this module does)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("fsserve.cli")


# -- shared argument groups ---------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser, split_default: str | None) -> None:
    """Arguments that pick a task and its data: a k-shot folder or the user's own files."""
    g = p.add_argument_group("data")
    g.add_argument("--task", help="task name from the registry (SST-2, sst-5, trec, RTE, CoLA, STS-B, ...)")
    g.add_argument("--data", help="k-shot root folder (default: ../shared/data/k-shot)")
    g.add_argument("--k", type=int, default=16, help="examples per class in the k-shot split")
    g.add_argument("--seed", type=int, default=42, help="k-shot split seed (and training seed)")
    if split_default is not None:
        g.add_argument("--split", default=split_default, choices=["train", "dev", "test"])
        g.add_argument("--file", help="evaluate on this CSV/JSONL file (text, optional text_b, label) instead")
        g.add_argument("--max-examples", type=int, help="evaluate on the first N examples only")


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    """Arguments that define the prompt (default: the task's LM-BFF manual prompt)."""
    g = p.add_argument_group("prompt")
    g.add_argument("--template", help='e.g. "{sent_0} It was {mask}." or "*cls**sent_0*_It_was*mask*.*sep+*"')
    g.add_argument("--label-words", help='e.g. "0:terrible,1:great" (use | for several words: "1:great|good")')
    g.add_argument("--max-length", type=int, default=128)


def _add_training_args(p: argparse.ArgumentParser, default_method: str) -> None:
    """Optimisation arguments shared by train and eval."""
    g = p.add_argument_group("training")
    from fsserve.config import METHODS

    g.add_argument("--method", default=default_method, choices=list(METHODS),
                   help="prompt (LM-BFF), finetune (standard), zero-shot, or a light adaptation of a frozen LM")
    g.add_argument("--steps", type=int, default=1000, help="optimiser steps (LM-BFF: 1000)")
    g.add_argument("--eval-steps", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--train-seed", type=int, help="training seed (default: --seed)")
    g.add_argument("--freeze-embeddings", action="store_true", help="freeze input (and tied output) embeddings")
    g.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="options of probe/prompt-tuning/prefix-tuning/lora, e.g. lora_r=8, pooling=mean, num_virtual_tokens=10")
    g = p.add_argument_group("demonstrations (LM-BFF: one labelled example per class in every prompt)")
    g.add_argument("--demos", default="none", choices=["none", "random", "similar"], help="how training draws demonstrations from the training set")
    g.add_argument("--demo-eval", default="top1", choices=["top1", "similar", "random"], help="how evaluation/prediction picks them")
    g.add_argument("--num-sample", type=int, default=1, help="evaluation draws to average (LM-BFF: 16; ignored for top1)")
    g.add_argument("--filter-rate", type=float, default=0.5, help="'similar' samples from this top fraction")
    g.add_argument("--demo-encoder", help="sentence-transformers model for similarity (default: all-MiniLM-L6-v2)")


# -- helpers ------------------------------------------------------------------------------
def _task_and_data(args: argparse.Namespace) -> tuple[Any, Path]:
    """Resolve the task spec and the k-shot root from the arguments."""
    from fsserve.data import default_data_dir, get_task

    task = get_task(args.task) if args.task else None
    data = Path(args.data) if args.data else default_data_dir() / "k-shot"
    return task, data


def _prompt_config(args: argparse.Namespace, task: Any, kind: str) -> Any:
    """Build the PromptConfig from --template/--label-words, falling back to the task's manual prompt."""
    from fsserve.config import PromptConfig
    from fsserve.prompts import decoder_template, parse_label_words

    if args.template is None and task is None:
        raise ValueError("give --task, or --template and --label-words for your own data")
    template = args.template or task.template
    if args.template is None and kind == "causal":
        template = decoder_template(template)
    words: Any = parse_label_words(args.label_words) if args.label_words else dict(task.label_words)
    labels = list(task.labels) if task is not None and not args.label_words else list(words)
    regression = list(task.label_range) if task is not None and task.is_regression else None
    return PromptConfig(template=template, label_words=words, labels=labels, max_length=args.max_length, regression_range=regression)


def _model_kind(name: str) -> str:
    """Say whether a model name or folder is an encoder MLM or a decoder LM, reading only its config."""
    from transformers import AutoConfig

    from fsserve.embedded import resolve_model_path
    from fsserve.modeling import detect_kind

    return detect_kind(AutoConfig.from_pretrained(resolve_model_path(name)))


def _load_train_dev(args: argparse.Namespace, task: Any, data: Path) -> tuple[list[Any], list[Any]]:
    """Read training and dev examples from a k-shot folder or from --train/--dev files."""
    from fsserve.data import load_examples, load_kshot

    if args.train:
        labels = list(task.labels) if task is not None else None
        regression = bool(task is not None and task.is_regression)
        train = load_examples(args.train, labels=labels, regression=regression)
        dev = load_examples(args.dev, labels=labels, regression=regression) if args.dev else []
        return train, dev
    if task is None:
        raise ValueError("give --task (with a k-shot --data folder) or --train FILE")
    return load_kshot(task, data, k=args.k, seed=args.seed, split="train"), load_kshot(task, data, k=args.k, seed=args.seed, split="dev")


def _eval_examples(args: argparse.Namespace, task: Any, data: Path, labels: list[str] | None, regression: bool) -> list[Any]:
    """Read the examples to evaluate on, optionally only the first N."""
    from fsserve.data import load_examples, load_kshot

    if args.file:
        examples = load_examples(args.file, labels=labels, regression=regression)
    elif task is not None:
        examples = load_kshot(task, data, k=args.k, seed=args.seed, split=args.split)
    else:
        raise ValueError("give --task (k-shot folder) or --file to evaluate on")
    return examples[: args.max_examples] if args.max_examples else examples


def _training_args(args: argparse.Namespace) -> Any:
    """TrainingArguments from the command line."""
    from fsserve.config import TrainingArguments

    return TrainingArguments(
        method=args.method,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        max_steps=0 if args.method == "zero-shot" else args.steps,
        eval_steps=args.eval_steps,
        seed=args.train_seed if args.train_seed is not None else args.seed,
        freeze_embeddings=args.freeze_embeddings,
    )


def _build_and_train(args: argparse.Namespace, task: Any, data: Path) -> tuple[Any, Any, str]:
    """Load the LM with its prompt, train it per the arguments, and return (model, result, metric)."""
    from fsserve.modeling import PromptModel
    from fsserve.training import Trainer, set_seed

    targs = _training_args(args)
    kind = _model_kind(args.model)
    prompt = _prompt_config(args, task, kind)
    metric = task.metric if task is not None else "acc"
    set_seed(targs.seed)
    from fsserve.config import ADAPTATION_METHODS

    method_config = None
    if args.method in ADAPTATION_METHODS:
        from fsserve.methods import MethodConfig

        method_config = MethodConfig.from_options(args.method_option)
    model = PromptModel.from_pretrained(args.model, prompt=prompt, method=args.method, method_config=method_config)
    use_demos = args.demos != "none"
    train, dev = _load_train_dev(args, task, data) if targs.max_steps > 0 or use_demos else ([], [])
    if use_demos:
        from fsserve.config import DemoConfig
        from fsserve.demos import DemoIndex

        index = DemoIndex(train, labels=None if prompt.is_regression else model.labels, task=task, encoder=args.demo_encoder)
        config = DemoConfig(train_mode=args.demos, eval_mode=args.demo_eval, num_sample=args.num_sample, filter_rate=args.filter_rate)
        model.attach_demos(index, config)
    result = Trainer(model, targs, train, dev, metric=metric).train()
    return model, result, metric


# -- commands -----------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    """Train a prompt-based (or standard fine-tuned) classifier and save it."""
    task, data = _task_and_data(args)
    model, result, metric = _build_and_train(args, task, data)
    model.save_pretrained(args.out)
    best = "n/a" if result.best_score is None else f"{result.best_score:.4f} at step {result.best_step}"
    print(f"trained {result.steps} steps in {result.seconds:.1f}s ({result.trainable_parameters:,} trainable parameters); best dev {metric}: {best}")
    print(f"saved to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a saved model, or a pretrained LM zero-shot / after training, on a k-shot split or a file."""
    from fsserve.modeling import MODEL_CONFIG, PromptModel
    from fsserve.training import evaluate_model

    if getattr(args, "methods", None):
        from fsserve.cli_methods import cmd_compare

        # `fsserve eval --methods a/b/c` is `fsserve compare`: one table, each method with its default rate.
        for name, value in (("lr", None), ("export_dir", "compare-bundles"), ("no_export", False), ("validate_export", False)):
            setattr(args, name, value)
        return cmd_compare(args)
    task, data = _task_and_data(args)
    if (Path(args.model) / MODEL_CONFIG).is_file():
        model = PromptModel.from_pretrained(args.model)
        what = f"saved model {args.model}"
    else:
        model, result, _ = _build_and_train(args, task, data)
        what = f"{args.model} ({args.method}{'' if args.method == 'zero-shot' else f', {result.steps} steps'})"
    metric = task.metric if task is not None else "acc"
    examples = _eval_examples(args, task, data, model.labels, model.prompt_config.is_regression)
    start = time.perf_counter()
    report = evaluate_model(model, examples, metric)
    seconds = time.perf_counter() - start
    where = args.file or f"{task.name} {args.k}-{args.seed}/{args.split}"
    print(f"{what} on {where} ({report['n']} examples): {metric} = {report['score']:.4f}  [{seconds:.1f}s]")
    if args.json:
        print(json.dumps({"model": args.model, "data": where, "n": report["n"], "metric": metric, "score": report["score"]}))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify texts given on the command line or in a file, one per line."""
    from fsserve.predictor import Predictor

    texts = list(args.texts)
    if args.input:
        texts += [line.strip() for line in Path(args.input).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError("give texts to classify, or --input FILE with one text per line")
    predictor = Predictor.from_pretrained(args.model, backend=args.backend, batch_size=args.batch_size)
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="fsserve", description="Prompt-based few-shot text classifiers (LM-BFF): train, evaluate, predict.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a classifier and save it")
    p.add_argument("--model", default="embedded", help="HF name or folder of an encoder MLM or decoder LM (default: embedded Gemma 3 270M)")
    p.add_argument("--train", help="training file (CSV/JSONL: text, optional text_b, label)")
    p.add_argument("--dev", help="dev file for checkpoint selection")
    p.add_argument("--out", required=True, help="folder to save the trained model")
    _add_data_args(p, None)
    _add_prompt_args(p)
    _add_training_args(p, "prompt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved model, or a pretrained LM zero-shot or after training")
    p.add_argument("model", help="saved fsserve model folder, or an LM name/folder (then --method decides)")
    p.add_argument("--train", help="training file when MODEL is an LM and --method trains")
    p.add_argument("--dev", help="dev file for checkpoint selection")
    p.add_argument("--json", action="store_true", help="also print a JSON line")
    p.add_argument("--methods", help="compare adaptation methods in one table (as `fsserve compare --methods`), e.g. zero-shot/probe/lora/prompt")
    _add_data_args(p, "test")
    _add_prompt_args(p)
    _add_training_args(p, "zero-shot")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="classify texts with a saved model or bundle")
    p.add_argument("model", help="saved model folder or exported bundle")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--input", help="file with one text per line")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_predict)

    from fsserve.cli_bench import add_bench_parser
    from fsserve.cli_experiment import add_experiment_parser
    from fsserve.cli_export import add_export_parser
    from fsserve.cli_methods import add_methods_parsers
    from fsserve.cli_search import add_search_parser
    from fsserve.cli_serve import add_serve_parsers

    add_export_parser(sub)
    add_serve_parsers(sub)
    add_search_parser(sub)
    add_experiment_parser(sub)
    add_bench_parser(sub)
    add_methods_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fsserve`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"fsserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
