"""Bounded load on loopback over HTTP/JSON and gRPC at once: one batcher, zero errors, every answer matched."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest

from fsserve.serving.client import build_infer_request, parse_infer_response
from fsserve.serving.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from fsserve.serving.server import histogram_counts
from test_serving_load import request_rows
from test_serving_support import metrics_text, model_dirs, reference, server_factory  # noqa: F401

aiohttp = pytest.importorskip("aiohttp")


async def _http_clients(port: int, ids: list[int], n_clients: int) -> tuple[dict[int, np.ndarray], list[str]]:
    """n_clients concurrent HTTP clients (each its own connection pool) sending their share of ``ids`` one after another."""
    answers: dict[int, np.ndarray] = {}
    errors: list[str] = []
    url = f"http://127.0.0.1:{port}/v2/models/sst2/infer"

    async def one_client(k: int) -> None:
        async with aiohttp.ClientSession() as session:
            for i in ids[k::n_clients]:
                rows = request_rows(i)
                body = {"id": f"req-{i}", "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(rows)], "data": rows}]}
                async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=120)) as response:
                    answer = await response.json()
                if response.status != 200 or answer.get("id") != f"req-{i}":
                    errors.append(f"{i}: {response.status} {answer}")
                    continue
                probs = answer["outputs"][1]
                answers[i] = np.reshape(np.asarray(probs["data"], dtype=np.float32), probs["shape"])

    await asyncio.gather(*(one_client(k) for k in range(n_clients)))
    return answers, errors


async def _grpc_clients(port: int, ids: list[int], n_clients: int) -> tuple[dict[int, np.ndarray], list[str]]:
    """The gRPC twin of _http_clients."""
    answers: dict[int, np.ndarray] = {}
    errors: list[str] = []

    async def one_client(k: int) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for i in ids[k::n_clients]:
                try:
                    response = await stub.ModelInfer(build_infer_request("sst2", request_rows(i), request_id=f"req-{i}"), timeout=120)
                except grpc.RpcError as exc:
                    errors.append(f"{i}: {exc.code().name} {exc.details()}")
                    continue
                answers[i] = parse_infer_response(response).probs

    await asyncio.gather(*(one_client(k) for k in range(n_clients)))
    return answers, errors


def test_load_1200_requests_half_http_half_grpc(server_factory: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    server = server_factory(http_port=0, max_batch_size=32, max_queue_delay_ms=2.0, max_queue_size=256)
    n = 1200
    http_ids, grpc_ids = list(range(0, n, 2)), list(range(1, n, 2))

    async def both() -> tuple[tuple[dict[int, np.ndarray], list[str]], tuple[dict[int, np.ndarray], list[str]]]:
        return await asyncio.gather(_http_clients(server.http_port, http_ids, 16), _grpc_clients(server.port, grpc_ids, 16))

    (http_answers, http_errors), (grpc_answers, grpc_errors) = asyncio.run(asyncio.wait_for(both(), timeout=300))
    assert not http_errors and not grpc_errors, (http_errors[:3], grpc_errors[:3])
    answers = {**http_answers, **grpc_answers}
    assert sorted(answers) == list(range(n))
    rows = [request_rows(i) for i in range(n)]
    expected = reference["sst2"].predict_proba([t for r in rows for t in r])
    offset = 0
    for i in range(n):
        np.testing.assert_allclose(answers[i], expected[offset : offset + len(rows[i])], atol=1e-5, err_msg=f"request {i}")
        offset += len(rows[i])
    text = metrics_text(server.metrics_port)
    sizes = histogram_counts(text, "fsserve_batch_size", 'model="sst2"')
    assert sizes["+Inf"] < sum(len(r) for r in rows) / 2, f"batching should at least halve the model calls: {sizes}"
    assert f'fsserve_requests_total{{code="OK",method="http:ModelInfer"}} {len(http_ids)}.0' in text
    assert f'fsserve_requests_total{{code="OK",method="ModelInfer"}} {len(grpc_ids)}.0' in text
