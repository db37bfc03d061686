"""End to end through ``Predictor.predict_proba`` (texts in, probabilities out, tokenization included), beside plain transformers.

Issue 16's targets are end-to-end numbers, so this times what a user calls, not the backend alone:

- ``fsserve graphs``: ``Predictor.from_model(model, device)``, the CUDA-graph backend (bfloat16 by
  default, every bucket captured at load);
- ``fsserve eager``: the same Predictor with ``cuda_graphs=False`` in the same dtype;
- ``transformers``: the plain way: the tokenizer on the filled-in template, ``lm(**inputs).logits``
  (B × seq × vocab), the label words' logits at the answer position, softmax.

Each (batch, tokens) cell interleaves the three, one call each per round with the order rotating,
and reports p50/p90/p99 and each one's speed-up over transformers measured in the same run. Also
recorded: fidelity (labels and max |Δ logit| of the graphs against eager fp32 on the CPU, on SST-2 dev when the
shared data is there, else on built-in sentences), the captured graphs' memory beside the weights',
and, when sentence-transformers can load the encoder, what picking similar demonstrations costs per
query on this device.

    python benchmarks/bench_predict.py --model embedded --device cuda --out out/bench_predict.json
    python benchmarks/bench_predict.py --model /tmp/tiny-lm --device cpu --runs 3 --cells 1x32   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fsserve.bench.report import machine_info, write_json_and_markdown
from fsserve.bench.timing import load_texts, summarize
from fsserve.config import GRAPH_COMPILE_MODES

TEMPLATE = "{sent_0} It was {mask}."
WORDS = {"0": "terrible", "1": "great"}


def text_of_length(model: Any, pool: list[str], tokens: int, rng: np.random.Generator) -> str:
    """A sentence built from the pool whose prompt is at most ``tokens`` tokens and as close to it as words allow."""
    words: list[str] = []
    while True:
        words.extend(pool[int(rng.integers(len(pool)))].split())
        if len(model.encode([" ".join(words)])[0].input_ids) >= tokens:
            break
    while len(words) > 1 and len(model.encode([" ".join(words)])[0].input_ids) > tokens:
        words.pop()
    return " ".join(words)


def plain_transformers(model: Any, device: str) -> Callable[[list[str]], np.ndarray]:
    """Probabilities the way a user of plain transformers computes them: full vocabulary logits, then the label words."""
    import torch

    lm, tokenizer = model.lm, model.tokenizer
    word_ids = torch.tensor(model.prompt.label_word_ids, device=device)  # one word per class (WORDS)
    causal = model.kind == "causal"
    tokenizer.padding_side = "right"

    @torch.inference_mode()
    def run(texts: list[str]) -> np.ndarray:
        filled = [f"{t} It was" if causal else f"{t} It was {tokenizer.mask_token}." for t in texts]
        inputs = tokenizer(filled, return_tensors="pt", padding=True).to(device)
        logits = lm(**inputs).logits
        rows = torch.arange(logits.shape[0], device=device)
        answer = inputs["attention_mask"].sum(-1) - 1 if causal else (inputs["input_ids"] == tokenizer.mask_token_id).int().argmax(-1)
        return torch.softmax(logits[rows, answer][:, word_ids].float(), -1).cpu().numpy()

    return run


def interleaved(calls: dict[str, Callable[[], Any]], runs: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Milliseconds per call, one call of each per round, the order rotating each round (after one warm-up round)."""
    names = list(calls)
    for name in names:
        calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            calls[name]()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def agreement(got: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Label agreement and max |Δ logit| of label logits against a reference: every fidelity check's two numbers."""
    return {"label_agreement": float((got.argmax(-1) == truth.argmax(-1)).mean()), "max_abs_diff": float(np.abs(got - truth).max())}


def fidelity(model: Any, device: str, texts: list[str]) -> dict[str, Any]:
    """Graph backend (fp32 and the default dtype) against eager fp32 on the CPU: label agreement, max |Δ logit|.

    The reference is the CPU's: on the first H200 run eager CUDA itself was off by up to 0.87 on
    three unpadded 33-token rows (RESULTS.md), so it cannot be the ground truth.
    """
    from fsserve.predictor import Predictor

    eager = Predictor.from_model(copy.deepcopy(model), device="cpu", batch_size=64).label_logits(texts)
    out: dict[str, Any] = {"n": len(texts), "reference": "eager fp32 on the CPU"}
    for dtype in ("float32", "auto"):
        graphs = Predictor.from_model(copy.deepcopy(model), device=device, dtype=dtype)
        got = graphs.label_logits(texts)
        out[dtype] = {**agreement(got, eager), "dtype": str(getattr(graphs.backend, "dtype", "float32")).removeprefix("torch.")}
    return out


def demo_selection(device: str, pool: list[str], queries: list[str], runs: int, encoder: str | None = None) -> dict[str, Any]:
    """Milliseconds to embed and pick similar demonstrations for 1 and 32 queries on this device (SBERT + FAISS)."""
    from fsserve.data import Example
    from fsserve.demos import DemoIndex

    try:
        examples = [Example(t, label=str(i % 2)) for i, t in enumerate(pool[:64])]
        index = DemoIndex(examples, labels=["0", "1"], device=device, encoder=encoder)
    except Exception as exc:  # noqa: BLE001 - the encoder may be missing on an offline GPU machine
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    import faiss

    faiss_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    out: dict[str, Any] = {"pool": len(examples), "encoder": encoder or "default", "encoder_on": index.device, "faiss_on": "gpu" if faiss_gpu and index.device != "cpu" else "cpu"}
    for size in (1, 32):
        batch = queries[:size]
        samples = interleaved({"select": lambda: index.select(batch, mode="similar")}, runs, lambda: None)["select"]
        out[f"batch_{size}"] = summarize(samples, size) | {"per_query_ms": float(np.median(samples)) / size}
    return out


def load_base(model_name: str) -> Any:
    """The benchmark's prompt model: SST-2's template and words, 256 tokens, the decoder form for a causal LM."""
    from fsserve.config import PromptConfig
    from fsserve.modeling import PromptModel
    from fsserve.prompts import decoder_template

    base = PromptModel.from_pretrained(model_name, prompt=PromptConfig(TEMPLATE, WORDS, max_length=256)).eval()
    if base.kind == "causal":
        base = PromptModel(base.lm, base.tokenizer, PromptConfig(decoder_template(TEMPLATE), WORDS, max_length=256), kind="causal").eval()
    return base


def run(model_name: str, device: str, cells: list[tuple[int, int]], runs: int, texts_source: str | None, encoder: str | None = None,
        compile_mode: str | None = None, extras: bool = True) -> dict[str, Any]:
    """Every cell interleaved, then fidelity, memory and demonstration selection; the JSON record.

    ``compile_mode``: also time the graphs with the forward compiled by ``torch.compile`` in that mode
    (captured lazily, so its compile time is the first call's, reported). ``extras=False`` skips
    fidelity and demonstration selection (a timing-only run).
    """
    import torch

    from fsserve.predictor import Predictor

    pool, source = load_texts(texts_source)
    base = load_base(model_name)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    on_cuda = device.startswith("cuda")
    graph_options = {"warmup": True} if on_cuda else {}  # on a CPU "graphs" is the eager backend: a smoke run of the script
    start = time.perf_counter()
    graphs = Predictor.from_model(copy.deepcopy(base), device=device, dtype=dtype, batch_size=64, **graph_options)
    setup = {"graphs_load_and_capture_s": time.perf_counter() - start}
    eager = Predictor.from_model(copy.deepcopy(base), device=device, dtype=dtype, cuda_graphs=False, batch_size=64)
    plain_model = copy.deepcopy(base).to(device=device, dtype=getattr(torch, dtype))
    plain = plain_transformers(plain_model, device)
    contenders: dict[str, Any] = {"fsserve graphs": graphs, "fsserve eager": eager}
    if compile_mode:
        contenders[f"fsserve graphs + compile {compile_mode}"] = Predictor.from_model(
            copy.deepcopy(base), device=device, dtype=dtype, batch_size=64, **({"compile": compile_mode} if on_cuda else {}))
    rng = np.random.default_rng(0)
    results = []
    for rows, tokens in cells:
        texts = [text_of_length(base, pool, tokens, rng) for _ in range(rows)]
        for name, predictor in contenders.items():  # the first call captures (and compiles) this cell's bucket where not yet done
            start = time.perf_counter()
            predictor.predict_proba(texts)
            setup[f"{name} first call {rows}x{tokens} s"] = time.perf_counter() - start
        calls = {name: (lambda p=predictor: p.predict_proba(texts)) for name, predictor in contenders.items()}
        samples = interleaved(calls | {"transformers": lambda: plain(texts)}, runs, sync)
        baseline = float(np.median(samples["transformers"]))
        for name, values in samples.items():
            results.append({"backend": name, "batch_size": rows, "tokens": tokens, **summarize(values, rows),
                            "speedup": baseline / float(np.median(values))})
        print(f"{rows} x {tokens}: " + ", ".join(f"{n} {np.median(v):.2f} ms" for n, v in samples.items()), flush=True)
    weights = sum(p.numel() * p.element_size() for p in graphs.backend.model.parameters())
    memory = {"weights_mb": weights / 2**20, "graphs_mb": getattr(graphs.backend, "graph_memory_bytes", 0) / 2**20,
              "graphs_captured": len(getattr(graphs.backend, "graphs", {}))}
    record = {
        "benchmark": "bench_predict", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model_name, "device": device,
        "dtype": dtype, "texts": source, "machine": machine_info(), "results": results, "memory": memory, "setup_s": setup,
    }
    if extras:
        record["fidelity"] = fidelity(base, device, pool[:872])
        record["demos"] = demo_selection(device, pool, pool[100:140], runs, encoder)
    return record


def to_markdown(record: dict[str, Any]) -> str:
    """The results as a table, with fidelity, memory and demonstration cost under it."""
    lines = [f"`benchmarks/bench_predict.py` on {record['machine'].get('gpu') or record['machine'].get('cpu')} ({record['device']}, "
             f"{record['dtype']}; model {record['model']}) — {record['date']}", "",
             "| batch × tokens | backend | p50 ms | p90 ms | p99 ms | texts/s | × transformers |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in record["results"]:
        lines.append(f"| {r['batch_size']} × {r['tokens']} | {r['backend']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['throughput_per_s']:.0f} | {r['speedup']:.2f} |")
    m = record["memory"]
    lines += ["", f"Memory: weights {m['weights_mb']:.0f} MiB, {m['graphs_captured']} captured graphs {m['graphs_mb']:.0f} MiB.",
              "Setup: " + ", ".join(f"{k} {v:.1f}" for k, v in record["setup_s"].items())]
    if "fidelity" in record:
        f = record["fidelity"]
        lines += [f"Fidelity on {f['n']} sentences against {f.get('reference', 'eager fp32')}: " + "; ".join(
            f"{v['dtype']} graphs {100 * v['label_agreement']:.2f}% labels, max |Δ logit| {v['max_abs_diff']:.2e}" for k, v in f.items() if isinstance(v, dict)),
            f"Demonstration selection: {record['demos']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the arguments, run, write JSON and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded", help="LM name or folder (default: the embedded Gemma 3 270M)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cells", default="1x32,8x32,32x128", help="batch x tokens cells, comma-separated")
    parser.add_argument("--runs", type=int, default=50, help="timed rounds per cell")
    parser.add_argument("--texts", help="CSV/JSONL of sentences (default: SST-2 dev from the shared data)")
    parser.add_argument("--encoder", help="sentence encoder for the demonstration timing (default: all-MiniLM-L6-v2)")
    parser.add_argument("--compile", dest="compile_mode", choices=GRAPH_COMPILE_MODES,
                        help="also time the graphs with the forward compiled by torch.compile in this mode")
    parser.add_argument("--timing-only", action="store_true", help="skip fidelity and demonstration selection")
    parser.add_argument("--out", default="out/bench_predict.json")
    args = parser.parse_args()
    cells = [tuple(int(x) for x in cell.split("x")) for cell in args.cells.split(",") if cell.strip()]
    record = run(args.model, args.device, cells, args.runs, args.texts, args.encoder, args.compile_mode,  # type: ignore[arg-type]
                 extras=not args.timing_only)
    print(write_json_and_markdown(args.out, record, to_markdown(record)))


if __name__ == "__main__":
    main()
