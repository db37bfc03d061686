"""LM-BFF's 15 tasks: file formats, metrics and manual prompts, plus loaders.

The registry describes each task as LM-BFF ships it (``data/original`` and ``data/k-shot``), so the
k-shot splits published with the paper load unchanged; ``load_examples`` reads a user's own files.
Drawing subsets (k-shot splits, stratified samples) lives in ``fsserve.sampling``.

>>> spec = get_task("sst2")
>>> spec.name, spec.labels, spec.label_words["1"]
('SST-2', ('0', '1'), 'great')
>>> compute_metric("acc", ["1", "0", "1"], ["1", "1", "1"])  # doctest: +ELLIPSIS
0.666...
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Example:
    """One input: a sentence (or pair) and its label name, a float score, or None when unlabelled."""

    text: str
    text_b: str | None = None
    label: str | float | None = None


@dataclass(frozen=True)
class TaskSpec:
    """What LM-BFF knows about a task: labels, metric, manual prompt and how its files are laid out.

    Columns are 0-based indexes into a tab- or comma-separated row; -1 means the last column.
    ``header_fields`` are the header names expected at (text, text_b, label) in files with a header.
    """

    name: str
    labels: tuple[str, ...]
    metric: str
    is_pair: bool
    is_regression: bool
    template: str
    label_words: dict[str, str] = field(hash=False)
    label_range: tuple[float, float] | None = None
    median: float | None = None  # regression: LM-BFF's fixed split point between classes "0" and "1"
    extension: str = "tsv"  # "tsv" (GLUE, split on tabs, no quoting) or "csv" (quoted, no header)
    has_header: bool = True
    text_column: int = 0
    text_b_column: int | None = None
    label_column: int = -1
    header_fields: tuple[str | None, ...] = ()
    split_files: dict[str, str] = field(default_factory=lambda: {s: s for s in SPLITS}, hash=False)
    skip_malformed: bool = False  # LM-BFF drops QQP rows with missing columns instead of failing


_SENTIMENT_TEMPLATE = "*cls**sent_0*_It_was*mask*.*sep+*"
_NLI_TEMPLATE = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
_PARAPHRASE_TEMPLATE = "*cls**sent_0**mask*,*+sentl_1**sep+*"
_BINARY_SENTIMENT = {"0": "terrible", "1": "great"}
_NLI3_WORDS = {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"}
_NLI2_WORDS = {"entailment": "Yes", "not_entailment": "No"}


def _csv_task(name: str, words: dict[str, str], template: str = _SENTIMENT_TEMPLATE) -> TaskSpec:
    """Single-sentence task in LM-BFF's csv layout: ``label,sentence``, no header, original test set."""
    return TaskSpec(name, tuple(words), "acc", False, False, template, words, extension="csv",
                    has_header=False, text_column=1, label_column=0)


def _glue_task(name: str, labels: tuple[str, ...], metric: str, template: str, words: dict[str, str],
               columns: tuple[int, int | None, int], fields: tuple[str | None, ...], **extra: Any) -> TaskSpec:
    """GLUE-style task (tsv); LM-BFF uses the original dev set as its test set."""
    text, text_b, label = columns
    return TaskSpec(name, labels, metric, text_b is not None, extra.pop("is_regression", False), template,
                    words, text_column=text, text_b_column=text_b, label_column=label,
                    header_fields=fields, **extra)


_TASK_LIST = [
    _glue_task("SST-2", ("0", "1"), "acc", _SENTIMENT_TEMPLATE, _BINARY_SENTIMENT, (0, None, 1),
               ("sentence", None, "label")),
    _csv_task("sst-5", {"0": "terrible", "1": "bad", "2": "okay", "3": "good", "4": "great"}),
    _csv_task("mr", _BINARY_SENTIMENT),
    _csv_task("cr", _BINARY_SENTIMENT),
    _csv_task("mpqa", _BINARY_SENTIMENT),
    _csv_task("subj", {"0": "subjective", "1": "objective"}, "*cls**sent_0*_This_is*mask*.*sep+*"),
    _csv_task("trec", {"0": "Description", "1": "Entity", "2": "Expression", "3": "Human",
                       "4": "Location", "5": "Number"}, "*cls**mask*:*+sent_0**sep+*"),
    _glue_task("CoLA", ("0", "1"), "mcc", "*cls**sent_0*_This_is*mask*.*sep+*",
               {"0": "incorrect", "1": "correct"}, (3, None, 1), (), has_header=False),
    _glue_task("MNLI", ("contradiction", "entailment", "neutral"), "acc", _NLI_TEMPLATE, _NLI3_WORDS,
               (8, 9, -1), ("sentence1", "sentence2", "gold_label"),
               split_files={"train": "train", "dev": "dev_matched", "test": "test_matched",
                            "test_mismatched": "test_mismatched"}),
    _glue_task("SNLI", ("contradiction", "entailment", "neutral"), "acc", _NLI_TEMPLATE, _NLI3_WORDS,
               (7, 8, -1), ("sentence1", "sentence2", "gold_label")),
    _glue_task("QNLI", ("entailment", "not_entailment"), "acc", _NLI_TEMPLATE, _NLI2_WORDS,
               (1, 2, -1), ("question", "sentence", "label")),
    _glue_task("RTE", ("entailment", "not_entailment"), "acc", _NLI_TEMPLATE, _NLI2_WORDS,
               (1, 2, -1), ("sentence1", "sentence2", "label")),
    _glue_task("MRPC", ("0", "1"), "f1", _PARAPHRASE_TEMPLATE, {"0": "No", "1": "Yes"},
               (3, 4, 0), ("#1 String", "#2 String", "Quality")),
    _glue_task("QQP", ("0", "1"), "f1", _PARAPHRASE_TEMPLATE, {"0": "No", "1": "Yes"},
               (3, 4, 5), ("question1", "question2", "is_duplicate"), skip_malformed=True),
    _glue_task("STS-B", ("0", "1"), "pearson", _PARAPHRASE_TEMPLATE, {"0": "No", "1": "Yes"},
               (7, 8, -1), ("sentence1", "sentence2", "score"), is_regression=True,
               label_range=(0.0, 5.0), median=2.5),
]
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _TASK_LIST}


def _fold(name: str) -> str:
    """Spelling-insensitive key, so "sst2", "SST-2" and "sst_2" name the same task."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


_BY_FOLDED = {_fold(name): spec for name, spec in TASKS.items()}


def get_task(name: str | TaskSpec) -> TaskSpec:
    """Look a task up by any common spelling, so CLI flags and configs need not match case or dashes."""
    if isinstance(name, TaskSpec):
        return name
    spec = _BY_FOLDED.get(_fold(str(name)))
    if spec is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return spec


def default_data_dir() -> Path:
    """Where the shared real data lives: $FSSERVE_DATA_DIR, else ../shared/data beside the repo root."""
    override = os.environ.get("FSSERVE_DATA_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _check_text(value: str | None, what: str, where: str) -> str:
    """Reject a missing or blank sentence, naming where it was found."""
    if value is None or not value.strip():
        raise ValueError(f"{where}: empty {what}")
    return value


def _parse_label(raw: object, where: str, labels: Sequence[str] | None, regression: bool,
                 label_range: tuple[float, float] | None = None) -> str | float:
    """Turn a raw cell into a label name (or a float score), rejecting names outside ``labels``."""
    if isinstance(raw, bool) or raw is None or (isinstance(raw, str) and not raw.strip()):
        raise ValueError(f"{where}: missing or invalid label {raw!r}")
    if regression:
        try:
            score = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"{where}: regression label {raw!r} is not a number") from None
        if not math.isfinite(score) or (label_range and not label_range[0] <= score <= label_range[1]):
            raise ValueError(f"{where}: score {raw!r} is outside the range {label_range}")
        return score
    name = str(raw).strip()
    if labels is not None and name not in labels:
        raise ValueError(f"{where}: unknown label {name!r}; expected one of {list(labels)}")
    return name


def _read_rows(spec: TaskSpec, path: Path) -> list[tuple[int, list[str]]]:
    """Split a task file into (line number, cells) rows, the header still included."""
    if spec.extension == "csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            return [(reader.line_num, row) for row in reader if row]
    # GLUE tsv files are not quoted: a '"' is text, so split on tabs only (as GLUE's readers do).
    text = path.read_text(encoding="utf-8-sig")
    return [(i, line.rstrip("\r").split("\t")) for i, line in enumerate(text.split("\n"), 1) if line.strip()]


def load_split(task: str | TaskSpec, path: str | Path) -> list[Example]:
    """Read one file in a task's LM-BFF/GLUE format, so real benchmark data feeds the same pipeline."""
    spec, path = get_task(task), Path(path)
    if not path.is_file():
        raise ValueError(f"{spec.name}: no such file {path}")
    rows = _read_rows(spec, path)
    if spec.has_header and rows:
        lineno, header = rows.pop(0)
        for column, expected in zip((spec.text_column, spec.text_b_column, spec.label_column),
                                    spec.header_fields):
            if expected is not None and (column >= len(header) or header[column] != expected):
                raise ValueError(f"{path}:{lineno}: header {header} is not {spec.name}'s: "
                                 f"expected {expected!r} in column {column}")
    needed = 1 + max(c for c in (spec.text_column, spec.text_b_column, spec.label_column) if c is not None)
    examples, skipped, blank = [], 0, 0
    for lineno, cells in rows:
        where = f"{path}:{lineno}"
        if len(cells) < needed:
            if spec.skip_malformed:
                skipped += 1
                continue
            raise ValueError(f"{where}: expected at least {needed} columns for {spec.name}, got {len(cells)}")
        sentences = [cells[c] for c in (spec.text_column, spec.text_b_column) if c is not None]
        if not all(s.strip() for s in sentences):
            # A published split may hold a blank sentence (LM-BFF's 8-shot CR has a text of one space);
            # it carries no signal and a prompt cannot be built from it, so the row is skipped, by name.
            logger.warning("%s: blank text %r in %s's published data: row skipped (user files refuse it)", where, sentences, spec.name)
            blank += 1
            continue
        text, text_b = sentences[0], (sentences[1] if len(sentences) > 1 else None)
        label = _parse_label(cells[spec.label_column], where, spec.labels, spec.is_regression, spec.label_range)
        examples.append(Example(text, text_b, label))
    if not examples:
        raise ValueError(f"{path}: no examples")
    if skipped:
        logger.warning("%s: skipped %d malformed rows, as LM-BFF does for %s", path, skipped, spec.name)
    if blank:
        logger.warning("%s: skipped %d row(s) with blank text", path, blank)
    logger.debug("loaded %d %s examples from %s", len(examples), spec.name, path)
    return examples


def load_kshot(task: str | TaskSpec, data_dir: str | Path, k: int = 16, seed: int = 42,
               split: str = "train") -> list[Example]:
    """Load one published k-shot split (<data_dir>/<task>/<k>-<seed>/<split>), the unit LM-BFF reports on."""
    spec = get_task(task)
    if split not in spec.split_files:
        raise ValueError(f"unknown split {split!r} for {spec.name}; expected one of {list(spec.split_files)}")
    path = Path(data_dir) / spec.name / f"{k}-{seed}" / f"{spec.split_files[split]}.{spec.extension}"
    return load_split(spec, path)


_USER_FIELDS = {"text", "text_b", "label"}


def _json_rows(path: Path) -> list[tuple[int, dict]]:
    """Parse a JSON-lines file into (line number, object) rows, skipping blank lines."""
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    return rows


def _csv_rows(path: Path) -> list[tuple[int, dict]]:
    """Parse a csv file with a header row into (line number, row dict) rows."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty file, expected a header row with columns text[,text_b],label")
        unknown = set(reader.fieldnames) - _USER_FIELDS
        if unknown or "text" not in reader.fieldnames:
            raise ValueError(f"{path}:1: header {reader.fieldnames} must name text, optional text_b and label "
                             f"(unknown: {sorted(unknown)})")
        rows = []
        for row in reader:
            if None in row:
                raise ValueError(f"{path}:{reader.line_num}: more cells than header columns")
            if any(v is None for v in row.values()):
                raise ValueError(f"{path}:{reader.line_num}: fewer cells than header columns")
            if any(v.strip() for v in row.values()):
                rows.append((reader.line_num, dict(row)))
        return rows



def load_examples(path: str | Path, labels: Sequence[str] | None = None, *, regression: bool = False,
                  pair: bool = False) -> list[Example]:
    """Read a user's own .csv / .jsonl (text, optional text_b, label) or .txt (one text a line) file.

    A missing ``label`` column or key gives unlabelled examples (label None); ``pair`` requires text_b.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        rows = [(i, {"text": line}) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                if line.strip()]
    elif suffix == ".jsonl":
        rows = _json_rows(path)
    elif suffix == ".csv":
        rows = _csv_rows(path)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .csv, .jsonl or .txt")
    examples = []
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        unknown = set(row) - _USER_FIELDS
        if unknown or "text" not in row:
            raise ValueError(f"{where}: keys {sorted(row)} must be text, optional text_b and label "
                             f"(unknown: {sorted(unknown)})")
        text, text_b = row["text"], row.get("text_b")
        if not isinstance(text, str) or not isinstance(text_b, (str, type(None))):
            raise ValueError(f"{where}: text and text_b must be strings, got {text!r} and {text_b!r}")
        _check_text(text, "text", where)
        if pair:
            _check_text(text_b, "text_b (pair task)", where)
        label = None
        if "label" in row:
            label = _parse_label(row["label"], where, labels, regression)
        examples.append(Example(text, text_b or None, label))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def regression_class(value: float, task: str | TaskSpec) -> str:
    """Bin a regression score into "0" (low) / "1" (high) as LM-BFF does when picking demonstrations.

    LM-BFF's demonstration code puts scores *at* the median in "0" (``<= median``); its k-shot
    sampler instead uses ``< median`` — see ``fsserve.sampling.sample_kshot``.
    """
    spec = get_task(task)
    if not spec.is_regression or spec.median is None:
        raise ValueError(f"{spec.name} is not a regression task")
    return "0" if float(value) <= spec.median else "1"
