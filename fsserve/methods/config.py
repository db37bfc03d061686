"""MethodConfig: the shape of a light adaptation (probe, soft prompt, prefix, LoRA), saved with the model as JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fsserve.config import _JsonConfig

HEADS = ("label-words", "classifier")
POOLINGS = ("auto", "cls", "mean", "last")
PROMPT_INITS = ("vocab", "random")
LORA_TARGETS = ("all", "attention", "mlp")


@dataclass
class MethodConfig(_JsonConfig):
    """Hyper-parameters that fix an adaptation's trainable structure (what is saved, not how it is optimised).

    One flat dataclass for every method, so it round-trips through one JSON object and ``key=value``
    options on the command line; each method reads only its own fields.

    >>> MethodConfig(num_virtual_tokens=20).num_virtual_tokens
    20
    >>> MethodConfig.from_options(["layer=6", "pooling=mean"]).layer
    6
    """

    head: str = "label-words"
    dropout: float = 0.1
    # probing
    layer: int = -1
    pooling: str = "auto"
    probe_hidden: int = 0
    # prompt tuning and prefix tuning
    num_virtual_tokens: int = 10
    prompt_init: str = "vocab"
    prefix_hidden: int = 512
    # LoRA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "all"

    def __post_init__(self) -> None:
        checks = {"head": HEADS, "pooling": POOLINGS, "prompt_init": PROMPT_INITS, "lora_targets": LORA_TARGETS}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("num_virtual_tokens", "prefix_hidden", "lora_r", "lora_alpha"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.probe_hidden < 0:
            raise ValueError(f"probe_hidden must be 0 (a linear probe) or a positive MLP width, got {self.probe_hidden}")
        for name in ("dropout", "lora_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_options(cls, options: list[str] | None, base: dict[str, Any] | None = None) -> MethodConfig:
        """Build from ``key=value`` strings (the CLI's ``--method-option``), casting to each field's type."""
        values: dict[str, Any] = dict(base or {})
        defaults = cls().to_dict()
        for option in options or []:
            key, sep, raw = option.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in defaults:
                raise ValueError(f"bad method option {option!r}: use key=value with key one of {', '.join(sorted(defaults))}")
            kind = type(defaults[key])
            try:
                values[key] = kind(raw) if kind is not str else raw
            except ValueError as exc:
                raise ValueError(f"method option {key} needs a {kind.__name__}, got {raw!r}") from exc
        return cls.from_dict(values)
