"""What the ``fsserve`` subcommands share: argument groups, their resolution, and the checks on a model argument.

Every command module (``train``, ``export``, ``serve``, ``search``, ``methods``, ``experiment``,
``bench``) imports from here and from the library; none imports ``fsserve.cli`` itself or ``main``
(which imports them all), and nothing in the library imports the CLI.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from fsserve.sampling import Sample

T = TypeVar("T")
# A Hugging Face model id: "name" or "namespace/name" (what AutoConfig would look up on the hub).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class IntermixedParser(argparse.ArgumentParser):
    """An ArgumentParser that accepts options between positionals (``predict BUNDLE --backend onnx "text"``).

    argparse's default parsing takes a command's positionals in one go, so texts written after an
    option were "unrecognized arguments"; intermixed parsing collects them wherever they stand.
    Parsers that hold sub-commands keep the default parsing (argparse cannot intermix those).

    >>> p = IntermixedParser(prog="x"); _ = p.add_argument("model"); _ = p.add_argument("texts", nargs="*")
    >>> _ = p.add_argument("--backend"); p.parse_args(["m", "--backend", "onnx", "a", "b"]).texts
    ['a', 'b']
    """

    _inside = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        """Parse intermixed where argparse allows it, plainly otherwise."""
        nested = any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._actions)
        if nested or self._inside:
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def comma_list(convert: Callable[[str], T], what: str) -> Callable[[str], tuple[T, ...]]:
    """An argparse ``type`` for ``a,b,c``: every item converted; a bad or empty list is refused, naming it.

    >>> comma_list(int, "integers")("1,8, 32")
    (1, 8, 32)
    """

    def parse(text: str) -> tuple[T, ...]:
        """Split on commas, convert each item."""
        try:
            values = tuple(convert(item.strip()) for item in text.split(",") if item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one of the comma-separated {what}, got {text!r}")
        return values

    return parse


def check_model_source(name: str, saved: bool = False, try_hub: bool = True) -> None:
    """Refuse, in one line, a model argument that is neither a folder nor a loadable model name.

    ``saved``: only a folder will do (a saved fsserve model or a bundle). Otherwise the embedded
    name and Hugging Face ids are accepted; an id is tried once (unless ``try_hub`` is off, for
    runs that may never load it) so a typo fails here, with one line, not deep inside transformers
    with a traceback about repo ids.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ValueError(f"{name} is a file, not a folder: give a saved fsserve model, a bundle or an LM folder")
    if saved:
        raise ValueError(f"{name}: no such folder (expected a saved fsserve model or an exported bundle)")
    from fsserve.embedded import is_embedded_name

    if is_embedded_name(name):
        return
    looks_local = name.startswith((".", "~", "/")) or (len(path.parts) > 1 and path.parent.is_dir())
    if looks_local or not _HUB_ID.fullmatch(name):
        raise ValueError(f"{name}: no such folder, and not a model name ('embedded' is the built-in Gemma 3 270M; "
                         "a Hugging Face id such as 'roberta-large' loads from the hub or its cache)")
    if not try_hub:
        return
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name)
    except Exception as exc:  # transformers raises OSError, ValueError or HTTP errors here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{name}: no such folder, and no model of that name could be loaded from Hugging Face ({first})") from None


# -- shared argument groups ---------------------------------------------------------------
def add_torch_device_args(p: argparse.ArgumentParser) -> None:
    """How the torch backend runs on a GPU: CUDA graphs (default there), the weights' dtype, torch.compile inside the graphs."""
    from fsserve.config import GRAPH_COMPILE_MODES

    p.add_argument("--no-cuda-graphs", action="store_true", help="torch on CUDA: run eagerly instead of replaying captured CUDA graphs")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="torch backend weights (default: bfloat16 with CUDA graphs, the saved dtype otherwise)")
    p.add_argument("--compile", choices=GRAPH_COMPILE_MODES,
                   help="torch on CUDA: compile the forward with torch.compile in this mode before capturing the graphs "
                        "(slower start, faster calls: 3.6x on the 1 x 32 Gemma replay)")


def add_data_args(p: argparse.ArgumentParser, split_default: str | None) -> None:
    """Arguments that pick a task and its data: a k-shot folder or the user's own files."""
    g = p.add_argument_group("data")
    g.add_argument("--task", help="task name from the registry (SST-2, sst-5, trec, RTE, CoLA, STS-B, ...)")
    g.add_argument("--data", help="k-shot root folder (default: ../shared/data/k-shot)")
    g.add_argument("--k", type=int, default=16, help="examples per class in the k-shot split")
    g.add_argument("--seed", type=int, default=42, help="k-shot split seed (and training seed)")
    if split_default is not None:
        g.add_argument("--split", default=split_default, choices=["train", "dev", "test"])
        g.add_argument("--file", help="evaluate on this CSV/JSONL file (text, optional text_b, label) instead")
        g.add_argument("--max-examples", type=int,
                       help="evaluate on a seeded sample of N examples, each class (regression: score bin) in its share of the split")
        g.add_argument("--sample-seed", type=int, default=0, help="seed of the --max-examples sample (default 0: the same examples for every model)")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """Arguments that define the prompt (default: the task's LM-BFF manual prompt)."""
    g = p.add_argument_group("prompt")
    g.add_argument("--template", help='e.g. "{sent_0} It was {mask}." or "*cls**sent_0*_It_was*mask*.*sep+*"')
    g.add_argument("--label-words", help='e.g. "0:terrible,1:great" (use | for several words: "1:great|good")')
    g.add_argument("--max-length", type=int,
                   help="prompt length in tokens (default: 128, LM-BFF's; with --demos, fsserve.config.DEMO_MAX_LENGTH, "
                        "768, within the LM's position table)")


def add_training_args(p: argparse.ArgumentParser, default_method: str) -> None:
    """Optimisation arguments shared by train and eval."""
    g = p.add_argument_group("training")
    from fsserve.config import DEMO_EVAL, DEMO_MODES, DEMO_NUM_SAMPLE, DEMO_PER_CLASS, METHODS

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
    g = p.add_argument_group("demonstrations (labelled training examples of every class in each prompt, as LM-BFF's)")
    g.add_argument("--demos", default="none", choices=["none", "random", "similar"], help="how training draws demonstrations from the training set")
    g.add_argument("--demo-eval", default=DEMO_EVAL, choices=list(DEMO_MODES),
                   help=f"how evaluation and prediction pick them (default {DEMO_EVAL}: --num-sample draws from each class's "
                        "more similar examples, averaged; top1: the most similar ones, one LM call a query, cheapest to serve)")
    g.add_argument("--num-sample", type=int, default=DEMO_NUM_SAMPLE,
                   help=f"evaluation draws to average (default {DEMO_NUM_SAMPLE}, the demonstrations study's; LM-BFF: 16; ignored for top1)")
    g.add_argument("--filter-rate", type=float, default=0.5, help="'similar' samples from this top fraction")
    g.add_argument("--demo-encoder", help="sentence-transformers model for similarity (default: all-MiniLM-L6-v2)")
    add_demo_format_args(g, per_class=DEMO_PER_CLASS)


def add_demo_format_args(g: Any, per_class: int = 1) -> None:
    """The demonstration format flags (fsserve.config.DemoConfig's order, separator, per_class, label_after).

    ``per_class`` is the --demos-per-class default: LM-BFF's 1 for experiments (their cache keys rest on
    it), the demonstrations study's choice (``DEMO_PER_CLASS``) for train and eval.
    """
    from fsserve.config import DEMO_ORDERS

    g.add_argument("--demo-order", default="class", choices=list(DEMO_ORDERS),
                   help="class (LM-BFF), shuffle (seeded by each query's text) or similar-last (the most similar next to the query)")
    g.add_argument("--demo-separator", type=escaped_text, default=" ", metavar="TEXT",
                   help=r"text between demonstrations and the query, with \n and \t escapes, e.g. '\n' (default: a space)")
    g.add_argument("--demos-per-class", type=int, default=per_class, metavar="N",
                   help=f"demonstrations of each class in every prompt (default {per_class}; LM-BFF: 1)")
    g.add_argument("--demo-label-after", action=argparse.BooleanOptionalAction, default=True,
                   help="end each demonstration with its label word (--no-demo-label-after: its text only, an ablation)")


def escaped_text(value: str) -> str:
    r"""Read ``\n``, ``\t`` and ``\\`` in a command-line string as newline, tab and backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], value)


def demo_format(args: argparse.Namespace) -> dict[str, Any]:
    """The DemoConfig format fields from the --demo-order/--demo-separator/--demos-per-class/--demo-label-after flags."""
    return {"order": args.demo_order, "separator": args.demo_separator, "per_class": args.demos_per_class,
            "label_after": args.demo_label_after}


# -- resolving the arguments ----------------------------------------------------------------
def task_and_data(args: argparse.Namespace) -> tuple[Any, Path]:
    """Resolve the task spec and the k-shot root from the arguments."""
    from fsserve.data import default_data_dir, get_task

    task = get_task(args.task) if args.task else None
    data = Path(args.data) if args.data else default_data_dir() / "k-shot"
    return task, data


def prompt_config(args: argparse.Namespace, task: Any, kind: str) -> Any:
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
    return PromptConfig(template=template, label_words=words, labels=labels, max_length=default_max_length(args),
                        regression_range=regression)


def default_max_length(args: argparse.Namespace) -> int:
    """--max-length, else 128 (LM-BFF) or, with demonstrations, a length that does not cut them (capped by the LM)."""
    if args.max_length is not None:
        return int(args.max_length)
    from fsserve.config import DEMO_MAX_LENGTH, PromptConfig

    if getattr(args, "demos", "none") == "none":
        return PromptConfig.max_length  # LM-BFF's 128
    from transformers import AutoConfig

    from fsserve.embedded import resolve_model_path

    limit = getattr(AutoConfig.from_pretrained(resolve_model_path(args.model)), "max_position_embeddings", None)
    # RoBERTa's table holds two offset rows beyond its 512 positions: leave room for them.
    return DEMO_MAX_LENGTH if limit is None else min(DEMO_MAX_LENGTH, int(limit) - 2)


def model_kind(name: str) -> str:
    """Say whether a model name or folder is an encoder MLM or a decoder LM, reading only its config."""
    from transformers import AutoConfig

    from fsserve.embedded import resolve_model_path
    from fsserve.modeling import detect_kind

    return detect_kind(AutoConfig.from_pretrained(resolve_model_path(name)))


def load_train_dev(args: argparse.Namespace, task: Any, data: Path) -> tuple[list[Any], list[Any]]:
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


def eval_examples(args: argparse.Namespace, task: Any, data: Path, labels: list[str] | None, regression: bool) -> Sample:
    """The examples to evaluate on, as a ``fsserve.sampling.Sample``: all, or a stratified sample of --max-examples."""
    from fsserve.data import load_examples, load_kshot
    from fsserve.sampling import stratified_sample

    if args.file:
        examples = load_examples(args.file, labels=labels, regression=regression)
    elif task is not None:
        examples = load_kshot(task, data, k=args.k, seed=args.seed, split=args.split)
    else:
        raise ValueError("give --task (k-shot folder) or --file to evaluate on")
    return stratified_sample(examples, args.max_examples, args.sample_seed, task)


def training_args(args: argparse.Namespace) -> Any:
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


