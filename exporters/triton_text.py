"""A Triton model repository that takes text: what ``fsserve serve`` serves, as a Triton ensemble.

Layout written for a bundle and a model name ``NAME`` (Triton's standard layout)::

    DIR/NAME/config.pbtxt                ensemble: TEXT[, TEXT_B] (BYTES, [-1, 1]) → LABEL ([-1, 1]), PROBS ([-1, labels])
    DIR/NAME/1/                          (an ensemble has no files, but Triton wants its version folder)
    DIR/NAME_preprocess/config.pbtxt     Python backend: texts → input_ids, attention_mask, answer_pos[, token_type_ids]
    DIR/NAME_preprocess/1/model.py       imports fsserve.serving.triton_python.Preprocess as TritonPythonModel
    DIR/NAME_preprocess/1/bundle/        the whole bundle (tokenizer, prompt, demonstration pool; verified on load)
    DIR/NAME_onnx/...                    the graph, as ``triton_repository.export_triton_repository`` writes it
    DIR/NAME_postprocess/config.pbtxt    Python backend: label_logits → LABEL, PROBS
    DIR/NAME_postprocess/1/model.py      imports fsserve.serving.triton_python.Postprocess as TritonPythonModel

Every model batches (``max_batch_size`` > 0, dynamic batching), so a client sends TEXT with shape
``[rows, 1]`` (Triton adds the batch axis to ``dims: [ 1 ]``) and gets LABEL as ``[rows, 1]``;
``fsserve serve`` takes that shape too. The bundle's files are hard-linked where the file system
allows (copied otherwise), so the graph is not stored twice. Each model folder is written
atomically; prompt-ensemble bundles are refused (their graph takes several rows per text).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from fsserve.exporters.triton_repository import export_triton_repository, graph_signature, tensor_entry
from fsserve.utils.atomic import atomic_directory

logger = logging.getLogger(__name__)

STEPS = ("preprocess", "onnx", "postprocess")
MODEL_PY = '''"""Triton Python-backend model: the {role} step of the {name!r} text ensemble that fsserve wrote.

It runs fsserve's own code, so fsserve must be installed in the Python environment Triton uses for
this model (``pip install fsserve``; torch is not needed). See fsserve/serving/triton_python.py.
"""

from fsserve.serving.triton_python import {cls} as TritonPythonModel  # noqa: F401
'''


def _block(entries: list[str]) -> str:
    """The bracketed list of ``input``/``output`` entries."""
    return "[\n" + ",\n".join(entries) + "\n]"


def _parameters(values: dict[str, str]) -> list[str]:
    """``parameters`` entries (Triton hands them to a Python model as string values)."""
    return [f"parameters {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}" for k, v in values.items()]


def render_python_config(name: str, inputs: list[str], outputs: list[str], max_batch_size: int, parameters: dict[str, str],
                         max_queue_delay_us: int = 2000, instance_count: int = 1) -> str:
    """The config.pbtxt of one Python-backend step (CPU instances, dynamic batching)."""
    return "\n".join([
        f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch_size}",
        f"input {_block(inputs)}", f"output {_block(outputs)}",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
        f"instance_group [\n  {{\n    count: {instance_count}\n    kind: KIND_CPU\n  }}\n]",
        *_parameters(parameters), "",
    ])


def render_ensemble_config(name: str, inputs: list[str], outputs: list[str], steps: list[tuple[str, list[str], list[str]]], max_batch_size: int) -> str:
    """The ensemble's config.pbtxt: ``steps`` are (model, tensors in, tensors out), each tensor named alike on both sides."""

    def step(model: str, ins: list[str], outs: list[str]) -> str:
        maps = [f'      input_map {{ key: "{t}" value: "{t}" }}' for t in ins] + [f'      output_map {{ key: "{t}" value: "{t}" }}' for t in outs]
        return "    {\n" + f'      model_name: "{model}"\n      model_version: -1\n' + "\n".join(maps) + "\n    }"

    return "\n".join([
        f'name: "{name}"', 'platform: "ensemble"', f"max_batch_size: {max_batch_size}",
        f"input {_block(inputs)}", f"output {_block(outputs)}",
        "ensemble_scheduling {\n  step [\n" + ",\n".join(step(*s) for s in steps) + "\n  ]\n}", "",
    ])


def _link_or_copy(source: str, target: str) -> str:
    """Hard-link a bundle file (no second copy of the graph on disk); copy where the file system cannot link."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def _write_python_model(folder: Path, version: int, role: str, name: str, config: str, bundle: Path | None = None) -> None:
    """One Python-backend model folder: config.pbtxt, VERSION/model.py and, for preprocessing, VERSION/bundle."""
    with atomic_directory(folder) as tmp:
        (tmp / str(version)).mkdir()
        cls = "Preprocess" if role == "preprocess" else "Postprocess"
        (tmp / str(version) / "model.py").write_text(MODEL_PY.format(role=role, name=name, cls=cls), encoding="utf-8")
        if bundle is not None:
            shutil.copytree(bundle, tmp / str(version) / "bundle", copy_function=_link_or_copy)
        (tmp / "config.pbtxt").write_text(config, encoding="utf-8")


def export_triton_text_repository(bundle: str | Path, directory: str | Path, model_name: str = "fsserve", version: int = 1, max_batch_size: int = 64,
                                  instance_count: int = 1, kind: str = "KIND_CPU", max_queue_delay_us: int = 2000, pad_to_multiple: int = 8,
                                  max_text_bytes: int = 8192) -> Path:
    """Write the text-in repository (ensemble + preprocess + graph + postprocess) for a bundle; return the ensemble's folder."""
    from fsserve.bundle import read_bundle_config
    from fsserve.prompts.templates import Template

    if pad_to_multiple < 1 or max_text_bytes < 1:
        raise ValueError(f"pad_to_multiple and max_text_bytes must be positive, got {pad_to_multiple} and {max_text_bytes}")
    bundle = Path(bundle)
    config = read_bundle_config(bundle)
    if config.get("ensemble"):
        raise ValueError(f"{bundle} is a prompt-ensemble bundle: its graph takes one row per prompt per text, which Triton's batcher cannot "
                         "split; serve it with fsserve serve (or export a single prompt)")
    demo_config = (config.get("demos") or {}).get("config") or {}
    if demo_config.get("eval_mode", "top1") != "top1" and int(demo_config.get("num_sample", 1)) > 1:
        raise ValueError(f"{bundle} averages {demo_config['num_sample']} draws of demonstrations per text ({demo_config['eval_mode']}): "
                         "its preprocessing makes several graph rows per text, which this ensemble cannot average; serve it with "
                         "fsserve serve, or train with --demo-eval top1")
    export_triton_repository(bundle, directory, model_name=f"{model_name}_onnx", version=version, max_batch_size=max_batch_size,
                             instance_count=instance_count, kind=kind, max_queue_delay_us=max_queue_delay_us)
    graph_inputs, graph_outputs = graph_signature(bundle / config["manifest"]["graph"])
    if len(graph_outputs) != 1:
        raise ValueError(f"{bundle}: the graph has outputs {[o['name'] for o in graph_outputs]}; the text repository needs exactly one (label logits)")
    logits = graph_outputs[0]
    labels = [str(label) for label in config["labels"]]
    texts = ["TEXT", "TEXT_B"] if Template.parse(config["prompt"]["template"]).num_sentences > 1 else ["TEXT"]
    text_entries = [tensor_entry(t, "TYPE_STRING", [1]) for t in texts]
    graph_entries = [tensor_entry(t["name"], t["data_type"], t["dims"][1:] or [1]) for t in graph_inputs]
    answer_entries = [tensor_entry("LABEL", "TYPE_STRING", [1]), tensor_entry("PROBS", "TYPE_FP32", [len(labels)])]
    logits_entry = tensor_entry(logits["name"], logits["data_type"], logits["dims"][1:] or [1])
    regression_head = config.get("method") == "finetune" and config["prompt"].get("regression_range") is not None
    root = Path(directory)
    names = {step: f"{model_name}_{step}" for step in STEPS}
    _write_python_model(root / names["preprocess"], version, "preprocess", model_name, render_python_config(
        names["preprocess"], text_entries, graph_entries, max_batch_size, {"pad_to_multiple": str(pad_to_multiple), "max_text_bytes": str(max_text_bytes)},
        max_queue_delay_us, instance_count), bundle=bundle)
    _write_python_model(root / names["postprocess"], version, "postprocess", model_name, render_python_config(
        names["postprocess"], [logits_entry], answer_entries, max_batch_size,
        {"labels": json.dumps(labels), "probabilities": "sigmoid" if regression_head else "softmax"}, max_queue_delay_us, instance_count))
    graph_names = [t["name"] for t in graph_inputs]
    steps = [(names["preprocess"], texts, graph_names), (names["onnx"], graph_names, [logits["name"]]), (names["postprocess"], [logits["name"]], ["LABEL", "PROBS"])]
    target = root / model_name
    with atomic_directory(target) as tmp:
        (tmp / str(version)).mkdir()
        (tmp / "config.pbtxt").write_text(render_ensemble_config(model_name, text_entries, answer_entries, steps, max_batch_size), encoding="utf-8")
    logger.info("wrote the Triton text repository %s (ensemble %s: %s → LABEL, PROBS)", root, model_name, ", ".join(texts))
    return target

