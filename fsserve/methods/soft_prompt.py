"""Prompt tuning (Lester et al., 2021): n learned virtual-token embeddings prepended to every input, the LM frozen.

The soft prompt is PEFT's ``PromptEmbedding`` (initialised from sampled vocabulary embeddings, or
randomly). It goes before the whole prompt, so the template and the label-word head (or a
classification head at the answer position) work unchanged; the virtual positions are cut off
again before the head, so ``answer_pos`` keeps indexing the real tokens. At export the embedding
is a constant of the graph.
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


def check_room(lm: nn.Module, prompt: PromptConfig, extra: int) -> None:
    """Refuse virtual tokens that would push the longest prompt past the LM's position table."""
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit is not None and prompt.max_length + extra > int(limit):
        raise ValueError(f"max_length {prompt.max_length} + {extra} virtual tokens exceeds the LM's {limit} positions; lower max_length")


class PromptTuningModel(AdaptedModel):
    """A frozen LM reading ``num_virtual_tokens`` trained embeddings before each prompt.

    >>> model = PromptModel.from_pretrained("embedded", prompt=prompt, method="prompt-tuning",  # doctest: +SKIP
    ...                                     method_config={"num_virtual_tokens": 20})
    """

    adaptation = "prompt-tuning"

    def __init__(self, lm: nn.Module, tokenizer: Any, prompt: PromptConfig, kind: str | None = None, config: MethodConfig | None = None) -> None:
        super().__init__(lm, tokenizer, prompt, kind=kind, config=config)
        from peft import PromptEmbedding, PromptTuningConfig, PromptTuningInit

        cfg = self.method_config
        check_room(self.lm, prompt, cfg.num_virtual_tokens)
        embeddings = self.lm.get_input_embeddings()
        init = PromptTuningInit.SAMPLE_VOCAB if cfg.prompt_init == "vocab" else PromptTuningInit.RANDOM
        peft_config = PromptTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens, token_dim=embeddings.embedding_dim,
            num_transformer_submodules=1, prompt_tuning_init=init,
        )
        self.soft_prompt = PromptEmbedding(peft_config, embeddings)
        self.num_virtual_tokens = cfg.num_virtual_tokens

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the LM on [soft prompt; prompt] and return the (B, S, H) states of the real tokens only."""
        n = self.num_virtual_tokens
        embedded = self.lm.get_input_embeddings()(input_ids)  # includes a family's own scaling (Gemma's √H)
        soft = self.soft_prompt.embedding.weight.to(embedded.dtype).unsqueeze(0).expand(embedded.shape[0], -1, -1)
        ones = torch.ones_like(attention_mask[:, :1]).expand(-1, n)
        mask = torch.cat([ones, attention_mask], dim=1)
        kwargs: dict[str, Any] = {"inputs_embeds": torch.cat([soft, embedded], dim=1), "attention_mask": mask}
        if token_type_ids is not None and self.uses_token_types:
            kwargs["token_type_ids"] = torch.cat([torch.zeros_like(ones), token_type_ids], dim=1)
        if self.kind == "causal":
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.backbone(**kwargs).last_hidden_state[:, n:]
