"""Tests for the fused label-logit op: Triton kernel vs torch reference vs a naive full-vocabulary head.

On CPU the kernel runs in Triton's interpreter. TRITON_INTERPRET=1 must be set before Triton is
imported, so those cases run in a subprocess that executes this file as a script (see the
``__main__`` block); all of them share one subprocess to pay the torch/Triton import once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import zlib
import sys
from dataclasses import asdict, dataclass

import pytest
import torch

from fsserve.kernels.label_logits import HeadTransform, label_logits, label_logits_reference

SEQ_LEN = 6  # short: the op reads one position per row, and the interpreter pays per element


@dataclass(frozen=True)
class Case:
    """One input configuration for the kernel-vs-reference comparison."""

    hidden_size: int
    batch: int
    transform: bool = False
    fuse_dense: bool = False
    bias: bool = False
    words_per_class: tuple[int, ...] | None = None  # None: one word per class, no word_to_class
    log_softmax: bool = False
    first_token: bool = True  # batch 1 only: answer at the first (True) or last token
    num_classes: int = 3
    strided_hidden: bool = False
    int32_positions: bool = False
    dtype: str = "float32"  # interpreter cases only; the CUDA test runs every case in all three

    @property
    def classes(self) -> int:
        """How many classes the inputs have: one per ``words_per_class`` entry, else ``num_classes``."""
        return len(self.words_per_class) if self.words_per_class is not None else self.num_classes


def _grid() -> list[Case]:
    """Every listed hidden size and batch, each with four head variants that cover all switches."""
    cases = []
    for hidden_size in (32, 100, 640, 768):
        for batch in (1, 37):
            cases += [
                Case(hidden_size, batch, first_token=True),
                Case(hidden_size, batch, bias=True, words_per_class=(1, 2, 3), log_softmax=True,
                     first_token=False),
                Case(hidden_size, batch, transform=True, bias=True, log_softmax=True, first_token=False),
                Case(hidden_size, batch, transform=True, fuse_dense=True, words_per_class=(2, 1, 3),
                     first_token=True),
            ]
    # More than one 64-word block and more than 16 classes, with the dense layer fused (the H loop
    # re-runs per word block); non-contiguous hidden states; int32 positions.
    cases += [
        Case(100, 37, transform=True, fuse_dense=True, bias=True, num_classes=20,
             words_per_class=tuple(1 + i % 6 for i in range(20)), log_softmax=True),
        Case(100, 37, bias=True, num_classes=70, log_softmax=True),
        Case(100, 37, transform=True, strided_hidden=True, int32_positions=True, log_softmax=True),
        Case(32, 5, transform=True, bias=True, words_per_class=(2, 2), log_softmax=True),  # two classes
    ]
    # Half-precision loads and casts (the interpreter emulates them; tolerances as on CUDA).
    for dtype in ("float16", "bfloat16"):
        cases += [
            Case(100, 37, transform=True, fuse_dense=True, bias=True, words_per_class=(1, 2, 3), dtype=dtype),
            Case(100, 37, transform=True, bias=True, log_softmax=True, dtype=dtype),
        ]
    return cases


INTERPRETER_CASES = _grid()


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int) -> dict:
    """Build fresh random inputs for ``case``, scaled so logits are O(1) at every hidden size."""
    gen = torch.Generator().manual_seed(seed)
    hidden_size, batch = case.hidden_size, case.batch

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        """Draw from the case's generator on CPU, then move and cast."""
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    if case.strided_hidden:  # a (B, S, H) view of a (S, B, H) buffer: row stride is not S * H
        hidden = randn(SEQ_LEN, batch, hidden_size).transpose(0, 1)
    else:
        hidden = randn(batch, SEQ_LEN, hidden_size)
    if batch == 1:
        positions = [0 if case.first_token else SEQ_LEN - 1]
    else:  # both ends for sure, the rest anywhere
        positions = torch.randint(0, SEQ_LEN, (batch,), generator=gen).tolist()
        positions[0], positions[-1] = 0, SEQ_LEN - 1
    pos_dtype = torch.int32 if case.int32_positions else torch.int64
    answer_pos = torch.tensor(positions, dtype=pos_dtype, device=device)

    if case.words_per_class is None:
        word_to_class = None
        num_words = case.num_classes
    else:
        classes = [c for c, n in enumerate(case.words_per_class) for _ in range(n)]
        order = torch.randperm(len(classes), generator=gen)  # words of a class need not be adjacent
        word_to_class = torch.tensor(classes, dtype=torch.int64)[order].to(device)
        num_words = len(classes)
    transform = None
    if case.transform:
        transform = HeadTransform(
            dense_weight=randn(hidden_size, hidden_size, scale=hidden_size**-0.5),
            dense_bias=randn(hidden_size, scale=0.1),
            ln_weight=(1 + torch.randn(hidden_size, generator=gen) * 0.1).to(device=device, dtype=dtype),
            ln_bias=randn(hidden_size, scale=0.1),
            eps=1e-5,
        )
    return dict(
        hidden=hidden,
        answer_pos=answer_pos,
        label_weight=randn(num_words, hidden_size, scale=hidden_size**-0.5),
        label_bias=randn(num_words, scale=0.5) if case.bias else None,
        transform=transform,
        word_to_class=word_to_class,
        log_softmax=case.log_softmax,
    )


def compare_kernel(case: Case, dtype: torch.dtype, device: str, seed: int, atol: float, rtol: float) -> str | None:
    """Run the kernel into a NaN-poisoned buffer and check every element; return a failure message or None."""
    inputs = make_inputs(case, dtype, device, seed)
    out = torch.full((case.batch, case.classes), float("nan"), device=device)
    got = label_logits(**inputs, backend="triton", fuse_dense=case.fuse_dense, out=out)
    expected = label_logits_reference(**inputs)
    if got.data_ptr() != out.data_ptr():
        return "the kernel did not write into out="
    if not torch.isfinite(got).all():
        return f"{int((~torch.isfinite(got)).sum())} elements not written (NaN/inf left)"
    if not torch.allclose(got, expected, atol=atol, rtol=rtol):
        return f"max abs error {(got - expected).abs().max().item():.3g} > atol {atol}, rtol {rtol}"
    return None


# ---------------------------------------------------------------------------------------------
# Kernel in the interpreter (CPU)
# ---------------------------------------------------------------------------------------------


def _interpreter_main() -> int:
    """Run every interpreter case (this file as a script, under TRITON_INTERPRET=1); print JSON results."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    results = []
    tolerances = {"float32": dict(atol=1e-4, rtol=1e-4), "float16": dict(atol=1e-2, rtol=1e-2),
                  "bfloat16": dict(atol=5e-2, rtol=5e-2)}
    for seed, case in enumerate(INTERPRETER_CASES):
        error = compare_kernel(case, getattr(torch, case.dtype), "cpu", seed, **tolerances[case.dtype])
        results.append({"case": asdict(case), "error": error})
    print(json.dumps(results))
    return 0


def test_kernel_matches_reference_in_interpreter() -> None:
    """The Triton kernel, run by the interpreter on CPU, equals the reference on every listed case."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(INTERPRETER_CASES)
    failures = [r for r in results if r["error"] is not None]
    assert not failures, json.dumps(failures, indent=1)


# ---------------------------------------------------------------------------------------------
# Reference vs the naive full-vocabulary computation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", [False, True])
@pytest.mark.parametrize("words_per_class", [None, (2, 1, 3)])
@pytest.mark.parametrize("log_softmax", [False, True])
def test_reference_equals_full_vocab_head(transform: bool, words_per_class: tuple | None, log_softmax: bool) -> None:
    """The reference equals the HF way: vocab logits at every position, gathered, averaged per class."""
    gen = torch.Generator().manual_seed(7)
    batch, hidden_size, vocab = 5, 24, 50
    hidden = torch.randn(batch, SEQ_LEN, hidden_size, generator=gen)
    answer_pos = torch.tensor([0, SEQ_LEN - 1, 2, 3, SEQ_LEN - 1])
    embedding = torch.randn(vocab, hidden_size, generator=gen)
    vocab_bias = torch.randn(vocab, generator=gen)
    counts = words_per_class or (1, 1, 1)
    label_ids = torch.randperm(vocab, generator=gen)[: sum(counts)]
    word_class = [c for c, n in enumerate(counts) for _ in range(n)]

    head = None
    states = hidden
    if transform:
        dense = torch.nn.Linear(hidden_size, hidden_size)
        norm = torch.nn.LayerNorm(hidden_size, eps=1e-5)
        with torch.no_grad():
            for param in (*dense.parameters(), *norm.parameters()):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3 + (1.0 if param is norm.weight else 0.0))
            states = norm(torch.nn.functional.gelu(dense(hidden)))
        head = HeadTransform(dense.weight.detach(), dense.bias.detach(), norm.weight.detach(), norm.bias.detach(),
                             eps=norm.eps)
    full_logits = states @ embedding.T + vocab_bias  # (B, S, V), as a HF model's head returns
    expected = torch.empty(batch, len(counts))
    for b in range(batch):
        at_answer = full_logits[b, answer_pos[b]]
        for c in range(len(counts)):
            ids = [label_ids[w] for w in range(len(word_class)) if word_class[w] == c]
            expected[b, c] = torch.stack([at_answer[i] for i in ids]).mean()
    if log_softmax:
        expected = torch.log_softmax(expected, dim=-1)

    got = label_logits_reference(
        hidden, answer_pos, embedding[label_ids], vocab_bias[label_ids], head,
        None if words_per_class is None else torch.tensor(word_class), log_softmax,
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Dispatch and input validation (CPU, reference path)
# ---------------------------------------------------------------------------------------------


def test_auto_backend_on_cpu_is_the_reference() -> None:
    """On CPU tensors ``backend='auto'`` gives exactly the reference, and honours out=."""
    inputs = make_inputs(Case(100, 7, transform=True, bias=True, words_per_class=(1, 2, 3)), torch.float32, "cpu", 3)
    out = torch.full((7, 3), float("nan"))
    got = label_logits(**inputs, out=out)
    assert got is out
    torch.testing.assert_close(got, label_logits_reference(**inputs), atol=0, rtol=0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter accepts CPU tensors")
def test_forced_triton_on_cpu_without_interpreter_is_refused() -> None:
    """Forcing the kernel on CPU tensors outside the interpreter says how to run it."""
    inputs = make_inputs(Case(32, 2), torch.float32, "cpu", 0)
    with pytest.raises((ValueError, ImportError), match="TRITON_INTERPRET|Triton"):
        label_logits(**inputs, backend="triton")


def _bad(**changes: object) -> dict:
    """Valid CPU inputs with some arguments replaced."""
    inputs = make_inputs(Case(16, 4, transform=True, bias=True, words_per_class=(1, 2)), torch.float32, "cpu", 1)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (_bad(hidden=torch.randn(4, 16)), "hidden must be a"),
        (_bad(hidden=torch.randn(4, SEQ_LEN, 16, dtype=torch.float64)), "hidden must be float32"),
        (_bad(answer_pos=torch.tensor([0, 1, 2])), "answer_pos must have shape"),
        (_bad(answer_pos=torch.tensor([0.0, 1.0, 2.0, 3.0])), "answer_pos must have dtype"),
        (_bad(answer_pos=torch.tensor([0, 1, SEQ_LEN, 2])), r"answer_pos must lie in \[0, 6\)"),
        (_bad(answer_pos=torch.tensor([0, -1, 1, 2])), "answer_pos must lie in"),
        (_bad(label_weight=torch.randn(3, 15)), "label_weight must have shape"),
        (_bad(label_weight=torch.randn(3, 16, dtype=torch.float16)), "label_weight must have dtype"),
        (_bad(label_bias=torch.randn(4)), "label_bias must have shape"),
        (_bad(word_to_class=torch.tensor([0, 2, 2])), r"classes \[1\] have none"),
        (_bad(word_to_class=torch.tensor([0, -1, 1])), "word_to_class values must lie in"),
        (_bad(transform=HeadTransform(torch.randn(16, 8), torch.randn(16), torch.randn(16), torch.randn(16))),
         "transform.dense_weight must have shape"),
        (_bad(transform=HeadTransform(torch.randn(16, 16), torch.randn(16), torch.randn(16), torch.randn(16),
                                      activation="relu")), "activation must be 'gelu'"),
        (_bad(transform="gelu"), "transform must be a HeadTransform"),
    ],
)
def test_bad_inputs_raise_value_error(inputs: dict, message: str) -> None:
    """Malformed inputs are refused with a ValueError that names the argument, on both entry points."""
    with pytest.raises(ValueError, match=message):
        label_logits_reference(**inputs)
    with pytest.raises(ValueError, match=message):
        label_logits(**inputs, backend="torch")


def test_wrong_out_buffer_is_refused() -> None:
    """An out= buffer of the wrong shape or dtype is refused rather than silently reallocated."""
    inputs = _bad()
    with pytest.raises(ValueError, match="out must be a float32"):
        label_logits(**inputs, backend="torch", out=torch.empty(4, 3))
    with pytest.raises(ValueError, match="out must be a float32"):
        label_logits(**inputs, backend="torch", out=torch.empty(4, 2, dtype=torch.float16))


# ---------------------------------------------------------------------------------------------
# Kernel on CUDA
# ---------------------------------------------------------------------------------------------

# Tolerances against the fp32 reference on the same (rounded) inputs. fp32: the kernel's dots are
# "ieee" (no TF32), so only summation order differs. fp16/bf16: the kernel accumulates in fp32, but
# with fuse_dense=False the cuBLAS dense output is rounded to the input dtype before GELU/LayerNorm.
# Simulating that rounding on CPU over GPU_CASES moves the O(1) logits by up to 4e-4 (fp16) and
# 3e-3 (bf16); the tolerances leave ~20x room for cuBLAS's own reduced-precision reductions.
GPU_TOLERANCES = {
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}
GPU_CASES = [case for case in INTERPRETER_CASES if case.dtype == "float32"] + [
    Case(1024, 1024, transform=True, bias=True, words_per_class=(2, 2), log_softmax=True),
    Case(1024, 1024, transform=True, fuse_dense=True, bias=True, words_per_class=(2, 2), log_softmax=True),
    Case(640, 1024, bias=False, words_per_class=(1, 3, 2)),
    Case(4096, 64, transform=True, fuse_dense=True, words_per_class=(1, 1)),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", list(GPU_TOLERANCES), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"h{c.hidden_size}-b{c.batch}"
                         f"{'-mlm' if c.transform else ''}{'-fused' if c.fuse_dense else ''}")
def test_kernel_matches_reference_on_cuda(case: Case, dtype: torch.dtype) -> None:
    """The compiled kernel equals the reference on CUDA in fp32, fp16 and bf16, within the stated tolerances."""
    error = compare_kernel(case, dtype, "cuda", seed=zlib.crc32(repr(case).encode()) % 1000, **GPU_TOLERANCES[dtype])
    assert error is None, error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_backend_on_cuda_uses_kernel_and_agrees(caplog: pytest.LogCaptureFixture) -> None:
    """On CUDA ``backend='auto'`` takes the kernel path, agrees with the forced kernel, and both fuse_dense variants agree."""
    inputs = make_inputs(Case(768, 37, transform=True, bias=True, words_per_class=(1, 2)), torch.float16, "cuda", 5)
    with caplog.at_level(logging.DEBUG, logger="fsserve.kernels.label_logits"):
        auto = label_logits(**inputs)
    assert [m.split("backend=")[1].split()[0] for m in caplog.messages if "backend=" in m] == ["triton"]
    for fuse in (False, True):
        torch.testing.assert_close(label_logits(**inputs, backend="triton", fuse_dense=fuse), auto,
                                   **GPU_TOLERANCES[torch.float16])


if __name__ == "__main__":
    sys.exit(_interpreter_main())
