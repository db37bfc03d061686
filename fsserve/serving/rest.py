"""KServe v2 REST (JSON) ↔ the gRPC messages the servicer takes: the HTTP front end's codec.

An HTTP inference request is turned into the same ``ModelInferRequest`` a gRPC client would send,
so ``tensors.decode_request`` validates both protocols with the same checks and the same messages;
only what is HTTP's own is checked here (the JSON itself, and Triton's binary tensor data extension:
a JSON header of ``Inference-Header-Content-Length`` bytes followed by the tensors' bytes, BYTES
elements length-prefixed exactly as in gRPC's raw contents). Responses go back the other way:
JSON ``data`` by default, binary for the outputs that ask for it (``binary_data``, or the
request's ``binary_data_output``, which tritonclient sets when no output is named).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fsserve.serving.protos import grpc_predict_v2_pb2 as pb
from fsserve.serving.status import InvalidInput
from fsserve.serving.tensors import deserialize_bytes_tensor, serialize_bytes_tensor

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_EXTENSION = "binary_tensor_data"


@dataclass
class RestInferRequest:
    """An HTTP inference request as the gRPC message, plus which outputs go back as binary data.

    >>> parsed = parse_infer_request(b'{"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["Fine."]}]}', None, "sst2")
    >>> list(parsed.request.inputs[0].contents.bytes_contents), parsed.binary("LABEL")
    ([b'Fine.'], False)
    """

    request: pb.ModelInferRequest
    binary_default: bool = False
    binary_outputs: dict[str, bool] = field(default_factory=dict)

    def binary(self, name: str) -> bool:
        """Whether output ``name`` goes back as binary data rather than JSON."""
        return self.binary_outputs.get(name, self.binary_default)


def _object(value: Any, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, else InvalidInput naming ``what``."""
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _is_int(value: Any) -> bool:
    """A JSON integer (bools are not integers here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major elements of a (possibly nested) JSON ``data`` array."""
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat


def _json_bytes(name: str, data: Any) -> list[bytes]:
    """BYTES elements from a JSON ``data`` array of strings (lone surrogates kept, so the UTF-8 check names them)."""
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: 'data' must be a JSON array, got {type(data).__name__}")
    items = []
    for i, item in enumerate(_flatten(data)):
        if not isinstance(item, str):
            raise InvalidInput(f"input {name!r}: data[{i}] is {json.dumps(item)[:40]}; BYTES elements are JSON strings")
        items.append(item.encode("utf-8", "surrogatepass"))
    return items


def _add_input(request: pb.ModelInferRequest, index: int, spec: Any, binary: memoryview, offset: int) -> tuple[bytes | None, int]:
    """Append one JSON input to ``request``; return its binary data (if it has some) and the new offset."""
    spec = _object(spec, f"inputs[{index}]")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{index}] needs a 'name' string")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input {name!r} needs a 'datatype' string, e.g. \"BYTES\"")
    if not isinstance(shape, list) or not all(_is_int(d) and abs(d) < 2**62 for d in shape):
        raise InvalidInput(f"input {name!r} needs a 'shape' array of integers, got {json.dumps(shape)[:60]}")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    size = _object(spec.get("parameters", {}), f"parameters of input {name!r}").get("binary_data_size")
    if size is None:
        if "data" not in spec:
            raise InvalidInput(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
        if datatype == "BYTES":
            tensor.contents.bytes_contents.extend(_json_bytes(name, spec["data"]))
        return None, offset
    if "data" in spec:
        raise InvalidInput(f"input {name!r} has both 'data' and a binary_data_size parameter; send one or the other")
    if not _is_int(size) or size < 0:
        raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
    if offset + size > len(binary):
        raise InvalidInput(f"input {name!r} declares binary_data_size {size} but only {len(binary) - offset} bytes of binary data remain")
    return bytes(binary[offset : offset + size]), offset + size


def parse_infer_request(body: bytes, header_length: str | None, model_name: str, model_version: str = "") -> RestInferRequest:
    """Turn an HTTP inference request body (JSON, or JSON header + binary tensors) into a ModelInferRequest."""
    view = memoryview(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {header_length!r}; it must be an integer of at most the body's {len(body)} bytes")
        view, binary = view[: int(header_length)], view[int(header_length) :]
    else:
        binary = memoryview(b"")
    try:
        document = json.loads(bytes(view))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    document = _object(document, "the inference request")
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {json.dumps(request_id)[:40]}")
    request.id = request_id
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty JSON array of tensors")
    blobs: list[bytes | None] = []
    offset = 0
    for index, spec in enumerate(inputs):
        blob, offset = _add_input(request, index, spec, binary, offset)
        blobs.append(blob)
    if offset != len(binary):
        raise InvalidInput(f"request carries {len(binary) - offset} bytes of binary data that no input's binary_data_size claims")
    _attach_binary(request, blobs)
    parameters = _object(document.get("parameters", {}), "'parameters'")
    parsed = RestInferRequest(request, binary_default=bool(parameters.get("binary_data_output", False)))
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a JSON array")
    for index, spec in enumerate(outputs):
        spec = _object(spec, f"outputs[{index}]")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"outputs[{index}] needs a 'name' string")
        options = _object(spec.get("parameters", {}), f"parameters of output {name!r}")
        if options.get("classification"):
            raise InvalidInput(f"output {name!r} asks for the classification extension, which this server does not support")
        request.outputs.add(name=name)
        if "binary_data" in options:
            parsed.binary_outputs[name] = bool(options["binary_data"])
    return parsed


def _attach_binary(request: pb.ModelInferRequest, blobs: list[bytes | None]) -> None:
    """All inputs binary → raw_input_contents (as gRPC's raw form); some → their BYTES elements, typed."""
    if all(blob is not None for blob in blobs):
        request.raw_input_contents.extend(blob for blob in blobs if blob is not None)
        return
    for tensor, blob in zip(request.inputs, blobs):
        # Wrong datatypes and shapes are left for decode_request, which names them as for gRPC.
        if blob is not None and tensor.datatype == "BYTES" and all(d >= 0 for d in tensor.shape):
            tensor.contents.bytes_contents.extend(deserialize_bytes_tensor(blob, math.prod(tensor.shape), repr(tensor.name)))


def _output_values(response: pb.ModelInferResponse, index: int) -> list[bytes] | np.ndarray:
    """Output ``index`` of a response, raw or typed: BYTES elements, or a float32 array."""
    tensor = response.outputs[index]
    raw = response.raw_output_contents[index] if response.raw_output_contents else None
    if tensor.datatype == "BYTES":
        if raw is None:
            return list(tensor.contents.bytes_contents)
        return deserialize_bytes_tensor(raw, math.prod(tensor.shape), tensor.name)
    return np.frombuffer(raw, dtype="<f4") if raw is not None else np.asarray(tensor.contents.fp32_contents, dtype="<f4")


def encode_infer_response(response: pb.ModelInferResponse, parsed: RestInferRequest) -> tuple[bytes, int | None]:
    """The HTTP body of an inference response and, when some output is binary, the JSON header's length."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for index, tensor in enumerate(response.outputs):
        values = _output_values(response, index)
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = {key: value.string_param for key, value in tensor.parameters.items()}
        if parsed.binary(tensor.name):
            blob = serialize_bytes_tensor(values) if isinstance(values, list) else np.ascontiguousarray(values, dtype="<f4").tobytes()
            parameters["binary_data_size"] = len(blob)
            blobs.append(blob)
        elif isinstance(values, list):
            entry["data"] = [item.decode("utf-8", "replace") for item in values]
        else:
            entry["data"] = values.tolist()
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}
    if response.id:
        document["id"] = response.id
    header = json.dumps(document).encode("utf-8")
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def model_metadata_json(metadata: pb.ModelMetadataResponse) -> dict[str, Any]:
    """A ModelMetadataResponse as the REST protocol's model metadata object."""

    def tensors(specs: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]

    return {"name": metadata.name, "versions": list(metadata.versions), "platform": metadata.platform,
            "inputs": tensors(metadata.inputs), "outputs": tensors(metadata.outputs)}
