"""The served models and the KServe v2 GRPCInferenceService that answers for them.

ServedModel is the domain side: a Predictor under a name, its batcher and its metadata. The
servicer is thin — protobuf → domain → protobuf: validation lives in tensors.py, batching in
batcher.py, status codes in status.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from grpc import aio

from fsserve import __version__
from fsserve.serving.batcher import DynamicBatcher
from fsserve.serving.config import ServerConfig
from fsserve.serving.protos import grpc_predict_v2_pb2 as pb
from fsserve.serving.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from fsserve.serving.status import ModelNotFound
from fsserve.serving.tensors import LABEL, PROBS, TEXT, TEXT_B, decode_request, encode_response

logger = logging.getLogger(__name__)

SERVER_NAME = "fsserve"
VERSION = "1"


@dataclass(frozen=True)
class TensorSpec:
    """Name, datatype and shape (-1: any size) of one model input or output, as ModelMetadata reports it."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class ServedModel:
    """A model under a name, answering classification requests through its own dynamic batcher.

    >>> model = ServedModel.load("sst2", "runs/sst2", ServerConfig(models={"sst2": "runs/sst2"}))  # doctest: +SKIP
    >>> [spec.name for spec in model.inputs]  # doctest: +SKIP
    ['TEXT']
    """

    def __init__(self, name: str, predictor: Any, config: ServerConfig, platform: str = "fsserve_torch", metrics: Any = None) -> None:
        self.name = name
        self.predictor = predictor
        self.platform = platform
        self.version = VERSION
        self.labels: list[str] = list(predictor.labels)
        self.num_sentences = int(getattr(predictor, "num_sentences", 1))
        self.max_rows = config.max_batch_size
        plan = getattr(getattr(predictor, "backend", None), "plan", None)  # a CUDA-graph backend's buckets
        self.batcher = DynamicBatcher(
            self._predict_proba, config.max_batch_size, config.max_queue_delay_ms, config.max_queue_size, metrics=metrics, model=name,
            bucket_sizes=plan.batch if plan is not None else None,
        )
        self.ready = False

    @classmethod
    def load(cls, name: str, path: str | Path, config: ServerConfig, metrics: Any = None) -> ServedModel:
        """Load a saved model folder or an exported bundle; ``backend="auto"`` picks onnx for bundles, torch otherwise."""
        from fsserve.predictor import Predictor

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"model {name!r}: {path} is not a folder holding a saved fsserve model or bundle")
        backend = config.backend
        if backend == "auto":
            backend = "onnx" if (path / "manifest.json").is_file() else "torch"
        start = time.perf_counter()
        torch_options = {"cuda_graphs": config.cuda_graphs, "dtype": config.dtype, "compile": config.compile} if backend == "torch" else {}
        options = {k: v for k, v in torch_options.items() if v is not None}
        predictor = Predictor.from_pretrained(path, backend=backend, device=config.device, batch_size=config.max_batch_size, **options)
        if getattr(predictor.backend, "capture", False):  # CUDA graphs: every bucket captured before the model reports ready
            predictor.backend.warmup()
        logger.info("event=model_loaded model=%s path=%s backend=%s labels=%d seconds=%.2f", name, path, backend, len(predictor.labels), time.perf_counter() - start)
        return cls(name, predictor, config, platform=f"fsserve_{backend}", metrics=metrics)

    @property
    def inputs(self) -> list[TensorSpec]:
        """TEXT (and TEXT_B for sentence-pair models): one UTF-8 string per row."""
        names = [TEXT, TEXT_B] if self.num_sentences > 1 else [TEXT]
        return [TensorSpec(n, "BYTES", (-1,)) for n in names]

    @property
    def outputs(self) -> list[TensorSpec]:
        """LABEL (the predicted label name per row) and PROBS (one probability per label per row)."""
        return [TensorSpec(LABEL, "BYTES", (-1,)), TensorSpec(PROBS, "FP32", (-1, len(self.labels)))]

    def _predict_proba(self, texts: list[str], texts_b: list[str] | None) -> np.ndarray:
        """Run the predictor on one batch (called in the batcher's model thread)."""
        return np.asarray(self.predictor.predict_proba(texts, texts_b), dtype=np.float32)

    async def start(self) -> None:
        """Start the batcher; the model is ready from then on."""
        await self.batcher.start()
        self.ready = True

    async def classify(self, texts: list[str], texts_b: list[str] | None = None, timeout: float | None = None) -> np.ndarray:
        """Probabilities (rows × labels) for one request, batched with whatever else is in flight."""
        return await self.batcher.submit(texts, texts_b, timeout)

    async def stop(self) -> None:
        """Answer everything queued, then stop the batcher; the model is no longer ready."""
        self.ready = False
        await self.batcher.close()


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Answer the six KServe v2 RPCs for a fixed set of served models.

    >>> servicer = InferenceServicer({}, max_text_bytes=8192, is_ready=lambda: True)
    >>> servicer.server_metadata().name
    'fsserve'
    """

    def __init__(self, models: Mapping[str, ServedModel], max_text_bytes: int, is_ready: Callable[[], bool]) -> None:
        self.models = models
        self.max_text_bytes = max_text_bytes
        self.is_ready = is_ready

    def model(self, name: str, version: str = "") -> ServedModel:
        """The served model of that name (and version, when given), or NOT_FOUND naming what is served."""
        model = self.models.get(name)
        if model is None:
            served = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"unknown model {name!r}; this server serves: {served}")
        if version and version != model.version:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; available: {model.version}")
        return model

    def server_metadata(self) -> pb.ServerMetadataResponse:
        """Server name and version (fsserve's), and the protocol extensions it supports (none)."""
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    # -- RPCs ---------------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        """Live as long as the process answers."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext) -> pb.ServerReadyResponse:
        """Ready once every model is loaded, until shutdown begins."""
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        """Whether a model is ready; an unknown model (or version) is simply not ready."""
        return pb.ModelReadyResponse(ready=self.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: aio.ServicerContext) -> pb.ServerMetadataResponse:
        """See server_metadata."""
        return self.server_metadata()

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: aio.ServicerContext) -> pb.ModelMetadataResponse:
        """See model_metadata."""
        return self.model_metadata(request.name, request.version)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        """See infer; the call's deadline bounds the wait in the batcher."""
        return await self.infer(request, context.time_remaining())

    # -- the domain side, shared with the HTTP/REST front end --------------------------------
    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether a model is ready; an unknown model (or version) is simply not ready."""
        model = self.models.get(name)
        return model is not None and model.ready and version in ("", model.version) and self.is_ready()

    def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        """Versions, platform, inputs (TEXT[, TEXT_B]) and outputs (LABEL, PROBS) of one model."""
        model = self.model(name, version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform=model.platform,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in model.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in model.outputs],
        )

    async def infer(self, request: pb.ModelInferRequest, timeout: float | None = None) -> pb.ModelInferResponse:
        """Validate the request, classify its rows through the model's batcher, and encode the outputs."""
        model = self.model(request.model_name, request.model_version)
        rows = decode_request(request, model.num_sentences, self.max_text_bytes, model.max_rows)
        probs = await model.classify(rows.texts, rows.texts_b, timeout=timeout)
        return encode_response(request, model.version, model.labels, probs, rows)
