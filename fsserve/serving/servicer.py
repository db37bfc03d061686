"""The KServe v2 GRPCInferenceService: protobuf → domain → protobuf, nothing else.

Validation lives in tensors.py, batching in batcher.py, status codes in interceptors.py; each
method here reads the request, calls the domain, and builds the response.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from grpc import aio

from fsserve import __version__
from fsserve.serving.errors import ModelNotFound
from fsserve.serving.models import ServedModel
from fsserve.serving.protos import grpc_predict_v2_pb2 as pb
from fsserve.serving.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from fsserve.serving.tensors import decode_request, encode_response

logger = logging.getLogger(__name__)

SERVER_NAME = "fsserve"


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
        model = self.models.get(request.name)
        ok = model is not None and model.ready and request.version in ("", model.version) and self.is_ready()
        return pb.ModelReadyResponse(ready=ok)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: aio.ServicerContext) -> pb.ServerMetadataResponse:
        """See server_metadata."""
        return self.server_metadata()

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: aio.ServicerContext) -> pb.ModelMetadataResponse:
        """Versions, platform, inputs (TEXT[, TEXT_B]) and outputs (LABEL, PROBS) of one model."""
        model = self.model(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform=model.platform,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in model.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in model.outputs],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        """Validate the request, classify its rows through the model's batcher, and encode the outputs."""
        model = self.model(request.model_name, request.model_version)
        rows = decode_request(request, model.num_sentences, self.max_text_bytes, model.max_rows)
        probs = await model.classify(rows.texts, rows.texts_b, timeout=context.time_remaining())
        return encode_response(request, model.version, model.labels, probs, rows)
