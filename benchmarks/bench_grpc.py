"""End to end over gRPC: an fsserve server on loopback, driven at several concurrencies, with and without dynamic batching.

The server runs in its own process (``fsserve serve``, port picked by the OS, metrics off), as it
would in production, so the clients' Python does not share its interpreter. Each configuration
sends a fixed number of one-sentence requests (real SST-2 dev sentences when the shared data is
there) from C client threads, each with its own channel, after a short warm-up; it reports the
throughput (requests/s over the wall time) and the latency percentiles per request. "Without
batching" is ``--max-batch-size 1`` (every request runs alone); "with" is the server's default
batcher (up to 32 rows, no queue delay: a batch forms from what queued while the model ran).

The server's overhead is measured at batch 1 against an in-process ``Predictor`` on the same
bundle and backend, interleaved request by request (one gRPC call, then one in-process call, the
same sentence): overhead = gRPC p50 − in-process p50.

    python benchmarks/bench_grpc.py bundles/sst2 --out out/bench_grpc.json
    python benchmarks/bench_grpc.py bundles/sst2 --concurrency 1,8 --requests 32 --quick
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fsserve.bench.report import machine_info, write_json_and_markdown
from fsserve.bench.run import load_texts
from fsserve.serving.process import ServerProcess

MODEL_NAME = "bench"


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    """p50/p90/p99 and mean of per-request latencies."""
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = (float(x) for x in np.percentile(a, [50, 90, 99]))
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(a.mean())}


def start_server(bundle: str, max_batch_size: int, delay_ms: float, backend: str, threads: int | None, device: str | None = None,
                 extra: Sequence[str] = ()) -> ServerProcess:
    """``fsserve serve`` on the bundle in a child process, on a port the OS picks, metrics off."""
    args = [f"{MODEL_NAME}={bundle}", "--port", "0", "--metrics-port", "-1", "--max-batch-size", str(max_batch_size),
            "--max-queue-delay-ms", str(delay_ms), "--backend", backend, "--max-queue-size", "1024"]
    args += (["--device", device] if device else []) + list(extra)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return ServerProcess(args, env=env)


def hammer(clients: Sequence[Any], requests: int, call: Callable[[Any, int], None]) -> tuple[list[float], list[str], float]:
    """Run ``call(client, i)`` for i < requests from one thread per client; return latencies (ms), errors and wall seconds."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker(client: Any) -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                call(client, i)
            except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with lock:
                latencies.append((time.perf_counter() - start) * 1e3)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    wall = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - wall


def drive(url: str, texts: list[str], concurrency: int, requests: int, warmup: int) -> dict[str, Any]:
    """Send ``requests`` one-sentence requests from ``concurrency`` threads; return throughput and latency percentiles."""
    from fsserve.serving import InferenceClient

    clients = [InferenceClient(url, timeout=600.0) for _ in range(concurrency)]
    try:
        for i in range(warmup):
            clients[i % concurrency].classify(MODEL_NAME, [texts[i % len(texts)]])
        latencies, errors, wall = hammer(clients, requests, lambda client, i: client.classify(MODEL_NAME, [texts[i % len(texts)]]))
    finally:
        for c in clients:
            c.close()
    if not latencies:
        raise RuntimeError(f"every request failed: {errors[:3]}")
    return {"concurrency": concurrency, "requests": requests, "errors": len(errors), "error_samples": errors[:3], "wall_s": wall,
            "throughput_per_s": len(latencies) / wall, **percentiles(latencies)}


def overhead(url: str, bundle: str, backend: str, texts: list[str], pairs: int, threads: int | None, device: str | None = None) -> dict[str, Any]:
    """Batch-1 latency through the server vs the same Predictor in process, interleaved call by call."""
    from fsserve.predictor import Predictor
    from fsserve.serving import InferenceClient

    kwargs = {"intra_op_num_threads": threads} if threads and backend == "onnx" else {}
    predictor = Predictor.from_pretrained(bundle, backend=backend, device=device, batch_size=1, **kwargs)
    grpc_ms, local_ms = [], []
    with InferenceClient(url, timeout=600.0) as client:
        for i in range(pairs + 3):
            text = texts[i % len(texts)]
            start = time.perf_counter()
            remote = client.classify(MODEL_NAME, [text])
            middle = time.perf_counter()
            local = predictor.predict_proba([text])
            end = time.perf_counter()
            if i >= 3:  # the first calls warm both up
                grpc_ms.append((middle - start) * 1e3)
                local_ms.append((end - middle) * 1e3)
            if not np.allclose(remote.probs, local, atol=1e-4):
                raise RuntimeError(f"server and in-process predictor disagree on {text!r}: {remote.probs} vs {local}")
    g, p = percentiles(grpc_ms), percentiles(local_ms)
    return {"pairs": pairs, "grpc": g, "in_process": p, "overhead_p50_ms": g["p50_ms"] - p["p50_ms"], "ratio_p50": g["p50_ms"] / p["p50_ms"]}


def to_markdown(record: dict[str, Any]) -> str:
    """The results as the table RESULTS.md carries."""
    m = record["machine"]
    lines = [f"`benchmarks/bench_grpc.py {record['bundle']}` ({record['backend']} backend) — {record['date']}; {m['cpu']}, "
             f"{m['logical_cores']} cores, GPU {m['gpu'] or 'none'}; load average before {m['load_avg_before']}",
             "", "| batching | concurrency | requests | req/s | p50 ms | p90 ms | p99 ms | errors |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in record["runs"]:
        lines.append(f"| {r['batching']} | {r['concurrency']} | {r['requests']} | {r['throughput_per_s']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    o = record.get("overhead")
    if o:
        lines += ["", f"Batch 1, {o['pairs']} interleaved pairs: gRPC p50 {o['grpc']['p50_ms']:.1f} ms vs in-process Predictor "
                      f"{o['in_process']['p50_ms']:.1f} ms: server overhead {o['overhead_p50_ms']:.1f} ms ({o['ratio_p50']:.2f}×)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse arguments, run every configuration, write JSON and markdown, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="an exported bundle (or saved model folder, with --backend torch)")
    parser.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"])
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client thread counts")
    parser.add_argument("--requests", type=int, default=96, help="requests per configuration (bounded)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed requests per configuration")
    parser.add_argument("--pairs", type=int, default=24, help="interleaved gRPC/in-process pairs for the overhead figure")
    parser.add_argument("--batching", default="both", choices=["both", "on", "off"])
    parser.add_argument("--delay-ms", type=float, default=0.0, help="the batcher's queue delay when batching (the server's default: 0)")
    parser.add_argument("--threads", type=int, help="onnxruntime threads for the in-process Predictor (OMP_NUM_THREADS for the server)")
    parser.add_argument("--texts", help="CSV/JSONL of sentences (default: SST-2 dev from the shared data)")
    parser.add_argument("--device", help="the server's and the in-process Predictor's device (cpu, cuda; default: cuda when available)")
    parser.add_argument("--out", default="out/bench_grpc.json")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not concurrencies or min(concurrencies) < 1 or args.requests < 1:
        raise SystemExit("--concurrency needs positive integers and --requests at least 1")
    backend = args.backend if args.backend != "auto" else ("onnx" if (Path(args.bundle) / "manifest.json").is_file() else "torch")
    texts, source = load_texts(args.texts)
    record: dict[str, Any] = {"benchmark": "bench_grpc", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bundle": args.bundle,
                              "backend": backend, "device": args.device, "texts": source, "machine": machine_info(args.threads), "runs": []}
    modes = {"both": ["off", "on"], "on": ["on"], "off": ["off"]}[args.batching]
    for mode in modes:
        server = start_server(args.bundle, 32 if mode == "on" else 1, args.delay_ms, backend, args.threads, args.device)
        try:
            url = f"127.0.0.1:{server.port}"
            if mode == "off":
                print("overhead vs in-process Predictor at batch 1 ...", flush=True)
                record["overhead"] = overhead(url, args.bundle, backend, texts, args.pairs, args.threads, args.device)
            for c in concurrencies:
                print(f"batching {mode}, concurrency {c}: {args.requests} requests ...", flush=True)
                run = drive(url, texts, c, args.requests, args.warmup)
                record["runs"].append({"batching": mode, "max_batch_size": 32 if mode == "on" else 1, **run})
                print(f"  {run['throughput_per_s']:.1f} req/s, p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms", flush=True)
        finally:
            server.stop()
    finish(record, args.out, to_markdown)


def finish(record: dict[str, Any], out: str, markdown: Callable[[dict[str, Any]], str]) -> None:
    """Note the load average after the run, write the JSON and markdown, print the tables."""
    record["machine"]["load_avg_after"] = list(os.getloadavg())
    print(write_json_and_markdown(out, record, markdown(record)))


if __name__ == "__main__":
    main()
