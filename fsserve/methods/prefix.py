"""Prefix tuning (Li & Liang, 2021): learned key/value prefixes in every attention layer, the LM frozen.

During training the prefixes come out of PEFT's ``PrefixEncoder`` (virtual-token embeddings through
the reparameterisation MLP, which steadies optimisation). Outside training the MLP's output is
computed once and kept as a plain tensor, so an exported graph holds the prefixes as constants and
no trace of the MLP. The prefixes enter through the LM's own key/value cache, which every
transformers family fills the same way (encoders attend to it bidirectionally, decoders causally).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from fsserve.config import PromptConfig
from fsserve.methods.base import AdaptedModel
from fsserve.methods.config import MethodConfig
from fsserve.methods.soft_prompt import check_room

logger = logging.getLogger(__name__)


def attention_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of an HF config, across the families' attribute names."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return layers, kv_heads, head_dim


class PrefixTuningModel(AdaptedModel):
    """A frozen LM whose every attention layer also attends to ``num_virtual_tokens`` learned keys and values.

    >>> model = PromptModel.from_pretrained("embedded", prompt=prompt, method="prefix-tuning")  # doctest: +SKIP
    >>> model.eval().prefixes().shape  # doctest: +SKIP
    torch.Size([18, 2, 1, 10, 256])
    """

    adaptation = "prefix-tuning"

    def __init__(self, lm: nn.Module, tokenizer: Any, prompt: PromptConfig, kind: str | None = None, config: MethodConfig | None = None) -> None:
        super().__init__(lm, tokenizer, prompt, kind=kind, config=config)
        self._folded: torch.Tensor | None = None
        from peft import PrefixEncoder, PrefixTuningConfig

        cfg = self.method_config
        check_room(self.lm, prompt, cfg.num_virtual_tokens)
        self.num_layers, self.kv_heads, self.head_dim = attention_shape(self.lm.config)
        peft_config = PrefixTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens, token_dim=self.kv_heads * self.head_dim, num_layers=self.num_layers,
            encoder_hidden_size=cfg.prefix_hidden, prefix_projection=True, num_transformer_submodules=1,
        )
        self.prefix_encoder = PrefixEncoder(peft_config)
        self.register_buffer("prefix_tokens", torch.arange(cfg.num_virtual_tokens), persistent=False)
        self.num_virtual_tokens = cfg.num_virtual_tokens
        self.train(self.training)

    def computed_prefixes(self) -> torch.Tensor:
        """Run the reparameterisation: (layers, 2, kv_heads, n, head_dim) keys and values."""
        flat = self.prefix_encoder(self.prefix_tokens)  # (n, layers * 2 * kv_heads * head_dim)
        n = self.num_virtual_tokens
        return flat.view(n, self.num_layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)

    def prefixes(self) -> torch.Tensor:
        """The prefixes in use: recomputed while training, the folded constant otherwise."""
        return self.computed_prefixes() if self._folded is None else self._folded

    def train(self, mode: bool = True) -> PrefixTuningModel:
        """Switch mode; leaving training folds the MLP into a constant tensor (what export traces)."""
        super().train(mode)
        if hasattr(self, "prefix_encoder"):
            if mode:
                self._folded = None
            else:
                with torch.no_grad():
                    self._folded = self.computed_prefixes().detach().clone()
        return self

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the LM with the prefixes pre-filled in its key/value cache; (B, S, H) states of the real tokens."""
        from transformers import DynamicCache

        prefixes = self.prefixes().to(self.lm.dtype)
        batch = input_ids.shape[0]
        cache = DynamicCache(config=self.lm.config)
        for layer in range(self.num_layers):
            keys, values = (prefixes[layer, i].unsqueeze(0).expand(batch, -1, -1, -1) for i in (0, 1))
            cache.update(keys, values, layer)
        ones = torch.ones_like(attention_mask[:, :1]).expand(-1, self.num_virtual_tokens)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.cat([ones, attention_mask], dim=1), "cache": cache}
        if token_type_ids is not None and self.uses_token_types:
            kwargs["token_type_ids"] = token_type_ids
        if self.kind == "causal":
            # Real tokens keep positions 0.. as without a prefix; the prefix keys carry no position.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.backbone(**kwargs).last_hidden_state
