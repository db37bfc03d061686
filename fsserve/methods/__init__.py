"""Light adaptations of a frozen LM: probing, prompt tuning, prefix tuning and LoRA.

Each is a :class:`fsserve.modeling.PromptModel` subclass: it reads the same prompt encoding, returns
the same ``(B, num_labels)`` scores, trains through the same :class:`fsserve.training.Trainer`,
saves as safetensors + JSON, and exports to the same bundle graph. Build one with
``PromptModel.from_pretrained(name, prompt=..., method="lora", method_config={...})``.

>>> from fsserve.methods import MethodConfig, method_class
>>> method_class("probe").__name__
'ProbeModel'
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from fsserve.config import ADAPTATION_METHODS, PromptConfig
from fsserve.methods.config import MethodConfig

_CLASSES = {
    "probe": ("fsserve.methods.probe", "ProbeModel"),
    "prompt-tuning": ("fsserve.methods.soft_prompt", "PromptTuningModel"),
    "prefix-tuning": ("fsserve.methods.prefix", "PrefixTuningModel"),
    "lora": ("fsserve.methods.lora", "LoraPromptModel"),
}

__all__ = ["ADAPTATION_METHODS", "MethodConfig", "adapt", "method_class", "restore"]


def method_class(method: str) -> type:
    """The PromptModel subclass that implements one adaptation method (imported on first use)."""
    if method not in _CLASSES:
        raise ValueError(f"unknown adaptation method {method!r}: choose one of {', '.join(ADAPTATION_METHODS)}")
    module, name = _CLASSES[method]
    return getattr(importlib.import_module(module), name)


def _as_config(config: MethodConfig | dict[str, Any] | None) -> MethodConfig:
    """Accept a MethodConfig, a plain dict (JSON) or None (the defaults)."""
    if config is None:
        return MethodConfig()
    if isinstance(config, MethodConfig):
        return config
    if isinstance(config, dict):
        return MethodConfig.from_dict(config)
    raise ValueError(f"method_config must be a MethodConfig or a dict, got {type(config).__name__}")


def adapt(lm: Any, tokenizer: Any, prompt: PromptConfig, method: str, kind: str | None = None,
          config: MethodConfig | dict[str, Any] | None = None) -> Any:
    """Wrap a pretrained LM for one adaptation method: the LM frozen, fresh trainable parts added."""
    return method_class(method)(lm, tokenizer, prompt, kind=kind, config=_as_config(config))


def restore(lm: Any, tokenizer: Any, prompt: PromptConfig, meta: dict[str, Any], path: Path) -> Any:
    """Rebuild a saved adapted model from its base LM, its fsserve.json and its method weights."""
    model = adapt(lm, tokenizer, prompt, meta["method"], kind=meta["kind"], config=meta.get("method_config"))
    model.load_method_files(Path(path))
    return model
