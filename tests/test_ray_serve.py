"""Ray Serve replicas of the Predictor on a local Ray of 2 CPUs: same answers, both replicas busy, a killed replica, a clean shutdown.

One Ray session serves the whole module (starting Ray takes seconds); the last test shuts it down
and checks that no process of it is left.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from test_serving_load import request_rows
from test_serving_support import save_tiny_model

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from fsserve.serving.ray_app import REPLICA_HEADER, RayServeConfig, start_ray_serve, stop_ray_serve  # noqa: E402

MODEL = "sst2"
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")


def _free_port() -> int:
    """A free loopback port (Ray's proxies take ports, not sockets)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def bundle(tiny_lm: Callable[[str], tuple[Any, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny sentiment prompt model of the serving tests, exported as an onnx bundle."""
    from fsserve.modeling import PromptModel

    root = tmp_path_factory.mktemp("ray")
    folder = save_tiny_model(tiny_lm, root / "model")
    return Path(PromptModel.from_pretrained(folder).export(root / "bundle", optimize=False))


@pytest.fixture(scope="module")
def reference(bundle: Path) -> Any:
    """The in-process Predictor every Ray answer is compared with."""
    from fsserve.predictor import Predictor

    return Predictor.from_pretrained(bundle, backend="onnx", intra_op_num_threads=1)


@pytest.fixture(scope="module")
def pair_bundle(tiny_lm: Callable[[str], tuple[Any, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The serving tests' tiny entailment (sentence-pair) model, exported: a second model in the same replicas."""
    from fsserve.modeling import PromptModel

    root = tmp_path_factory.mktemp("ray-pairs")
    return Path(PromptModel.from_pretrained(save_tiny_model(tiny_lm, root / "model", pair=True)).export(root / "bundle", optimize=False))


@pytest.fixture(scope="module")
def ray_serve(bundle: Path, pair_bundle: Path) -> Iterator[dict[str, Any]]:
    """Two replicas (half a CPU each) of two models on a local Ray of 2 CPUs, HTTP and gRPC on free loopback ports."""
    config = RayServeConfig(models={MODEL: str(bundle), "rte": str(pair_bundle)}, num_replicas=2, replica_cpus=0.5, max_batch_size=16)
    endpoints = start_ray_serve(config, http_port=_free_port(), grpc_port=_free_port(), num_cpus=2, request_timeout_s=15)
    node = ray._private.worker._global_node
    endpoints["session_dir"] = node.get_session_dir_path()
    endpoints["pids"] = {p.pid for p in psutil.Process().children(recursive=True)}
    yield endpoints
    stop_ray_serve()


def _post(connection: http.client.HTTPConnection, body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
    """POST an infer request to the model; the status, the JSON answer and the replica that made it."""
    connection.request("POST", f"/v2/models/{MODEL}/infer", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    raw = response.read()
    try:
        answer = json.loads(raw)
    except ValueError:  # Ray's proxy answers its own failures in plain text
        answer = {"proxy": raw.decode("utf-8", "replace")}
    return response.status, answer, response.getheader(REPLICA_HEADER) or ""


def _body(i: int) -> dict[str, Any]:
    rows = request_rows(i)
    return {"id": f"req-{i}", "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(rows)], "data": rows}]}


def _load(port: int, ids: list[int], clients: int, during: Callable[[], None] | None = None,
          spans: dict[int, tuple[float, float]] | None = None) -> tuple[dict[int, Any], dict[int, str]]:
    """``clients`` threads, each on its own keep-alive connection, send their share of ``ids``; ``during`` runs alongside.

    Returns the answers (JSON, replica) and the failures by request; ``spans`` receives each request's (sent, answered) times.
    """
    answers: dict[int, Any] = {}
    failures: dict[int, str] = {}
    spans = {} if spans is None else spans

    def client(k: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for i in ids[k::clients]:
            sent = time.monotonic()
            try:
                status, answer, replica = _post(connection, _body(i))
            except (OSError, http.client.HTTPException) as exc:
                failures[i] = f"{type(exc).__name__}: {exc}"
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                continue
            finally:
                spans[i] = (sent, time.monotonic())
            if status != 200:
                failures[i] = f"{status} {answer}"
            else:
                answers[i] = (answer, replica)
        connection.close()

    with ThreadPoolExecutor(clients + 1) as pool:
        futures = [pool.submit(client, k) for k in range(clients)]
        if during is not None:
            pool.submit(during).result()
        for future in futures:
            future.result()
    return answers, failures


def _check_answers(answers: dict[int, Any], reference: Any) -> None:
    """Every answer's LABEL and PROBS equal the in-process Predictor's for that request's texts."""
    for i, (answer, _) in answers.items():
        rows = request_rows(i)
        expected = reference.predict_proba(rows)
        assert answer["id"] == f"req-{i}"
        outputs = {o["name"]: o for o in answer["outputs"]}
        np.testing.assert_allclose(np.reshape(outputs["PROBS"]["data"], outputs["PROBS"]["shape"]), expected, atol=1e-5, err_msg=f"request {i}")
        assert outputs["LABEL"]["data"] == reference.labels_from_proba(expected)


def test_answers_equal_the_predictor_over_http_and_grpc(ray_serve: dict[str, Any], reference: Any) -> None:
    from fsserve.serving import InferenceClient

    port = int(ray_serve["http"].rsplit(":", 1)[1])
    answers, failures = _load(port, list(range(24)), clients=4)
    assert not failures, failures
    _check_answers(answers, reference)
    with InferenceClient(ray_serve["grpc"], timeout=60) as client:
        result = client.classify(MODEL, request_rows(5))
    np.testing.assert_allclose(result.probs, reference.predict_proba(request_rows(5)), atol=1e-5)
    import grpc

    from fsserve.serving.client import build_infer_request
    from fsserve.serving.protos import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(ray_serve["grpc"]) as channel:  # the gRPC answer names its replica, as the HTTP header does
        _, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(build_infer_request(MODEL, request_rows(1)), timeout=60)
    running = {name.rsplit("#", 1)[1] for name, _ in _replica_actors()}
    assert dict(call.trailing_metadata()).get(REPLICA_HEADER) in running, (call.trailing_metadata(), running)


def test_tritonclient_http_binary_and_pairs(ray_serve: dict[str, Any], reference: Any, pair_bundle: Path) -> None:
    """Triton's own HTTP client (binary tensor data) works through Ray's proxy, for the pair model too."""
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    from fsserve.predictor import Predictor

    client = httpclient.InferenceServerClient(ray_serve["http"].removeprefix("http://"))
    texts = request_rows(2)
    text = httpclient.InferInput("TEXT", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    result = client.infer(MODEL, [text], request_id="r-1")  # no outputs named: all of them, binary
    np.testing.assert_allclose(result.as_numpy("PROBS"), reference.predict_proba(texts), atol=1e-5)
    pairs = (["A man sleeps.", "Two dogs run."], ["Someone rests.", "Cats fly."])
    inputs = []
    for name, rows in zip(("TEXT", "TEXT_B"), pairs):
        tensor = httpclient.InferInput(name, [len(rows)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in rows], dtype=object))
        inputs.append(tensor)
    expected = Predictor.from_pretrained(pair_bundle, backend="onnx").predict_proba(*pairs)
    np.testing.assert_allclose(client.infer("rte", inputs).as_numpy("PROBS"), expected, atol=1e-5)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("rte", inputs[:1])
    assert caught.value.status() == "400" and caught.value.message() == "input 'TEXT_B' is missing; this model takes TEXT, TEXT_B"
    client.close()


def test_errors_carry_the_same_status_and_message_as_fsserve_serve(ray_serve: dict[str, Any]) -> None:
    import grpc

    from fsserve.serving import InferenceClient

    port = int(ray_serve["http"].rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    status, answer, _ = _post(connection, {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [" "]}]})
    assert (status, answer) == (400, {"error": "TEXT[0] is empty (or only whitespace)"})
    connection.request("POST", "/v2/models/nope/infer", json.dumps(_body(1)))
    response = connection.getresponse()
    assert response.status == 404 and json.loads(response.read()) == {"error": f"unknown model 'nope'; this server serves: rte, {MODEL}"}
    connection.request("GET", f"/v2/models/{MODEL}")
    metadata = json.loads(connection.getresponse().read())
    assert [t["name"] for t in metadata["inputs"]] == ["TEXT"] and [t["name"] for t in metadata["outputs"]] == ["LABEL", "PROBS"]
    with InferenceClient(ray_serve["grpc"], timeout=60) as client, pytest.raises(grpc.RpcError) as caught:
        client.classify(MODEL, ["fine", ""])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "TEXT[1] is empty" in caught.value.details()


def test_two_replicas_both_take_traffic(ray_serve: dict[str, Any], reference: Any) -> None:
    port = int(ray_serve["http"].rsplit(":", 1)[1])
    answers, failures = _load(port, list(range(100, 196)), clients=8)
    assert not failures, failures
    _check_answers(answers, reference)
    served = [replica for _, replica in answers.values()]
    counts = {replica: served.count(replica) for replica in set(served)}
    assert len(counts) == 2 and min(counts.values()) >= 10, counts


def _replica_actors() -> list[tuple[str, str]]:
    """(name, namespace) of the app's replica actors, as Ray's controller named them."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    return sorted((a["name"], a["namespace"]) for a in actors if a["name"].startswith("SERVE_REPLICA::fsserve#FsserveReplica#"))


def _wait_for_replacement(count: int, gone: tuple[str, str], timeout: float = 90.0) -> None:
    """Wait until ``gone`` has been replaced: ``count`` replica actors without it, all running, the deployment healthy."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deployment = serve.status().applications["fsserve"].deployments["FsserveReplica"]
        actors = _replica_actors()
        healthy = deployment.status == "HEALTHY" and deployment.replica_states.get("RUNNING", 0) == count
        if healthy and gone not in actors and len(actors) == count:
            return
        time.sleep(0.5)
    raise AssertionError(f"the deployment did not come back to {count} running replicas: {serve.status()}")


def test_a_replica_killed_under_load(ray_serve: dict[str, Any], reference: Any) -> None:
    """Ray restarts the killed replica and routes around it; only the requests it held when it died are lost.

    Ray Serve does not re-send a request whose replica dies while running it (its proxy answers 500,
    or, now and then, holds it until the request timeout and answers 408), so the loss is counted, not hidden: each failed request must have been in flight at the moment of
    the kill, there can be no more of them than requests in flight, and sending each again (a
    classification is idempotent) gives the Predictor's answer. Every other request succeeds.
    """
    port = int(ray_serve["http"].rsplit(":", 1)[1])
    before = _replica_actors()
    assert len(before) == 2, before
    kill_window: list[float] = []

    def kill_one() -> None:
        time.sleep(1.0)  # the load is under way
        name, namespace = before[0]
        kill_window.append(time.monotonic())
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        kill_window.append(time.monotonic())

    ids, clients = list(range(1000, 1400)), 8
    spans: dict[int, tuple[float, float]] = {}
    answers, failures = _load(port, ids, clients, during=kill_one, spans=spans)
    _check_answers(answers, reference)
    assert len(answers) + len(failures) == len(ids) and len(answers) >= len(ids) - clients, failures
    killed_at, kill_returned = kill_window
    for i, failure in failures.items():
        # the proxy answers 500, or, when the request hung on the dead replica, 408 at its request timeout
        assert failure == "500 {'proxy': 'Internal Server Error'}" or (failure.startswith("408 ") and "timed out" in failure), (i, failure)
        sent, answered = spans[i]
        assert sent < kill_returned and answered > killed_at, f"request {i} failed but was not in flight when the replica was killed"
    retried, still_failing = _load(port, sorted(failures), clients=1)
    assert not still_failing
    _check_answers(retried, reference)
    print(f"replica killed under load: {len(failures)} of {len(ids)} requests lost (in flight on it), {len(answers)} answered")

    _wait_for_replacement(2, gone=before[0])
    after = _replica_actors()
    assert before[0] not in after and len(after) == 2, (before, after)
    answers, failures = _load(port, list(range(2000, 2064)), clients=8)
    assert not failures
    _check_answers(answers, reference)
    assert before[0][0].rsplit("#", 1)[1] not in {replica for _, replica in answers.values()}
    assert len({replica for _, replica in answers.values()}) == 2


def test_the_proxies_carry_the_request_timeout(ray_serve: dict[str, Any], bundle: Path) -> None:
    """Both proxies got start_ray_serve's request timeout (read back from Serve's controller: ray is pinned)."""
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    assert ray.get(controller.get_http_config.remote()).request_timeout_s == 15
    assert ray.get(controller.get_grpc_config.remote()).request_timeout_s == 15
    with pytest.raises(ValueError, match="request_timeout_s must not be negative"):
        start_ray_serve(RayServeConfig(models={MODEL: str(bundle)}), request_timeout_s=-1)


def test_shutdown_leaves_no_ray_process(ray_serve: dict[str, Any]) -> None:
    node_pids = {p.process.pid for processes in ray._private.worker._global_node.all_processes.values() for p in processes}
    started = ray_serve["pids"] | {p.pid for p in psutil.Process().children(recursive=True)} | node_pids
    assert node_pids and started
    stop_ray_serve()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 30
    left: list[str] = []
    while time.monotonic() < deadline:
        left = []
        for process in psutil.process_iter(["pid", "cmdline", "status"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            ours = process.info["pid"] in started or ray_serve["session_dir"] in cmdline
            if ours and process.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(f"{process.info['pid']}: {cmdline[:120]}")
        if not left:
            break
        time.sleep(0.5)
    assert not left, left


def test_deploy_ray_command_serves_until_sigterm(bundle: Path, reference: Any, tmp_path: Path) -> None:
    """`fsserve deploy ray` starts its own local Ray, answers, and on SIGTERM stops and takes every Ray process with it."""
    import signal
    import subprocess
    import sys

    assert not ray.is_initialized(), "runs after the module's Ray session is shut down"
    port = _free_port()
    log = tmp_path / "deploy.log"
    with open(log, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "fsserve", "deploy", "ray", f"{MODEL}={bundle}", "--autoscale", "1,2", "--num-cpus", "2",
                                    "--http-port", str(port), "--grpc-port", "-1", "--replica-cpus", "0.5", "--request-timeout", "30"],
                                   stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        first = process.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith(f"Ray Serve: {MODEL} on autoscaling 1-2 replicas; KServe v2 HTTP on http://127.0.0.1:{port}"), (first, log.read_text()[-2000:])
        ray_pids = {p.pid for p in psutil.Process(process.pid).children(recursive=True)}
        answers, failures = _load(port, list(range(8)), clients=2)
        assert not failures
        _check_answers(answers, reference)
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and out.strip().endswith("stopped"), (process.returncode, out, log.read_text()[-2000:])
    time.sleep(2)
    left = [p for p in ray_pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, left


def test_bad_settings_are_refused_by_name(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsserve.cli.deploy import parse_autoscale
    from fsserve.serving import ray_app

    with pytest.raises(ValueError, match="not an exported bundle"):
        RayServeConfig(models={MODEL: str(tmp_path)})
    with pytest.raises(ValueError, match="num_replicas must be at least 1"):
        RayServeConfig(models={MODEL: str(bundle)}, num_replicas=0)
    with pytest.raises(ValueError, match="autoscale must be MIN,MAX"):
        RayServeConfig(models={MODEL: str(bundle)}, autoscale=(3, 2))
    with pytest.raises(ValueError, match="--autoscale takes MIN,MAX"):
        parse_autoscale("4")
    assert ray_app.deployment_options(RayServeConfig(models={MODEL: str(bundle)}, autoscale=(0, 3)))["autoscaling_config"]["max_replicas"] == 3
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'fsserve\[ray\]'"):
        ray_app.require_ray()
