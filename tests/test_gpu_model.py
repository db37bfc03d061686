"""The whole torch path on a device: PromptModel and Predictor give the CPU's label logits.

On CUDA the inference head is the Triton label-logit kernel (``backend='auto'``); each GPU test has a
CPU twin that runs the same comparison on the CPU, where the same op takes its torch reference.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fsserve.config import PromptConfig
from fsserve.modeling import PromptModel
from fsserve.predictor import Predictor

ARCHS = ("bert", "roberta", "gpt2", "gemma")
PROMPT = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=48)
TEXTS = ["a fine film, warm and funny", "dull.", "The plot never comes together and the acting is flat.",
         "An hour too long, but the last scene earns it."] * 3
# Label logits of the tiny models are O(0.1); bf16 weights and activations round at ~3 significant digits.
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=5e-2)}
KERNEL_LOGGER = "fsserve.kernels.label_logits"


def _device_matches_cpu(tiny_lm: Any, arch: str, device: str, dtype: torch.dtype, caplog: pytest.LogCaptureFixture) -> str:
    """Compare one family's label logits on ``device`` in ``dtype`` with fp32 on the CPU; return the backend used."""
    lm, tokenizer = tiny_lm(arch)
    reference = PromptModel(copy.deepcopy(lm), tokenizer, PROMPT).eval().predict_logits(TEXTS)
    model = PromptModel(lm, tokenizer, PROMPT).eval().to(device=device, dtype=dtype)
    with caplog.at_level(logging.DEBUG, logger=KERNEL_LOGGER):
        logits = model.predict_logits(TEXTS, batch_size=5)  # 5, 5, 2: a ragged last batch too
    assert logits.shape == (len(TEXTS), 2) and logits.dtype == torch.float32
    torch.testing.assert_close(logits.cpu(), reference.cpu(), **TOLERANCE[dtype])
    assert torch.equal(logits.argmax(-1).cpu(), reference.argmax(-1).cpu()) or dtype != torch.float32
    used = {line.split("backend=")[1].split()[0] for line in caplog.messages if "backend=" in line}
    assert len(used) == 1, f"the head ran through {used or 'no'} label_logits backend"
    return used.pop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_model_on_cuda_runs_the_kernel_and_matches_cpu(tiny_lm: Any, arch: str, dtype: torch.dtype,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """On CUDA, inference goes through the Triton kernel and gives the CPU's logits (fp32 and bf16 weights)."""
    pytest.importorskip("triton")
    assert _device_matches_cpu(tiny_lm, arch, "cuda", dtype, caplog) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_model_in_another_dtype_on_cpu_matches_fp32(tiny_lm: Any, arch: str, dtype: torch.dtype,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """CPU twin: the same comparison on the CPU, where the op takes its torch reference."""
    assert _device_matches_cpu(tiny_lm, arch, "cpu", dtype, caplog) == "torch"


def _predictor_matches_cpu(tiny_lm: Any, tmp_path: Path, device: str) -> None:
    """A saved model served by the torch Predictor on ``device`` predicts what it predicts on the CPU."""
    lm, tokenizer = tiny_lm("bert")
    PromptModel(lm, tokenizer, PROMPT).save_pretrained(tmp_path / "model")
    on_cpu = Predictor.from_pretrained(tmp_path / "model", backend="torch", device="cpu")
    on_device = Predictor.from_pretrained(tmp_path / "model", backend="torch", device=device, batch_size=3)
    np.testing.assert_allclose(on_device.predict_proba(TEXTS), on_cpu.predict_proba(TEXTS), atol=1e-5)
    assert on_device.predict(TEXTS) == on_cpu.predict(TEXTS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_predictor_on_cuda_matches_cpu(tiny_lm: Any, tmp_path: Path) -> None:
    """Predictor(backend='torch', device='cuda') returns the CPU's probabilities and labels."""
    _predictor_matches_cpu(tiny_lm, tmp_path, "cuda")


def test_torch_predictor_twin_on_cpu(tiny_lm: Any, tmp_path: Path) -> None:
    """CPU twin: two CPU predictors with different batch sizes agree (the same comparison code)."""
    _predictor_matches_cpu(tiny_lm, tmp_path, "cpu")
