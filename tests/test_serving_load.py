"""Bounded load and fuzz tests of the gRPC server on loopback: batching under load, queue bounds, malformed input."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from fsserve.serving.client import build_infer_request, parse_infer_response
from fsserve.serving.protos import grpc_predict_v2_pb2 as pb
from fsserve.serving.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from fsserve.serving.server import histogram_counts
from test_serving_support import metrics_text, model_dirs, reference, server_factory  # noqa: F401

ADJECTIVES = ["gripping", "dull", "warm", "clumsy", "bold", "tired", "sharp"]
OBJECTS = ["script", "cast", "score", "ending", "pacing"]
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def request_rows(i: int) -> list[str]:
    """The 1-3 distinct texts of request i, so every answer can be traced back to its request."""
    base = f"Review {i}: a {ADJECTIVES[i % 7]} film with a {ADJECTIVES[(i // 7) % 7]} {OBJECTS[i % 5]}."
    return [base, f"{base} Truly.", f"{base} Or not."][: 1 + i % 3]


async def _run_clients(port: int, n_requests: int, n_clients: int) -> tuple[dict[int, Any], list[BaseException]]:
    """n_clients concurrent clients, each on its own channel, sending their share of n_requests one after another."""
    answers: dict[int, Any] = {}
    errors: list[BaseException] = []

    async def one_client(k: int) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for i in range(k, n_requests, n_clients):
                try:
                    answers[i] = await stub.ModelInfer(build_infer_request("sst2", request_rows(i), request_id=f"req-{i}"), timeout=60)
                except grpc.RpcError as exc:
                    errors.append(exc)

    await asyncio.gather(*(one_client(k) for k in range(n_clients)))
    return answers, errors


def _load_answers_like(server: Any, n: int, timeout: float, reference: Any, atol: float) -> tuple[dict[str, float], int]:
    """Send n requests from 32 clients; every one answered, under its own id, with the reference's rows; the batch-size histogram and the rows sent."""
    answers, errors = asyncio.run(asyncio.wait_for(_run_clients(server.port, n, 32), timeout=timeout))
    assert not errors, f"{len(errors)} errors, first: {errors[0]!r}"
    assert sorted(answers) == list(range(n))
    rows = [request_rows(i) for i in range(n)]
    expected = reference.predict_proba([t for r in rows for t in r])
    offset = 0
    for i in range(n):
        assert answers[i].id == f"req-{i}"
        result = parse_infer_response(answers[i])
        np.testing.assert_allclose(result.probs, expected[offset : offset + len(rows[i])], atol=atol)
        offset += len(rows[i])
    return histogram_counts(metrics_text(server.metrics_port), "fsserve_batch_size", 'model="sst2"'), offset


def test_load_2000_requests_from_32_clients(server_factory: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    server = server_factory(max_batch_size=32, max_queue_delay_ms=2.0, max_queue_size=256)
    n = 2000
    sizes, total_rows = _load_answers_like(server, n, 240, reference["sst2"], atol=1e-5)
    assert sizes["+Inf"] - sizes["1.0"] > 0, f"no batch held more than one row: {sizes}"
    assert sizes["+Inf"] < total_rows / 2, f"batching should at least halve the model calls: {sizes}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_on_cuda_graphs_answers_what_the_cpu_reference_does(server_factory: Any, model_dirs: dict[str, Any]) -> None:  # noqa: F811
    """The server on CUDA (captured graphs, fp32) under a bounded load of 32 clients; CPU twin: the 2000-request test above.

    The reference is pinned to the CPU in fp32: the shared ``reference`` fixture follows the default
    device, which on a GPU machine is CUDA graphs in bf16 (the first GPU run compared against that
    and saw bf16's 2e-3, not a serving error).
    """
    from fsserve.predictor import Predictor

    cpu_reference = Predictor.from_pretrained(model_dirs["sst2"], device="cpu")
    server = server_factory(device="cuda", dtype="float32", max_batch_size=32, max_queue_delay_ms=2.0, max_queue_size=256)
    sizes, _ = _load_answers_like(server, 600, 120, cpu_reference, atol=1e-4)
    assert sizes["+Inf"] - sizes["1.0"] > 0, f"no batch held more than one row on CUDA: {sizes}"


def test_full_queue_answers_resource_exhausted_and_keeps_serving(server_factory: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    server = server_factory(max_queue_size=4, max_queue_delay_ms=300.0)

    async def burst() -> list[Any]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [stub.ModelInfer(build_infer_request("sst2", request_rows(3 * i)), timeout=60) for i in range(32)]
            return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(burst())
    refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert refused and all(o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused), refused[:3]
    assert "max_queue_size 4" in refused[0].details()
    served = {i: o for i, o in enumerate(outcomes) if not isinstance(o, BaseException)}
    assert len(served) >= 4
    for i, answer in served.items():
        np.testing.assert_allclose(parse_infer_response(answer).probs, reference["sst2"].predict_proba(request_rows(3 * i)), atol=1e-5)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        after = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(build_infer_request("sst2", ["Still here?"]), timeout=30)
    np.testing.assert_allclose(parse_infer_response(after).probs, reference["sst2"].predict_proba(["Still here?"]), atol=1e-5)
    assert f'fsserve_errors_total{{code="RESOURCE_EXHAUSTED",method="ModelInfer"}} {len(refused)}.0' in metrics_text(server.metrics_port)


# -- fuzz -----------------------------------------------------------------------------------
def _fuzz_bytes(rng: random.Random) -> bytes:
    """A text element: valid UTF-8, invalid UTF-8, empty, whitespace, or oversized."""
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24)))
    if kind == 1:
        return b""
    if kind == 2:
        return b" \t\n"
    if kind == 3:
        return b"y" * rng.choice([8192, 8193, 20000])
    return rng.choice(["fine text", "ünïcødé ✓", "a", "A triumph."]).encode()


def fuzz_request(rng: random.Random) -> pb.ModelInferRequest:
    """A random, mostly malformed ModelInfer request: names, datatypes, shapes, contents, raw blobs, outputs."""
    model = rng.choice(["sst2"] * 6 + ["rte"] * 3 + ["", "nope"])
    request = pb.ModelInferRequest(model_name=model, model_version=rng.choice(["", "", "", "", "1", "2"]))
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        tensor = request.inputs.add(
            name=rng.choice(["TEXT", "TEXT", "TEXT_B", "", "text", "PROBS"]),
            datatype=rng.choice(["BYTES", "BYTES", "FP32", "INT64", "", "STRING"]),
            shape=[rng.choice([-5, -1, 0, 1, 2, 3, 32, 33, 2**40, 2**62]) for _ in range(rng.choice([0, 1, 1, 2, 3]))],
        )
        kind = rng.randrange(4)
        if kind == 0:
            tensor.contents.bytes_contents.extend(_fuzz_bytes(rng) for _ in range(rng.randrange(4)))
        elif kind == 1:
            tensor.contents.fp32_contents.extend(rng.random() for _ in range(rng.randrange(1, 4)))
        elif kind == 2:
            tensor.contents.int64_contents.append(rng.randrange(-(2**63), 2**63))
    if rng.random() < 0.35:
        for _ in range(rng.randrange(4)):
            blob = bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
            if rng.random() < 0.5:
                items = [_fuzz_bytes(rng) for _ in range(rng.randrange(1, 3))]
                blob = b"".join(len(x).to_bytes(4, "little") + x for x in items) + blob[: rng.randrange(3)]
            request.raw_input_contents.append(blob)
    for _ in range(rng.choice([0, 0, 1, 2])):
        request.outputs.add(name=rng.choice(["LABEL", "PROBS", "LOGITS", ""]))
    if rng.random() < 0.2:
        request.parameters["priority"].int64_param = rng.randrange(100)
    return request


def test_fuzz_500_malformed_requests(server_factory: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    server = server_factory()
    rng = random.Random(20210601)
    requests: list[bytes | pb.ModelInferRequest] = []
    for _ in range(500):
        if rng.random() < 0.1:  # not even a protobuf message
            requests.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
        else:
            requests.append(fuzz_request(rng))

    async def send_all() -> list[Any]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            as_bytes = channel.unary_unary(MODEL_INFER)  # no serializers: the payload goes out as given
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            outcomes: list[Any] = []
            for start in range(0, len(requests), 50):
                calls = [as_bytes(r, timeout=30) if isinstance(r, bytes) else stub.ModelInfer(r, timeout=30) for r in requests[start : start + 50]]
                outcomes += await asyncio.gather(*calls, return_exceptions=True)
            return outcomes

    outcomes = asyncio.run(asyncio.wait_for(send_all(), timeout=120))
    codes: dict[str, int] = {}
    for request, outcome in zip(requests, outcomes):
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, grpc.RpcError), f"not a gRPC status: {outcome!r}"
            code = outcome.code()
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) and outcome.details(), (code, outcome.details(), request)
        else:
            code = grpc.StatusCode.OK
            if not isinstance(request, bytes):  # the few well-formed ones: one answer row per row
                result = parse_infer_response(outcome)
                assert len(result.labels or result.probs) == request.inputs[0].shape[0]
        codes[code.name] = codes.get(code.name, 0) + 1
    assert codes.get("INVALID_ARGUMENT", 0) > 350 and codes.get("NOT_FOUND", 0) > 20, codes
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(build_infer_request("sst2", ["After the storm."]), timeout=30)
    np.testing.assert_allclose(parse_infer_response(answer).probs, reference["sst2"].predict_proba(["After the storm."]), atol=1e-5)
    assert 'code="INTERNAL"' not in metrics_text(server.metrics_port), "a well-formed protobuf made the servicer fail"
