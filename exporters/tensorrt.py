"""TensorRT: a bundle whose graph onnxruntime's TensorRT provider runs, and a plain engine builder.

``PromptModel.export(dir, format="tensorrt")`` writes the usual bundle without onnxruntime's
contrib fusions (TensorRT parses standard ONNX only), after checking that this machine can run
TensorRT at all; ``Predictor.from_pretrained(dir, backend="onnx", device="tensorrt")`` then runs it
with the TensorRT execution provider, which builds and caches the engine on first use. An engine
is specific to one GPU and TensorRT version, so the bundle stays portable ONNX; :func:`build_engine`
writes a serialized plan for deployments (e.g. Triton's ``tensorrt_plan``) that want one up front.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_MISSING = (
    "TensorRT is not available here: {what}. Install the [gpu] extra on a machine with an NVIDIA GPU, "
    "plus onnxruntime-gpu (for the TensorRT execution provider) or the tensorrt package (for build_engine)"
)


def tensorrt_status() -> dict[str, Any]:
    """What this machine offers for TensorRT: the onnxruntime provider, the tensorrt package, a GPU."""
    import onnxruntime as ort

    from fsserve.utils.device import cuda_available

    return {
        "onnxruntime_provider": "TensorrtExecutionProvider" in ort.get_available_providers(),
        "tensorrt_package": importlib.util.find_spec("tensorrt") is not None,
        "cuda": cuda_available(),
    }


def require_tensorrt(need_package: bool = False) -> dict[str, Any]:
    """Raise ImportError naming what is missing unless TensorRT can run here; return the status."""
    status = tensorrt_status()
    missing = []
    if not status["cuda"]:
        missing.append("no CUDA GPU")
    if need_package and not status["tensorrt_package"]:
        missing.append("the tensorrt Python package is not installed")
    if not need_package and not (status["onnxruntime_provider"] or status["tensorrt_package"]):
        missing.append("neither onnxruntime's TensorrtExecutionProvider nor the tensorrt package is installed")
    if missing:
        raise ImportError(_MISSING.format(what="; ".join(missing)))
    return status


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    max_batch_size: int = 32,
    max_length: int = 128,
    fp16: bool = False,
    workspace_bytes: int = 1 << 30,
) -> Path:
    """Build a serialized TensorRT engine from a bundle graph, with a profile over batch and length."""
    require_tensorrt(need_package=True)
    import tensorrt as trt

    if max_batch_size < 1 or max_length < 1:
        raise ValueError(f"max_batch_size and max_length must be positive, got {max_batch_size} and {max_length}")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    opt_batch, opt_len = max(1, max_batch_size // 2), max(1, max_length // 2)
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if len(tensor.shape) == 1:
            profile.set_shape(tensor.name, (1,), (opt_batch,), (max_batch_size,))
        else:
            profile.set_shape(tensor.name, (1, 1), (opt_batch, opt_len), (max_batch_size, max_length))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    partial = engine_path.with_name(f".{engine_path.name}.partial")
    partial.write_bytes(bytes(serialized))
    os.replace(partial, engine_path)  # a half-written engine never carries the final name
    logger.info("built TensorRT engine %s (fp16=%s)", engine_path, fp16)
    return engine_path
