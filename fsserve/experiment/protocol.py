"""The LM-BFF evaluation protocol: every task × method × seed, best-on-dev, test metric, mean ± std.

For each task, method and seed the model trains on ``<data>/<task>/<k>-<seed>/train``; the
checkpoint (and, with a grid of learning rates and batch sizes, the setting) is chosen by the dev
score, and the test split is scored with the task's metric. Every grid point of every cell is cached
as its own JSON file, named by a hash of everything that decides its result (model, data files,
steps, learning rate, ...), so an interrupted run resumes where it stopped and a finished cell is
never recomputed; changing a setting starts a fresh cell beside the old one.
Several processes may share one run (``fsserve experiment --workers N``, or the same command in
several shells): each claims a cell before computing it (``fsserve.experiment.cell_lock``).

Methods (LM-BFF, Table 3): ``zero-shot`` (the prompt, untrained), ``in-context`` (GPT-3 style,
``fsserve.experiment.baselines``), ``finetune`` (standard fine-tuning, a new head), ``prompt`` (prompt-based
fine-tuning), ``prompt-demo`` / ``prompt-demo-similar`` (with random / SBERT-similar demonstrations
drawn from the training set; evaluation averages ``num_sample`` draws, LM-BFF: 16), laid out in the
format ``demo_order`` / ``demo_separator`` / ``demo_per_class`` / ``demo_label_after`` gives
(``fsserve.config.DemoConfig``; the defaults are LM-BFF's, and only a format that differs from it
enters a cell's key, so cells cached before the format was a setting keep their files).
Reports (markdown table, JSON, grouped-bar plot) are in ``fsserve.experiment.report``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsserve.config import DemoConfig, PromptConfig, _JsonConfig
from fsserve.data import TaskSpec, get_task, load_kshot
from fsserve.sampling import stratified_sample
from fsserve.utils.atomic import sha256_file, write_json_atomic

logger = logging.getLogger(__name__)

METHODS = ("zero-shot", "in-context", "finetune", "prompt", "prompt-demo", "prompt-demo-similar")
TRAINED = ("finetune", "prompt", "prompt-demo", "prompt-demo-similar")
DEMO_MODES = {"prompt-demo": "random", "prompt-demo-similar": "similar"}
CACHE_VERSION = 1
# The demonstration format of every cell cached before the format was a setting (cells in it keep their keys).
LMBFF_DEMO_FORMAT = {"order": "class", "separator": " ", "per_class": 1, "label_after": True}


@dataclass
class ExperimentConfig(_JsonConfig):
    """What an experiment runs; defaults are LM-BFF's protocol (1000 steps, eval every 100, full test).

    ``max_test`` scores a seeded, class-stratified sample of the test set instead (the same one for
    every method and split seed, fixed by ``test_sample_seed``), never its first rows.

    >>> cfg = ExperimentConfig(tasks=["SST-2"], methods=["prompt"], seeds=[13], data_dir="k-shot")
    >>> cfg.max_steps, cfg.eval_steps, cfg.max_test, cfg.num_sample
    (1000, 100, None, 16)
    """

    tasks: list[str]
    methods: list[str]
    seeds: list[int]
    data_dir: str
    out_dir: str = "experiments"
    model: str = "embedded"
    k: int = 16
    max_steps: int = 1000
    eval_steps: int = 100
    max_test: int | None = None  # None: the full test set; N: a stratified sample of N (fsserve.sampling), drawn with test_sample_seed
    test_sample_seed: int = 0
    learning_rates: list[float] = field(default_factory=lambda: [1e-5])
    finetune_learning_rates: list[float] | None = None  # None: the same grid as the prompt methods
    batch_sizes: list[int] = field(default_factory=lambda: [8])
    freeze_embeddings: bool = False
    max_length: int = 128
    demo_max_length: int = 256
    context_length: int = 512
    context_examples: int = 32
    num_sample: int = 16
    filter_rate: float = 0.5
    demo_encoder: str | None = None
    eval_batch_size: int = 16
    demo_order: str = "class"
    demo_separator: str = " "
    demo_per_class: int = 1
    demo_label_after: bool = True

    def __post_init__(self) -> None:
        self.tasks = [get_task(t).name for t in _as_list(self.tasks, "tasks")]
        self.methods = _as_list(self.methods, "methods")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
        self.seeds = [int(s) for s in _as_list(self.seeds, "seeds")]
        for name in ("tasks", "methods", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {values}")
        self.learning_rates = [float(v) for v in _as_list(self.learning_rates, "learning_rates")]
        if self.finetune_learning_rates is not None:
            self.finetune_learning_rates = [float(v) for v in _as_list(self.finetune_learning_rates, "finetune_learning_rates")]
        self.batch_sizes = [int(v) for v in _as_list(self.batch_sizes, "batch_sizes")]
        if any(v <= 0 for v in self.learning_rates + (self.finetune_learning_rates or [])):
            raise ValueError("learning rates must be positive")
        for name in ("k", "eval_steps", "max_length", "demo_max_length", "context_length", "num_sample", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if min(self.batch_sizes) < 1 or self.max_steps < 0 or self.context_examples < 0:
            raise ValueError("batch sizes must be >= 1, max_steps and context_examples >= 0")
        if self.max_test is not None and self.max_test < 1:
            raise ValueError(f"max_test must be a positive number of test examples, got {self.max_test}")
        if not 0.0 < self.filter_rate <= 1.0:
            raise ValueError(f"filter_rate must be in (0, 1], got {self.filter_rate}")
        try:
            DemoConfig(**self.demo_format())
        except ValueError as exc:  # DemoConfig names its own field first ("order must ..."): name ours
            raise ValueError(f"demo_{exc}") from None

    def demo_format(self) -> dict[str, Any]:
        """The DemoConfig format fields (order, separator, per_class, label_after) of the demonstration methods."""
        return {"order": self.demo_order, "separator": self.demo_separator, "per_class": self.demo_per_class,
                "label_after": self.demo_label_after}

    def grid(self, method: str) -> list[tuple[float, int]]:
        """The (learning rate, batch size) settings tried for a method; one dummy point if it does not train."""
        if method not in TRAINED:
            return [(0.0, 0)]
        rates = self.finetune_learning_rates if method == "finetune" and self.finetune_learning_rates else self.learning_rates
        return [(lr, bs) for lr in rates for bs in self.batch_sizes]


def _as_list(value: Any, name: str) -> list[Any]:
    """Accept a list or a comma-separated string, refusing an empty one."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    if not items:
        raise ValueError(f"{name} must not be empty")
    return items


@dataclass(frozen=True)
class Cell:
    """One point of the protocol: a task, a method, a seed and one grid setting.

    >>> Cell("SST-2", "prompt", 13, learning_rate=1e-5, batch_size=8).seed
    13
    """

    task: str
    method: str
    seed: int
    learning_rate: float = 0.0
    batch_size: int = 0


def split_files(config: ExperimentConfig, task: TaskSpec, seed: int) -> dict[str, Path]:
    """The train/dev/test files of one k-shot split, checked to exist."""
    folder = Path(config.data_dir) / task.name / f"{config.k}-{seed}"
    files = {s: folder / f"{task.split_files[s]}.{task.extension}" for s in ("train", "dev", "test")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ValueError(f"{task.name} seed {seed}: missing k-shot file(s) {', '.join(missing)}")
    return files


def cell_settings(config: ExperimentConfig, cell: Cell) -> dict[str, Any]:
    """Everything that decides a cell's result (its cache key): the model, data, budget and method options."""
    task = get_task(cell.task)
    data = {s: sha256_file(p)[:16] for s, p in split_files(config, task, cell.seed).items()}
    settings: dict[str, Any] = {
        "version": CACHE_VERSION, "task": task.name, "method": cell.method, "seed": cell.seed,
        "model": config.model, "k": config.k, "data_sha256": data, "max_test": config.max_test,
    }
    if config.max_test is not None:
        # Cells cached before test subsets were sampled scored the first max_test rows: this key keeps them apart.
        settings["test_sample"] = {"method": "stratified", "size": config.max_test, "seed": config.test_sample_seed}
    if cell.method == "in-context":
        settings.update(max_length=config.context_length, context_examples=config.context_examples)
        return settings
    demo = cell.method in DEMO_MODES
    settings["max_length"] = config.demo_max_length if demo else config.max_length
    if cell.method in TRAINED:
        settings.update(max_steps=config.max_steps, eval_steps=config.eval_steps, learning_rate=cell.learning_rate,
                        batch_size=cell.batch_size, freeze_embeddings=config.freeze_embeddings)
    if demo:
        settings.update(demo_mode=DEMO_MODES[cell.method], demo_eval_mode=demo_eval_mode(config, cell.method), num_sample=config.num_sample,
                        filter_rate=config.filter_rate, demo_encoder=config.demo_encoder)
        if config.demo_format() != LMBFF_DEMO_FORMAT:
            settings["demo_format"] = config.demo_format()
        if settings["demo_eval_mode"] != "top1":
            # Sampled evaluation draws per query (seeded by its text, as the Predictor does) since 2026-12-03;
            # cells cached before drew from one generator per call: this key keeps them apart.
            settings["draws"] = "per-query"
    return settings


def demo_eval_mode(config: ExperimentConfig, method: str) -> str:
    """How evaluation draws demonstrations: LM-BFF averages ``num_sample`` draws; one draw of similar ones is top1.

    A single sampled draw would make every evaluation a different random draw, so with ``num_sample=1``
    the similar method takes each class's most similar example instead (deterministic).
    """
    mode = DEMO_MODES[method]
    return "top1" if mode == "similar" and config.num_sample == 1 else mode


def cache_path(config: ExperimentConfig, settings: dict[str, Any]) -> Path:
    """Where a cell's JSON lives: ``<out>/cells/<task>/<method>/seed-<seed>-<hash of settings>.json``."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(config.out_dir) / "cells" / settings["task"] / settings["method"] / f"seed-{settings['seed']}-{digest}.json"


def iter_cells(config: ExperimentConfig) -> Iterator[Cell]:
    """Every cell of the protocol, task by task, so a partial run already covers whole tasks."""
    for task in config.tasks:
        for method in config.methods:
            for seed in config.seeds:
                for lr, bs in config.grid(method):
                    yield Cell(task, method, seed, lr, bs)


def _prompt_config(config: ExperimentConfig, task: TaskSpec, method: str, kind: str) -> Any:
    """The task's LM-BFF manual prompt (rewritten for decoders), sized for the method."""
    from fsserve.prompts import decoder_template

    template = decoder_template(task.template) if kind == "causal" else task.template
    length = config.context_length if method == "in-context" else config.demo_max_length if method in DEMO_MODES else config.max_length
    return PromptConfig(template=template, label_words=dict(task.label_words), labels=list(task.labels), max_length=length,
                        regression_range=list(task.label_range) if task.is_regression else None)


def run_cell(config: ExperimentConfig, cell: Cell, pretrained: tuple[Any, Any] | None = None,
             save_to: str | Path | None = None) -> dict[str, Any]:
    """Train (if the method trains) and score one cell; returns its dev and test scores and timings.

    ``pretrained`` is an already loaded ``(lm, tokenizer)`` to copy instead of loading ``config.model``.
    ``save_to`` keeps the scored model there (``PromptModel.save_pretrained``, with its demonstration
    pool) and its test predictions as ``test_predictions.json``, so the served path can be checked.
    """
    import time

    from fsserve.config import TrainingArguments
    from fsserve.modeling import PromptModel
    from fsserve.training import Trainer, set_seed

    if save_to is not None and cell.method == "in-context":
        raise ValueError("an in-context cell has no trained model to save")
    task = get_task(cell.task)
    start = time.perf_counter()
    train = load_kshot(task, config.data_dir, config.k, cell.seed, "train")
    dev = load_kshot(task, config.data_dir, config.k, cell.seed, "dev")
    sample = stratified_sample(load_kshot(task, config.data_dir, config.k, cell.seed, "test"), config.max_test, config.test_sample_seed, task)
    test = sample.examples
    if pretrained is None:
        kind = _model_kind(config.model)
        prompt = _prompt_config(config, task, cell.method, kind)
        lm, tokenizer = _pretrained(config.model, prompt)
    else:
        from fsserve.modeling import detect_kind

        lm, tokenizer = copy.deepcopy(pretrained[0]), pretrained[1]
        kind = detect_kind(lm.config)
        prompt = _prompt_config(config, task, cell.method, kind)
    set_seed(cell.seed)
    # Fresh pretrained weights per cell: no cell sees another's training.
    model = PromptModel(lm, tokenizer, prompt, method="finetune" if cell.method == "finetune" else "prompt", kind=kind)
    if cell.method in DEMO_MODES:
        from fsserve.demos import DemoIndex

        mode, eval_mode = DEMO_MODES[cell.method], demo_eval_mode(config, cell.method)
        index = DemoIndex(train, labels=None if task.is_regression else list(task.labels), task=task, encoder=config.demo_encoder)
        model.attach_demos(index, DemoConfig(train_mode=mode, eval_mode=eval_mode, num_sample=config.num_sample,
                                             filter_rate=config.filter_rate, encoder=config.demo_encoder, **config.demo_format()))
    record: dict[str, Any] = {"metric": task.metric, "n_test": len(test), "test_sample": sample.record(), "dev": None, "best_step": None}
    if cell.method in TRAINED:
        args = TrainingArguments(method="finetune" if cell.method == "finetune" else "prompt", learning_rate=cell.learning_rate,
                                 batch_size=cell.batch_size, eval_batch_size=config.eval_batch_size, max_steps=config.max_steps,
                                 eval_steps=config.eval_steps, seed=cell.seed, freeze_embeddings=config.freeze_embeddings,
                                 progress=False)
        trainer = Trainer(model, args, train, dev, metric=task.metric)
        result = trainer.train()
        record.update(dev=result.best_score, best_step=result.best_step, dev_curve=result.evals,
                      train_seconds=round(result.seconds, 1), final_loss=result.losses[-1] if result.losses else None)
        scored = trainer.evaluate(test)
        record["test"], predictions = scored["score"], scored["predictions"]
    elif cell.method == "in-context":
        from fsserve.experiment.baselines import in_context_logits
        from fsserve.metrics import compute_metric

        logits, sizes = in_context_logits(model, train, test, seed=cell.seed, max_examples=config.context_examples,
                                          batch_size=config.eval_batch_size)
        record["test"] = compute_metric(task.metric, model.scores_to_predictions(logits)[1], _references(test, task))
        record["context_examples"] = {"min": min(sizes), "max": max(sizes), "mean": sum(sizes) / len(sizes)}
    else:  # zero-shot: the dev score is reported too (cheap), but nothing is chosen by it
        from fsserve.training import evaluate_model

        record["dev"] = evaluate_model(model, dev, task.metric, config.eval_batch_size)["score"]
        scored = evaluate_model(model, test, task.metric, config.eval_batch_size)
        record["test"], predictions = scored["score"], scored["predictions"]
    if save_to is not None:
        model.save_pretrained(save_to)
        write_json_atomic(Path(save_to) / "test_predictions.json", [p if isinstance(p, float) else str(p) for p in predictions])
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def _references(examples: list[Any], task: TaskSpec) -> list[Any]:
    """Gold labels as the metric compares them (floats for regression, names otherwise)."""
    return [float(ex.label) if task.is_regression else str(ex.label) for ex in examples]


def _model_kind(name: str) -> str:
    """Encoder MLM or decoder LM, read from the model's config only (picks the decoder template rewrite)."""
    from transformers import AutoConfig

    from fsserve.embedded import resolve_model_path
    from fsserve.modeling import detect_kind

    return detect_kind(AutoConfig.from_pretrained(resolve_model_path(name)))


_TOKENIZERS: dict[str, Any] = {}


def _pretrained(name: str, prompt: PromptConfig) -> tuple[Any, Any]:
    """Fresh pretrained weights for one cell, with the tokenizer loaded once per process (the slow part)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from fsserve.embedded import resolve_model_path
    from fsserve.modeling import PromptModel, detect_kind

    if name not in _TOKENIZERS:
        loaded = PromptModel.from_pretrained(name, prompt=prompt)
        _TOKENIZERS.clear()
        _TOKENIZERS[name] = loaded.tokenizer
        return loaded.lm, loaded.tokenizer
    # Reloading (from the page cache) rather than deep-copying a kept pristine copy holds one LM in memory, not two.
    source = resolve_model_path(name)
    auto = AutoModelForMaskedLM if detect_kind(AutoConfig.from_pretrained(source)) == "mlm" else AutoModelForCausalLM
    return auto.from_pretrained(source, dtype=torch.float32), _TOKENIZERS[name]


Runner = Callable[[ExperimentConfig, Cell], dict[str, Any]]


def run_experiment(config: ExperimentConfig, runner: Runner | None = None,
                   on_cell: Callable[[Cell, dict[str, Any], bool], None] | None = None,
                   poll_seconds: float = 5.0) -> dict[str, Any]:
    """Run (or resume) every cell, then write results.json, results.md and results.png into ``out_dir``.

    ``runner`` computes one cell (default :func:`run_cell`); ``on_cell(cell, record, cached)`` is called
    after each cell (the CLI prints progress with it). Several processes may run the same experiment at
    once: each claims a cell before computing it (``fsserve.experiment.cell_lock``), skips cells another worker
    holds, and at the end waits (polling every ``poll_seconds``) for their results, or takes a cell over
    if its worker died.
    """
    from fsserve.experiment.cell_lock import release, try_claim
    from fsserve.experiment.report import write_reports

    runner = runner or run_cell
    records: dict[int, dict[str, Any]] = {}

    def settle(i: int, cell: Cell, settings: dict[str, Any], path: Path, lock: Path) -> bool:
        """Read the cell's result, or claim and compute it; False while another live worker holds it."""
        cached = True
        if not path.is_file():
            if not try_claim(lock):
                return False
            try:
                if not path.is_file():  # another worker may have finished it between our look and our claim
                    logger.info("running %s / %s / seed %d (lr %g, batch %d)", cell.task, cell.method, cell.seed,
                                cell.learning_rate, cell.batch_size)
                    records[i] = {"settings": settings, **runner(config, cell)}
                    write_json_atomic(path, records[i])
                    cached = False
            finally:
                release(lock)
        if cached:
            records[i] = json.loads(path.read_text(encoding="utf-8"))
        if on_cell is not None:
            on_cell(cell, records[i], cached)
        return True

    pending = []
    for i, cell in enumerate(iter_cells(config)):
        settings = cell_settings(config, cell)
        path = cache_path(config, settings)
        pending.append((i, cell, settings, path, path.with_suffix(".lock")))
    pending = [item for item in pending if not settle(*item)]
    while pending:  # cells another worker is computing: take its result, or the cell if it died
        time.sleep(poll_seconds)
        pending = [item for item in pending if not settle(*item)]
    return write_reports(config, [records[i] for i in sorted(records)])
