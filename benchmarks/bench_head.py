"""Time the label-logit head four ways, to show what the fused op saves over the Hugging Face way.

(a) hf_full:     vocabulary logits at every position (what ``model(...).logits`` does), then gather
(b) answer_only: vocabulary logits at the answer position only, then gather
(c) reference:   ``label_logits_reference`` (torch, label rows only)
(d) triton:      ``label_logits(backend="triton")``, on CUDA only; both ``fuse_dense`` variants
                 for the MLM (RoBERTa) head

Shapes: Gemma-3 270M (hidden 640, vocab 262,144, decoder: no head transform) and RoBERTa-large
(hidden 1024, vocab 50,265, MLM head: dense -> GELU -> LayerNorm), batch 1/32/256, sequence 128,
3 classes x 2 label words. Cases whose vocabulary-sized logits would not fit in memory (or, on CPU,
would take too long) are skipped and listed as such.

    python benchmarks/bench_head.py --device cuda --out out/bench_head_cuda.json
    python benchmarks/bench_head.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fsserve.kernels.label_logits import HeadTransform, label_logits, label_logits_reference
from fsserve.utils.device import resolve_device, triton_available

SEQ_LEN = 128
NUM_CLASSES = 3
WORDS_PER_CLASS = 2


@dataclass(frozen=True)
class Shape:
    """A model's head: hidden size, vocabulary size, and whether it has the MLM transform."""

    name: str
    hidden: int
    vocab: int
    mlm: bool


SHAPES = (Shape("gemma-3-270m", 640, 262_144, False), Shape("roberta-large", 1024, 50_265, True))


def cpu_model() -> str:
    """Name the CPU from /proc/cpuinfo, for the results table."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_bytes(device: str) -> int:
    """Memory the benchmark may use for vocabulary-sized logits."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def time_ms(fn: Callable[[], object], device: str, min_time_s: float, max_reps: int) -> float:
    """Median milliseconds of ``fn`` after one warm-up; CUDA events on GPU, wall clock on CPU."""
    cuda = device.startswith("cuda")
    fn()  # warm-up: compiles the kernel, allocates, fills caches
    if cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    spent = time.perf_counter()
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() - spent < min_time_s):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if not cuda and times[-1] > 1e3 * min_time_s:  # one slow CPU run says enough
            break
    return statistics.median(times)


def build_weights(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """A random output embedding (and MLM transform), and the label words picked from it."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, v = shape.hidden, shape.vocab

    def randn(*size: int, s: float = 1.0) -> torch.Tensor:
        """Draw on the device directly (vocab x hidden is large)."""
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * s).to(dtype)

    weights = dict(
        embedding=randn(v, h, s=h**-0.5),
        vocab_bias=randn(v, s=0.1) if shape.mlm else None,  # RoBERTa's decoder has a bias; Gemma's has none
        label_ids=torch.randperm(v, generator=gen, device=device)[: NUM_CLASSES * WORDS_PER_CLASS],
        word_to_class=torch.arange(NUM_CLASSES, device=device).repeat_interleave(WORDS_PER_CLASS),
        transform=None,
    )
    if shape.mlm:
        weights["transform"] = HeadTransform(randn(h, h, s=h**-0.5), randn(h, s=0.1),
                                             (1 + randn(h, s=0.1).float()).to(dtype), randn(h, s=0.1))
    return weights


def build_batch(shape: Shape, batch: int, dtype: torch.dtype, device: str, seed: int = 1) -> dict:
    """Random final hidden states and answer positions for one batch."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(batch, SEQ_LEN, shape.hidden, generator=gen, device=device).to(dtype)
    return dict(hidden=hidden, answer_pos=torch.randint(0, SEQ_LEN, (batch,), generator=gen, device=device))


def apply_transform(x: torch.Tensor, t: HeadTransform | None) -> torch.Tensor:
    """The MLM head transform in the input dtype, as the HF module runs it."""
    if t is None:
        return x
    x = F.gelu(F.linear(x, t.dense_weight, t.dense_bias))
    return F.layer_norm(x, (x.shape[-1],), t.ln_weight, t.ln_bias, t.eps)


def hf_full(inp: dict) -> torch.Tensor:
    """(a) Vocabulary logits at every position, then gather: the ``model(...).logits`` way."""
    logits = F.linear(apply_transform(inp["hidden"], inp["transform"]), inp["embedding"], inp["vocab_bias"])
    rows = torch.arange(logits.shape[0], device=logits.device)
    picked = logits[rows, inp["answer_pos"]][:, inp["label_ids"]].float()
    return picked.view(-1, NUM_CLASSES, WORDS_PER_CLASS).mean(-1)


def answer_only(inp: dict) -> torch.Tensor:
    """(b) Vocabulary logits at the answer position only, then gather."""
    rows = torch.arange(inp["hidden"].shape[0], device=inp["hidden"].device)
    x = apply_transform(inp["hidden"][rows, inp["answer_pos"]], inp["transform"])
    picked = F.linear(x, inp["embedding"], inp["vocab_bias"])[:, inp["label_ids"]].float()
    return picked.view(-1, NUM_CLASSES, WORDS_PER_CLASS).mean(-1)


def op_args(inp: dict) -> tuple:
    """Positional arguments of label_logits / label_logits_reference for these inputs."""
    bias = None if inp["vocab_bias"] is None else inp["vocab_bias"][inp["label_ids"]]
    return (inp["hidden"], inp["answer_pos"], inp["embedding"][inp["label_ids"]].contiguous(), bias,
            inp["transform"], inp["word_to_class"])


def required_bytes(shape: Shape, batch: int, dtype: torch.dtype) -> int:
    """Bytes the fused op cannot avoid moving: gathered rows, label rows, transform weights, positions, output."""
    e = torch.finfo(dtype).bits // 8
    h, w = shape.hidden, NUM_CLASSES * WORDS_PER_CLASS
    total = batch * h * e + batch * 8 + w * h * e + batch * NUM_CLASSES * 4
    if shape.mlm:
        total += (h * h + 3 * h) * e + w * e
    return total


def vocab_flops(shape: Shape, rows: int) -> float:
    """Matmul FLOPs of a vocabulary head (plus transform) over ``rows`` hidden vectors."""
    flops = 2.0 * rows * shape.hidden * shape.vocab
    if shape.mlm:
        flops += 2.0 * rows * shape.hidden * shape.hidden
    return flops


def run(args: argparse.Namespace) -> dict:
    """Run every shape x batch x method, skipping what does not fit, and return the results record."""
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if cuda else "float32")]
    batches = (1, 32) if args.quick else (1, 32, 256)
    min_time = 0.2 if args.quick else 0.5
    max_reps = 20 if args.quick else 100
    max_flops = (args.cpu_max_gflop * 1e9) if not cuda else float("inf")
    max_gb = args.max_gb if args.max_gb is not None else (64.0 if cuda else 4.0)
    kernel = cuda and triton_available()
    e = torch.finfo(dtype).bits // 8
    rows_out: list[dict] = []
    skipped: list[str] = []
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if not kernel:
        skipped.append("(d) triton: no CUDA device with Triton here")

    with torch.inference_mode():
        for shape in SHAPES:
            weights = build_weights(shape, dtype, device)
            for batch in batches:
                inp = {**weights, **build_batch(shape, batch, dtype, device)}
                budget = min(available_bytes(device) * 0.5, max_gb * 2**30)
                methods: list[tuple[str, Callable[[], object], dict]] = []
                full_bytes = batch * SEQ_LEN * shape.vocab * e
                if full_bytes > budget:
                    skipped.append(f"(a) hf_full {shape.name} b{batch}: {full_bytes / 2**30:.1f} GiB of logits "
                                   f"> {budget / 2**30:.1f} GiB allowed")
                elif vocab_flops(shape, batch * SEQ_LEN) > max_flops:
                    skipped.append(f"(a) hf_full {shape.name} b{batch}: {vocab_flops(shape, batch * SEQ_LEN) / 1e9:.0f}"
                                   f" GFLOP > --cpu-max-gflop {args.cpu_max_gflop:g}")
                else:
                    methods.append(("a_hf_full", lambda: hf_full(inp), {"flops": vocab_flops(shape, batch * SEQ_LEN)}))
                if vocab_flops(shape, batch) > max_flops:
                    skipped.append(f"(b) answer_only {shape.name} b{batch}: {vocab_flops(shape, batch) / 1e9:.0f} GFLOP"
                                   f" > --cpu-max-gflop {args.cpu_max_gflop:g}")
                else:
                    methods.append(("b_answer_only", lambda: answer_only(inp), {"flops": vocab_flops(shape, batch)}))
                args_ = op_args(inp)
                nbytes = required_bytes(shape, batch, dtype)
                methods.append(("c_reference", lambda: label_logits_reference(*args_, validate=False),
                                {"bytes": nbytes}))
                if kernel:
                    variants = (False, True) if shape.mlm else (False,)
                    for fuse in variants:
                        name = "d_triton_fuse_dense" if fuse else "d_triton"
                        methods.append((name, lambda fuse=fuse: label_logits(*args_, backend="triton",
                                                                             fuse_dense=fuse, validate=False),
                                        {"bytes": nbytes}))
                base = base_b = None
                for name, fn, work in methods:
                    ms = time_ms(fn, device, min_time, max_reps)
                    base = ms if name == "a_hf_full" else base
                    base_b = ms if name == "b_answer_only" else base_b
                    row = {"shape": shape.name, "batch": batch, "method": name, "ms": ms}
                    if "flops" in work:
                        row["tflops"] = work["flops"] / ms / 1e9
                    if "bytes" in work:
                        row["bytes"] = work["bytes"]
                        row["gbps"] = work["bytes"] / ms / 1e6
                    rows_out.append(row)
                    print(f"{shape.name:14s} b{batch:<4d} {name:20s} {ms:10.3f} ms", flush=True)
                for row in rows_out:
                    if row["shape"] == shape.name and row["batch"] == batch:
                        row["vs_hf_full"] = (row["ms"] / base) if base else None
                        row["vs_answer_only"] = (row["ms"] / base_b) if base_b else None
                del inp, methods, args_
                if cuda:
                    torch.cuda.empty_cache()

    return {
        "benchmark": "bench_head",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else f"CPU: {cpu_model()} ({torch.get_num_threads()} threads)",
        "dtype": str(dtype).removeprefix("torch."),
        "seq_len": SEQ_LEN,
        "labels": f"{NUM_CLASSES} classes x {WORDS_PER_CLASS} words",
        "torch": torch.__version__,
        "quick": bool(args.quick),
        # CPU timings on a shared machine move with the load; recorded so the numbers can be judged.
        "load_avg_1min": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "results": rows_out,
        "skipped": skipped,
    }


def to_markdown(record: dict) -> str:
    """Render the results record as the table RESULTS.md carries."""
    lines = [
        f"Device: {record['device']}; dtype {record['dtype']}; seq {record['seq_len']}; {record['labels']}; "
        f"torch {record['torch']}; {record['date']}{' (--quick)' if record['quick'] else ''}; "
        f"1-min load average before/after: {record['load_avg_1min']}",
        "",
        "| shape | batch | method | ms | vs (a) | vs (b) | achieved |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in record["results"]:
        ratio = f"{r['vs_hf_full']:.4f}" if r.get("vs_hf_full") else "n/a (a skipped)"
        ratio_b = f"{r['vs_answer_only']:.4f}" if r.get("vs_answer_only") else "n/a"
        if "gbps" in r:
            achieved = f"{r['gbps']:.2f} GB/s of {r['bytes'] / 1e6:.2f} MB"
        else:
            achieved = f"{r['tflops']:.3f} TFLOP/s"
        lines.append(f"| {r['shape']} | {r['batch']} | {r['method']} | {r['ms']:.4f} | {ratio} | {ratio_b} | {achieved} |")
    if record["skipped"]:
        lines += ["", "Skipped:"] + [f"- {s}" for s in record["skipped"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse arguments, run, write JSON and markdown, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--out", default=None, help="JSON path (markdown goes next to it); default out/bench_head_<device>.json")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 32, fewer repeats")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max-gb", type=float, default=None,
                        help="cap on vocabulary-sized logits in GiB (default 4 on CPU, 64 on CUDA; also <= half of free memory)")
    parser.add_argument("--cpu-max-gflop", type=float, default=500.0, help="on CPU, skip cases above this many GFLOP")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch; on a shared, loaded machine 1 avoids OpenMP threads waiting on each other")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    record = run(args)
    out = Path(args.out or f"out/bench_head_{resolve_device(args.device).replace(':', '')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    markdown = to_markdown(record)
    out.with_suffix(".md").write_text(markdown)
    print()
    print(markdown)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
