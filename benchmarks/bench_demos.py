"""Time demonstration selection: DemoIndex (one encoder call per batch + FAISS per class) vs LM-BFF's loop.

Pool: 10,000 SST-2 training sentences (seeded sample), embedded with all-MiniLM-L6-v2. Queries: SST-2
dev sentences. Both sides use the same encoder and the same pool embeddings, in the same run:

* fsserve, batch 1 and batch 32: ``DemoIndex.embed`` (one encoder call per batch) then
  ``DemoIndex.select(mode="top1", embeddings=...)`` (one exact FAISS search per class for the batch);
* LM-BFF's way: per query, embed it alone (the same call as fsserve's batch 1, timed once and
  shared), then a Python loop calling
  ``sentence_transformers.util.pytorch_cos_sim`` against every pool embedding, sort, and take the
  best of each class.

Embedding the pool is the slow part on a small CPU, so the built index is kept in ``--cache`` (a
``DemoIndex.save`` folder, reloaded and verified without re-embedding) and its build time is
recorded next to it; ``--rebuild`` re-embeds.

    python benchmarks/bench_demos.py                      # ~3 min the first time (pool: 115 s), ~40 s after
    python benchmarks/bench_demos.py --no-results         # do not touch benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_head import cpu_model  # the benchmarks' one CPU-name helper (this folder is on sys.path)
from fsserve.data import load_split
from fsserve.demos import DemoIndex
from fsserve.sampling import stratified_sample
from fsserve.utils.atomic import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
SST2 = Path(os.environ.get("FSSERVE_DATA_DIR", REPO.parent / "shared" / "data")) / "original" / "SST-2"
SECTION = "## Demonstration selection (bench_demos.py)"


def build_or_load(pool: list, cache: Path, rebuild: bool) -> tuple[DemoIndex, dict]:
    """Reuse the cached index when it holds exactly this pool; otherwise embed the pool and cache it."""
    timing_path = cache.parent / f"{cache.name}.build.json"
    if not rebuild and cache.is_dir() and timing_path.is_file():
        start = time.perf_counter()
        index = DemoIndex.load(cache)
        if [ex.text for ex in index.examples] == [ex.text for ex in pool]:
            info = json.loads(timing_path.read_text())
            return index, {**info, "loaded_from_cache": True, "load_s": time.perf_counter() - start}
    start = time.perf_counter()
    index = DemoIndex(pool, labels=["0", "1"])
    info = {"build_s": time.perf_counter() - start, "built_at": datetime.datetime.now().isoformat(timespec="seconds"),
            "pool_size": len(pool), "cpu": cpu_model()}
    index.save(cache)
    write_json_atomic(timing_path, info)
    return index, {**info, "loaded_from_cache": False}


def lmbff_loop(index: DemoIndex, pool_tensor: list, query_vec: np.ndarray) -> list[int]:
    """LM-BFF's selection: cosine against every pool embedding in a Python loop, sort, best per class."""
    import torch
    from sentence_transformers import util

    query = torch.from_numpy(query_vec)
    scores = [(i, util.pytorch_cos_sim(pool_tensor[i], query)) for i in range(len(pool_tensor))]
    scores.sort(key=lambda x: x[1], reverse=True)
    best: dict[int, int] = {}
    classes = index.class_of(np.arange(len(pool_tensor)))
    for i, _ in scores:
        best.setdefault(int(classes[i]), i)
        if len(best) == len(index.classes):
            break
    return [best[j] for j in range(len(index.classes))]


def run(args: argparse.Namespace) -> dict:
    """Measure both ways on the same pool and queries; return the JSON record."""
    import torch

    import faiss

    if args.threads:
        torch.set_num_threads(args.threads)
    default_faiss_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(args.faiss_threads)
    train = load_split("SST-2", SST2 / "train.tsv")
    rng = np.random.default_rng(0)
    pool = [train[i] for i in sorted(rng.choice(len(train), size=args.pool_size, replace=False))]
    # a seeded, class-stratified sample of dev (never the first rows: agreement is counted on it too)
    dev = load_split("SST-2", SST2 / "dev.tsv")
    queries = [ex.text for ex in stratified_sample(dev, max(args.queries, 64), 0, "SST-2").examples]
    index, build = build_or_load(pool, Path(args.cache), args.rebuild)
    index.select(queries[:4], mode="top1")  # warm-up: encoder, FAISS, allocator

    pool_tensor = list(torch.from_numpy(np.array(index.embeddings)))
    # Batch 1: the query embedding is the same call for both ways, so it is measured once per query and
    # both searches run on it, interleaved, so that load from other jobs hits both sides alike.
    embed_s, faiss_s, loop_s, agree = [], [], [], 0
    for q, text in enumerate(queries[: args.batch1_queries]):
        t0 = time.perf_counter()
        vectors = index.embed([text])
        t1 = time.perf_counter()
        pick = index.select([text], mode="top1", embeddings=vectors)[0].tolist()
        t2 = time.perf_counter()
        embed_s.append(t1 - t0)
        faiss_s.append(t2 - t1)
        if q < args.loop_queries:
            loop_pick = lmbff_loop(index, pool_tensor, vectors[0])
            loop_s.append(time.perf_counter() - t2)
            agree += loop_pick == pick
    embed_b1 = 1e3 * statistics.median(embed_s)
    loop = {"queries": len(loop_s), "embed_ms": embed_b1, "search_ms": 1e3 * statistics.median(loop_s)}
    b1 = {"batch": 1, "queries": len(embed_s), "embed_ms": embed_b1, "search_ms": 1e3 * statistics.median(faiss_s)}
    embed_s, faiss_s = [], []
    for start in range(0, args.queries, 32):
        chunk = queries[start : start + 32]
        t0 = time.perf_counter()
        vectors = index.embed(chunk)
        t1 = time.perf_counter()
        index.select(chunk, mode="top1", embeddings=vectors)
        t2 = time.perf_counter()
        embed_s.append((t1 - t0) / len(chunk))
        faiss_s.append((t2 - t1) / len(chunk))
    b32 = {"batch": 32, "queries": args.queries, "embed_ms": 1e3 * statistics.median(embed_s),
           "search_ms": 1e3 * statistics.median(faiss_s)}
    # FAISS's OpenMP threads spin-wait for each other when the cores are shared: time that setting too.
    faiss.omp_set_num_threads(default_faiss_threads)
    omp = []
    for start in range(0, args.queries, 32):
        chunk = queries[start : start + 32]
        vectors = index.embed(chunk)
        t0 = time.perf_counter()
        index.select(chunk, mode="top1", embeddings=vectors)
        omp.append((time.perf_counter() - t0) / len(chunk))
    faiss.omp_set_num_threads(args.faiss_threads)
    b32["search_ms_default_faiss_threads"] = 1e3 * statistics.median(omp)
    for rec in (loop, b1, b32):
        rec["total_ms"] = rec["embed_ms"] + rec["search_ms"]
    for rec in (b1, b32):
        rec["speedup_total_vs_loop"] = loop["total_ms"] / rec["total_ms"]
        rec["speedup_search_vs_loop"] = loop["search_ms"] / rec["search_ms"]
    return {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0], "torch_threads": torch.get_num_threads(),
            "faiss_threads": args.faiss_threads, "faiss_default_threads": default_faiss_threads, "pool_size": len(index),
            "encoder": index.encoder_name, "index_type": index.index_type, "pool": build,
            "fsserve_batch1": b1, "fsserve_batch32": b32, "lmbff_loop": loop,
            "loop_top1_agrees_with_faiss": f"{agree}/{len(loop_s)}"}


def results_section(r: dict) -> str:
    """The RESULTS.md section for one run."""
    b1, b32, loop, pool = r["fsserve_batch1"], r["fsserve_batch32"], r["lmbff_loop"], r["pool"]
    built = (f"embedding the {r['pool_size']:,}-sentence pool took {pool['build_s']:.0f} s "
             f"({r['pool_size'] / pool['build_s']:.0f} sentences/s, measured {pool['built_at']}); "
             + (f"this run reloaded and verified it from the cache in {pool['load_s']:.1f} s, no re-embedding."
                if pool["loaded_from_cache"] else "this run embedded it."))
    rows = [("fsserve, batch 1", b1), ("fsserve, batch 32", b32), ("LM-BFF loop (same batch-1 embed + Python cosine loop)", loop)]
    table = ["| method | embed ms/query | search ms/query | total ms/query | loop / this (total) | loop / this (search) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, rec in rows:
        ratio = (f"{rec['speedup_total_vs_loop']:.1f}x | {rec['speedup_search_vs_loop']:.0f}x" if "speedup_total_vs_loop" in rec
                 else "1.0x | 1x")
        table.append(f"| {name} | {rec['embed_ms']:.2f} | {rec['search_ms']:.3f} | {rec['total_ms']:.2f} | {ratio} |")
    return "\n".join([
        SECTION, "",
        f"CPU run, {r['date']}: `{r['cpu']}` ({r['cores']} cores shared with other jobs, 1-minute load "
        f"average {r['load_avg_1m']:.1f} at the end; torch threads {r['torch_threads']}: torch and FAISS share one "
        f"OpenMP runtime here, so `--faiss-threads` sets both). Encoder `{r['encoder']}`, "
        f"exact FAISS `IndexFlatIP` per class (`{r['index_type']}`), pool of {r['pool_size']:,} SST-2 training "
        f"sentences (seeded sample), SST-2 dev sentences as queries, mode `top1`; medians per query "
        f"({b1['queries']} queries at batch 1, {b32['queries']} at batch 32, {loop['queries']} through the loop). "
        f"Command: `python benchmarks/bench_demos.py`. The loop's top-1 picks agree with FAISS's on "
        f"{r['loop_top1_agrees_with_faiss']} queries.", "",
        *table, "",
        f"Pool: {built} The search column is where the index replaces LM-BFF's loop; at batch 32 the encoder "
        "call is shared by the batch, which is what `Predictor` does per request batch.", "",
        f"FAISS ran with {r['faiss_threads']} OpenMP thread(s) (`--faiss-threads`); with its default "
        f"{r['faiss_default_threads']} the batch-32 search took "
        f"{b32['search_ms_default_faiss_threads']:.3f} ms/query on this shared "
        "machine (OpenMP threads wait on each other when other jobs hold the cores): on a shared CPU, serve "
        "with `faiss.omp_set_num_threads(1)`.", "",
    ])


def update_results(path: Path, section: str) -> None:
    """Replace (or append) only this script's section, re-reading the file right before writing it."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def main() -> None:
    """Parse arguments, run, write the JSON and the RESULTS.md section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-size", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=128, help="queries for batch 32")
    parser.add_argument("--batch1-queries", type=int, default=32)
    parser.add_argument("--loop-queries", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--faiss-threads", type=int, default=1,
                        help="FAISS OpenMP threads for the timed searches (1: honest on shared cores)")
    parser.add_argument("--cache", default=str(REPO / "out" / "bench_demos_pool"))
    parser.add_argument("--rebuild", action="store_true", help="re-embed the pool even when the cache holds it")
    parser.add_argument("--out", default=str(REPO / "out" / "bench_demos.json"))
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    record = run(args)
    write_json_atomic(args.out, record)
    print(json.dumps(record, indent=2))
    if not args.no_results:
        update_results(Path(args.results), results_section(record))


if __name__ == "__main__":
    main()
