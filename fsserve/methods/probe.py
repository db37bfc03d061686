"""Probing: a frozen LM and a linear (or small MLP) classifier on one layer's pooled representation.

The probe reads the same prompt-formatted input as every other method (so a bundle's Predictor
serves it unchanged); for a plain-text probe use the template ``{sent_0}{mask}``. Pooling is
``cls`` (first real token), ``mean`` (masked mean) or ``last`` (last real token); each works for
both padding sides. The frozen LM runs in eval mode even while the probe trains, so a probe sees
exactly the pretrained features (what ``probe-layers`` caches).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from fsserve.config import PromptConfig
from fsserve.methods.base import AdaptedModel
from fsserve.methods.config import MethodConfig

logger = logging.getLogger(__name__)


def pool(states: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Reduce (B, S, H) token states to (B, H): first real token, masked mean, or last real token."""
    mask = attention_mask.to(states.dtype)
    if pooling == "mean":
        return (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    if pooling == "cls":
        index = attention_mask.long().argmax(-1)  # argmax gives the first maximum: the first real token
    elif pooling == "last":
        index = attention_mask.long().cumsum(-1).argmax(-1)  # the count first peaks at the last real token
    else:
        raise ValueError(f"unknown pooling {pooling!r}: use cls, mean or last")
    return states.gather(1, index.view(-1, 1, 1).expand(-1, 1, states.shape[-1])).squeeze(1)


class ProbeHead(nn.Module):
    """Dropout and a linear layer, or a one-hidden-layer MLP when ``hidden`` > 0.

    >>> ProbeHead(32, 2, hidden=16)(torch.zeros(4, 32)).shape
    torch.Size([4, 2])
    """

    def __init__(self, hidden_size: int, num_labels: int, hidden: int = 0, dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(hidden_size, hidden), nn.GELU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden or hidden_size, num_labels))
        self.net = nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Map (B, H) pooled features to (B, num_labels) class logits."""
        return self.net(pooled)


class ProbeModel(AdaptedModel):
    """A probe on layer ``config.layer`` (0 = embeddings, -1 = last) of a frozen LM.

    >>> model = PromptModel.from_pretrained("embedded", prompt=prompt, method="probe",  # doctest: +SKIP
    ...                                     method_config={"layer": 9, "pooling": "mean"})
    """

    adaptation = "probe"

    def __init__(self, lm: nn.Module, tokenizer: Any, prompt: PromptConfig, kind: str | None = None, config: MethodConfig | None = None) -> None:
        super().__init__(lm, tokenizer, prompt, kind=kind, config=config)
        cfg = self.method_config
        self.num_layers = int(self.lm.config.num_hidden_layers)
        if not -self.num_layers - 1 <= cfg.layer <= self.num_layers:
            raise ValueError(f"layer {cfg.layer} is out of range: this LM has layers 0 (embeddings) to {self.num_layers}")
        self.layer = cfg.layer % (self.num_layers + 1)
        self.pooling = cfg.pooling if cfg.pooling != "auto" else ("cls" if self.kind == "mlm" else "last")
        self.head = ProbeHead(self.lm.config.hidden_size, len(self.labels), cfg.probe_hidden, cfg.dropout)
        self.lm.eval()

    def train(self, mode: bool = True) -> ProbeModel:
        """Train the probe; the frozen LM stays in eval mode (no dropout on the features)."""
        super().train(mode)
        self.lm.eval()
        return self

    def layer_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every layer's (B, S, H) states: index 0 the embeddings, the last one the LM's final output."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": True}
        if token_type_ids is not None and self.uses_token_types:
            kwargs["token_type_ids"] = token_type_ids
        if self.kind == "causal":
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.backbone(**kwargs)
        # The last entry is taken from last_hidden_state so it includes the final norm in every family.
        return list(out.hidden_states[:-1]) + [out.last_hidden_state]

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The (B, H) pooled representation of the probed layer."""
        return pool(self.layer_states(input_ids, attention_mask, token_type_ids)[self.layer], attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_labels) class logits of the probe; ``answer_pos`` only keeps the shared signature."""
        logits = self.head(self.features(input_ids, attention_mask, token_type_ids))
        # Tracing drops graph inputs that nothing depends on; a zero-weighted term keeps answer_pos an
        # input, so a probe's graph takes the same feed as every other bundle's.
        return logits + answer_pos.unsqueeze(-1).to(logits.dtype) * 0.0

    label_logits = forward
