"""The two extras of ``fsserve bench``: what demonstrations cost, and whether int8 still agrees with fp32.

Demonstrations (LM-BFF) cost twice, and the bench shows the two apart: *selection* (embedding the
queries with the sentence encoder and searching the per-class FAISS indexes, ``DemoIndex.select``)
and the *longer sequence* (each prompt carries one demonstration per class). The second is timed
on every backend with and without demonstrations in the same interleaved rounds, on real sentences
at their natural length.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fsserve.bench.backends import BenchBackend, Subject
from fsserve.bench.memory import PeakMemory
from fsserve.bench.timing import BenchConfig, cell_rows, summarize, time_cell


def demo_pool(subject: Subject) -> tuple[Any, str]:
    """The demonstration pool: the model's own, the bundle's, or SST-2's 16-shot training split (seed 42)."""
    from fsserve.data import default_data_dir, get_task, load_kshot
    from fsserve.demos import DemoIndex

    model = subject.model
    if model.demo_index is not None:
        return model.demo_index, "the model's own pool"
    if (Path(subject.source) / "manifest.json").is_file():
        from fsserve.predictor import load_bundle_demos

        index = load_bundle_demos(subject.source)
        if index is not None:
            return index, "the bundle's pool"
    task = get_task("SST-2")
    kshot = default_data_dir() / "k-shot"
    if model.labels == list(task.labels) and (kshot / task.name / "16-42").is_dir():
        pool = load_kshot(task, kshot, k=16, seed=42, split="train")
        return DemoIndex(pool, labels=model.labels, task=task), f"SST-2 16-shot train (seed 42, {len(pool)} examples)"
    raise ValueError("--demos needs a demonstration pool: a model or bundle saved with demos, or a two-class model and the SST-2 k-shot data")


def _bound(backend: BenchBackend, batch: dict[str, np.ndarray], suffix: str) -> BenchBackend:
    """The backend on a fixed batch (so one round can interleave runs on two different batches)."""
    return dataclasses.replace(backend, name=backend.name + suffix, run=lambda _ignored: backend.run(batch))


def _unsuffixed(state: dict[str, dict[str, Any]], suffix: str) -> dict[str, dict[str, Any]]:
    """The cell state of the runs whose names end with ``suffix``, under the backends' own names."""
    return {name[: len(name) - len(suffix)]: value for name, value in state.items() if name.endswith(suffix)}


def demo_costs(subject: Subject, backends: list[BenchBackend], texts: list[str], cfg: BenchConfig, probe: PeakMemory, bar: Any = None,
               deadline: Callable[[int], float | None] | None = None) -> dict[str, Any]:
    """Per batch size: selection time, and every backend with and without demonstrations (interleaved)."""
    from fsserve.demos.prompting import DemoPrompt
    from fsserve.predictor import pad_batch
    from fsserve.prompts import Prompt

    model = subject.model
    index, pool = demo_pool(subject)
    prompt = Prompt(dataclasses.replace(model.prompt_config, max_length=cfg.demo_max_length), model.tokenizer, model.kind)
    demo_prompt = DemoPrompt(prompt)
    rng = np.random.default_rng(cfg.seed + 1)
    rows: list[dict[str, Any]] = []
    selection: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for batch_size in cfg.batch_sizes:
        if bar is not None:
            bar.set_description(f"demos batch {batch_size}")
        queries = [texts[int(i)] for i in rng.integers(len(texts), size=batch_size)]
        index.select(queries, mode=cfg.demo_mode, rng=0)  # warm-up: loads the encoder
        spent, samples = time.perf_counter(), []
        while len(samples) < cfg.min_runs or (len(samples) < cfg.max_runs and time.perf_counter() - spent < cfg.cell_seconds / 3):
            start = time.perf_counter()
            chosen = index.select(queries, mode=cfg.demo_mode, rng=0)
            samples.append((time.perf_counter() - start) * 1e3)
        selection.append({"batch_size": batch_size, "mode": cfg.demo_mode, **summarize(samples, batch_size)})
        plain = pad_batch(prompt.encode(queries), model.pad_token_id, model.uses_token_types)
        with_demos = pad_batch(demo_prompt.encode(queries, index.demos(chosen)), model.pad_token_id, model.uses_token_types)
        width = int(with_demos["input_ids"].shape[1])
        active = list(backends)  # an oversize baseline batch goes through in slices (fsserve.bench.backends.baseline_rows)
        bound = [_bound(b, plain, "") for b in active] + [_bound(b, with_demos, "+demos") for b in active]
        state = time_cell(bound, plain, cfg, probe, bar, deadline(batch_size * cfg.demo_max_length) if deadline else None)
        plain_state = {b.name: state[b.name] for b in active}
        demo_state = _unsuffixed(state, "+demos")
        plain_rows = cell_rows(active, plain_state, batch_size, int(plain["input_ids"].shape[1]), "plain")
        demo_rows = cell_rows(active, demo_state, batch_size, width, "demos")
        rows += plain_rows + demo_rows
        for p, d in zip(plain_rows, demo_rows):
            summary.append({
                "backend": p["backend"], "batch_size": batch_size, "seq_plain": p["seq_len"], "seq_demos": d["seq_len"],
                "plain_p50_ms": p["p50_ms"], "demos_p50_ms": d["p50_ms"], "sequence_cost": d["p50_ms"] / p["p50_ms"],
                "selection_p50_ms": selection[-1]["p50_ms"], "total_p50_ms": selection[-1]["p50_ms"] + d["p50_ms"],
            })
        if bar is not None:
            bar.update(1)
    return {"pool": pool, "mode": cfg.demo_mode, "encoder": getattr(index, "encoder_name", None), "max_length": cfg.demo_max_length,
            "selection": selection, "rows": rows, "summary": summary}


def agreement_examples(spec: str, limit: int | None, seed: int) -> tuple[Any, str]:
    """Examples to compare int8 with fp32 on (a task's dev set from the shared data, or a file), as a ``Sample``.

    ``limit`` draws a seeded, class-stratified sample of that many (``fsserve.sampling``), not the first rows.
    """
    from fsserve.data import default_data_dir, get_task, load_examples, load_split
    from fsserve.sampling import stratified_sample

    path = Path(spec)
    task = None
    if path.is_file():
        examples, where = load_examples(path), str(path)
    else:
        task = get_task(spec)
        dev = default_data_dir() / "original" / task.name / f"{task.split_files['dev']}.{task.extension}"
        examples, where = load_split(task, dev), str(dev)
    return stratified_sample(examples, limit, seed, task), where


def int8_agreement(subject: Subject, cfg: BenchConfig) -> dict[str, Any]:
    """How often the int8 graph predicts what the fp32 graph predicts (and each one's accuracy) on real examples."""
    from fsserve.exporters.onnx import text_batches
    from fsserve.runtime.onnx import OnnxBackend

    sample, where = agreement_examples(str(cfg.agreement), cfg.agreement_max, cfg.seed)
    examples = sample.examples
    if not examples:
        raise ValueError(f"no examples to measure int8 agreement on in {where}")
    model = subject.model
    batches = text_batches(model, examples, batch_size=32)
    lengths = [len(e.input_ids) for e in model.encode(examples)]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])  # the (stable) order text_batches runs them in
    kwargs: dict[str, Any] = {"intra_op_num_threads": cfg.threads} if cfg.threads else {}
    if not cfg.spinning:
        kwargs["session_config"] = {"session.intra_op.allow_spinning": "0"}
    logits = {}
    for precision in ("fp32", "int8"):
        runner = OnnxBackend(subject.graphs[precision], device="cpu", **kwargs)
        logits[precision] = np.concatenate([runner.label_logits(**b) for b in batches])
    labels = [examples[i].label for i in order]
    result: dict[str, Any] = {
        "on": where, "examples": len(examples), "sample": sample.record(), "int8_recipe": subject.notes.get("int8_recipe"),
        "int8_vs_fp32": float((logits["int8"].argmax(-1) == logits["fp32"].argmax(-1)).mean()),
        "max_abs_diff": float(np.abs(logits["int8"] - logits["fp32"]).max()),
    }
    if not model.prompt_config.is_regression and all(label is not None for label in labels):
        gold = np.array([str(label) for label in labels])
        result["accuracy"] = {p: float((np.array(model.labels)[logits[p].argmax(-1)] == gold).mean()) for p in logits}
    return result
