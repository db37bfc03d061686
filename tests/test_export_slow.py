"""The embedded Gemma 3 270M, fine-tuned on SST-2 16-shot (seed 42), exported: ONNX equals torch on all 872 dev sentences.

Slow (trains 60 steps and runs the dev set several times): ``pytest -m slow tests/test_export_slow.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)
# Two int8 recipes (see fsserve.exporters.onnx.default_int8_mode and benchmarks/RESULTS.md): the
# default, dynamic QInt8 (the fast one: measured 0.932-0.946 agreement on Gemma fine-tunes), guarded by
# a floor; and the faithful one, int8 weights in the down projections only (measured 0.993), held
# to the 0.99 goal.
INT8_GOAL = 0.99
INT8_FLOOR = 0.92


def _data() -> Path:
    """The shared data root (FSSERVE_DATA_DIR or ../shared/data), skipping where it is absent."""
    from fsserve.data import default_data_dir

    path = default_data_dir()
    if not (path / "original" / "SST-2" / "dev.tsv").is_file():
        pytest.skip(f"SST-2 data not found under {path} (set FSSERVE_DATA_DIR)")
    return path


@pytest.fixture(scope="module")
def trained_gemma() -> Any:
    """The embedded model with SST-2's manual prompt (the decoder drops the text after the mask), trained briefly."""
    from fsserve.config import PromptConfig, TrainingArguments
    from fsserve.data import get_task, load_kshot
    from fsserve.modeling import PromptModel
    from fsserve.training import Trainer

    spec = get_task("SST-2")
    prompt = PromptConfig(spec.template, dict(spec.label_words), labels=list(spec.labels))
    model = PromptModel.from_pretrained("embedded", prompt=prompt)
    train = load_kshot(spec, _data() / "k-shot", k=16, seed=42, split="train")
    dev = load_kshot(spec, _data() / "k-shot", k=16, seed=42, split="dev")
    args = TrainingArguments(max_steps=60, learning_rate=1e-5, batch_size=8, freeze_embeddings=True, eval_steps=30, progress=False)
    Trainer(model, args, train, dev).train()
    return model.eval()


@pytest.fixture(scope="module")
def sst2_dev() -> list[str]:
    """The 872 sentences of the original SST-2 dev set."""
    from fsserve.data import get_task, load_split

    return [e.text for e in load_split(get_task("SST-2"), _data() / "original" / "SST-2" / "dev.tsv")]


def test_onnx_fp32_and_int8_match_torch_on_sst2_dev(trained_gemma: Any, sst2_dev: list[str], tmp_path: Path) -> None:
    from fsserve.predictor import Predictor

    assert len(sst2_dev) == 872
    expected = trained_gemma.predict_logits(sst2_dev).numpy()

    fp32 = trained_gemma.export(tmp_path / "fp32", torch_weights=False)
    got = Predictor.from_pretrained(fp32, backend="onnx").label_logits(sst2_dev)
    assert (got.argmax(-1) == expected.argmax(-1)).all(), f"{int((got.argmax(-1) != expected.argmax(-1)).sum())} of 872 differ"
    diff = float(np.abs(got - expected).max())
    logger.info("fp32 ONNX vs torch on SST-2 dev: max abs diff %.3g", diff)
    assert diff < 1e-3

    for name, options, floor in (("int8", {}, INT8_FLOOR),
                                 ("int8-down", {"int8_mode": "weight-only", "int8_nodes": ("down_proj",)}, INT8_GOAL)):
        int8 = trained_gemma.export(tmp_path / name, quantize="int8", validation_texts=sst2_dev, torch_weights=False, **options)
        report = json.loads((int8 / "manifest.json").read_text())["agreement_with_fp32"]
        logger.info("%s agreement with fp32 on SST-2 dev: %s", name, report)
        int8_logits = Predictor.from_pretrained(int8, backend="onnx").label_logits(sst2_dev)
        with_torch = float((int8_logits.argmax(-1) == expected.argmax(-1)).mean())
        assert report["examples"] == 872
        assert report["agreement"] >= floor and with_torch >= floor, f"{name} agreement {report['agreement']:.4f} (with torch {with_torch:.4f})"
