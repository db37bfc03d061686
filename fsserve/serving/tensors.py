"""KServe v2 tensors ↔ domain rows: decode and validate ModelInfer requests, encode responses.

Everything a client can get wrong about tensors is checked here, before a request reaches the
batcher, so one malformed request never fails a batch of well-formed ones.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fsserve.serving.protos import grpc_predict_v2_pb2 as pb
from fsserve.serving.status import InvalidInput
from fsserve.serving.texts import decode_texts

TEXT, TEXT_B, LABEL, PROBS = "TEXT", "TEXT_B", "LABEL", "PROBS"
OUTPUTS = (LABEL, PROBS)
_LENGTH = struct.Struct("<I")
_TYPED_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents", "fp32_contents", "fp64_contents")


@dataclass
class InferRows:
    """One ModelInfer request as domain data: the texts (and second texts) to classify and what to send back.

    >>> rows = InferRows(["A triumph."], None, ["LABEL", "PROBS"], raw=True)
    >>> len(rows)
    1
    """

    texts: list[str]
    texts_b: list[str] | None
    outputs: list[str]
    raw: bool

    def __len__(self) -> int:
        return len(self.texts)


def serialize_bytes_tensor(items: Sequence[bytes]) -> bytes:
    """Encode BYTES elements the way raw tensor contents carry them: a 4-byte little-endian length before each."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def deserialize_bytes_tensor(buffer: bytes, count: int, name: str = "tensor") -> list[bytes]:
    """Decode exactly ``count`` length-prefixed BYTES elements, naming what is wrong with a malformed buffer."""
    items: list[bytes] = []
    offset = 0
    while offset < len(buffer):
        if len(items) == count:
            raise InvalidInput(f"raw contents of {name} hold more than the {count} element(s) its shape declares")
        if offset + 4 > len(buffer):
            raise InvalidInput(f"raw contents of {name} are malformed: element {len(items)} has a truncated 4-byte length")
        (size,) = _LENGTH.unpack_from(buffer, offset)
        offset += 4
        if offset + size > len(buffer):
            raise InvalidInput(f"raw contents of {name} are malformed: element {len(items)} claims {size} bytes but {len(buffer) - offset} remain")
        items.append(bytes(buffer[offset : offset + size]))
        offset += size
    if len(items) != count:
        raise InvalidInput(f"shape of {name} declares {count} element(s) but its raw contents hold {len(items)}")
    return items


def _element_count(tensor: pb.ModelInferRequest.InferInputTensor) -> int:
    """Check an input's shape is [n] or [n, 1] and return n."""
    shape = list(tensor.shape)
    if len(shape) not in (1, 2) or any(d < 0 for d in shape) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInput(f"input {tensor.name!r} has shape {shape}; expected [-1] (one text per row, e.g. [{max(shape[:1] or [1])}])")
    return int(math.prod(shape))


def _typed_bytes(tensor: pb.ModelInferRequest.InferInputTensor, count: int) -> list[bytes]:
    """Read BYTES elements from typed contents, refusing contents of another type."""
    contents = tensor.contents
    for field in _TYPED_FIELDS:
        if len(getattr(contents, field)):
            raise InvalidInput(f"input {tensor.name!r} carries {field}; BYTES tensors use bytes_contents (or raw_input_contents)")
    items = list(contents.bytes_contents)
    if len(items) != count:
        raise InvalidInput(f"shape of {tensor.name!r} declares {count} element(s) but bytes_contents holds {len(items)}")
    return items


def decode_request(request: pb.ModelInferRequest, num_sentences: int, max_text_bytes: int, max_rows: int) -> InferRows:
    """Validate a ModelInfer request against the model's inputs and the server's limits; return its rows."""
    expected = [TEXT, TEXT_B] if num_sentences > 1 else [TEXT]
    raw = len(request.raw_input_contents) > 0
    if raw and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(f"request has {len(request.inputs)} input(s) but {len(request.raw_input_contents)} raw_input_contents entries")
    found: dict[str, list[str]] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name not in expected:
            raise InvalidInput(f"unexpected input {tensor.name!r}; this model takes {', '.join(expected)}")
        if tensor.name in found:
            raise InvalidInput(f"input {tensor.name!r} is given twice")
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input {tensor.name!r} has datatype {tensor.datatype or '(none)'!r}; expected BYTES")
        count = _element_count(tensor)
        if count == 0:
            raise InvalidInput(f"input {tensor.name!r} has no elements")
        if count > max_rows:
            raise InvalidInput(f"input {tensor.name!r} has {count} rows; max_batch_size is {max_rows}")
        if raw:
            if tensor.contents.ByteSize():
                raise InvalidInput(f"input {tensor.name!r} has typed contents while the request uses raw_input_contents; use one or the other")
            items = deserialize_bytes_tensor(request.raw_input_contents[index], count, repr(tensor.name))
        else:
            items = _typed_bytes(tensor, count)
        found[tensor.name] = decode_texts(tensor.name, items, max_text_bytes, InvalidInput)
    for name in expected:
        if name not in found:
            raise InvalidInput(f"input {name!r} is missing; this model takes {', '.join(expected)}")
    if num_sentences > 1 and len(found[TEXT]) != len(found[TEXT_B]):
        raise InvalidInput(f"TEXT has {len(found[TEXT])} rows but TEXT_B has {len(found[TEXT_B])}")
    outputs = [out.name for out in request.outputs] or list(OUTPUTS)
    for name in outputs:
        if name not in OUTPUTS:
            raise InvalidInput(f"unknown output {name!r}; this model returns {', '.join(OUTPUTS)}")
    if len(set(outputs)) != len(outputs):
        raise InvalidInput(f"output(s) requested twice: {outputs}")
    return InferRows(found[TEXT], found.get(TEXT_B), outputs, raw)


def encode_response(request: pb.ModelInferRequest, model_version: str, labels: Sequence[str], probs: np.ndarray, rows: InferRows) -> pb.ModelInferResponse:
    """Build the ModelInfer response: LABEL and/or PROBS, raw when the request was raw (as Triton does), typed otherwise."""
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=model_version, id=request.id)
    probs = np.ascontiguousarray(probs, dtype="<f4")
    predicted = [labels[i].encode("utf-8") for i in probs.argmax(axis=-1)]
    for name in rows.outputs:
        if name == LABEL:
            tensor = response.outputs.add(name=LABEL, datatype="BYTES", shape=[len(predicted)])
            if rows.raw:
                response.raw_output_contents.append(serialize_bytes_tensor(predicted))
            else:
                tensor.contents.bytes_contents.extend(predicted)
        else:
            tensor = response.outputs.add(name=PROBS, datatype="FP32", shape=list(probs.shape))
            tensor.parameters["labels"].string_param = json.dumps(list(labels))
            if rows.raw:
                response.raw_output_contents.append(probs.tobytes())
            else:
                tensor.contents.fp32_contents.extend(probs.ravel().tolist())
    return response
