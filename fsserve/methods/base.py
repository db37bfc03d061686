"""AdaptedModel: what every light adaptation shares — a frozen LM, a small trained part, its own weights file.

The subclass keeps ``PromptModel.method == "prompt"``: inputs are prompts (template, answer
position) and the output is ``(B, num_labels)``, which is the contract the exporter, the bundle and
the Predictor rely on. Which adaptation it is lives in ``adaptation`` and in the saved JSON's
``method``. Only the adaptation's parameters are trainable; the LM's stay byte for byte as loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsserve.config import PromptConfig
from fsserve.heads import ClassificationHead
from fsserve.methods.config import MethodConfig
from fsserve.modeling import PromptModel

logger = logging.getLogger(__name__)

METHOD_WEIGHTS = "method.safetensors"


class AdaptedModel(PromptModel):
    """Base of the adaptation models: freezes the LM, swaps in a classifier head when asked, saves its tensors.

    >>> model = method_class("prompt-tuning")(lm, tokenizer, prompt, config=MethodConfig())  # doctest: +SKIP
    >>> sorted(model.method_state())[:1]  # doctest: +SKIP
    ['soft_prompt.embedding.weight']
    """

    adaptation = ""

    def __init__(self, lm: nn.Module, tokenizer: Any, prompt: PromptConfig, kind: str | None = None, config: MethodConfig | None = None) -> None:
        super().__init__(lm, tokenizer, prompt, method="prompt", kind=kind)
        self.method_config = config or MethodConfig()
        for param in self.lm.parameters():
            param.requires_grad_(False)
        if self.method_config.head == "classifier":
            self.head = ClassificationHead(self.lm.config.hidden_size, len(self.labels), self.method_config.dropout)

    # -- which tensors are the method's ---------------------------------------------------
    def is_method_parameter(self, name: str) -> bool:
        """Say whether a parameter belongs to the adaptation (everything outside the LM, by default)."""
        return not name.startswith("lm.")

    def method_state(self) -> dict[str, torch.Tensor]:
        """The adaptation's parameters by name: what is trained, saved and loaded."""
        return {name: p for name, p in self.named_parameters() if self.is_method_parameter(name)}

    def save_method_files(self, folder: Path) -> None:
        """Write the adaptation's tensors as safetensors next to the (unchanged) LM."""
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in self.method_state().items()}, str(Path(folder) / METHOD_WEIGHTS))

    def load_method_files(self, folder: Path) -> None:
        """Read the tensors written by :meth:`save_method_files`, refusing a file that does not fit this model."""
        from safetensors.torch import load_file

        path = Path(folder) / METHOD_WEIGHTS
        if not path.is_file():
            raise ValueError(f"{path} is missing: the saved {self.adaptation} model has no method weights")
        saved, own = load_file(str(path)), self.method_state()
        if set(saved) != set(own):
            missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
            raise ValueError(f"{path} does not fit this {self.adaptation} model: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for name, tensor in saved.items():
                if tensor.shape != own[name].shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}")
                own[name].copy_(tensor)
        self.train(self.training)  # let subclasses refresh what they derive from their weights

    def metadata(self) -> dict[str, Any]:
        """PromptModel's metadata with the adaptation named as the method and its config recorded."""
        return super().metadata() | {"method": self.adaptation, "method_config": self.method_config.to_dict()}

    def trainable_parameters(self) -> int:
        """How many numbers training changes (the comparison table's column)."""
        return sum(p.numel() for p in self.method_state().values())
