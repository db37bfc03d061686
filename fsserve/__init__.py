"""fsserve: train, export and serve prompt-based few-shot text classifiers (LM-BFF), fast.

Public names are imported lazily (PEP 562) so that ``import fsserve`` stays light: the
onnxruntime prediction path never imports torch.

>>> from fsserve import PromptModel, Predictor  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PromptConfig": "fsserve.config",
    "TrainingArguments": "fsserve.config",
    "Template": "fsserve.prompts",
    "Prompt": "fsserve.prompts",
    "Example": "fsserve.data",
    "get_task": "fsserve.data",
    "load_kshot": "fsserve.data",
    "load_examples": "fsserve.data",
    "PromptModel": "fsserve.modeling",
    "Trainer": "fsserve.training",
    "Predictor": "fsserve.predictor",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name on first use, so the package import stays cheap."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fsserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """List the public names for tab completion."""
    return __all__
