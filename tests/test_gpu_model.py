"""The whole torch path on a device and in a dtype: PromptModel and Predictor give fp32 CPU label logits.

On CUDA the inference head is the Triton label-logit kernel (``backend='auto'``). Each GPU test has a
CPU twin that runs the same comparison on the CPU, where the same op takes its torch reference: the
model in bf16 against an fp32 reference on the CPU (and, for PromptModel, fp32 against the Hugging
Face LM's own full-vocabulary logits, so no twin compares a model with a copy of itself).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from fsserve.config import PromptConfig
from fsserve.modeling import PromptModel
from fsserve.predictor import Predictor

ARCHS = ("bert", "roberta", "gpt2", "gemma")
PROMPT = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=48)
TEXTS = ["a fine film, warm and funny", "dull.", "The plot never comes together and the acting is flat.",
         "An hour too long, but the last scene earns it."] * 3
# Label logits of the tiny models are O(0.1). bf16 rounds weights and activations to 8 significant
# bits while the label-logit op accumulates in fp32: on the CPU the four families land at most
# 1.2e-3 from fp32 (bert 1.1e-3, roberta 1.2e-3, gpt2 0.7e-3, gemma 0.9e-3).
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-3, rtol=0.0)}
KERNEL_LOGGER = "fsserve.kernels.label_logits"


def hf_label_logits(model: PromptModel, texts: list[str]) -> torch.Tensor:
    """fp32 label logits on the CPU the Hugging Face way: the LM's full-vocabulary logits at the answer, gathered."""
    batch = model.collate(model.encode(texts))
    inputs = {k: v for k, v in batch.items() if k != "answer_pos"}
    with torch.no_grad():
        full = model.lm(**inputs).logits
    return full[torch.arange(len(texts)), batch["answer_pos"]][:, model.prompt.label_word_ids]  # one word per class


def assert_matches(got: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    """Within the dtype's tolerance, and the same label wherever the reference's margin exceeds what that tolerance can move."""
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got, reference, **tolerance)
    margin = (reference[:, 0] - reference[:, 1]).abs()
    clear = margin > 2 * (tolerance["atol"] + tolerance["rtol"] * reference.abs().max())
    assert clear.sum() >= len(reference) * 3 // 4, "most rows must have a label the tolerance cannot flip"
    assert torch.equal(got.argmax(-1)[clear], reference.argmax(-1)[clear])


def _device_matches_cpu(tiny_lm: Any, arch: str, device: str, dtype: torch.dtype, caplog: pytest.LogCaptureFixture) -> str:
    """Compare one family's label logits on ``device`` in ``dtype`` with HF's fp32 logits on the CPU; return the backend used."""
    lm, tokenizer = tiny_lm(arch)
    reference = hf_label_logits(PromptModel(tiny_lm(arch)[0], tokenizer, PROMPT).eval(), TEXTS)
    model = PromptModel(lm, tokenizer, PROMPT).eval().to(device=device, dtype=dtype)
    with caplog.at_level(logging.DEBUG, logger=KERNEL_LOGGER):
        logits = model.predict_logits(TEXTS, batch_size=5)  # 5, 5, 2: a ragged last batch too
    assert logits.shape == (len(TEXTS), 2) and logits.dtype == torch.float32
    assert_matches(logits.cpu(), reference, dtype)
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
def test_prompt_model_on_cpu_matches_fp32(tiny_lm: Any, arch: str, dtype: torch.dtype, caplog: pytest.LogCaptureFixture) -> None:
    """CPU twin: the same comparison on the CPU, where the op takes its torch reference."""
    assert _device_matches_cpu(tiny_lm, arch, "cpu", dtype, caplog) == "torch"


def _predictor_matches_cpu(tiny_lm: Any, tmp_path: Path, device: str, dtype: torch.dtype) -> None:
    """A saved model served by the torch Predictor on ``device`` in ``dtype`` gives the fp32 CPU Predictor's logits and labels."""
    lm, tokenizer = tiny_lm("bert")
    PromptModel(lm, tokenizer, PROMPT).save_pretrained(tmp_path / "model")
    on_cpu = Predictor.from_pretrained(tmp_path / "model", backend="torch", device="cpu")
    on_device = Predictor.from_pretrained(tmp_path / "model", backend="torch", device=device, batch_size=3, dtype=dtype)
    assert_matches(torch.from_numpy(on_device.label_logits(TEXTS)), torch.from_numpy(on_cpu.label_logits(TEXTS)), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_predictor_on_cuda_matches_cpu(tiny_lm: Any, tmp_path: Path, dtype: torch.dtype) -> None:
    """Predictor(backend='torch', device='cuda') (CUDA graphs, in fp32 or bf16) returns the fp32 CPU Predictor's logits and labels."""
    _predictor_matches_cpu(tiny_lm, tmp_path, "cuda", dtype)


def test_torch_predictor_in_bf16_on_cpu_matches_fp32(tiny_lm: Any, tmp_path: Path) -> None:
    """CPU twin: the same comparison on the CPU, for the model in bf16."""
    _predictor_matches_cpu(tiny_lm, tmp_path, "cpu", torch.bfloat16)
