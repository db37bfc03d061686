"""InferenceClient: a small synchronous KServe v2 gRPC client for fsserve models (used by `fsserve client`).

Any client of the protocol works (tritonclient, kserve); this one also reads the label names that
fsserve attaches to the PROBS output, so it can print ``label=probability``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fsserve.serving.protos import grpc_predict_v2_pb2 as pb
from fsserve.serving.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from fsserve.serving.tensors import LABEL, PROBS, TEXT, TEXT_B, deserialize_bytes_tensor, serialize_bytes_tensor


@dataclass
class Classification:
    """What the server answered for one request: a label per row, probabilities, and the label names.

    >>> result = Classification(["1"], np.array([[0.2, 0.8]], dtype=np.float32), ["0", "1"])
    >>> result.labels[0]
    '1'
    """

    labels: list[str]
    probs: np.ndarray
    label_names: list[str]


def build_infer_request(model: str, texts: list[str], texts_b: list[str] | None = None, raw: bool = True, request_id: str = "") -> pb.ModelInferRequest:
    """A ModelInfer request with TEXT (and TEXT_B) as BYTES tensors, raw (as tritonclient sends) or typed."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    for name, values in ((TEXT, texts), (TEXT_B, texts_b)):
        if values is None:
            continue
        encoded = [v.encode("utf-8") for v in values]
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[len(encoded)])
        if raw:
            request.raw_input_contents.append(serialize_bytes_tensor(encoded))
        else:
            tensor.contents.bytes_contents.extend(encoded)
    return request


def parse_infer_response(response: pb.ModelInferResponse) -> Classification:
    """Read LABEL and PROBS from a response, raw or typed."""
    raw = list(response.raw_output_contents)
    labels: list[str] = []
    probs = np.zeros((0, 0), dtype=np.float32)
    names: list[str] = []
    for index, tensor in enumerate(response.outputs):
        count = int(np.prod(tensor.shape)) if len(tensor.shape) else 0
        if tensor.name == LABEL:
            items = deserialize_bytes_tensor(raw[index], count, LABEL) if raw else list(tensor.contents.bytes_contents)
            labels = [item.decode("utf-8") for item in items]
        elif tensor.name == PROBS:
            flat = np.frombuffer(raw[index], dtype="<f4") if raw else np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
            probs = flat.reshape(list(tensor.shape))
            if "labels" in tensor.parameters:
                names = list(json.loads(tensor.parameters["labels"].string_param))
    return Classification(labels, probs, names)


class InferenceClient:
    """Call an fsserve (or any KServe v2) gRPC server: readiness, metadata, classification.

    >>> with InferenceClient("localhost:8001") as client:  # doctest: +SKIP
    ...     client.classify("sst2", ["A triumph."]).labels
    ['1']
    """

    def __init__(self, url: str, token: str | None = None, root_certificates: str | Path | None = None, timeout: float = 30.0) -> None:
        if not url or ":" not in url:
            raise ValueError(f"url must be host:port, got {url!r}")
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(root_certificates).read_bytes())
            self.channel = grpc.secure_channel(url, credentials)
        else:
            self.channel = grpc.insecure_channel(url)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata: list[tuple[str, str]] = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout

    def _call(self, method: str, request: Any) -> Any:
        """Invoke one RPC with the token and the timeout."""
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=self.timeout)

    def server_ready(self) -> bool:
        """Whether the server is ready for inference."""
        return bool(self._call("ServerReady", pb.ServerReadyRequest()).ready)

    def model_metadata(self, model: str) -> pb.ModelMetadataResponse:
        """The model's inputs, outputs, versions and platform."""
        return self._call("ModelMetadata", pb.ModelMetadataRequest(name=model))

    def classify(self, model: str, texts: list[str], texts_b: list[str] | None = None) -> Classification:
        """Classify texts (and second texts for pair models) in one request."""
        return parse_infer_response(self._call("ModelInfer", build_infer_request(model, texts, texts_b)))

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
