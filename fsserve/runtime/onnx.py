"""The onnxruntime backend: an exported label-logits graph behind the one backend interface, without torch.

Devices map to execution providers: ``cpu`` → CPU; ``cuda[:n]`` → CUDA (then CPU for what CUDA
lacks); ``tensorrt[:n]`` → TensorRT, then CUDA, then CPU. A provider that this onnxruntime build
lacks is a ValueError naming it and the package that has it, never a silent fall-back to the CPU.
On CUDA the inputs and the output are bound to the device (IO binding), so onnxruntime does not
stage copies per run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_GPU_PACKAGE = "onnxruntime-gpu (pip install onnxruntime-gpu, instead of onnxruntime)"


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers (what device='auto' chooses from)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def providers_for_device(device: str | None, trt_cache_dir: str | Path | None = None, trt_fp16: bool = False) -> tuple[list[Any], str]:
    """Turn a device name into an onnxruntime provider list (with options) and the canonical device."""
    available = available_providers()
    if device in (None, "auto"):
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if not isinstance(device, str):
        raise ValueError(f"device must be a string like 'cpu', 'cuda' or 'tensorrt', got {device!r}")
    name, _, index = device.partition(":")
    if index and not index.isdigit():
        raise ValueError(f"bad device {device!r}: the index after ':' must be a number")
    device_id = int(index or 0)
    if name == "cpu":
        return ["CPUExecutionProvider"], "cpu"
    if name not in ("cuda", "tensorrt"):
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda[:N]', 'tensorrt[:N]' or 'auto'")
    needed = ["CUDAExecutionProvider"] + (["TensorrtExecutionProvider"] if name == "tensorrt" else [])
    missing = [p for p in needed if p not in available]
    if missing:
        raise ValueError(f"device {device!r} needs {', '.join(missing)}, which this onnxruntime lacks (it has {available}); install {_GPU_PACKAGE}")
    providers: list[Any] = []
    if name == "tensorrt":
        trt: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": trt_fp16}
        if trt_cache_dir is not None:
            trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache_dir))
        providers.append(("TensorrtExecutionProvider", trt))
    providers += [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return providers, f"{name}:{device_id}"


class OnnxBackend:
    """Run ``label_logits`` with onnxruntime on an exported graph (numpy in, numpy out).

    >>> backend = OnnxBackend("bundle/model.onnx", device="cpu", intra_op_num_threads=2)  # doctest: +SKIP
    >>> backend.label_logits(input_ids, attention_mask, answer_pos).shape  # doctest: +SKIP
    (2, 2)
    """

    name = "onnx"

    def __init__(
        self,
        path: str | Path,
        device: str | None = None,
        intra_op_num_threads: int | None = None,
        inter_op_num_threads: int | None = None,
        io_binding: bool | None = None,
        trt_cache_dir: str | Path | None = None,
        trt_fp16: bool = False,
        session_config: dict[str, str] | None = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path} is not an ONNX graph file")
        for label, value in (("intra_op_num_threads", intra_op_num_threads), ("inter_op_num_threads", inter_op_num_threads)):
            if value is not None and int(value) < 0:
                raise ValueError(f"{label} must be >= 0 (0 lets onnxruntime choose), got {value}")
        providers, self.device = providers_for_device(device, trt_cache_dir, trt_fp16)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = int(intra_op_num_threads)
        if inter_op_num_threads is not None:
            options.inter_op_num_threads = int(inter_op_num_threads)
        # e.g. {"session.intra_op.allow_spinning": "0"}: on a shared CPU, spinning threads starve each other.
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(str(key), str(value))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        on_gpu = self.device != "cpu"
        self.io_binding = on_gpu if io_binding is None else bool(io_binding)
        if self.io_binding and not on_gpu:
            raise ValueError("io_binding binds buffers on a CUDA device; it needs device='cuda' or 'tensorrt'")
        logger.info("onnxruntime session on %s with %s", self.device, self.session.get_providers())

    def label_logits(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, answer_pos: np.ndarray, token_type_ids: np.ndarray | None = None
    ) -> np.ndarray:
        """Return (B, num_labels) float32 label logits for one padded batch."""
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "answer_pos": answer_pos, "token_type_ids": token_type_ids}
        feed: dict[str, np.ndarray] = {}
        for name in self.input_names:
            value = given.get(name)
            if value is None:
                if name == "token_type_ids":
                    value = np.zeros_like(np.asarray(input_ids))
                else:
                    raise ValueError(f"the graph needs input {name!r}, which was not given")
            feed[name] = np.ascontiguousarray(value, dtype=np.int64)
        width = feed["input_ids"].shape[-1]
        if feed["answer_pos"].shape != feed["input_ids"].shape[:1] or ((feed["answer_pos"] < 0) | (feed["answer_pos"] >= width)).any():
            # The graph's gather would silently wrap negative positions; refuse them here.
            raise ValueError(f"answer_pos must hold one position in [0, {width}) per row, got {feed['answer_pos'].tolist()}")
        if not self.io_binding:
            return np.asarray(self.session.run([self.output_name], feed)[0], dtype=np.float32)
        return self._run_bound(feed)

    def _run_bound(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Run with inputs and output bound on the GPU (one copy in, one copy out)."""
        import onnxruntime as ort

        device_id = int(self.device.partition(":")[2] or 0)
        binding = self.session.io_binding()
        for name, array in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", device_id))
        binding.bind_output(self.output_name, "cuda", device_id)
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)
