"""LoRA (Hu et al., 2021) through PEFT on the attention and MLP projections of a frozen LM, merged at export.

PEFT's ``LoraModel`` injects the low-rank layers into the LM in place, so the model keeps its usual
forward and the label-word head. Only the ``lora_`` tensors are trained and saved; the base LM is
saved unchanged. Export merges a copy (PEFT's ``merge_and_unload``) into a plain prompt model, so
the graph is exactly as large and as fast as the base model's.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsserve.config import PromptConfig
from fsserve.methods.base import AdaptedModel
from fsserve.methods.config import MethodConfig
from fsserve.modeling import PromptModel

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"\.\d+\.")  # a module inside one of the numbered transformer blocks


def lora_targets(lm: nn.Module, which: str = "all") -> list[str]:
    """Full names of the linear projections inside the transformer blocks: attention, MLP, or both."""
    from transformers.pytorch_utils import Conv1D

    names = []
    for name, module in lm.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or not _BLOCK.search(name):
            continue
        attention = "attn" in name or "attention" in name
        if which == "all" or (which == "attention") == attention:
            names.append(name)
    if not names:
        raise ValueError(f"found no {which} projections to adapt in {type(lm).__name__}")
    return names


class _MergedLora(PromptModel):
    """The plain prompt model a LoRA model merges into for export; its metadata remembers where it came from."""

    merged_from: dict[str, Any] = {}

    def metadata(self) -> dict[str, Any]:
        """PromptModel's metadata plus the LoRA settings the weights were merged from."""
        return super().metadata() | {"merged_from": self.merged_from}


class LoraPromptModel(AdaptedModel):
    """A frozen LM with PEFT LoRA layers, scored by the label-word head.

    >>> model = PromptModel.from_pretrained("embedded", prompt=prompt, method="lora",  # doctest: +SKIP
    ...                                     method_config={"lora_r": 8, "lora_targets": "attention"})
    >>> model.export("bundles/lora")  # doctest: +SKIP
    """

    adaptation = "lora"

    def __init__(self, lm: nn.Module, tokenizer: Any, prompt: PromptConfig, kind: str | None = None, config: MethodConfig | None = None) -> None:
        if config is not None and config.head != "label-words":
            raise ValueError("LoRA goes with the label-word head (it merges into a plain prompt model at export); "
                             "use method='finetune' for a classification head on a trained LM")
        super().__init__(lm, tokenizer, prompt, kind=kind, config=config)
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        cfg = self.method_config
        peft_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
            target_modules=lora_targets(self.lm, cfg.lora_targets),
        )
        # PEFT swaps the target layers inside self.lm; the tuner object is kept unregistered (it only
        # holds self.lm again) for merge_and_unload at export.
        self.__dict__["_tuner"] = LoraModel(self.lm, peft_config, "default")
        for name, param in self.lm.named_parameters():
            param.requires_grad_("lora_" in name)

    def is_method_parameter(self, name: str) -> bool:
        """The LoRA matrices, wherever PEFT put them inside the LM."""
        return "lora_" in name

    def lm_state_for_save(self) -> dict[str, torch.Tensor]:
        """The base LM's weights under their original names (without PEFT's wrappers and LoRA matrices)."""
        return {k.replace(".base_layer.", "."): v for k, v in self.lm.state_dict().items() if "lora_" not in k}

    def merged(self) -> PromptModel:
        """A plain PromptModel whose LM has the LoRA products added into its weights (a copy; self is unchanged)."""
        tuner = copy.deepcopy(self.__dict__["_tuner"])
        merged = _MergedLora(tuner.merge_and_unload(safe_merge=True), self.tokenizer, self.prompt_config, method="prompt", kind=self.kind)
        merged.merged_from = {"method": self.adaptation, "method_config": self.method_config.to_dict()}
        merged.source = getattr(self, "source", None)
        merged.attach_demos(self.demo_index, self.demo_config)
        return merged.eval()

    def export(self, directory: str | Path, format: str = "onnx", **kwargs: Any) -> Path:
        """Export the merged model: the same graph as the base LM's, with no LoRA cost at run time."""
        return self.merged().export(directory, format=format, **kwargs)
