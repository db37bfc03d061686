"""The KServe v2 gRPC server, called with tritonclient (a client no one here wrote) and a raw grpcio stub.

Without tritonclient only the tests marked ``needs_tritonclient`` skip; the raw-stub tests still run.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fsserve.serving.client import build_infer_request, parse_infer_response
from fsserve.serving.config import ServerConfig
from fsserve.serving.protos import grpc_predict_v2_pb2 as pb
from fsserve.serving.server import histogram_counts
from fsserve.serving.server import BackgroundServer
from test_serving_support import metrics_text, model_dirs, reference, self_signed_cert, server_factory, start_server, stub  # noqa: F401

try:
    import tritonclient.grpc as tc
except ImportError:  # the dev extra's client; the server itself does not need it
    tc = None
needs_tritonclient = pytest.mark.skipif(tc is None, reason="tritonclient[grpc] is not installed (pip install 'fsserve[dev]')")

TEXTS = ["A triumph.", "A mess from start to finish.", "It was fine, I guess.", "Gorgeous, moving and funny.", "Überraschend gut! 🎬"]
PREMISES = ["A man is playing a guitar.", "The cat sleeps on the mat.", "Two kids run in the park."]
HYPOTHESES = ["A person plays music.", "A dog is barking.", "Children are outside."]


@pytest.fixture(scope="module")
def server(model_dirs: dict[str, Path]) -> Iterator[BackgroundServer]:  # noqa: F811
    """One server for the module: sst2 (single sentence) and rte (pairs)."""
    background = start_server(model_dirs)
    yield background
    background.stop(grace=1.0)


@pytest.fixture(scope="module")
def triton(server: BackgroundServer) -> Any:
    """A tritonclient gRPC client pointed at the server."""
    return tc.InferenceServerClient(f"127.0.0.1:{server.port}")


@pytest.fixture(scope="module")
def raw(server: BackgroundServer) -> Iterator[Any]:
    """A raw grpcio stub of GRPCInferenceService."""
    channel, client = stub(server.port)
    yield client
    channel.close()


def bytes_input(name: str, texts: list[str]) -> Any:
    """A tritonclient BYTES input holding the texts."""
    tensor = tc.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def rpc_code(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    """Make a call expected to fail and return its status code and details."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


# -- metadata, readiness, health, reflection ------------------------------------------------
@needs_tritonclient
def test_readiness_and_metadata_through_tritonclient(triton: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("sst2") and triton.is_model_ready("rte")
    assert not triton.is_model_ready("nope") and not triton.is_model_ready("sst2", model_version="7")
    meta = triton.get_server_metadata()
    assert meta.name == "fsserve" and meta.version
    sst2 = triton.get_model_metadata("sst2")
    assert sst2.versions == ["1"] and sst2.platform == "fsserve_torch"
    assert [(t.name, t.datatype, list(t.shape)) for t in sst2.inputs] == [("TEXT", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in sst2.outputs] == [("LABEL", "BYTES", [-1]), ("PROBS", "FP32", [-1, 2])]
    rte = triton.get_model_metadata("rte")
    assert [t.name for t in rte.inputs] == ["TEXT", "TEXT_B"]
    assert list(rte.outputs[1].shape) == [-1, len(reference["rte"].labels)]


def test_health_and_reflection(server: BackgroundServer) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in database.get_services()
        service = DescriptorPool(database).FindServiceByName("inference.GRPCInferenceService")
        assert {m.name for m in service.methods} == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"}


# -- inference equals Predictor.predict_proba -----------------------------------------------
@needs_tritonclient
def test_single_and_batched_inference_match_predictor(triton: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    expected = reference["sst2"].predict_proba(TEXTS)
    for i, text in enumerate(TEXTS):
        result = triton.infer("sst2", [bytes_input("TEXT", [text])])
        np.testing.assert_allclose(result.as_numpy("PROBS"), expected[i : i + 1], atol=1e-5)
    result = triton.infer("sst2", [bytes_input("TEXT", TEXTS)], request_id="batch-1")
    probs = result.as_numpy("PROBS")
    assert probs.shape == (len(TEXTS), 2) and result.get_response().id == "batch-1"
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert [x.decode() for x in result.as_numpy("LABEL")] == reference["sst2"].predict(TEXTS)
    assert len({round(float(p[0]), 4) for p in probs}) == len(TEXTS), "the test model must tell the texts apart"


@needs_tritonclient
def test_pair_inputs_and_output_subset(triton: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    expected = reference["rte"].predict_proba(PREMISES, HYPOTHESES)
    result = triton.infer("rte", [bytes_input("TEXT", PREMISES), bytes_input("TEXT_B", HYPOTHESES)], outputs=[tc.InferRequestedOutput("PROBS")])
    np.testing.assert_allclose(result.as_numpy("PROBS"), expected, atol=1e-5)
    assert result.as_numpy("LABEL") is None
    only_label = triton.infer("rte", [bytes_input("TEXT", PREMISES), bytes_input("TEXT_B", HYPOTHESES)], outputs=[tc.InferRequestedOutput("LABEL")])
    assert [x.decode() for x in only_label.as_numpy("LABEL")] == reference["rte"].predict(PREMISES, HYPOTHESES)
    assert [o.name for o in only_label.get_response().outputs] == ["LABEL"]


def test_raw_stub_typed_and_raw_contents(raw: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    expected = reference["sst2"].predict_proba(TEXTS)
    typed = raw.ModelInfer(build_infer_request("sst2", TEXTS, raw=False, request_id="t"))
    assert not typed.raw_output_contents and typed.id == "t" and typed.model_version == "1"
    assert len(typed.outputs[1].contents.fp32_contents) == len(TEXTS) * 2
    from_raw = raw.ModelInfer(build_infer_request("sst2", TEXTS, raw=True))
    assert len(from_raw.raw_output_contents) == 2
    for response in (typed, from_raw):
        result = parse_infer_response(response)
        np.testing.assert_allclose(result.probs, expected, atol=1e-5)
        assert result.label_names == ["0", "1"] and result.labels == reference["sst2"].predict(TEXTS)
    column = build_infer_request("sst2", TEXTS[:2], raw=False)
    column.inputs[0].shape[:] = [2, 1]  # [n, 1] is the other common way to send a batch of strings
    np.testing.assert_allclose(parse_infer_response(raw.ModelInfer(column)).probs, expected[:2], atol=1e-5)


# -- errors ---------------------------------------------------------------------------------
def _request(texts: list[bytes], name: str = "TEXT", datatype: str = "BYTES", shape: list[int] | None = None, model: str = "sst2") -> pb.ModelInferRequest:
    """A typed-contents request with exactly the given elements (no validation here)."""
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=[len(texts)] if shape is None else shape)
    tensor.contents.bytes_contents.extend(texts)
    return request


@pytest.mark.parametrize(
    ("build", "code", "needle"),
    [
        (lambda: _request([b"hi"], model="nope"), "NOT_FOUND", "unknown model 'nope'"),
        (lambda: pb.ModelInferRequest(model_name="sst2", model_version="3"), "NOT_FOUND", "no version '3'"),
        (lambda: pb.ModelInferRequest(model_name="sst2"), "INVALID_ARGUMENT", "input 'TEXT' is missing"),
        (lambda: _request([b"hi"], name="TXT"), "INVALID_ARGUMENT", "unexpected input 'TXT'"),
        (lambda: _request([b"hi"], datatype="FP32"), "INVALID_ARGUMENT", "datatype 'FP32'; expected BYTES"),
        (lambda: _request([b"a", b"b"], shape=[3]), "INVALID_ARGUMENT", "declares 3 element(s) but bytes_contents holds 2"),
        (lambda: _request([b"a", b"b"], shape=[1, 2]), "INVALID_ARGUMENT", "expected [-1]"),
        (lambda: _request([b"fine", b""]), "INVALID_ARGUMENT", "TEXT[1] is empty"),
        (lambda: _request([b"   "]), "INVALID_ARGUMENT", "TEXT[0] is empty"),
        (lambda: _request([b"x" * 9000]), "INVALID_ARGUMENT", "TEXT[0] is 9000 bytes; the limit is 8192"),
        (lambda: _request([b"ok", b"\xff\xfebad"]), "INVALID_ARGUMENT", "TEXT[1] is not valid UTF-8"),
        (lambda: _request([b"x"] * 33), "INVALID_ARGUMENT", "33 rows; max_batch_size is 32"),
        (lambda: _request([b"premise"], model="rte"), "INVALID_ARGUMENT", "input 'TEXT_B' is missing"),
        (lambda: _request([b"hi"], name="TEXT_B"), "INVALID_ARGUMENT", "unexpected input 'TEXT_B'"),
    ],
)
def test_error_cases_give_their_status_code(raw: Any, build: Any, code: str, needle: str) -> None:
    status, details = rpc_code(raw.ModelInfer, build())
    assert status.name == code and needle in details, details


def test_more_error_cases(raw: Any) -> None:
    wrong_typed = _request([])
    wrong_typed.inputs[0].shape[:] = [1]
    wrong_typed.inputs[0].contents.fp32_contents.append(1.0)
    assert "carries fp32_contents" in rpc_code(raw.ModelInfer, wrong_typed)[1]
    truncated = build_infer_request("sst2", ["hello"])
    truncated.raw_input_contents[0] = truncated.raw_input_contents[0][:-2]
    status, details = rpc_code(raw.ModelInfer, truncated)
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "claims 5 bytes but 3 remain" in details
    mixed = build_infer_request("sst2", ["hello"])
    mixed.inputs[0].contents.bytes_contents.append(b"hello")
    assert "use one or the other" in rpc_code(raw.ModelInfer, mixed)[1]
    bad_output = build_infer_request("sst2", ["hello"])
    bad_output.outputs.add(name="LOGITS")
    assert "unknown output 'LOGITS'" in rpc_code(raw.ModelInfer, bad_output)[1]
    assert rpc_code(raw.ModelMetadata, pb.ModelMetadataRequest(name="nope"))[0] == grpc.StatusCode.NOT_FOUND


@needs_tritonclient
def test_errors_reach_tritonclient_users(triton: Any) -> None:
    with pytest.raises(tc.InferenceServerException) as info:
        triton.infer("sst2", [bytes_input("TEXT", ["ok"]), bytes_input("TEXT", ["twice"])])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "given twice" in info.value.message()
    assert triton.is_server_ready()


def test_past_deadline_request_is_dropped_from_its_batch(server_factory: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    server = server_factory(max_queue_delay_ms=1500.0)
    channel, client = stub(server.port)
    outcome: dict[str, Any] = {}

    def patient() -> None:
        outcome["patient"] = parse_infer_response(client.ModelInfer(build_infer_request("sst2", ["I can wait."]), timeout=30))

    thread = threading.Thread(target=patient)
    thread.start()
    status, _ = rpc_code(client.ModelInfer, build_infer_request("sst2", ["I cannot wait.", "Neither can I."]), timeout=0.3)
    thread.join(timeout=30)
    assert status == grpc.StatusCode.DEADLINE_EXCEEDED
    np.testing.assert_allclose(outcome["patient"].probs, reference["sst2"].predict_proba(["I can wait."]), atol=1e-5)
    sizes = histogram_counts(metrics_text(server.metrics_port), "fsserve_batch_size", 'model="sst2"')
    assert sizes["1.0"] == sizes["+Inf"] == 1, f"only the patient request's row should have run: {sizes}"
    channel.close()


# -- auth and TLS ---------------------------------------------------------------------------
def test_bearer_token_auth(server_factory: Any, reference: dict[str, Any]) -> None:  # noqa: F811
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = server_factory(token="s3cret")
    channel, client = stub(server.port)
    request = build_infer_request("sst2", TEXTS[:2])
    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
        assert rpc_code(client.ModelInfer, request, metadata=metadata)[0] == grpc.StatusCode.UNAUTHENTICATED
    status, details = rpc_code(client.ServerLive, pb.ServerLiveRequest())
    assert status == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
    ok = parse_infer_response(client.ModelInfer(request, metadata=[("authorization", "Bearer s3cret")]))
    np.testing.assert_allclose(ok.probs, reference["sst2"].predict_proba(TEXTS[:2]), atol=1e-5)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())  # probes need no token
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert 'fsserve_errors_total{code="UNAUTHENTICATED",method="ModelInfer"} 3.0' in metrics_text(server.metrics_port)
    channel.close()


@needs_tritonclient
def test_bearer_token_through_tritonclient(server_factory: Any) -> None:  # noqa: F811
    server = server_factory(token="s3cret", metrics_port=None)
    triton = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert triton.is_model_ready("sst2", headers={"authorization": "Bearer s3cret"})
    with pytest.raises(tc.InferenceServerException) as info:
        triton.is_model_ready("sst2")
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"


def test_tls_on_and_off(server_factory: Any, tmp_path: Path, reference: dict[str, Any]) -> None:  # noqa: F811
    cert, key = self_signed_cert(tmp_path)
    server = server_factory(tls_cert=str(cert), tls_key=str(key), metrics_port=None)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    channel, client = stub(server.port, credentials)
    result = parse_infer_response(client.ModelInfer(build_infer_request("sst2", TEXTS), timeout=30))
    np.testing.assert_allclose(result.probs, reference["sst2"].predict_proba(TEXTS), atol=1e-5)
    plain_channel, plain = stub(server.port)
    assert rpc_code(plain.ServerLive, pb.ServerLiveRequest(), timeout=5)[0] == grpc.StatusCode.UNAVAILABLE
    channel.close()
    plain_channel.close()


@needs_tritonclient
def test_tls_through_tritonclient(server_factory: Any, tmp_path: Path) -> None:  # noqa: F811
    cert, key = self_signed_cert(tmp_path)
    server = server_factory(tls_cert=str(cert), tls_key=str(key), metrics_port=None)
    assert tc.InferenceServerClient(f"127.0.0.1:{server.port}", ssl=True, root_certificates=str(cert)).is_server_ready()


# -- CLI and config -------------------------------------------------------------------------
def test_cli_client_prints_labels_and_probabilities(server: BackgroundServer, reference: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    from fsserve.cli.serve import add_serve_parsers

    parser = argparse.ArgumentParser()
    add_serve_parsers(parser.add_subparsers(dest="command"))
    url = f"127.0.0.1:{server.port}"
    args = parser.parse_args(["client", *PREMISES[:2], "--text-b", *HYPOTHESES[:2], "--url", url, "--model", "rte", "--json"])
    assert args.func(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = reference["rte"].predict_proba(PREMISES[:2], HYPOTHESES[:2])
    assert [line["label"] for line in lines] == reference["rte"].predict(PREMISES[:2], HYPOTHESES[:2])
    assert np.allclose([list(line["probs"].values()) for line in lines], expected, atol=1e-5)
    args = parser.parse_args(["client", "A triumph.", "--url", url, "--model", "sst2"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith(f"{reference['sst2'].predict('A triumph.')}\t[0=")
    args = parser.parse_args(["client", "x", "--url", url, "--model", "missing"])
    assert args.func(args) == 1 and "NOT_FOUND" in capsys.readouterr().err


def test_server_config_round_trip_and_validation() -> None:
    config = ServerConfig.from_specs(["runs/sst2/", "pairs=runs/rte"], port=0, token="t")
    assert config.models == {"sst2": "runs/sst2/", "pairs": "runs/rte"} and config.host == "127.0.0.1"
    assert ServerConfig.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ValueError, match="two models are named 'sst2'"):
        ServerConfig.from_specs(["a/sst2", "b/sst2"])
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        ServerConfig(models={"m": "p"}, tls_cert="cert.pem")
    with pytest.raises(ValueError, match="max_batch_size"):
        ServerConfig(models={"m": "p"}, max_batch_size=0)
    with pytest.raises(ValueError, match="unknown ServerConfig field"):
        ServerConfig.from_dict({"models": {"m": "p"}, "prot": 1})


def test_serves_an_exported_onnx_bundle(tmp_path: Path, model_dirs: dict[str, Path], reference: dict[str, Any]) -> None:  # noqa: F811
    from fsserve.modeling import PromptModel
    from fsserve.predictor import Predictor

    bundle = PromptModel.from_pretrained(model_dirs["sst2"]).export(tmp_path / "sst2-onnx", torch_weights=False)
    with BackgroundServer(ServerConfig(models={"onnx": str(bundle)}, port=0, metrics_port=None)) as server:
        channel, client = stub(server.port)
        assert client.ModelMetadata(pb.ModelMetadataRequest(name="onnx")).platform == "fsserve_onnx"
        result = parse_infer_response(client.ModelInfer(build_infer_request("onnx", TEXTS), timeout=30))
        channel.close()
    np.testing.assert_allclose(result.probs, Predictor.from_pretrained(bundle, backend="onnx").predict_proba(TEXTS), atol=1e-5)
    np.testing.assert_allclose(result.probs, reference["sst2"].predict_proba(TEXTS), atol=1e-4)


def test_missing_serve_extra_names_it() -> None:
    import subprocess
    import sys

    code = "import sys; sys.modules['grpc'] = None\nfrom fsserve.serving import InferenceServer"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "ImportError" in proc.stderr and "fsserve[serve]" in proc.stderr, proc.stderr
