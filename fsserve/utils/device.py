"""Decide the compute device once, instead of scattered ``torch.cuda.is_available()`` calls."""

from __future__ import annotations

import functools
import importlib.util


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
