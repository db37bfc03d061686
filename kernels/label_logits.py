"""Fused label-word logits: gather at the answer position, head transform, label rows, mean per class.

The last step of every prompt-based prediction only needs a handful of vocabulary rows (the label
words) at one position per sequence. The Hugging Face way computes logits over the whole vocabulary
at every position and then throws nearly all of them away; this op computes just the
``B x num_labels`` numbers that are used, in one kernel.

Public API (read top to bottom like the Triton tutorials):

- ``HeadTransform``: the MLM head transform (dense -> exact GELU -> LayerNorm) applied before the
  label rows, as BERT/RoBERTa do. Decoder LMs (GPT-2, Gemma) pass ``transform=None``.
- ``label_logits_kernel``: the Triton kernel.
- ``label_logits``: the launcher *and* the public op. With ``backend="auto"`` it runs the kernel
  when the tensors are on CUDA and Triton is usable, and the torch reference otherwise;
  ``backend="triton"`` forces the kernel (CPU tensors work under ``TRITON_INTERPRET=1``, which is
  how the CPU tests run it), ``backend="torch"`` forces the reference.
- ``label_logits_reference``: the torch reference with the same signature.

>>> import torch
>>> hidden = torch.randn(2, 5, 8)
>>> weight = torch.randn(4, 8)                     # 4 label words ...
>>> word_to_class = torch.tensor([0, 0, 1, 1])     # ... two per class
>>> label_logits(hidden, torch.tensor([1, 4]), weight, word_to_class=word_to_class).shape
torch.Size([2, 2])
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from fsserve.kernels.label_logits_reference import HeadTransform, check_inputs, label_logits_reference, reference_logits
from fsserve.utils.device import triton_available

__all__ = ["HeadTransform", "label_logits", "label_logits_kernel", "label_logits_reference", "MAX_KERNEL_CLASSES"]

try:  # Triton is the optional [gpu] extra; without it only the torch reference runs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - only on installs without the extra
    triton = None
    tl = None

logger = logging.getLogger(__name__)

# The kernel keeps a (BLOCK_B x BLOCK_C) fp32 accumulator in registers; past this many classes the
# auto backend uses the reference instead (LM-BFF tasks have at most a few dozen classes).
MAX_KERNEL_CLASSES = 1024
# Default for ``fuse_dense``: keep the MLM head's H x H dense layer in cuBLAS. The kernel's grid runs
# over blocks of 16 rows only (the label part is too small to split further), so a fused dense layer
# is one SM streaming the whole H x H weight at batch 1, and every row block re-reading it at large
# batch; cuBLAS tiles the same GEMM over all SMs. The price of not fusing is one extra launch and a
# B x H round trip through memory, which is small next to H x H weights. bench_head.py measures both.
DEFAULT_FUSE_DENSE = False


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


def _jit(fn):
    """Compile with Triton when it is installed; otherwise keep the kernel as an inert function."""
    return triton.jit(fn) if triton is not None else fn


@_jit
def label_logits_kernel(
    x_ptr,  # (B, S, H) hidden states, or (B, H) dense outputs from cuBLAS when GATHER is False
    pos_ptr,  # (B,) answer positions
    wl_ptr,  # (W, H) label-word rows of the output embedding
    bl_ptr,  # (W,) label-word bias
    w2c_ptr,  # (W,) class index of each word
    wd_ptr,  # (H, H) dense weight, (out, in); read only when FUSE_DENSE
    bd_ptr,  # (H,) dense bias
    gamma_ptr,  # (H,) LayerNorm weight
    beta_ptr,  # (H,) LayerNorm bias
    out_ptr,  # (B, C) float32 class logits
    B,
    H,
    W,
    C,
    stride_xb,
    stride_xs,
    stride_xh,
    stride_wlw,
    stride_wlh,
    stride_wdn,
    stride_wdk,
    stride_ob,
    stride_oc,
    eps,
    GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_WORD_MAP: tl.constexpr,
    TRANSFORM: tl.constexpr,
    FUSE_DENSE: tl.constexpr,
    LOG_SOFTMAX: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One program handles BLOCK_B rows of the batch. Memory traffic: each row's hidden vector at its
    # answer position is read once (H elements, not S x H), the W label rows and the transform
    # vectors once per program, the (H, H) dense weight once per program when FUSE_DENSE; the only
    # write is the (B, C) result. Nothing of vocabulary size is ever touched.
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    if GATHER:
        pos = tl.load(pos_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        pos = tl.zeros([BLOCK_B], dtype=tl.int64)
    # int64 offsets: B x S x H passes 2**31 elements at batch 1024, seq 512, hidden 4096.
    x_rows = x_ptr + rows.to(tl.int64) * stride_xb + pos * stride_xs
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)

    class_sum = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    class_count = tl.zeros([BLOCK_C], dtype=tl.float32)
    # Usually one word block (W <= 64); more words re-run the H loop rather than hold them all.
    for w0 in range(0, W, BLOCK_W):
        words = w0 + tl.arange(0, BLOCK_W)
        word_mask = words < W
        # P[b, w] = sum_h g[b, h] * gamma[h] * wl[w, h]; without a transform gamma is 1 and P is
        # the logit. With one, LayerNorm folds into the epilogue (see below), so a single pass over
        # H suffices and the normalised vector is never materialised.
        p = tl.zeros([BLOCK_B, BLOCK_W], dtype=tl.float32)
        s1 = tl.zeros([BLOCK_B], dtype=tl.float32)  # sum_h g
        s2 = tl.zeros([BLOCK_B], dtype=tl.float32)  # sum_h g^2
        q = tl.zeros([BLOCK_W], dtype=tl.float32)  # sum_h gamma * wl
        r = tl.zeros([BLOCK_W], dtype=tl.float32)  # sum_h beta * wl
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + offs_h
            col_mask = cols < H
            # Masked loads return 0 outside H and outside B: padded columns then add 0 to every sum
            # below (GELU(0) = 0), so no power-of-two hidden size is assumed.
            if FUSE_DENSE:
                g = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    ks = k0 + offs_k
                    k_mask = ks < H
                    xk = tl.load(
                        x_rows[:, None] + ks[None, :] * stride_xh,
                        mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0,
                    )
                    # (BLOCK_K, BLOCK_H) tile of W_d^T: y[b, n] = sum_k x[b, k] * W_d[n, k].
                    wd = tl.load(
                        wd_ptr + cols[None, :] * stride_wdn + ks[:, None] * stride_wdk,
                        mask=k_mask[:, None] & col_mask[None, :],
                        other=0.0,
                    )
                    if UPCAST_DOT:
                        xk = xk.to(tl.float32)
                        wd = wd.to(tl.float32)
                    # fp16/bf16 use tensor cores with fp32 accumulation; fp32 stays exact ("ieee").
                    g = tl.dot(xk, wd, g, input_precision="ieee")
            else:
                g = tl.load(
                    x_rows[:, None] + cols[None, :] * stride_xh,
                    mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
            # (BLOCK_H, BLOCK_W) tile of the label rows, transposed by the pointer arithmetic.
            wl = tl.load(
                wl_ptr + words[None, :] * stride_wlw + cols[:, None] * stride_wlh,
                mask=col_mask[:, None] & word_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            if TRANSFORM:
                g = g + tl.load(bd_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
                g = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
                s1 += tl.sum(g, axis=1)
                s2 += tl.sum(g * g, axis=1)
                gamma = tl.load(gamma_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                beta = tl.load(beta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                r += tl.sum(wl * beta[:, None], axis=0)
                wl = wl * gamma[:, None]
                q += tl.sum(wl, axis=0)
            p = tl.dot(g, wl, p, input_precision="ieee")
        if TRANSFORM:
            # LayerNorm folded through the label rows:
            #   sum_h ((g_h - mean) * rstd * gamma_h + beta_h) * wl_h = rstd * (P - mean * Q) + R.
            # E[g^2] - mean^2 cancels only when |mean| >> std, which GELU outputs do not reach.
            mean = s1 / H
            var = tl.maximum(s2 / H - mean * mean, 0.0)
            rstd = tl.rsqrt(var + eps)
            logits = rstd[:, None] * (p - mean[:, None] * q[None, :]) + r[None, :]
        else:
            logits = p
        if HAS_BIAS:
            logits += tl.load(bl_ptr + words, mask=word_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_WORD_MAP:
            word_class = tl.load(w2c_ptr + words, mask=word_mask, other=-1)
        else:
            word_class = words
        # (BLOCK_W, BLOCK_C) one-hot: a tiny exact matmul sums each class's words.
        onehot = ((word_class[:, None] == offs_c[None, :]) & word_mask[:, None]).to(tl.float32)
        class_sum = tl.dot(logits, onehot, class_sum, input_precision="ieee")
        class_count += tl.sum(onehot, axis=0)

    class_mask = offs_c < C
    # The launcher guarantees every class has a word; padded classes divide by 1, not 0.
    logits = class_sum / tl.where(class_mask, class_count, 1.0)[None, :]
    if LOG_SOFTMAX:
        shifted = tl.where(class_mask[None, :], logits, float("-inf"))
        row_max = tl.max(shifted, axis=1)
        total = tl.sum(tl.exp(shifted - row_max[:, None]), axis=1)
        logits = logits - (row_max + tl.log(total))[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ob + offs_c[None, :] * stride_oc,
        logits,
        mask=row_mask[:, None] & class_mask[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Launcher (and the public op)
# ---------------------------------------------------------------------------------------------


def _pow2_block(n: int, low: int, high: int) -> int:
    """Pick a power-of-two block for ``n`` elements, at least ``low`` (tl.dot needs 16) and at most ``high``."""
    return max(low, min(high, 1 << max(0, (n - 1).bit_length())))


def label_logits(
    hidden: torch.Tensor,
    answer_pos: torch.Tensor,
    label_weight: torch.Tensor,
    label_bias: torch.Tensor | None = None,
    transform: HeadTransform | None = None,
    word_to_class: torch.Tensor | None = None,
    log_softmax: bool = False,
    *,
    num_labels: int | None = None,
    fuse_dense: bool = DEFAULT_FUSE_DENSE,
    backend: str = "auto",
    validate: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute (B, num_labels) float32 label logits in one fused op, so no vocabulary-sized logits exist.

    ``backend``: ``"auto"`` (kernel on CUDA with Triton, reference otherwise), ``"triton"`` or
    ``"torch"``. ``validate=True`` checks ``answer_pos`` against the sequence length, which costs
    one device-to-host sync on CUDA; pass False when the positions were checked on the host.
    ``out``: optional (B, num_labels) float32 tensor to write into.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    inputs = check_inputs(hidden, answer_pos, label_weight, label_bias, transform, word_to_class, num_labels, validate)
    num_labels = inputs.num_labels
    if backend == "auto":
        use_kernel = hidden.is_cuda and triton_available() and num_labels <= MAX_KERNEL_CLASSES
        backend = "triton" if use_kernel else "torch"
        logger.debug("label_logits: backend=%s (device %s)", backend, hidden.device)
    if backend == "torch":
        result = reference_logits(inputs, log_softmax)
        return result if out is None else inputs.check_out(out).copy_(result)

    if triton is None:
        raise ImportError("backend='triton' needs Triton: pip install 'fsserve[gpu]'")
    if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' with CPU tensors needs TRITON_INTERPRET=1 set before Triton is imported")
    if num_labels > MAX_KERNEL_CLASSES:
        raise ValueError(f"the kernel handles at most {MAX_KERNEL_CLASSES} classes, got {num_labels}; use backend='torch'")

    batch, _, hidden_size = hidden.shape
    num_words = label_weight.shape[0]
    if out is None:
        out = torch.empty(batch, num_labels, device=hidden.device, dtype=torch.float32)
    else:
        inputs.check_out(out)

    x, gather, fuse = hidden, True, False
    wd = bd = gamma = beta = label_weight  # placeholders: pointers the kernel never reads
    eps = 0.0
    if transform is not None:
        bd, gamma, beta = transform.dense_bias, transform.ln_weight, transform.ln_bias
        eps = float(transform.eps)
        if fuse_dense:
            wd, fuse = transform.dense_weight, True
        else:
            # The one GEMM stays in cuBLAS (see DEFAULT_FUSE_DENSE); the kernel fuses the rest.
            # Its bias is added in the kernel, in fp32.
            rows = torch.arange(batch, device=hidden.device)
            x = F.linear(hidden[rows, answer_pos], transform.dense_weight).unsqueeze(1)
            gather = False
    stride_xb, stride_xs, stride_xh = x.stride()
    wd_strides = wd.stride() if fuse else (0, 0)

    BLOCK_B = 16  # the smallest tl.dot tile; batch rows are the only parallel axis
    BLOCK_H = _pow2_block(hidden_size, 16, 128)
    BLOCK_K = _pow2_block(hidden_size, 16, 64)
    BLOCK_W = _pow2_block(num_words, 16, 64)
    BLOCK_C = _pow2_block(num_labels, 16, MAX_KERNEL_CLASSES)
    grid = (triton.cdiv(batch, BLOCK_B),)
    label_logits_kernel[grid](
        x, answer_pos, label_weight,
        label_bias if label_bias is not None else label_weight,
        word_to_class if word_to_class is not None else answer_pos,
        wd, bd, gamma, beta, out,
        batch, hidden_size, num_words, num_labels,
        stride_xb, stride_xs, stride_xh,
        label_weight.stride(0), label_weight.stride(1),
        wd_strides[0], wd_strides[1],
        out.stride(0), out.stride(1),
        eps,
        GATHER=gather,
        HAS_BIAS=label_bias is not None,
        HAS_WORD_MAP=word_to_class is not None,
        TRANSFORM=transform is not None,
        FUSE_DENSE=fuse,
        LOG_SOFTMAX=bool(log_softmax),
        # Triton 3.9's interpreter multiplies bf16 bit patterns as integers in tl.dot; interpreted
        # (CPU) runs therefore upcast the dense tiles. Compiled GPU runs keep bf16 tensor cores.
        UPCAST_DOT=not hidden.is_cuda and hidden.dtype == torch.bfloat16,
        BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, BLOCK_W=BLOCK_W, BLOCK_C=BLOCK_C,
        num_warps=4,
    )
    return out
