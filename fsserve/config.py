"""Plain dataclass configs (prompt, training) that round-trip through JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="_JsonConfig")

BASE_METHODS = ("prompt", "finetune", "zero-shot")
# Lighter adaptations of a frozen LM, built and restored by fsserve.methods.
ADAPTATION_METHODS = ("probe", "prompt-tuning", "prefix-tuning", "lora")
METHODS = BASE_METHODS + ADAPTATION_METHODS


class _JsonConfig:
    """Mixin giving dataclasses ``to_dict``/``from_dict``/``save``/``load`` that refuse unknown keys."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict, so configs can be saved next to weights."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Build the config from a dict, naming any key this version does not know."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} must be built from a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        """Read a config from a JSON file."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


@dataclass
class PromptConfig(_JsonConfig):
    """What turns an example into an LM input and the LM's output into class scores.

    >>> cfg = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"})
    >>> cfg.labels
    ['0', '1']
    """

    template: str
    label_words: dict[str, Any]
    labels: list[str] | None = None
    max_length: int = 128
    truncate_head: bool = False
    first_sent_limit: int | None = None
    other_sent_limit: int | None = None
    regression_range: list[float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or not self.template.strip():
            raise ValueError("template must be a non-empty string")
        if not isinstance(self.label_words, dict) or not self.label_words:
            raise ValueError("label_words must be a non-empty dict mapping each label to a word or list of words")
        words: dict[str, list[str]] = {}
        for label, value in self.label_words.items():
            items = [value] if isinstance(value, str) else list(value)
            if not items or not all(isinstance(w, str) and w.strip() for w in items):
                raise ValueError(f"label {label!r} needs at least one non-empty label word, got {value!r}")
            words[str(label)] = items
        self.label_words = words
        if self.labels is None:
            self.labels = list(words)
        self.labels = [str(label) for label in self.labels]
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, got {self.labels}")
        extra = [label for label in words if label not in self.labels]
        if extra:
            raise ValueError(f"label word(s) given for {extra}, which are not in the label list {self.labels}")
        missing = [label for label in self.labels if label not in words]
        if missing:
            raise ValueError(f"label(s) {missing} have no label word")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {self.max_length}")
        if self.regression_range is not None:
            lo, hi = (float(v) for v in self.regression_range)
            if not hi > lo or len(self.labels) != 2:
                raise ValueError("regression needs exactly two labels (low, high) and a range (lo, hi) with hi > lo")
            self.regression_range = [lo, hi]

    @property
    def is_regression(self) -> bool:
        """Say whether the prompt scores a real value (LM-BFF's two-word regression)."""
        return self.regression_range is not None


# torch.compile modes the CUDA-graph backend takes (Inductor without cudagraphs of its own: the graphs are
# fsserve's). On an H200 "default" made the 1 x 32 Gemma 3 270M replay 3.6x faster (benchmarks/RESULTS.md).
GRAPH_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")

DEMO_MODES = ("random", "similar", "top1")
DEMO_ORDERS = ("class", "shuffle", "similar-last")


# Prompt length with demonstrations (the CLI's default when --demos is on): the demonstrations study's phase 2
# length, which cuts no prompt of SST-2, sst-5, trec or RTE even with two demonstrations per class (RTE's
# longest is 704 tokens; studies/demos/lengths.json). Batches pad to their longest prompt, so short tasks pay nothing.
DEMO_MAX_LENGTH = 768
# Demonstrations of each class per prompt for `fsserve train/eval --demos` (DemoConfig keeps LM-BFF's 1): the
# study's dev choice, +1.6 over one per class on SST-2 and trec (docs/results.md, "The demonstrations study").
DEMO_PER_CLASS = 2
# How `fsserve train/eval --demos` picks them at evaluation and prediction (DemoConfig keeps ``top1``): 4 draws
# from each class's more similar half, label logits averaged. With two per class the study's dev score
# was 89.8 this way (level two-per-class) and 87.7 with the single most similar set (level chosen): 4 LM calls a query buy 2.1 points.
DEMO_EVAL = "similar"
DEMO_NUM_SAMPLE = 4


@dataclass
class DemoConfig(_JsonConfig):
    """How demonstrations are drawn and laid out: fresh per example and step in training, ``top1`` by default at prediction.

    The format fields (``order``, ``separator``, ``per_class``, ``label_after``) are read by
    :class:`fsserve.demos.DemoPrompt`; their defaults are LM-BFF's one demonstration per class, in
    class order, joined by a space, each ending with its label word.

    >>> DemoConfig(train_mode="similar", eval_mode="top1").filter_rate
    0.5
    >>> DemoConfig(order="shuffle", separator="\\n", per_class=2).per_class
    2
    """

    train_mode: str = "similar"
    eval_mode: str = "top1"
    filter_rate: float = 0.5
    num_sample: int = 1
    encoder: str | None = None
    index_type: str = "flat"
    order: str = "class"  # "class", "shuffle" (seeded by the query text) or "similar-last" (most similar next to the query)
    separator: str = " "  # between demonstrations and before (decoder) or after (masked LM) the query
    per_class: int = 1  # demonstrations of each class in every prompt
    label_after: bool = True  # False: each demonstration is its text only, without template or label word

    def __post_init__(self) -> None:
        if self.order not in DEMO_ORDERS:
            raise ValueError(f"order must be one of {', '.join(DEMO_ORDERS)}, got {self.order!r}")
        if not isinstance(self.separator, str):
            raise ValueError(f"separator must be a string (e.g. ' ' or '\\n'), got {self.separator!r}")
        if isinstance(self.per_class, bool) or not isinstance(self.per_class, int) or self.per_class < 1:
            raise ValueError(f"per_class must be an integer of at least 1, got {self.per_class!r}")
        if not isinstance(self.label_after, bool):
            raise ValueError(f"label_after must be True or False, got {self.label_after!r}")
        for name in ("train_mode", "eval_mode"):
            if getattr(self, name) not in DEMO_MODES:
                raise ValueError(f"{name} must be one of {', '.join(DEMO_MODES)}, got {getattr(self, name)!r}")
        if not 0.0 < self.filter_rate <= 1.0:
            raise ValueError(f"filter_rate must be in (0, 1], got {self.filter_rate}")
        if self.num_sample < 1:
            raise ValueError(f"num_sample must be at least 1, got {self.num_sample}")


@dataclass
class TrainingArguments(_JsonConfig):
    """How a PromptModel is trained (defaults follow LM-BFF where it is practical on a CPU).

    >>> TrainingArguments(max_steps=60, learning_rate=1e-5).batch_size
    8
    """

    method: str = "prompt"
    learning_rate: float = 1e-5
    batch_size: int = 8
    eval_batch_size: int = 32
    max_steps: int = 1000
    eval_steps: int = 100
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    freeze_embeddings: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        for name in ("batch_size", "eval_batch_size", "eval_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
