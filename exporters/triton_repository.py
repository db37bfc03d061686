"""An NVIDIA Triton Inference Server model repository from a bundle, for serving where one machine is not enough.

Layout written (the standard one for the ``onnxruntime_onnx`` platform)::

    DIR/<name>/config.pbtxt     inputs, outputs, dynamic batching, instance groups
    DIR/<name>/1/model.onnx     the bundle's verified graph

The graph's batch axis becomes Triton's batch dimension (``max_batch_size`` > 0), so Triton's
dynamic batcher can merge requests; ``sequence_length`` stays ``-1``. ``answer_pos`` has only the
batch axis, which Triton expresses as ``dims: [ 1 ]`` reshaped to a scalar per request.
Tokenization and the prompt stay on the client (the bundle's tokenizer and fsserve.json), which
sends the same int64 tensors the onnxruntime backend takes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from fsserve.utils.atomic import atomic_directory

logger = logging.getLogger(__name__)

# ONNX TensorProto element types to Triton data types (the ones a label-logits graph can have).
_TRITON_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 3: "TYPE_INT8", 2: "TYPE_UINT8"}


def graph_signature(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of an ONNX graph as (name, Triton type, dims with -1 for named axes)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        initializers = {i.name for i in model.graph.initializer}
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            if tensor.elem_type not in _TRITON_TYPES:
                raise ValueError(f"graph tensor {value.name!r} has ONNX type {tensor.elem_type}, which has no Triton type here")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            out.append({"name": value.name, "data_type": _TRITON_TYPES[tensor.elem_type], "dims": dims})
        return out

    return describe(model.graph.input), describe(model.graph.output)


def tensor_entry(name: str, data_type: str, dims: list[int], scalar: bool = False) -> str:
    """One ``input``/``output`` entry of a config.pbtxt (``scalar``: dims [1] that the model sees reshaped to one value per row)."""
    lines = [f'    name: "{name}"', f"    data_type: {data_type}", f"    dims: [ {', '.join(str(d) for d in dims)} ]"]
    if scalar:
        lines.append("    reshape: { shape: [ ] }")
    return "  {\n" + "\n".join(lines) + "\n  }"


def _tensor_block(tensor: dict[str, Any]) -> str:
    """One graph ``input``/``output`` entry: the batch axis is dropped, a batch-only tensor becomes [1] → scalar."""
    dims = tensor["dims"][1:]
    return tensor_entry(tensor["name"], tensor["data_type"], dims or [1], scalar=not dims)


def render_config(
    name: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    max_batch_size: int = 64,
    preferred_batch_sizes: tuple[int, ...] = (8, 32),
    max_queue_delay_us: int = 2000,
    instance_count: int = 1,
    kind: str = "KIND_CPU",
) -> str:
    """The config.pbtxt text for an ONNX label-logits model (protobuf text format)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 for dynamic batching, got {max_batch_size}")
    if kind not in ("KIND_CPU", "KIND_GPU"):
        raise ValueError(f"instance kind must be KIND_CPU or KIND_GPU, got {kind!r}")
    if instance_count < 1:
        raise ValueError(f"instance_count must be >= 1, got {instance_count}")
    preferred = [b for b in preferred_batch_sizes if 0 < b <= max_batch_size]
    return "\n".join([
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(_tensor_block(t) for t in inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(t) for t in outputs) + "\n]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]" if preferred else "",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {kind}\n  }}\n]",
        "",
    ])


def export_triton_repository(
    bundle: str | Path,
    directory: str | Path,
    model_name: str = "fsserve",
    version: int = 1,
    max_batch_size: int = 64,
    instance_count: int = 1,
    kind: str = "KIND_CPU",
    max_queue_delay_us: int = 2000,
) -> Path:
    """Write a Triton model repository serving the bundle's graph; return the model's folder."""
    from fsserve.bundle import verify_bundle

    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ValueError(f"bad Triton model name {model_name!r}")
    if version < 1:
        raise ValueError(f"Triton model versions start at 1, got {version}")
    bundle = Path(bundle)
    manifest = verify_bundle(bundle)
    graph = bundle / manifest["graph"]
    inputs, outputs = graph_signature(graph)
    config = render_config(model_name, inputs, outputs, max_batch_size, max_queue_delay_us=max_queue_delay_us, instance_count=instance_count, kind=kind)
    target = Path(directory) / model_name
    with atomic_directory(target) as tmp:
        (tmp / str(version)).mkdir()
        shutil.copy2(graph, tmp / str(version) / "model.onnx")
        (tmp / "config.pbtxt").write_text(config, encoding="utf-8")
    logger.info("wrote Triton model repository %s (%d inputs, %s)", target, len(inputs), kind)
    return target
