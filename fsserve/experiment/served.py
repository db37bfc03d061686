"""Does the served product score what the study measured? Retrain one cached cell, export it, serve it, score it.

A study cell's accuracy is measured on the torch model inside ``fsserve experiment``. A user gets the
bundle behind ``fsserve serve``: ONNX graph, the bundle's tokenizer and prompt, demonstrations picked by
the bundle's encoder and index, the dynamic batcher, gRPC. :func:`served_check` rebuilds the cell's
exact configuration from its cache key, trains it again (the same seeds, so the same model), exports
the bundle with the real CLI, starts the real server and sends the cell's test sample through the
KServe v2 client; it reports the cell's score, the retrained torch model's, the in-process bundle
Predictor's and the server's, and how many labels agree row by row.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fsserve.data import get_task, load_kshot
from fsserve.experiment.protocol import (
    DEMO_MODES, LMBFF_DEMO_FORMAT, TRAINED, Cell, ExperimentConfig, _references, cell_settings, run_cell,
)
from fsserve.sampling import stratified_sample

logger = logging.getLogger(__name__)


def config_for_cell(settings: dict[str, Any], data_dir: str | Path, out_dir: str | Path) -> tuple[ExperimentConfig, Cell]:
    """Rebuild the experiment configuration and cell behind a cached cell's settings, checked to give the same key."""
    method = settings.get("method")
    if method not in TRAINED and method != "zero-shot":
        raise ValueError(f"only trained or zero-shot cells can be served, not {method!r} (in-context has no bundle)")
    kw: dict[str, Any] = {
        "tasks": [settings["task"]], "methods": [method], "seeds": [settings["seed"]], "data_dir": str(data_dir),
        "out_dir": str(out_dir), "model": settings["model"], "k": settings["k"], "max_test": settings["max_test"],
        "test_sample_seed": settings.get("test_sample", {}).get("seed", 0),
    }
    lr, bs = 0.0, 0
    if method in TRAINED:
        lr, bs = float(settings["learning_rate"]), int(settings["batch_size"])
        kw.update(max_steps=settings["max_steps"], eval_steps=settings["eval_steps"], learning_rates=[lr], batch_sizes=[bs],
                  freeze_embeddings=settings["freeze_embeddings"])
    if method in DEMO_MODES:
        fmt = settings.get("demo_format", LMBFF_DEMO_FORMAT)
        kw.update(demo_max_length=settings["max_length"], num_sample=settings["num_sample"], filter_rate=settings["filter_rate"],
                  demo_encoder=settings["demo_encoder"], demo_order=fmt["order"], demo_separator=fmt["separator"],
                  demo_per_class=fmt["per_class"], demo_label_after=fmt["label_after"])
    else:
        kw["max_length"] = settings["max_length"]
    config = ExperimentConfig(**kw)
    cell = Cell(settings["task"], method, int(settings["seed"]), learning_rate=lr, batch_size=bs)
    rebuilt = cell_settings(config, cell)
    if rebuilt != settings:
        differ = sorted(k for k in set(rebuilt) | set(settings) if rebuilt.get(k) != settings.get(k))
        raise ValueError(f"this cell's settings cannot be rebuilt exactly (they differ in {', '.join(differ)}): "
                         "it was cached by an older fsserve or with other data; rerun the cell first")
    return config, cell


def _agreement(a: list[Any], b: list[Any]) -> dict[str, Any]:
    """Rows on which two label lists agree."""
    same = sum(str(x) == str(y) for x, y in zip(a, b))
    return {"same": same, "of": len(a), "rate": same / len(a) if a else 1.0}


def _score(task: Any, predictions: list[Any], examples: list[Any]) -> float:
    """The task's metric for these predictions against the examples' gold labels."""
    from fsserve.metrics import compute_metric

    return float(compute_metric(task.metric, predictions, _references(examples, task)))


def serve_and_classify(bundle: Path, examples: list[Any], batch: int = 8, timeout: float = 300.0) -> list[str]:
    """Start ``fsserve serve BUNDLE`` in its own process, send the examples over gRPC in requests of ``batch`` rows, stop it."""
    from fsserve.serving.client import InferenceClient
    from fsserve.serving.process import ServerProcess

    with ServerProcess([str(bundle), "--port", "0", "--metrics-port", "-1"], timeout=timeout) as server, \
            InferenceClient(f"127.0.0.1:{server.port}", timeout=timeout) as client:
        labels: list[str] = []
        for start in range(0, len(examples), batch):
            part = examples[start : start + batch]
            texts_b = [ex.text_b for ex in part] if part[0].text_b is not None else None
            labels.extend(client.classify(bundle.name, [ex.text for ex in part], texts_b).labels)
        return labels


def served_check(cell_file: str | Path, data_dir: str | Path, work: str | Path, export_args: list[str] | None = None,
                 batch: int = 8) -> dict[str, Any]:
    """Retrain a cached cell, export and serve it, and score its test sample at each step of the way."""
    from fsserve.predictor import Predictor

    cached = json.loads(Path(cell_file).read_text(encoding="utf-8"))
    work = Path(work)
    config, cell = config_for_cell(cached["settings"], data_dir, work / "cells")
    model_dir, bundle = work / "model", work / "bundle"
    start = time.perf_counter()
    record = run_cell(config, cell, save_to=model_dir)
    logger.info("retrained %s %s seed %s: test %.4f (cached %.4f)", cell.task, cell.method, cell.seed, record["test"], cached["test"])
    torch_labels = json.loads((model_dir / "test_predictions.json").read_text(encoding="utf-8"))
    cmd = [sys.executable, "-m", "fsserve", "export", str(model_dir), str(bundle), *(export_args or [])]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    task = get_task(cell.task)
    examples = stratified_sample(load_kshot(task, config.data_dir, config.k, cell.seed, "test"), config.max_test,
                                 config.test_sample_seed, task).examples
    predictor = Predictor.from_pretrained(bundle, backend="onnx")
    bundle_labels = [str(p) for p in predictor.predict(examples)]
    served_labels = serve_and_classify(bundle, examples, batch=batch)
    return {
        "cell": str(cell_file), "task": cell.task, "method": cell.method, "seed": cell.seed, "n_test": len(examples),
        "test_sample": cached.get("test_sample"), "metric": task.metric, "export_args": export_args or [],
        "test": {"cell": cached["test"], "retrained_torch": record["test"], "bundle_predictor": _score(task, bundle_labels, examples),
                 "served_grpc": _score(task, served_labels, examples)},
        "dev": {"cell": cached["dev"], "retrained_torch": record["dev"]},
        "labels_agree": {"bundle_vs_torch": _agreement(bundle_labels, torch_labels),
                         "served_vs_torch": _agreement(served_labels, torch_labels),
                         "served_vs_bundle": _agreement(served_labels, bundle_labels)},
        "seconds": round(time.perf_counter() - start, 1),
    }
