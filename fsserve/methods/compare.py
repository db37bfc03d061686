"""compare_methods: train each adaptation method on one task and tabulate parameters, bundle size, accuracy, time.

Every method gets the same data, steps, batch size and seed; only the learning rate follows the
method (a soft prompt needs a far larger step than full fine-tuning). A method spec is a name with
optional MethodConfig options: ``probe``, ``probe:layer=9,pooling=mean``, or ``probe:layer=best``
(the layer with the best dev accuracy in a probe-layers pass; never chosen on test).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fsserve.config import ADAPTATION_METHODS, METHODS, PromptConfig, TrainingArguments
from fsserve.methods.config import MethodConfig

logger = logging.getLogger(__name__)

DEFAULT_LEARNING_RATES = {
    "prompt": 1e-5, "finetune": 1e-5, "zero-shot": 0.0,
    "probe": 5e-3, "prompt-tuning": 3e-2, "prefix-tuning": 5e-3, "lora": 5e-4,
}
# What full fine-tuning freezes on a CPU (the brief's recipe); the light methods freeze the whole LM anyway.
FREEZE_EMBEDDINGS = {"prompt", "finetune"}


@dataclass
class MethodRow:
    """One line of the comparison table."""

    method: str
    trainable_parameters: int
    bundle_mb: float | None
    accuracy: float
    train_seconds: float
    learning_rate: float
    note: str = ""


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """Split ``name:key=value,key=value`` into the method name and its options."""
    name, _, rest = spec.strip().partition(":")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} in {spec!r}: choose from {', '.join(METHODS)}")
    options = [o for o in rest.split(",") if o.strip()]
    if options and name not in ADAPTATION_METHODS:
        raise ValueError(f"{name} takes no options (got {spec!r})")
    return name, options


def _bundle_mb(model: Any, folder: Path, validate: bool) -> tuple[float | None, str]:
    """Export the model and measure the bundle on disk (MB); None with the reason when it cannot export."""
    try:
        path = model.export(folder, torch_weights=False, validate=validate)
    except ValueError as exc:
        return None, f"not exported: {exc}"
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    shutil.rmtree(path, ignore_errors=True)  # measured; a ~1 GB bundle per method is not worth keeping
    return size / 1e6, ""


def compare_methods(
    model_name: str,
    prompt: PromptConfig,
    train: Sequence[Any],
    dev: Sequence[Any],
    test: Sequence[Any],
    methods: Sequence[str],
    steps: int = 60,
    batch_size: int = 8,
    seed: int = 42,
    metric: str = "acc",
    learning_rates: dict[str, float] | None = None,
    export_dir: str | Path | None = None,
    validate_export: bool = False,
    results_path: str | Path | None = None,
    eval_steps: int | None = None,
) -> list[MethodRow]:
    """Train and score every method spec on the same data; rows are appended to ``results_path`` as they finish."""
    from fsserve.modeling import PromptModel
    from fsserve.training import Trainer, evaluate_model, set_seed

    rates = DEFAULT_LEARNING_RATES | dict(learning_rates or {})
    specs = [parse_spec(s) for s in methods]
    rows = []
    for spec, (name, options) in zip(methods, specs):
        config = MethodConfig.from_options([o for o in options if o != "layer=best"]) if name in ADAPTATION_METHODS else None
        note = ""
        set_seed(seed)
        args = TrainingArguments(
            method=name, learning_rate=rates[name] or 1e-5, batch_size=batch_size, max_steps=0 if name == "zero-shot" else steps,
            eval_steps=eval_steps or steps, seed=seed, freeze_embeddings=name in FREEZE_EMBEDDINGS, progress=False,
        )
        if "layer=best" in options:
            from fsserve.methods.probe_layers import best_layer, probe_layers

            probe = PromptModel.from_pretrained(model_name, prompt=prompt, method="probe", method_config=config)
            layer = best_layer(probe_layers(probe, train, dev, args))
            config = MethodConfig.from_dict(config.to_dict() | {"layer": layer})  # type: ignore[union-attr]
            note = f"layer {layer} of {probe.num_layers} (best on dev)"
            del probe
        model = PromptModel.from_pretrained(model_name, prompt=prompt, method=name, method_config=config)
        result = Trainer(model, args, train, dev, metric=metric).train()
        trainable = model.trainable_parameters() if name in ADAPTATION_METHODS else result.trainable_parameters
        score = evaluate_model(model, test, metric)["score"]
        size, why = (None, "") if export_dir is None else _bundle_mb(model, Path(export_dir) / spec.replace(":", "_").replace("=", "-").replace(",", "_"), validate_export)
        row = MethodRow(spec, int(trainable), size, score, result.seconds, args.learning_rate if name != "zero-shot" else 0.0, "; ".join(x for x in (note, why) if x))
        logger.info("%s", row)
        rows.append(row)
        if results_path is not None:
            with open(results_path, "a", encoding="utf-8") as handle:  # one JSON line per finished method
                handle.write(json.dumps(asdict(row)) + "\n")
        del model
    return rows


def format_table(rows: Sequence[MethodRow], metric: str = "acc") -> str:
    """A Markdown table of the comparison (what the CLI prints and docs/methods.md records)."""
    lines = [f"| method | trainable parameters | bundle (MB) | {metric} | training time (s) | lr | note |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        size = "n/a" if r.bundle_mb is None else f"{r.bundle_mb:,.0f}"
        lines.append(f"| {r.method} | {r.trainable_parameters:,} | {size} | {r.accuracy:.4f} | {r.train_seconds:.0f} | {r.learning_rate:g} | {r.note} |")
    return "\n".join(lines)
