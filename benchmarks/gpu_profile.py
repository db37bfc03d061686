"""Where a GPU call's time goes, which side of a fidelity gap is right, and what ``torch.compile`` adds inside the graphs.

Three parts, each skipped when the run's own deadline (``--deadline-s``) would be passed:

- **fidelity breakdown**: the same sentences through the CPU in fp32 (the torch reference head:
  the ground truth), CUDA eager fp32 (the fused Triton head, and the torch head), CUDA eager on
  inputs padded to the graph buckets, and the CUDA graphs in fp32 (lazily captured, and all captured
  up front); each one's max |Δ logit| and label agreement against the CPU, and its worst rows with
  their token counts. A gap that only the graphs show is the graphs' bug; one that eager CUDA shows too is not.
- **where the time goes** for ``Predictor.predict_proba`` on the graph backend (bf16), per cell:
  tokenizing, padding, copying in, the graph replay alone (CUDA events), the whole backend call and
  the whole ``predict_proba``; plus the torch profiler's top host operations for one call.
- **torch.compile** (``--compile``): the forward compiled in that mode and captured in a graph for the
  1 × 32 bucket: its compile-and-capture seconds and its replay beside the plain graph's.

    python benchmarks/gpu_profile.py --model /tmp/gemma-270m-random --device cuda --out out/gpu_profile.json
    python benchmarks/gpu_profile.py --model /tmp/tiny-lm --device cpu --texts 64   # a smoke run of the CPU-runnable parts
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench_predict import agreement, interleaved, load_base, text_of_length
from fsserve.bench.report import machine_info, write_json_and_markdown
from fsserve.bench.timing import load_texts
from fsserve.config import GRAPH_COMPILE_MODES


class PaddedEager:
    """The eager backend fed exactly what the graphs get: each chunk padded to its bucket, the real rows read back."""

    def __init__(self, eager: Any, plan: Any, pad_token_id: int) -> None:
        self.eager, self.plan, self.pad_token_id = eager, plan, pad_token_id
        self.input_names = eager.input_names

    def label_logits(self, **batch: np.ndarray) -> np.ndarray:
        """Pad to the bucket, run eagerly, cut the padding rows off."""
        from fsserve.runtime.buckets import pad_to_shape

        rows, width = batch["input_ids"].shape
        padded = pad_to_shape({k: v for k, v in batch.items() if v is not None}, *self.plan.shape(rows, width), self.pad_token_id)
        return self.eager.label_logits(**padded)[:rows]


def compare(name: str, got: np.ndarray, truth: np.ndarray, lengths: list[int]) -> dict[str, Any]:
    """Max |Δ logit| and label agreement against the truth, and the three worst rows with their token counts."""
    diff = np.abs(got - truth).max(axis=1)
    worst = np.argsort(-diff)[:3]
    return {"variant": name, **agreement(got, truth),
            "rows_over_1e-3": int((diff > 1e-3).sum()), "worst": [{"row": int(i), "tokens": lengths[i], "diff": float(diff[i])} for i in worst]}


def fidelity_breakdown(base: Any, device: str, texts: list[str]) -> dict[str, Any]:
    """Every variant against the CPU fp32 reference on the same sentences."""
    import torch

    from fsserve.predictor import Predictor

    lengths = [len(e.input_ids) for e in base.encode(texts)]
    truth = Predictor.from_model(copy.deepcopy(base), device="cpu", batch_size=64).label_logits(texts)
    out: dict[str, Any] = {"n": len(texts), "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                           "float32_matmul_precision": torch.get_float32_matmul_precision(), "variants": []}

    def variant(name: str, make: Callable[[Any], Any], torch_head: bool = False) -> None:
        model = copy.deepcopy(base)
        model.use_fused_head = not torch_head
        start = time.perf_counter()
        try:
            got = make(model).label_logits(texts)
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others' numbers
            out["variants"].append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            return
        out["variants"].append(compare(name, got, truth, lengths) | {"seconds": time.perf_counter() - start})

    variant("cuda eager fp32, Triton head", lambda m: Predictor.from_model(m, device=device, cuda_graphs=False, dtype="float32"))
    variant("cuda eager fp32, torch head", lambda m: Predictor.from_model(m, device=device, cuda_graphs=False, dtype="float32"), torch_head=True)

    def padded(m: Any) -> Any:
        from fsserve.runtime.buckets import BucketPlan

        predictor = Predictor.from_model(m, device=device, cuda_graphs=False, dtype="float32")
        predictor.backend = PaddedEager(predictor.backend, BucketPlan().covering(int(m.prompt_config.max_length)), int(m.pad_token_id))
        return predictor

    variant("cuda eager fp32 on bucket-padded inputs", padded)
    if device.startswith("cuda"):
        variant("cuda graphs fp32 (lazy), Triton head", lambda m: Predictor.from_model(m, device=device, dtype="float32"))
        variant("cuda graphs fp32 (lazy), torch head", lambda m: Predictor.from_model(m, device=device, dtype="float32"), torch_head=True)
        variant("cuda graphs fp32 (all captured first)", lambda m: Predictor.from_model(m, device=device, dtype="float32", warmup=True))
        variant("cuda graphs bf16 (lazy)", lambda m: Predictor.from_model(m, device=device, dtype="bfloat16"))
    return out


def median_ms(call: Callable[[], Any], runs: int, sync: Callable[[], None]) -> float:
    """Median wall milliseconds of ``call`` (synchronised before and after), after one untimed call."""
    return float(np.median(interleaved({"call": call}, runs, sync)["call"]))


def where_time_goes(base: Any, device: str, pool: list[str], cells: list[tuple[int, int]], runs: int) -> dict[str, Any]:
    """Per cell: the stages of one predict_proba call on the graph backend, timed apart."""
    import torch

    from fsserve.predictor import Predictor, pad_batch
    from fsserve.runtime.buckets import pad_to_shape

    on_cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    predictor = Predictor.from_model(copy.deepcopy(base), device=device, dtype="bfloat16" if on_cuda else "float32", batch_size=64)
    backend = predictor.backend
    rng = np.random.default_rng(0)
    cells_out = []
    for rows, tokens in cells:
        texts = [text_of_length(base, pool, tokens, rng) for _ in range(rows)]
        predictor.predict_proba(texts)  # captures this cell's bucket
        encoded = predictor.encode(texts)
        batch = pad_batch(encoded, predictor.pad_token_id, predictor.with_token_types)
        stages = {"predict_proba": median_ms(lambda: predictor.predict_proba(texts), runs, sync),
                  "tokenize (encode)": median_ms(lambda: predictor.encode(texts), runs, sync),
                  "pad_batch": median_ms(lambda: pad_batch(encoded, predictor.pad_token_id, predictor.with_token_types), runs, sync),
                  "backend.label_logits": median_ms(lambda: backend.label_logits(**batch), runs, sync)}
        if on_cuda:
            shape = backend.plan.shape(rows, batch["input_ids"].shape[1])
            padded = pad_to_shape(batch, *shape, backend.pad_token_id)
            captured = backend.graphs[shape]
            stages["pad_to_shape"] = median_ms(lambda: pad_to_shape(batch, *shape, backend.pad_token_id), runs, sync)
            stages["copy in (H2D)"] = median_ms(torch.inference_mode()(lambda: [b.copy_(torch.from_numpy(padded[k])) for k, b in captured.inputs.items()]), runs, sync)
            stages["read out (D2H)"] = median_ms(lambda: captured.output.float().cpu().numpy(), runs, sync)
            stages["graph replay (wall)"] = median_ms(captured.graph.replay, runs, sync)
            stages["graph replay (CUDA events)"] = replay_gpu_ms(captured.graph, runs)
            stages["bucket"] = f"{shape[0]} x {shape[1]}"
        cells_out.append({"batch_size": rows, "tokens": tokens, "ms": stages})
    return {"cells": cells_out, "host_ops": host_profile(predictor, [text_of_length(base, pool, cells[0][1], rng) for _ in range(cells[0][0])])}


def replay_gpu_ms(graph: Any, runs: int) -> float:
    """GPU milliseconds of one replay: CUDA events around ``runs`` back-to-back replays, divided."""
    import torch

    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / runs


def host_profile(predictor: Any, texts: list[str]) -> str:
    """The torch profiler's table (top 15 by self CPU time) for five predict_proba calls."""
    import torch

    predictor.predict_proba(texts)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            predictor.predict_proba(texts)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def compiled_graph(base: Any, device: str, mode: str, runs: int) -> dict[str, Any]:
    """Compile and capture the 1 × 32 bucket with ``torch.compile(mode)``; its replay against the plain graph's."""
    from fsserve.runtime.graphs import GraphBackend

    plain = GraphBackend(copy.deepcopy(base), device=device, dtype="bfloat16", batch_buckets=(1,), seq_buckets=(32,))
    plain.warmup([(1, 32)])
    start = time.perf_counter()
    compiled = GraphBackend(copy.deepcopy(base), device=device, dtype="bfloat16", batch_buckets=(1,), seq_buckets=(32,), compile=mode)
    compiled.warmup([(1, 32)])
    seconds = time.perf_counter() - start
    return {"mode": mode, "compile_and_capture_s": seconds, "plain_replay_ms": replay_gpu_ms(plain.graphs[(1, 32)].graph, runs),
            "compiled_replay_ms": replay_gpu_ms(compiled.graphs[(1, 32)].graph, runs)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The three parts in order, each only while the deadline allows."""
    began = time.perf_counter()
    pool, source = load_texts(args.texts_file)
    base = load_base(args.model)
    cells = [tuple(int(x) for x in c.split("x")) for c in args.cells.split(",") if c.strip()]
    record: dict[str, Any] = {"benchmark": "gpu_profile", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
                              "device": args.device, "texts": source, "machine": machine_info(), "skipped": []}

    def left() -> float:
        return args.deadline_s - (time.perf_counter() - began)

    record["time"] = where_time_goes(base, args.device, pool, cells, args.runs)  # type: ignore[arg-type]
    print(to_markdown(record), flush=True)
    if left() > 60:
        record["fidelity"] = fidelity_breakdown(base, args.device, pool[: args.texts])
        print(to_markdown(record), flush=True)
    else:
        record["skipped"].append("fidelity")
    if args.compile and args.device.startswith("cuda"):
        if left() > 60:
            try:
                record["compile"] = compiled_graph(base, args.device, args.compile, args.runs)
            except Exception as exc:  # noqa: BLE001 - report why compiling failed, keep the rest
                record["compile_error"] = f"{type(exc).__name__}: {exc}"[:500]
        else:
            record["skipped"].append("compile")
    return record


def to_markdown(record: dict[str, Any]) -> str:
    """Stage times per cell, the fidelity table, the compile line and the host-op profile."""
    lines = [f"`benchmarks/gpu_profile.py` on {record['machine'].get('gpu') or record['machine'].get('cpu')} ({record['device']}; "
             f"model {record['model']}) — {record['date']}", ""]
    for cell in record["time"]["cells"]:
        lines.append(f"- {cell['batch_size']} × {cell['tokens']}: " + ", ".join(
            f"{k} {v:.3f} ms" if isinstance(v, float) else f"{k} {v}" for k, v in cell["ms"].items()))
    if "fidelity" in record:
        f = record["fidelity"]
        lines += ["", f"Fidelity on {f['n']} sentences against the CPU fp32 reference (tf32 matmul {f['tf32_matmul']}, "
                      f"float32 matmul precision {f['float32_matmul_precision']}):", "",
                  "| variant | max abs Δ logit | labels agree | rows > 1e-3 | worst rows (row: tokens, Δ) |", "|---|---:|---:|---:|---|"]
        for v in f["variants"]:
            if "error" in v:
                lines.append(f"| {v['variant']} | failed: {v['error']} | | | |")
                continue
            worst = "; ".join(f"{w['row']}: {w['tokens']}, {w['diff']:.2e}" for w in v["worst"])
            lines.append(f"| {v['variant']} | {v['max_abs_diff']:.2e} | {100 * v['label_agreement']:.2f}% | {v['rows_over_1e-3']} | {worst} |")
    if "compile" in record:
        c = record["compile"]
        lines += ["", f"torch.compile {c['mode']} inside the 1 × 32 graph: {c['compile_and_capture_s']:.0f} s to compile and capture; "
                      f"replay {c['compiled_replay_ms']:.3f} ms against {c['plain_replay_ms']:.3f} ms plain."]
    if "compile_error" in record:
        lines += ["", f"torch.compile failed: {record['compile_error']}"]
    if record.get("skipped"):
        lines.append(f"Skipped for time: {', '.join(record['skipped'])}.")
    lines += ["", "Host operations of five 1st-cell predict_proba calls (torch profiler):", "", "```", record["time"]["host_ops"], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the arguments, run, write JSON and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="LM name or folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cells", default="1x32,32x128", help="batch x tokens cells for the time breakdown")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--texts", type=int, default=872, help="sentences for the fidelity breakdown")
    parser.add_argument("--texts-file", help="CSV/JSONL of sentences (default: SST-2 dev from the shared data)")
    parser.add_argument("--compile", choices=GRAPH_COMPILE_MODES, help="also compile the 1 x 32 graph in this mode")
    parser.add_argument("--deadline-s", type=float, default=240.0, help="skip a part that would start with less than a minute left")
    parser.add_argument("--out", default="out/gpu_profile.json")
    args = parser.parse_args()
    record = run(args)
    print(write_json_and_markdown(args.out, record, to_markdown(record)))


if __name__ == "__main__":
    main()
