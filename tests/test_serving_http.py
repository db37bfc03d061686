"""KServe v2 over HTTP/JSON: tritonclient.http and plain HTTP against the same server, batcher and errors as gRPC."""

from __future__ import annotations

import json
import re
import signal
import threading
import urllib.error
import urllib.request
from typing import Any

import grpc
import numpy as np
import pytest

from fsserve.serving.protos import grpc_predict_v2_pb2 as pb
from fsserve.serving.rest import HEADER_LENGTH
from fsserve.serving.tensors import serialize_bytes_tensor
from test_serving_support import metrics_text, model_dirs, reference, server_factory, spawn_server, start_server, stub  # noqa: F401

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

TEXTS = ["A gripping, warm film.", "Dull and far too long.", "An odd one."]
PAIRS = (["The cat sat.", "It rains."], ["A cat is sitting.", "The sun shines."])


def call(port: int, path: str, body: bytes | dict[str, Any] | None = None, headers: dict[str, str] | None = None,
         method: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request to 127.0.0.1:port; return (status, headers, body) for successes and errors alike."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def text_input(texts: list[str], name: str = "TEXT", shape: list[int] | None = None) -> dict[str, Any]:
    """A JSON BYTES input."""
    return {"name": name, "datatype": "BYTES", "shape": shape or [len(texts)], "data": texts}


@pytest.fixture(scope="module")
def server(model_dirs: Any) -> Any:  # noqa: F811
    """One server with HTTP on a free port, shared by the read-only tests of this module."""
    background = start_server(model_dirs, http_port=0, max_batch_size=8)
    yield background
    background.stop(grace=1.0)


# -- tritonclient.http --------------------------------------------------------------------------
def test_tritonclient_health_metadata_and_readiness(server: Any) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("sst2") and client.is_model_ready("sst2", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("sst2", "7")
    assert client.get_server_metadata()["name"] == "fsserve"
    meta = client.get_model_metadata("rte")
    assert [i["name"] for i in meta["inputs"]] == ["TEXT", "TEXT_B"] and meta["versions"] == ["1"]
    assert meta["outputs"][1] == {"name": "PROBS", "datatype": "FP32", "shape": [-1, 2]}
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("nope")
    assert caught.value.status() == "404" and "unknown model 'nope'" in caught.value.message()
    client.close()


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_matches_the_predictor(server: Any, reference: dict[str, Any], binary: bool) -> None:  # noqa: F811
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    text = httpclient.InferInput("TEXT", [len(TEXTS), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in TEXTS], dtype=object), binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("LABEL", "PROBS")]
    result = client.infer("sst2", [text], outputs=outputs, request_id="r-1")
    expected = reference["sst2"].predict_proba(TEXTS)
    np.testing.assert_allclose(result.as_numpy("PROBS"), expected, atol=1e-5)
    assert [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("LABEL")] == reference["sst2"].predict(TEXTS)
    response = result.get_response()
    assert response["id"] == "r-1" and json.loads(response["outputs"][1]["parameters"]["labels"]) == ["0", "1"]
    client.close()


def test_tritonclient_pairs_default_binary_outputs(server: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    inputs = []
    for name, texts in zip(("TEXT", "TEXT_B"), PAIRS):
        tensor = httpclient.InferInput(name, [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        inputs.append(tensor)
    result = client.infer("rte", inputs)  # no outputs named: tritonclient asks for all of them, binary
    np.testing.assert_allclose(result.as_numpy("PROBS"), reference["rte"].predict_proba(*PAIRS), atol=1e-5)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("rte", inputs[:1])
    assert caught.value.status() == "400" and caught.value.message() == "input 'TEXT_B' is missing; this model takes TEXT, TEXT_B"
    client.close()


# -- plain HTTP ---------------------------------------------------------------------------------
def test_plain_json_request_and_response(server: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    status, headers, body = call(server.http_port, "/v2/models/sst2/versions/1/infer", {"id": "x", "inputs": [text_input(TEXTS[:2])]})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    answer = json.loads(body)
    assert answer["model_name"] == "sst2" and answer["model_version"] == "1" and answer["id"] == "x"
    label, probs = answer["outputs"]
    assert label == {"name": "LABEL", "datatype": "BYTES", "shape": [2], "data": reference["sst2"].predict(TEXTS[:2])}
    assert probs["shape"] == [2, 2]
    np.testing.assert_allclose(np.reshape(probs["data"], (2, 2)), reference["sst2"].predict_proba(TEXTS[:2]), atol=1e-5)
    status, _, body = call(server.http_port, "/v2/models/sst2/infer", {"inputs": [text_input(TEXTS[:1])], "outputs": [{"name": "PROBS"}]})
    assert status == 200 and [o["name"] for o in json.loads(body)["outputs"]] == ["PROBS"]
    assert call(server.http_port, "/v2/health/ready")[0] == 200 and json.loads(call(server.http_port, "/v2/health/live")[2]) == {"live": True}
    assert "binary_tensor_data" in json.loads(call(server.http_port, "/v2")[2])["extensions"]


# Each case: the same request over gRPC (typed contents) and over HTTP (JSON) must fail with the same message.
SAME_ERRORS = [
    ("wrong datatype", "sst2", [{"name": "TEXT", "datatype": "FP32", "shape": [1], "data": [1.0]}], None, 400),
    ("wrong shape", "sst2", [text_input(TEXTS[:2] * 2, shape=[2, 2])], None, 400),
    ("count mismatch", "sst2", [text_input(TEXTS[:2], shape=[3])], None, 400),
    ("unexpected input", "sst2", [text_input(TEXTS[:1], name="WORDS")], None, 400),
    ("missing pair input", "rte", [text_input(TEXTS[:1])], None, 400),
    ("unknown output", "sst2", [text_input(TEXTS[:1])], ["LOGITS"], 400),
    ("empty text", "sst2", [text_input(["   "])], None, 400),
    ("too many rows", "sst2", [text_input(["x"] * 9)], None, 400),
    ("text too long", "sst2", [text_input(["y" * 9000])], None, 400),
    ("unknown model", "nope", [text_input(TEXTS[:1])], None, 404),
]


def _grpc_request(model: str, inputs: list[dict[str, Any]], outputs: list[str] | None) -> pb.ModelInferRequest:
    """The gRPC twin of a JSON request, with typed contents."""
    request = pb.ModelInferRequest(model_name=model)
    for spec in inputs:
        tensor = request.inputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
        if spec["datatype"] == "BYTES":
            tensor.contents.bytes_contents.extend(t.encode() for t in spec["data"])
        else:
            tensor.contents.fp32_contents.extend(spec["data"])
    for name in outputs or []:
        request.outputs.add(name=name)
    return request


@pytest.mark.parametrize(("case", "model", "inputs", "outputs", "status"), SAME_ERRORS, ids=[c[0] for c in SAME_ERRORS])
def test_http_and_grpc_refuse_alike(server: Any, case: str, model: str, inputs: list[dict[str, Any]], outputs: list[str] | None, status: int) -> None:
    channel, grpc_stub = stub(server.port)
    with pytest.raises(grpc.RpcError) as caught:
        grpc_stub.ModelInfer(_grpc_request(model, inputs, outputs), timeout=30)
    channel.close()
    body: dict[str, Any] = {"inputs": inputs}
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    got, headers, answer = call(server.http_port, f"/v2/models/{model}/infer", body)
    assert (got, json.loads(answer)) == (status, {"error": caught.value.details()})
    assert caught.value.code() == (grpc.StatusCode.NOT_FOUND if status == 404 else grpc.StatusCode.INVALID_ARGUMENT)
    assert headers["Content-Type"].startswith("application/json")


HELLO = serialize_bytes_tensor([b"hello"])


def with_binary(spec: dict[str, Any], blob: bytes) -> tuple[bytes, dict[str, str]]:
    """A request body of a JSON header holding one input, then ``blob``, and the header naming the JSON's length."""
    header = json.dumps({"inputs": [spec]}).encode()
    return header + blob, {HEADER_LENGTH: str(len(header))}


@pytest.mark.parametrize(("body", "headers", "message"), [
    (b"{not json", {}, "request body is not valid JSON"),
    (b'["TEXT"]', {}, "the inference request must be a JSON object, got list"),
    (b'{"inputs": []}', {}, "'inputs' must be a non-empty JSON array of tensors"),
    (b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": "3", "data": []}]}', {}, "needs a 'shape' array of integers"),
    (b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [7]}]}', {}, "data[0] is 7; BYTES elements are JSON strings"),
    (b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1]}]}', {}, "has neither 'data' nor a binary_data_size"),
    (b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}', {}, "TEXT[0] is not valid UTF-8"),
    (b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}', {HEADER_LENGTH: "999"}, "must be an integer of at most"),
    (*with_binary({"name": "TEXT", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 50}}, HELLO),
     "declares binary_data_size 50 but only 9 bytes"),
    (*with_binary(text_input(["a"]), b"extra"), "5 bytes of binary data that no input"),
    (*with_binary({"name": "TEXT", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 9}}, HELLO),
     "shape of 'TEXT' declares 2 element(s) but its raw contents hold 1"),
    (b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "outputs": [{"name": "PROBS", "parameters": {"classification": 2}}]}',
     {}, "classification extension"),
], ids=["malformed", "array", "no-inputs", "shape-type", "number", "no-data", "surrogate", "header-length", "binary-short", "binary-extra",
        "binary-count", "classification"])
def test_malformed_requests_are_400_with_the_problem_named(server: Any, body: bytes, headers: dict[str, str], message: str) -> None:
    status, _, answer = call(server.http_port, "/v2/models/sst2/infer", body, headers)
    assert status == 400, answer
    assert message in json.loads(answer)["error"]


def test_binary_request_with_json_header_and_mixed_inputs(server: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    blob = serialize_bytes_tensor([t.encode() for t in PAIRS[0]])
    header = json.dumps({"inputs": [
        {"name": "TEXT", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(blob)}},
        text_input(PAIRS[1], name="TEXT_B"),
    ], "outputs": [{"name": "PROBS", "parameters": {"binary_data": True}}, {"name": "LABEL"}]}).encode()
    status, headers, body = call(server.http_port, "/v2/models/rte/infer", header + blob, {HEADER_LENGTH: str(len(header))})
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    length = int(headers[HEADER_LENGTH])
    probs_out, label_out = json.loads(body[:length])["outputs"]
    assert probs_out["parameters"]["binary_data_size"] == len(body) - length == 2 * 2 * 4
    np.testing.assert_allclose(np.frombuffer(body[length:], "<f4").reshape(2, 2), reference["rte"].predict_proba(*PAIRS), atol=1e-5)
    assert label_out["data"] == reference["rte"].predict(*PAIRS)


def test_oversize_body_unknown_paths_and_methods(server: Any) -> None:
    status, _, answer = call(server.http_port, "/v2/models/sst2/infer", b"x" * (16 * 1024 * 1024 + 1))
    assert status == 413 and "the limit is 16777216" in json.loads(answer)["error"]
    status, _, answer = call(server.http_port, "/v2/no/such/path")
    assert status == 404 and "Not Found: GET /v2/no/such/path" in json.loads(answer)["error"]
    status, _, answer = call(server.http_port, "/v2/models/sst2/infer")
    assert status == 405 and "Method Not Allowed" in json.loads(answer)["error"]
    status, _, answer = call(server.http_port, "/v2/models/sst2/versions/3")
    assert status == 404 and json.loads(answer)["error"] == "model 'sst2' has no version '3'; available: 1"
    assert call(server.http_port, "/v2/models/nope/ready")[0] == 503
    counts = metrics_text(server.metrics_port)
    assert 'fsserve_requests_total{code="INVALID_ARGUMENT",method="http:ModelInfer"}' in counts
    assert 'fsserve_errors_total{code="RESOURCE_EXHAUSTED",method="http:ModelInfer"}' in counts


# -- limits, auth, drain ------------------------------------------------------------------------
def test_full_queue_answers_429_and_keeps_serving(server_factory: Any) -> None:  # noqa: F811
    import asyncio

    import aiohttp

    server = server_factory(http_port=0, max_queue_size=4, max_queue_delay_ms=300.0)
    url = f"http://127.0.0.1:{server.http_port}/v2/models/sst2/infer"

    async def burst() -> list[tuple[int, dict[str, Any]]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(i: int) -> tuple[int, dict[str, Any]]:
                async with session.post(url, json={"inputs": [text_input([f"Film number {i}."])]}) as response:
                    return response.status, await response.json()

            return await asyncio.gather(*(one(i) for i in range(32)))

    outcomes = asyncio.run(burst())
    refused = [body for status, body in outcomes if status != 200]
    assert refused and all(status in (200, 429) for status, _ in outcomes)
    assert "max_queue_size 4" in refused[0]["error"]
    assert sum(status == 200 for status, _ in outcomes) >= 4
    assert call(server.http_port, "/v2/models/sst2/infer", {"inputs": [text_input(TEXTS[:1])]})[0] == 200


def test_token_is_required_except_for_health(server_factory: Any) -> None:  # noqa: F811
    server = server_factory(http_port=0, token="s3cret")
    body = {"inputs": [text_input(TEXTS[:1])]}
    status, _, answer = call(server.http_port, "/v2/models/sst2/infer", body)
    assert status == 401 and json.loads(answer)["error"] == "missing 'Authorization: Bearer <token>' header"
    assert call(server.http_port, "/v2/models/sst2/infer", body, {"Authorization": "Bearer wrong"})[0] == 401
    assert call(server.http_port, "/v2/models/sst2/infer", body, {"Authorization": "Bearer s3cret"})[0] == 200
    assert call(server.http_port, "/v2/health/ready")[0] == 200
    assert call(server.http_port, "/v2/models/sst2")[0] == 401


def test_stop_lets_an_accepted_http_request_finish(model_dirs: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    server = start_server(model_dirs, http_port=0, max_queue_delay_ms=60_000.0)  # the batch waits until the drain
    port = server.http_port
    answers: list[tuple[int, dict[str, str], bytes]] = []
    worker = threading.Thread(target=lambda: answers.append(call(port, "/v2/models/sst2/infer", {"inputs": [text_input(TEXTS[:1])]})))
    worker.start()
    batcher = server.server.models["sst2"].batcher
    while batcher.queued == 0 and worker.is_alive():
        threading.Event().wait(0.01)
    server.stop(grace=30.0)
    worker.join(timeout=60)
    (status, _, body), = answers
    assert status == 200
    np.testing.assert_allclose(json.loads(body)["outputs"][1]["data"], reference["sst2"].predict_proba(TEXTS[:1])[0], atol=1e-5)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=5)


def test_cli_serve_http_port(model_dirs: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    proc, lines = spawn_server([f"sst2={model_dirs['sst2']}", "--port", "0", "--metrics-port", "-1", "--http-port", "0"])
    try:
        match = re.search(r"HTTP/REST on 127\.0\.0\.1:(\d+)", lines[-1])
        assert match, lines[-1]
        port = int(match.group(1))
        assert call(port, "/v2/health/ready")[0] == 200
        status, _, body = call(port, "/v2/models/sst2/infer", {"inputs": [text_input(TEXTS)]})
        assert status == 200 and json.loads(body)["outputs"][0]["data"] == reference["sst2"].predict(TEXTS)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
