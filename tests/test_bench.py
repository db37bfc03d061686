"""fsserve bench on a tiny model: one minimal grid, then the JSON schema, the numbers, the table and the PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fsserve.bench.report import to_markdown, write_outputs
from fsserve.bench.run import BenchConfig, run_bench
from fsserve.config import PromptConfig
from fsserve.modeling import PromptModel

PROMPT = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=48)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {"backend", "device", "variant", "seq_len", "batch_size", "runs", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms",
            "throughput_per_s", "load_mb", "peak_mb", "speedup"}
POSITIVE = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "throughput_per_s", "load_mb", "peak_mb", "speedup")


def _numbers(value: Any, where: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON value, with its path, for the finiteness check."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(where, float(value))]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{where}[{i}]")]
    return []


@pytest.fixture(scope="module")
def bench_run(tiny_lm: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Path]]:
    """Save a tiny Gemma prompt model, bench it on a 2 × 2 grid with demonstrations and int8 agreement."""
    lm, tokenizer = tiny_lm("gemma")
    saved = tmp_path_factory.mktemp("bench-model") / "model"
    from fsserve.data import Example
    from fsserve.demos import DemoIndex

    model = PromptModel(lm, tokenizer, PROMPT)
    # The model carries its own pool, so --demos needs no data folder.
    pool = [Example("A gem of a film.", label=PROMPT.labels[1]), Example("A tedious mess.", label=PROMPT.labels[0])]
    model.attach_demos(DemoIndex(pool, labels=PROMPT.labels))
    model.save_pretrained(saved)
    texts = tmp_path_factory.mktemp("bench-texts") / "texts.jsonl"
    rows = [{"text": f"Sentence number {i} is {'good' if i % 2 else 'bad'}, and it goes on for a while.", "label": str(i % 2)} for i in range(12)]
    texts.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path_factory.mktemp("bench-out")
    cfg = BenchConfig(batch_sizes=(1, 2), seq_lens=(8, 16), min_runs=2, max_runs=2, cell_seconds=0, threads=1, demos=True,
                      demo_max_length=64, texts=str(texts), agreement=str(texts), progress=False)
    record = run_bench(saved, cfg, out_dir=out)
    return record, write_outputs(record, out)


def test_schema_and_every_cell(bench_run: tuple[dict[str, Any], dict[str, Path]]) -> None:
    record, _ = bench_run
    for key in ("benchmark", "schema_version", "machine", "config", "model", "results", "skipped", "demos", "agreement", "seconds"):
        assert key in record, key
    machine = record["machine"]
    assert machine["cpu"] and machine["logical_cores"] >= 1 and "torch" in machine["versions"] and "onnxruntime" in machine["versions"]
    ran = {r["backend"] for r in record["results"]}
    assert ran == {"transformers", "torch", "onnx-fp32", "onnx-int8"}
    skipped = {s["backend"] for s in record["skipped"]}
    assert ran | skipped == {"transformers", "torch", "torch-triton", "torch-graphs", "torch-graphs-compile", "onnx-fp32", "onnx-int8",
                             "onnx-cuda", "onnx-tensorrt"}
    assert all(s["reason"] for s in record["skipped"])
    cells = {(r["seq_len"], r["batch_size"], r["backend"]) for r in record["results"]}
    assert cells == {(s, b, n) for s in (8, 16) for b in (1, 2) for n in ran}
    for row in record["results"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["runs"] == 2
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        for key in POSITIVE:
            assert row[key] > 0 and math.isfinite(row[key]), (row["backend"], key, row[key])
        # Same model, same inputs: the label each backend picks is the baseline's (int8 may flip a near tie).
        if row["backend"] in ("torch", "onnx-fp32"):
            assert row["argmax_agreement_vs_baseline"] == 1.0 and row["max_abs_diff_vs_baseline"] < 1e-3
    baseline = [r for r in record["results"] if r["backend"] == "transformers"]
    assert all(r["speedup"] == 1.0 for r in baseline)


def test_every_number_is_finite_and_positive_where_it_is_a_measure(bench_run: tuple[dict[str, Any], dict[str, Path]]) -> None:
    record, _ = bench_run
    for where, value in _numbers(record):
        assert math.isfinite(value), where
        assert value >= 0 or where.endswith("load_avg_before") or "load_avg" in where, where
    demos = record["demos"]
    assert {s["backend"] for s in demos["summary"]} == {"transformers", "torch", "onnx-fp32", "onnx-int8"}
    for s in demos["summary"]:
        assert s["seq_demos"] > s["seq_plain"]
        for key in ("plain_p50_ms", "demos_p50_ms", "sequence_cost", "selection_p50_ms", "total_p50_ms"):
            assert s[key] > 0 and math.isfinite(s[key]), key
    agreement = record["agreement"]
    assert agreement["examples"] == 12 and 0 <= agreement["int8_vs_fp32"] <= 1 and set(agreement["accuracy"]) == {"fp32", "int8"}


def test_outputs_json_markdown_png(bench_run: tuple[dict[str, Any], dict[str, Path]]) -> None:
    record, paths = bench_run
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["results"] == json.loads(json.dumps(record["results"]))
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC
    table = paths["markdown"].read_text(encoding="utf-8")
    assert table == to_markdown(record)
    for backend in ("transformers", "torch", "onnx-fp32", "onnx-int8"):
        assert f"| {backend} |" in table
    assert "× vs transformers" in table and "torch-triton: needs" in table


def test_bad_config_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        BenchConfig(backends=("tensorflow",))
    with pytest.raises(ValueError, match="batch_sizes"):
        BenchConfig(batch_sizes=(0,))
    with pytest.raises(ValueError, match="seq_lens"):
        BenchConfig(seq_lens=(4,))


def test_cli_parser_reads_the_grid() -> None:
    import argparse

    from fsserve.cli.bench import add_bench_parser

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "bundles/sst2", "--batch-sizes", "1,32", "--seq-lens", "64", "--backends", "torch,onnx-int8"])
    assert args.batch_sizes == (1, 32) and args.seq_lens == (64,) and args.backends == ("torch", "onnx-int8")
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "x", "--batch-sizes", "1,a"])
