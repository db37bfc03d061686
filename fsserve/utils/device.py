"""Decide the compute device once, instead of scattered ``torch.cuda.is_available()`` calls."""

from __future__ import annotations

import functools
import importlib.util
from typing import Any


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    """Say whether CUDA can be used, without importing torch when it is not installed."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Say whether Triton kernels can run here (importable and a CUDA device present)."""
    return cuda_available() and importlib.util.find_spec("triton") is not None


def resolve_device(device: str | None = None) -> str:
    """Turn ``None``/``"auto"``/``"cpu"``/``"cuda[:n]"`` into a concrete device string, refusing bad names."""
    if device in (None, "auto"):
        return "cuda" if cuda_available() else "cpu"
    if not isinstance(device, str):
        raise ValueError(f"device must be a string like 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not cuda_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available on this machine")
        return device
    raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")


_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def resolve_dtype(dtype: Any, device: str) -> Any:
    """Turn ``"auto"`` (bfloat16 on CUDA, float32 elsewhere), a name (``bf16``, ``float16``…) or a torch dtype into a torch dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif dtype in (None, "auto"):
        name = "bfloat16" if device.startswith("cuda") else "float32"
    else:
        name = _DTYPE_NAMES.get(str(dtype).lower(), "")
    if name not in _DTYPE_NAMES.values():
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto")
    return getattr(torch, name)


def stream_capturing() -> bool:
    """Say whether a CUDA graph is being captured right now (host-side checks must not sync then)."""
    if not cuda_available():
        return False
    import torch

    return bool(torch.cuda.is_current_stream_capturing())
