"""The served path scores what the study measured: a cached cell, retrained, exported, served over gRPC (issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fsserve.experiment.protocol import ExperimentConfig, run_experiment
from fsserve.experiment.served import config_for_cell, served_check
from test_experiment import _write_kshot


@pytest.fixture(scope="module")
def demo_cell(tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir) -> tuple[Path, Path]:
    """One cached prompt-demo-similar cell of a tiny Gemma on a tiny SST-2 split (sampled draws at evaluation)."""
    root = tmp_path_factory.mktemp("served")
    kshot = _write_kshot(root / "kshot", k=4, seeds=(13,))
    config = ExperimentConfig(tasks=["SST-2"], methods=["prompt-demo-similar"], seeds=[13], data_dir=str(kshot),
                              out_dir=str(root / "study"), model=str(tiny_lm_dir("gemma")), k=4, max_steps=3, eval_steps=3,
                              learning_rates=[1e-3], batch_sizes=[2], max_test=6, num_sample=2, demo_max_length=128,
                              eval_batch_size=8, demo_order="similar-last", demo_separator="\n")
    (cell,) = run_experiment(config)["cells"]
    files = list((root / "study" / "cells").rglob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["test"] == cell["test"]
    return files[0], kshot


def test_the_served_bundle_scores_the_cell_row_for_row(demo_cell: tuple[Path, Path], tmp_path: Path) -> None:
    cell_file, kshot = demo_cell
    report = served_check(cell_file, kshot, tmp_path, batch=4)
    scores = report["test"]
    assert report["n_test"] == 6 and report["method"] == "prompt-demo-similar"
    # Retraining gives the cell's model back; the bundle and the server give its answers back, row by row.
    assert scores["retrained_torch"] == scores["cell"] and report["dev"]["retrained_torch"] == report["dev"]["cell"]
    for pair in ("bundle_vs_torch", "served_vs_torch", "served_vs_bundle"):
        assert report["labels_agree"][pair]["same"] == 6, (pair, report)
    assert scores["bundle_predictor"] == scores["served_grpc"] == scores["cell"]
    # The bundle carries the cell's demonstration format (a wrong one would have changed answers above too).
    assert any("similar-last" in f.read_text() for f in (tmp_path / "bundle").glob("*.json"))


def test_a_cell_that_cannot_be_rebuilt_exactly_is_refused(demo_cell: tuple[Path, Path], tmp_path: Path) -> None:
    cell_file, kshot = demo_cell
    settings = json.loads(cell_file.read_text())["settings"]
    config, cell = config_for_cell(settings, kshot, tmp_path)
    assert (cell.method, cell.seed, config.num_sample, config.demo_order) == ("prompt-demo-similar", 13, 2, "similar-last")
    stale = {k: v for k, v in settings.items() if k != "draws"}  # cached before evaluation draws were per query
    with pytest.raises(ValueError, match="differ in draws"):
        config_for_cell(stale, kshot, tmp_path)
    with pytest.raises(ValueError, match="in-context has no bundle"):
        config_for_cell({**settings, "method": "in-context"}, kshot, tmp_path)
