"""KServe v2 serving for fsserve bundles: gRPC, and HTTP/REST on a second port.

Needs the ``[serve]`` extra (grpcio, grpcio-health-checking, grpcio-reflection, prometheus-client,
aiohttp for HTTP). ``triton_python`` holds the Triton Python-backend models of the text repository
that ``fsserve.exporters.triton_repository`` writes (they need numpy and fsserve only).
Names are imported lazily, so a missing extra shows as an ImportError naming it on first use.

>>> from fsserve.serving import ServerConfig, BackgroundServer  # doctest: +SKIP
"""

from __future__ import annotations

from fsserve.utils.lazy import lazy_exports

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
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, extra=("serve", frozenset({"grpc", "grpc_health", "grpc_reflection", "prometheus_client", "google", "aiohttp"})))
