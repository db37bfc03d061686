"""Label heads: from the hidden state at the answer position to class scores, never via the full vocabulary.

The label-word head multiplies the (MLM-transformed) hidden vector by the label words' rows of the
output embedding only: B × num_words instead of B × seq × vocab. The classification head is the
standard fine-tuning baseline. Both take ``(B, H)`` and return ``(B, num_labels)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fsserve.utils.device import stream_capturing


def tracing() -> bool:
    """Say whether the forward is being traced, exported or compiled, where the fused kernel must give way to plain torch."""
    onnx_export = getattr(torch.onnx, "is_in_onnx_export", lambda: False)()
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
    return bool(torch.jit.is_tracing() or onnx_export or compiling)


class MLMTransform(nn.Module):
    """The MLM head's dense → activation → LayerNorm, shared by reference with the LM (no copy)."""

    def __init__(self, dense: nn.Linear, activation: Any, norm: nn.LayerNorm, activation_name: str | None = None) -> None:
        super().__init__()
        self.dense = dense
        self.activation = activation
        self.norm = norm
        # "gelu" (exact erf) is what the fused kernel implements; anything else stays on the torch path.
        self.activation_name = activation_name

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the transform the MLM head runs before its vocabulary decoder."""
        return self.norm(self.activation(self.dense(hidden)))


def _activation(module: Any, *names: str) -> Any:
    """Find the activation callable of an MLM head under one of its usual attribute names."""
    for name in names:
        act = getattr(module, name, None)
        if act is not None:
            return act
    return nn.GELU()


def mlm_head_parts(lm: nn.Module) -> tuple[MLMTransform, nn.Module]:
    """Locate the transform and the decoder (output embedding) of a masked LM, by architecture family.

    Supported: BERT-like (``cls.predictions``), RoBERTa/XLM-R/CamemBERT-like (``lm_head``),
    DistilBERT (``vocab_transform``), ELECTRA (``generator_predictions``), ALBERT (``predictions``).
    """
    decoder = lm.get_output_embeddings()
    if decoder is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings to take label-word rows from")
    act = getattr(lm.config, "hidden_act", None)
    if hasattr(lm, "cls") and hasattr(lm.cls, "predictions"):
        t = lm.cls.predictions.transform
        return MLMTransform(t.dense, _activation(t, "transform_act_fn"), t.LayerNorm, act), decoder
    if hasattr(lm, "lm_head") and hasattr(lm.lm_head, "dense") and hasattr(lm.lm_head, "layer_norm"):
        head = lm.lm_head
        return MLMTransform(head.dense, nn.GELU(), head.layer_norm, "gelu"), decoder
    if hasattr(lm, "vocab_transform"):
        act = getattr(lm.config, "activation", act)
        return MLMTransform(lm.vocab_transform, _activation(lm, "activation"), lm.vocab_layer_norm, act), decoder
    if hasattr(lm, "generator_predictions"):
        g = lm.generator_predictions
        return MLMTransform(g.dense, _activation(g, "activation"), g.LayerNorm, act), decoder
    if hasattr(lm, "predictions") and hasattr(lm.predictions, "LayerNorm"):
        p = lm.predictions
        return MLMTransform(p.dense, _activation(p, "activation"), p.LayerNorm, act), decoder
    raise ValueError(
        f"fsserve does not know the masked-LM head of {type(lm).__name__}; supported families are "
        "BERT, RoBERTa/XLM-R, DistilBERT, ELECTRA and ALBERT"
    )


class LabelWordHead(nn.Module):
    """Class scores from the label words' rows of the LM's output embedding (the LM-BFF head).

    The weight rows are gathered from the live output embedding at every call, so training the
    embedding (when it is not frozen) trains the head, and what is saved is just the LM itself.
    """

    def __init__(
        self,
        decoder: nn.Module,
        label_word_ids: list[int],
        word_to_class: list[int],
        num_labels: int,
        transform: MLMTransform | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.transform = transform
        self.softcap = softcap
        self.num_labels = num_labels
        self.register_buffer("label_word_ids", torch.tensor(label_word_ids, dtype=torch.long), persistent=False)
        self.register_buffer("word_to_class", torch.tensor(word_to_class, dtype=torch.long), persistent=False)
        counts = torch.bincount(self.word_to_class, minlength=num_labels).clamp(min=1)
        average = torch.zeros(len(label_word_ids), num_labels)
        average[torch.arange(len(label_word_ids)), self.word_to_class] = 1.0
        self.register_buffer("word_average", average / counts, persistent=False)
        # Decided once here, not per call: a per-call tensor comparison is a device sync on CUDA.
        self.one_word_per_class = list(word_to_class) == list(range(num_labels))

    def label_weight(self) -> torch.Tensor:
        """The (num_words, H) rows of the output embedding that score the label words."""
        return self.decoder.weight.index_select(0, self.label_word_ids)

    def label_bias(self) -> torch.Tensor | None:
        """The decoder bias entries of the label words, if the decoder has a bias."""
        bias = getattr(self.decoder, "bias", None)
        return None if bias is None else bias.index_select(0, self.label_word_ids)

    @property
    def fusable(self) -> bool:
        """Say whether the fused label-logit op (``fsserve.kernels.label_logits``) computes this head exactly."""
        return not self.softcap and (self.transform is None or self.transform.activation_name == "gelu")

    def fused(self, hidden: torch.Tensor, answer_pos: torch.Tensor) -> torch.Tensor:
        """Gather, transform and score in one op: the Triton kernel on CUDA, its torch reference elsewhere."""
        from fsserve.kernels.label_logits import HeadTransform, label_logits

        transform = None
        if self.transform is not None:
            t = self.transform
            transform = HeadTransform(t.dense.weight, t.dense.bias, t.norm.weight, t.norm.bias, float(t.norm.eps))
        word_map = None if self.one_word_per_class else self.word_to_class
        # The host-side range checks sync with the GPU, which a CUDA graph capture forbids; a captured
        # graph gets its inputs from GraphBackend, which checks them on the host before every replay.
        return label_logits(
            hidden, answer_pos, self.label_weight(), self.label_bias(), transform=transform,
            word_to_class=word_map, num_labels=self.num_labels, validate=not stream_capturing(),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map (B, H) answer-position states to (B, num_labels): mean of each class's word logits."""
        if self.transform is not None:
            hidden = self.transform(hidden)
        logits = hidden @ self.label_weight().t()
        bias = self.label_bias()
        if bias is not None:
            logits = logits + bias
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.one_word_per_class:
            return logits
        return logits @ self.word_average.to(logits.dtype)


class ClassificationHead(nn.Module):
    """The standard fine-tuning baseline: dropout and a linear layer on one token's state."""

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_outputs)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map (B, H) pooled states to (B, num_outputs) logits."""
        return self.out(self.dropout(hidden))
