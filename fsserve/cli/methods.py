"""``fsserve probe-layers`` and ``fsserve compare``: the adaptation methods' reports on the command line."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any


def _add_common(p: argparse.ArgumentParser) -> None:
    """The model, data, prompt and optimisation arguments both reports share."""
    from fsserve.cli.args import add_data_args, add_prompt_args

    p.add_argument("model", nargs="?", default="embedded", help="HF name or folder of an encoder MLM or decoder LM (default: embedded)")
    add_data_args(p, "test")
    add_prompt_args(p)
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per method / probe")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="also print the rows as JSON lines")


def _data(args: argparse.Namespace) -> tuple[Any, Any, list[Any], list[Any], Any, str]:
    """Prompt, task, train/dev examples, the evaluation ``Sample`` and metric from the shared arguments."""
    from fsserve.cli.args import check_model_source, eval_examples, model_kind, prompt_config, task_and_data
    from fsserve.data import load_kshot

    check_model_source(args.model)
    task, data = task_and_data(args)
    if task is None:
        raise ValueError("give --task: the reports train on a task's k-shot split")
    prompt = prompt_config(args, task, model_kind(args.model))
    train = load_kshot(task, data, k=args.k, seed=args.seed, split="train")
    dev = load_kshot(task, data, k=args.k, seed=args.seed, split="dev")
    sample = eval_examples(args, task, data, prompt.labels, prompt.is_regression)
    return prompt, task, train, dev, sample, task.metric


def cmd_probe_layers(args: argparse.Namespace) -> int:
    """Train one probe per layer of the frozen LM and print accuracy by layer."""
    from fsserve.config import TrainingArguments
    from fsserve.methods.config import MethodConfig
    from fsserve.methods.probe_layers import best_layer, probe_layers
    from fsserve.modeling import PromptModel

    prompt, task, train, dev, sample, _ = _data(args)
    test = sample.examples
    config = MethodConfig.from_options(args.method_option)
    model = PromptModel.from_pretrained(args.model, prompt=prompt, method="probe", method_config=config)
    targs = TrainingArguments(method="probe", learning_rate=args.lr, batch_size=args.batch_size, max_steps=args.steps,
                              eval_steps=max(1, args.steps // 3), seed=args.seed, progress=False)
    scores = probe_layers(model, train, dev, targs, test=test)
    print(f"probes on {args.model} ({model.pooling} pooling, {args.steps} steps, lr {args.lr:g}), {task.name} {args.k}-{args.seed}, "
          f"{args.split}: {sample}:")
    print(f"| layer | dev acc | {args.split} acc ({len(test)}) |\n|---:|---:|---:|")
    for s in scores:
        print(f"| {s.layer} | {s.dev:.4f} | {s.test:.4f} |")
    print(f"best layer on dev: {best_layer(scores)}")
    if args.json:
        for s in scores:
            print(json.dumps({**s.__dict__, "sample": sample.record()}))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train every listed method on one task and print one comparison table."""
    from fsserve.methods.compare import compare_methods, format_table

    prompt, task, train, dev, sample, metric = _data(args)
    test = sample.examples
    rates = {}
    for item in args.lr or []:
        name, _, value = item.partition("=")
        rates[name] = float(value)
    methods = [m for m in re.split(r"[/\s]+", args.methods) if m]
    rows = compare_methods(
        args.model, prompt, train, dev, test, methods, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
        metric=metric, learning_rates=rates, export_dir=None if args.no_export else Path(args.export_dir),
        validate_export=args.validate_export,
    )
    print(f"{task.name} {args.k}-{args.seed}, {args.split}: {sample}, {args.steps} steps, batch {args.batch_size}:")
    print(format_table(rows, metric))
    if args.json:
        for row in rows:
            print(json.dumps({**row.__dict__, "sample": sample.record()}))
    return 0


def add_methods_parsers(sub: Any) -> None:
    """Register ``probe-layers`` and ``compare`` on the fsserve subcommand parser."""
    p = sub.add_parser("probe-layers", help="train one probe per layer of a frozen LM; accuracy by layer")
    _add_common(p)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE", help="probe options: pooling=mean, probe_hidden=64, ...")
    p.set_defaults(func=cmd_probe_layers)

    p = sub.add_parser("compare", help="train several adaptation methods on one task and print one table")
    _add_common(p)
    p.add_argument("--methods", required=True,
                   help="methods separated by '/' (or spaces): zero-shot/probe/probe:layer=best/prompt-tuning/prefix-tuning/lora/finetune/prompt; "
                        "options after ':' separated by ','")
    p.add_argument("--lr", action="append", metavar="METHOD=LR", help="override a method's learning rate (repeatable)")
    p.add_argument("--export-dir", default="compare-bundles", help="where bundles are exported to measure their size (removed after)")
    p.add_argument("--no-export", action="store_true", help="skip exporting (no bundle size column)")
    p.add_argument("--validate-export", action="store_true", help="validate each export against torch (slower)")
    p.set_defaults(func=cmd_compare)
