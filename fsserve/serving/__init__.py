"""KServe v2 gRPC serving for fsserve bundles.

Needs the ``[serve]`` extra (grpcio, grpcio-health-checking, grpcio-reflection, prometheus-client).
Names are imported lazily, so a missing extra shows as an ImportError naming it on first use.

>>> from fsserve.serving import ServerConfig, BackgroundServer  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ServerConfig": "fsserve.serving.config",
    "InferenceServer": "fsserve.serving.server",
    "BackgroundServer": "fsserve.serving.server",
    "serve": "fsserve.serving.server",
    "InferenceClient": "fsserve.serving.client",
    "DynamicBatcher": "fsserve.serving.batcher",
    "ServerMetrics": "fsserve.serving.server",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Import a public name on first use; name the ``[serve]`` extra when a dependency is missing."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fsserve.serving' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in {"grpc", "grpc_health", "grpc_reflection", "prometheus_client", "google"}:
            raise ImportError(f"fsserve serving needs the optional dependency {exc.name!r}: pip install 'fsserve[serve]'") from exc
        raise
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """List the public names for tab completion."""
    return __all__
