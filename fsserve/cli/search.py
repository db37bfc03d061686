"""``fsserve search labels|templates``: automatic label words and templates (LM-BFF), printed best first.

Wired into fsserve/cli/main.py with ``add_search_parser(subparsers)``; each subcommand's handler is set
as its ``func`` default. This module prints (it is the CLI); fsserve.search.label_words only logs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_search_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``search`` with its ``labels`` and ``templates`` subcommands on the main CLI's subparsers."""
    from fsserve.cli.args import add_data_args, add_prompt_args

    parser = subparsers.add_parser("search", help="find label words or templates automatically (LM-BFF)")
    sub = parser.add_subparsers(dest="search_command", required=True)
    labels = sub.add_parser("labels", help="label-word search for a template (any encoder or decoder LM)")
    templates = sub.add_parser("templates", help="template search with a T5 model (--t5) or the decoder LM itself")
    for p in (labels, templates):
        p.add_argument("--model", default="embedded", help="LM that scores prompts (default: the embedded Gemma 3 270M)")
        p.add_argument("--train", help="training file (CSV/JSONL) instead of a k-shot task")
        p.add_argument("--dev", help="dev file, for ranking")
        p.add_argument("--top", type=int, default=10, help="how many candidates to keep and print")
        p.add_argument("--rank", type=int, default=0, help="re-rank the best N candidates on dev (0: no re-ranking)")
        p.add_argument("--rank-steps", type=int, default=0, help="fine-tune a copy this many steps before scoring on dev (0: zero-shot)")
        p.add_argument("--lr", type=float, default=1e-5)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--freeze-embeddings", action="store_true")
        p.add_argument("--json", action="store_true", help="one JSON object per candidate")
        add_data_args(p, None)
        add_prompt_args(p)
    labels.add_argument("--candidates-per-class", type=int, default=30, help="k: whole-word tokens kept per class")
    labels.set_defaults(func=run_search_labels)
    templates.add_argument("--t5", help="a T5-family model (name or folder) that fills <extra_id_i> spans")
    templates.add_argument("--form", help="where spans go, e.g. '{sent_0} <extra_id_0> {mask} <extra_id_1>'")
    templates.add_argument("--beam", type=int, default=8, help="beam width")
    templates.add_argument("--max-tokens", type=int, default=None, help="longest generation (default: 12 with T5, 5 with a decoder)")
    templates.set_defaults(func=run_search_templates)
    return parser


def _setup(args: argparse.Namespace) -> tuple[Any, list[Any], list[Any], str]:
    """Load the scoring model with the (manual or given) prompt, the train/dev examples and the metric."""
    from fsserve.cli.args import check_model_source, load_train_dev, model_kind, prompt_config, task_and_data
    from fsserve.modeling import PromptModel

    check_model_source(args.model)
    task, data = task_and_data(args)
    prompt = prompt_config(args, task, model_kind(args.model))
    model = PromptModel.from_pretrained(args.model, prompt=prompt)
    train, dev = load_train_dev(args, task, data)
    if args.rank and not dev:
        raise ValueError("--rank needs dev examples (a k-shot task, or --dev FILE)")
    return model, train, dev, task.metric if task is not None else "acc"


def _rank(model: Any, candidates: list[Any], configs: list[Any], train: list[Any], dev: list[Any], args: argparse.Namespace, metric: str) -> list[Any]:
    """Re-rank the best ``--rank`` candidates on dev (zero-shot or after ``--rank-steps`` of fine-tuning)."""
    from fsserve.config import TrainingArguments
    from fsserve.search.label_words import rerank, score_prompts

    if not args.rank:
        return candidates
    n = min(args.rank, len(candidates))
    targs = TrainingArguments(max_steps=args.rank_steps, learning_rate=args.lr, batch_size=args.batch_size, freeze_embeddings=args.freeze_embeddings, progress=False)
    scores = score_prompts(model, configs[:n], dev, train, targs if args.rank_steps else None, metric)
    return rerank(candidates[:n], scores) + candidates[n:]


def _print(rows: list[dict[str, Any]], as_json: bool) -> None:
    """Print candidates best first, as text or one JSON object per line."""
    for i, row in enumerate(rows, 1):
        if as_json:
            print(json.dumps({"rank": i, **row}))
        else:
            dev = "" if row.get("dev_score") is None else f"  dev {row['dev_score']:.4f}"
            what = row.get("template") or " ".join(f"{k}:{v}" for k, v in row["label_words"].items())
            print(f"{i:3d}. {what}  [score {row['score']:.4f}{dev}]")


def run_search_labels(args: argparse.Namespace) -> int:
    """Search label words for the template and print the best combinations."""
    from fsserve.config import PromptConfig
    from fsserve.search.label_words import search_label_words

    model, train, dev, metric = _setup(args)
    found = search_label_words(model, train, k=args.candidates_per_class, num_candidates=args.top, metric=metric)
    base = model.prompt_config
    configs = [PromptConfig(base.template, c.label_words, base.labels, base.max_length) for c in found]
    found = _rank(model, found, configs, train, dev, args, metric)
    _print([{"label_words": c.label_words, "score": c.score, "loss": c.loss, "dev_score": c.dev_score} for c in found], args.json)
    return 0


def run_search_templates(args: argparse.Namespace) -> int:
    """Generate templates (T5 spans or decoder continuations) for the label words and print the best."""
    from fsserve.config import PromptConfig
    from fsserve.search.templates import decoder_templates, t5_templates

    model, train, dev, metric = _setup(args)
    base = model.prompt_config
    words = {label: base.label_words[label][0] for label in model.labels}
    if args.t5:
        found = t5_templates(args.t5, None, train, words, form=args.form, beam_width=args.beam, max_tokens=args.max_tokens or 12, num_templates=args.top)
    else:
        found = decoder_templates(model, train, form=args.form, beam_width=args.beam, max_tokens=args.max_tokens or 5, num_templates=args.top)
    configs = [PromptConfig(c.template, base.label_words, base.labels, base.max_length) for c in found]
    found = _rank(model, found, configs, train, dev, args, metric)
    _print([{"template": c.template, "score": c.score, "dev_score": c.dev_score} for c in found], args.json)
    return 0
