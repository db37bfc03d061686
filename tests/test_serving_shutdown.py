"""Graceful shutdown of a `serve` subprocess: SIGTERM during slow batches still answers every accepted request."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fsserve.serving.client import build_infer_request, parse_infer_response
from fsserve.serving.protos import grpc_predict_v2_pb2 as pb
from fsserve.serving.server import histogram_counts
from test_serving_support import free_port, metrics_text, save_tiny_model, spawn_server, stub


def long_rows(i: int) -> list[str]:
    """Eight long, distinct texts: a batch of them takes a noticeable fraction of a second on a CPU."""
    return [f"request {i} row {r}: " + " ".join(f"word{i}x{r}x{k}" for k in range(60)) for r in range(8)]


def _gauge(text: str, name: str) -> float:
    """Read one gauge of the model "slow" from Prometheus text (0 before it is first set)."""
    key = f'{name}{{model="slow"}} '
    return float(text.split(key, 1)[1].split()[0]) if key in text else 0.0


def wait_until_accepted(metrics_port: int, n: int, timeout: float = 60.0) -> None:
    """Poll /metrics until all n requests are in the batcher or answered, with some still queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = metrics_text(metrics_port)
        answered = histogram_counts(text, "fsserve_batch_size").get("+Inf", 0.0)  # one request per batch here
        if _gauge(text, "fsserve_queue_depth") >= 1 and _gauge(text, "fsserve_in_flight") + answered >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"requests were not accepted in {timeout}s")


def test_sigterm_drains_accepted_requests(tmp_path: Path, tiny_lm: Any) -> None:
    from fsserve.predictor import Predictor

    folder = save_tiny_model(tiny_lm, tmp_path / "slow", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
    port, metrics_port = free_port(), free_port()
    args = [f"slow={folder}", "--port", str(port), "--metrics-port", str(metrics_port), "--max-batch-size", "8", "--max-queue-delay-ms", "1"]
    proc, output = spawn_server(args)
    try:
        channel, client = stub(port)
        answers: dict[int, Any] = {}

        def call(i: int) -> None:
            try:
                answers[i] = client.ModelInfer(build_infer_request("slow", long_rows(i), request_id=str(i)), timeout=120)
            except grpc.RpcError as exc:
                answers[i] = exc

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        wait_until_accepted(metrics_port, 6)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        late_channel, late = stub(port)
        try:
            late.ModelInfer(build_infer_request("slow", ["too late"]), timeout=10)
            late_status = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            late_status = exc.code()
        late_channel.close()
        for thread in threads:
            thread.join(timeout=120)
        rest, _ = proc.communicate(timeout=60)
        output.append(rest)
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(output)
    assert proc.returncode == 0, log
    assert late_status == grpc.StatusCode.UNAVAILABLE, f"a call after SIGTERM got {late_status}"
    failed = {i: a for i, a in answers.items() if isinstance(a, grpc.RpcError)}
    assert sorted(answers) == list(range(6)) and not failed, f"{failed}\n{log}"
    assert "event=draining" in log and "event=server_stopped" in log and log.rstrip().endswith("stopped")
    drained = [line for line in log.splitlines() if "event=draining" in line][0]
    assert "queued=0" not in drained, f"SIGTERM should have found requests still queued: {drained}"
    predictor = Predictor.from_pretrained(folder)
    for i in range(6):
        assert isinstance(answers[i], pb.ModelInferResponse) and answers[i].id == str(i)
        np.testing.assert_allclose(parse_infer_response(answers[i]).probs, predictor.predict_proba(long_rows(i)), atol=1e-5)
    assert time.monotonic() - sent < 60
