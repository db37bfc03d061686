"""The torch reference of the fused label-logit op, and the input checks both paths share.

``label_logits_reference`` is the ground truth the Triton kernel is tested against and the path
``fsserve.kernels.label_logits.label_logits`` takes off CUDA; ``HeadTransform`` describes the MLM
head transform both paths apply. Split from the kernel module so that each file holds one idea: the
kernel and its launcher there, the plain-torch semantics here.

>>> import torch
>>> hidden = torch.randn(2, 5, 8)
>>> label_logits_reference(hidden, torch.tensor([1, 4]), torch.randn(3, 8)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)


@dataclass
class HeadTransform:
    """The MLM head transform before the label rows, so encoder heads fuse like decoder heads.

    ``dense_weight`` is (H, H) in ``nn.Linear`` layout (out, in); the others are (H,).

    >>> import torch
    >>> h = 8
    >>> t = HeadTransform(torch.eye(h), torch.zeros(h), torch.ones(h), torch.zeros(h), eps=1e-5)
    >>> t.activation
    'gelu'
    """

    dense_weight: torch.Tensor
    dense_bias: torch.Tensor
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    eps: float = 1e-5
    activation: str = "gelu"  # exact (erf) GELU, as BERT and RoBERTa use


@dataclass(frozen=True)
class HeadInputs:
    """The op's inputs once :func:`check_inputs` accepted them, with the number of classes settled.

    Both paths (the Triton launcher and the torch reference) read these, so the checks run once
    and the argument list is written once.
    """

    hidden: torch.Tensor
    answer_pos: torch.Tensor
    label_weight: torch.Tensor
    label_bias: torch.Tensor | None
    transform: HeadTransform | None
    word_to_class: torch.Tensor | None
    num_labels: int

    def check_out(self, out: torch.Tensor) -> torch.Tensor:
        """Refuse an ``out`` buffer of the wrong shape, dtype or device; return it."""
        shape = (self.hidden.shape[0], self.num_labels)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != torch.float32:
            raise ValueError(f"out must be a float32 tensor of shape {shape}, got {_describe(out)}")
        if out.device != self.hidden.device:
            raise ValueError(f"out is on {out.device} but hidden is on {self.hidden.device}")
        return out


# ---------------------------------------------------------------------------------------------
# Torch reference
# ---------------------------------------------------------------------------------------------


def label_logits_reference(
    hidden: torch.Tensor,
    answer_pos: torch.Tensor,
    label_weight: torch.Tensor,
    label_bias: torch.Tensor | None = None,
    transform: HeadTransform | None = None,
    word_to_class: torch.Tensor | None = None,
    log_softmax: bool = False,
    *,
    num_labels: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Compute the same label logits in plain torch (fp32), as the ground truth the kernel is tested against."""
    inputs = check_inputs(hidden, answer_pos, label_weight, label_bias, transform, word_to_class, num_labels, validate)
    return reference_logits(inputs, log_softmax)


def reference_logits(inputs: HeadInputs, log_softmax: bool = False) -> torch.Tensor:
    """Run the reference computation on inputs that :func:`check_inputs` accepted."""
    hidden, transform, word_to_class = inputs.hidden, inputs.transform, inputs.word_to_class
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    x = hidden[rows, inputs.answer_pos].float()
    if transform is not None:
        x = F.linear(x, transform.dense_weight.float(), transform.dense_bias.float())
        x = F.gelu(x)  # approximate="none": the erf form
        x = F.layer_norm(x, (x.shape[-1],), transform.ln_weight.float(), transform.ln_bias.float(),
                         float(transform.eps))
    bias = None if inputs.label_bias is None else inputs.label_bias.float()
    word_logits = F.linear(x, inputs.label_weight.float(), bias)
    if word_to_class is None:
        class_logits = word_logits
    else:
        index = word_to_class.long()
        sums = word_logits.new_zeros(word_logits.shape[0], inputs.num_labels).index_add_(1, index, word_logits)
        counts = torch.bincount(index, minlength=inputs.num_labels).to(sums.dtype)
        class_logits = sums / counts
    if log_softmax:
        class_logits = torch.log_softmax(class_logits, dim=-1)
    return class_logits


# ---------------------------------------------------------------------------------------------
# Input checks shared by both paths
# ---------------------------------------------------------------------------------------------


def check_inputs(
    hidden: torch.Tensor,
    answer_pos: torch.Tensor,
    label_weight: torch.Tensor,
    label_bias: torch.Tensor | None,
    transform: HeadTransform | None,
    word_to_class: torch.Tensor | None,
    num_labels: int | None,
    validate: bool,
) -> HeadInputs:
    """Refuse malformed inputs with a ValueError naming the argument; return them with the number of classes."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a (batch, seq, hidden) tensor, got {_describe(hidden)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    batch, seq_len, hidden_size = hidden.shape
    if batch == 0 or seq_len == 0 or hidden_size == 0:
        raise ValueError(f"hidden must not be empty, got shape {tuple(hidden.shape)}")

    def same_place(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
        """Check one companion tensor's type, shape, dtype and device against hidden."""
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {_describe(tensor)}")
        if tensor.dtype not in dtypes:
            raise ValueError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {tensor.dtype}")
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")

    same_place("answer_pos", answer_pos, (batch,), INDEX_DTYPES)
    if not isinstance(label_weight, torch.Tensor) or label_weight.dim() != 2 or label_weight.shape[0] == 0:
        raise ValueError(f"label_weight must be a non-empty (num_words, hidden) tensor, got {_describe(label_weight)}")
    num_words = label_weight.shape[0]
    same_place("label_weight", label_weight, (num_words, hidden_size), (hidden.dtype,))
    if label_bias is not None:
        same_place("label_bias", label_bias, (num_words,), (hidden.dtype,))
    if transform is not None:
        if not isinstance(transform, HeadTransform):
            raise ValueError(f"transform must be a HeadTransform or None, got {type(transform).__name__}")
        if transform.activation != "gelu":
            raise ValueError(f"transform.activation must be 'gelu' (exact erf GELU), got {transform.activation!r}")
        if not transform.eps > 0:
            raise ValueError(f"transform.eps must be positive, got {transform.eps}")
        same_place("transform.dense_weight", transform.dense_weight, (hidden_size, hidden_size), (hidden.dtype,))
        for name in ("dense_bias", "ln_weight", "ln_bias"):
            same_place(f"transform.{name}", getattr(transform, name), (hidden_size,), (hidden.dtype,))

    if word_to_class is None:
        if num_labels is not None and num_labels != num_words:
            raise ValueError(f"without word_to_class there is one word per class: num_labels must be {num_words}")
        num_labels = num_words
    else:
        same_place("word_to_class", word_to_class, (num_words,), INDEX_DTYPES)
        if num_labels is None:
            num_labels = int(word_to_class.max()) + 1
        if validate:
            lowest = int(word_to_class.min())
            if lowest < 0 or int(word_to_class.max()) >= num_labels:
                raise ValueError(f"word_to_class values must lie in [0, {num_labels}), got min {lowest}")
            counts = torch.bincount(word_to_class.long(), minlength=num_labels)
            empty = (counts == 0).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"every class needs at least one label word; classes {empty} have none")
    if validate:
        low, high = torch.stack([answer_pos.min(), answer_pos.max()]).tolist()
        if low < 0 or high >= seq_len:
            raise ValueError(f"answer_pos must lie in [0, {seq_len}), got values from {low} to {high}")
    return HeadInputs(hidden, answer_pos, label_weight, label_bias, transform, word_to_class, num_labels)


def _describe(value: object) -> str:
    """Say what was passed, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
