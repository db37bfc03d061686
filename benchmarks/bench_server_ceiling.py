"""The server's own ceiling: fsserve's gRPC stack serving a model that costs a fixed time per batch.

On the H200 the served Gemma gained only 5.8× from batching at concurrency 32 (1182 against 204
req/s), with the GPU busy a fraction of each batch cycle, and a batch-1 request cost 2.9 ms more
over gRPC than in process (RESULTS.md). This asks how much of that is the server itself: the same
server (``InferenceServer`` with its batcher, in its own process) answers for a stand-in predictor
whose every batch takes ``--model-ms`` (a sleep, which releases the GIL as a GPU wait does) and
returns fixed probabilities. With ``--model-ms 0`` the throughput is the stack's own limit on this
machine; with the H200's batch-1 time (3.4 ms) the batching ratio is what this server allows there.

    python benchmarks/bench_server_ceiling.py --model-ms 0,3.4 --concurrency 1,32 --out out/bench_server_ceiling.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Any

import numpy as np

from bench_grpc import MODEL_NAME, drive
from fsserve.bench.report import machine_info, write_json_and_markdown
from fsserve.bench.run import load_texts


class FixedCostPredictor:
    """Answers every batch after ``model_ms`` milliseconds with the same probabilities: a model of known cost."""

    labels = ["0", "1"]
    num_sentences = 1
    backend = None

    def __init__(self, model_ms: float) -> None:
        self.model_ms = model_ms

    def predict_proba(self, texts: list[str], texts_b: list[str] | None = None) -> np.ndarray:
        """(B, 2) probabilities after the batch's fixed cost."""
        if self.model_ms > 0:
            time.sleep(self.model_ms / 1e3)
        return np.full((len(texts), 2), 0.5, dtype=np.float32)


def serve(model_ms: float, max_batch_size: int, delay_ms: float) -> None:
    """Child process: serve the stand-in on a free port, print the port, run until stdin closes."""
    from fsserve.serving.config import ServerConfig
    from fsserve.serving.server import BackgroundServer
    from fsserve.serving.servicer import ServedModel

    config = ServerConfig(models={MODEL_NAME: "stand-in"}, port=0, metrics_port=None, max_batch_size=max_batch_size,
                          max_queue_delay_ms=delay_ms, max_queue_size=1024)
    server = BackgroundServer(config, models={MODEL_NAME: ServedModel(MODEL_NAME, FixedCostPredictor(model_ms), config)}).start()
    print(server.port, flush=True)
    sys.stdin.read()
    server.stop(grace=1.0)


def run_one(model_ms: float, batching: bool, texts: list[str], concurrencies: list[int], requests: int, delay_ms: float) -> list[dict[str, Any]]:
    """Start a server process for one (cost, batching) pair and drive it at each concurrency."""
    max_batch = 32 if batching else 1
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--model-ms", str(model_ms), "--max-batch-size", str(max_batch),
                              "--delay-ms", str(delay_ms)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        rows = []
        for c in concurrencies:
            result = drive(f"127.0.0.1:{port}", texts, c, requests, warmup=4)
            rows.append({"model_ms": model_ms, "batching": "on" if batching else "off", **result})
            print(f"model {model_ms} ms, batching {'on' if batching else 'off'}, concurrency {c}: "
                  f"{result['throughput_per_s']:.0f} req/s, p50 {result['p50_ms']:.2f} ms", flush=True)
        return rows
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=30)


def to_markdown(record: dict[str, Any]) -> str:
    """One row per (cost, batching, concurrency), and the batching ratio at the highest concurrency."""
    m = record["machine"]
    lines = [f"`benchmarks/bench_server_ceiling.py` — {record['date']}; {m['cpu']}, {m['logical_cores']} cores, load average before "
             f"{m['load_avg_before']}", "", "| model ms per batch | batching | concurrency | req/s | p50 ms | p99 ms |", "|---:|---|---:|---:|---:|---:|"]
    for r in record["runs"]:
        lines.append(f"| {r['model_ms']} | {r['batching']} | {r['concurrency']} | {r['throughput_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    top = max(r["concurrency"] for r in record["runs"])
    for cost in sorted({r["model_ms"] for r in record["runs"]}):
        rate = {r["batching"]: r["throughput_per_s"] for r in record["runs"] if r["model_ms"] == cost and r["concurrency"] == top}
        if {"on", "off"} <= set(rate):
            lines.append(f"\nModel {cost} ms: batching gives {rate['on'] / rate['off']:.1f}× at concurrency {top}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the arguments; serve (child) or drive (parent) and write JSON and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-ms", default="0,3.4", help="the stand-in's milliseconds per batch, comma-separated")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--requests", type=int, default=960, help="requests per (cost, batching, concurrency)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="the batcher's queue delay when batching (the server's default: 0)")
    parser.add_argument("--max-batch-size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="out/bench_server_ceiling.json")
    args = parser.parse_args()
    if args.serve:
        serve(float(args.model_ms), args.max_batch_size, args.delay_ms)
        return
    texts, _ = load_texts(None)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    record: dict[str, Any] = {"benchmark": "bench_server_ceiling", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
                              "runs": []}
    for cost in (float(x) for x in args.model_ms.split(",") if x.strip()):
        for batching in (False, True):
            record["runs"] += run_one(cost, batching, texts, concurrencies, args.requests, args.delay_ms)
    print(write_json_and_markdown(args.out, record, to_markdown(record)))


if __name__ == "__main__":
    main()
