"""PromptModel: an encoder MLM or a decoder LM with a label-word (or classification) head.

Class scores come from the LM's logits of the label words at the answer position (the ``[MASK]``
for an encoder, the last prompt token for a decoder), computed from only those words' rows of
the output embedding: the B × seq × vocab logits of the plain HF forward are never formed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fsserve.config import ADAPTATION_METHODS, DEMO_MAX_LENGTH, DemoConfig, PromptConfig
from fsserve.heads import ClassificationHead, LabelWordHead, mlm_head_parts, tracing
from fsserve.prompts import Encoded, Prompt
from fsserve.utils.atomic import atomic_directory, write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_CONFIG = "fsserve.json"
HEAD_WEIGHTS = "head.safetensors"
LM_DIR = "lm"
DEMOS_DIR = "demos"


def detect_kind(config: Any) -> str:
    """Decide ``mlm`` or ``causal`` from an HF config: masked-LM families stay encoders unless ``is_decoder``."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{config.model_type} is an encoder-decoder model; PromptModel takes an encoder MLM or a decoder LM "
            "(T5-family models are used for template search)"
        )
    model_type = config.model_type
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "mlm"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "mlm"
    raise ValueError(f"model type {model_type!r} is neither a masked LM nor a causal LM known to transformers")


class PromptModel(nn.Module):
    """A pretrained LM adapted to classify through a template and label words (LM-BFF).

    ``method`` is ``"prompt"`` (label-word head; also zero-shot before training) or
    ``"finetune"`` (standard fine-tuning: a new linear head on the CLS / last token).

    >>> from fsserve import PromptModel, PromptConfig
    >>> model = PromptModel.from_pretrained(  # doctest: +SKIP
    ...     "embedded", prompt=PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}))
    >>> model.predict_proba(["A delight from start to finish."])  # doctest: +SKIP
    """

    def __init__(self, lm: nn.Module, tokenizer: Any, prompt: PromptConfig, method: str = "prompt", kind: str | None = None) -> None:
        super().__init__()
        if method not in ("prompt", "finetune", "zero-shot"):
            raise ValueError(f"unknown method {method!r}: choose prompt, finetune or zero-shot")
        self.lm = lm
        self.tokenizer = tokenizer
        self.prompt_config = prompt
        self.method = "prompt" if method == "zero-shot" else method
        self.kind = kind or detect_kind(lm.config)
        self.labels: list[str] = list(prompt.labels or [])
        self.backbone = lm.base_model
        self.prompt = Prompt(prompt, tokenizer, self.kind)
        self.uses_token_types = "token_type_ids" in _forward_args(self.backbone) and getattr(lm.config, "type_vocab_size", 0) > 1
        if self.method == "prompt":
            if self.kind == "mlm":
                transform, decoder = mlm_head_parts(lm)
            else:
                transform, decoder = None, lm.get_output_embeddings()
            softcap = getattr(lm.config, "final_logit_softcapping", None) if self.kind == "causal" else None
            self.head: nn.Module = LabelWordHead(
                decoder, self.prompt.label_word_ids, self.prompt.word_to_class, len(self.labels), transform, softcap
            )
        else:
            outputs = 1 if prompt.is_regression else len(self.labels)
            self.head = ClassificationHead(lm.config.hidden_size, outputs)
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        self.pad_token_id = int(tokenizer.pad_token_id)
        # Inference goes through fsserve.kernels.label_logits (Triton on CUDA, its torch reference elsewhere).
        self.use_fused_head = True
        self.demo_index: Any = None
        self.demo_config = DemoConfig()
        self.demo_prompt: Any = None
        self.eval()  # like HF's from_pretrained: inference mode until a Trainer says otherwise

    def attach_demos(self, index: Any, config: DemoConfig | None = None) -> None:
        """Append demonstrations of every class from this pool (a ``DemoIndex``) to every prompt, in ``config``'s format; ``None`` removes them."""
        if index is not None:
            if self.method != "prompt":
                raise ValueError("demonstrations go with the prompt method, not standard fine-tuning")
            classes = [str(c) for c in index.classes]
            expected = ["0", "1"] if self.prompt_config.is_regression else self.labels
            if classes != expected:
                raise ValueError(f"the demonstration pool's classes {classes} do not match the model's labels {expected}")
            from fsserve.demos.prompting import DemoPrompt

            self.demo_prompt = DemoPrompt.from_config(self.prompt, config or self.demo_config)
        else:
            self.demo_prompt = None
        self.demo_index = index
        self.demo_config = config or self.demo_config
        if index is not None and len(index):
            self._warn_if_demos_cut()

    def _warn_if_demos_cut(self, most: int = 256) -> None:
        """Warn when max_length cuts the pool's own prompts with demonstrations: a silent cut costs accuracy."""
        index, config = self.demo_index, self.demo_config
        rows = np.unique(np.linspace(0, len(index) - 1, num=min(most, len(index))).astype(int))
        try:
            encoded = self.demo_prompt.encode_selected(index, [index.examples[i] for i in rows], "top1", config.filter_rate,
                                                       embeddings=index.embeddings[rows])
        except ValueError as err:  # a pool member never demonstrates itself: a class of one has nothing left to check with
            logger.debug("demonstration length not checked: %s", err)
            return
        cut = sum(e.cut > 0 for e in encoded)
        if cut:
            longest = max(len(e.input_ids) + e.cut for e in encoded)
            logger.warning("max_length %d cuts %d of %d training prompts with demonstrations (the longest needs %d tokens): "
                           "their sentences are truncated; raise the prompt's max_length (fsserve.config.DEMO_MAX_LENGTH is %d)",
                           self.prompt_config.max_length, cut, len(encoded), longest, DEMO_MAX_LENGTH)
    # -- loading and saving ---------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | Path | None = None,
        prompt: PromptConfig | dict[str, Any] | None = None,
        method: str = "prompt",
        kind: str = "auto",
        torch_dtype: torch.dtype = torch.float32,
        method_config: Any = None,
    ) -> PromptModel:
        """Load a saved PromptModel folder, or wrap any HF encoder/decoder (hub name, path, ``"embedded"``).

        ``method`` may also be one of ``ADAPTATION_METHODS`` (probe, prompt-tuning, prefix-tuning,
        lora), configured by ``method_config`` (a ``fsserve.methods.MethodConfig`` or a dict).
        """
        path = Path(str(name_or_dir)) if name_or_dir is not None else None
        if path is not None and (path / MODEL_CONFIG).is_file():
            return cls._load_saved(path, torch_dtype)
        if path is not None and path.is_dir() and not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a saved fsserve model (no {MODEL_CONFIG}) nor a transformers model folder")
        if prompt is None:
            raise ValueError("a prompt (PromptConfig with template and label words) is needed to wrap a pretrained LM")
        if isinstance(prompt, dict):
            prompt = PromptConfig.from_dict(prompt)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

        from fsserve.embedded import resolve_model_path

        source = resolve_model_path(None if name_or_dir is None else str(name_or_dir))
        config = AutoConfig.from_pretrained(source)
        resolved_kind = detect_kind(config) if kind == "auto" else kind
        auto = AutoModelForMaskedLM if resolved_kind == "mlm" else AutoModelForCausalLM
        logger.info("loading %s as a %s LM", source, resolved_kind)
        lm = auto.from_pretrained(source, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
        if method in ADAPTATION_METHODS:
            from fsserve.methods import adapt

            model = adapt(lm, tokenizer, prompt, method, kind=resolved_kind, config=method_config)
        else:
            model = cls(lm, tokenizer, prompt, method=method, kind=resolved_kind)
        model.source = str(name_or_dir)
        return model

    @classmethod
    def _load_saved(cls, path: Path, torch_dtype: torch.dtype) -> PromptModel:
        """Rebuild a model written by :meth:`save_pretrained` (safetensors and JSON only)."""
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

        try:
            meta = json.loads((path / MODEL_CONFIG).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path / MODEL_CONFIG} is not readable JSON: {exc}") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} was saved with format version {meta.get('format_version')}, this fsserve reads {FORMAT_VERSION}")
        if not (path / LM_DIR / "config.json").is_file():
            raise ValueError(f"{path} is not a complete saved fsserve model: {LM_DIR}/config.json is missing")
        auto = AutoModelForMaskedLM if meta["kind"] == "mlm" else AutoModelForCausalLM
        lm = auto.from_pretrained(path / LM_DIR, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path / LM_DIR)
        if meta["method"] in ADAPTATION_METHODS:
            from fsserve.methods import restore

            model = restore(lm, tokenizer, PromptConfig.from_dict(meta["prompt"]), meta, path)
        else:
            model = cls(lm, tokenizer, PromptConfig.from_dict(meta["prompt"]), method=meta["method"], kind=meta["kind"])
        if meta["method"] == "finetune":
            from safetensors.torch import load_file

            state = load_file(str(path / HEAD_WEIGHTS))
            model.head.load_state_dict(state)
        if meta.get("demos"):
            from fsserve.demos import DemoIndex

            model.attach_demos(DemoIndex.load(path / meta["demos"]["dir"]), DemoConfig.from_dict(meta["demos"]["config"]))
        model.source = meta.get("source")
        model.eval()
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the LM, tokenizer, head and prompt atomically (safetensors + JSON, no pickle)."""
        with atomic_directory(directory) as tmp:
            self.lm.save_pretrained(tmp / LM_DIR, safe_serialization=True, state_dict=self.lm_state_for_save())
            self.tokenizer.save_pretrained(tmp / LM_DIR)
            self.save_method_files(tmp)
            if self.method == "finetune":
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, str(tmp / HEAD_WEIGHTS))
            if self.demo_index is not None:
                self.demo_index.save(tmp / DEMOS_DIR)
            write_json_atomic(tmp / MODEL_CONFIG, self.metadata())

    def lm_state_for_save(self) -> dict[str, torch.Tensor] | None:
        """The LM weights to save (None: the LM's own); adaptations that inject layers return the clean base."""
        return None

    def save_method_files(self, folder: Path) -> None:
        """Hook for fsserve.methods: write an adaptation's trained tensors next to the LM (nothing here)."""

    def metadata(self) -> dict[str, Any]:
        """What a saved model or bundle records about this model besides its weights."""
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "kind": self.kind,
            "labels": self.labels,
            "prompt": self.prompt_config.to_dict(),
            "label_word_ids": self.prompt.label_word_ids,
            "word_to_class": self.prompt.word_to_class,
            "model_type": self.lm.config.model_type,
            "source": getattr(self, "source", None),
            "demos": None if self.demo_index is None else {"dir": DEMOS_DIR, "config": self.demo_config.to_dict()},
        }

    def export(self, directory: str | Path, format: str = "onnx", **kwargs: Any) -> Path:
        """Write a self-contained bundle (ONNX graph of the label logits, tokenizer, prompt, manifest)."""
        if format not in ("onnx", "tensorrt"):
            raise ValueError(f"unknown export format {format!r}: use 'onnx' or 'tensorrt'")
        from fsserve.exporters.bundle import export_bundle

        return export_bundle(self, directory, format=format, **kwargs)

    # -- encoding -------------------------------------------------------------------------
    def encode(
        self, examples: Sequence[Any], demo_mode: str | None = None, rng: Any = None, embeddings: Any = None
    ) -> list[Encoded]:
        """Tokenize examples for this model's method (a prompt, with demonstrations if attached, or plain text)."""
        if self.method == "prompt" and self.demo_index is not None:
            mode = demo_mode or self.demo_config.eval_mode
            return self.demo_prompt.encode_selected(self.demo_index, examples, mode, self.demo_config.filter_rate, rng, embeddings)
        if self.method == "prompt":
            return self.prompt.encode(examples)
        from fsserve.prompts.plain import encode_plain

        return encode_plain(self.tokenizer, examples, self.prompt.template.num_sentences, self.prompt_config.max_length, self.kind)

    def collate(self, encoded: Sequence[Encoded], pad_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad a batch into tensors: input_ids, attention_mask, answer_pos (and token_type_ids)."""
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        types = torch.zeros((len(encoded), width), dtype=torch.long)
        answer = torch.empty(len(encoded), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            start = 0 if pad_side == "right" else width - n
            ids[i, start : start + n] = torch.tensor(e.input_ids)
            mask[i, start : start + n] = 1
            types[i, start : start + n] = torch.tensor(e.token_type_ids)
            answer[i] = start + e.answer_pos
        batch = {"input_ids": ids, "attention_mask": mask, "answer_pos": answer}
        if self.uses_token_types:
            batch["token_type_ids"] = types
        return batch

    # -- the forward ----------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the LM body only (no vocabulary projection): (B, S, H) last hidden states."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.uses_token_types:
            kwargs["token_type_ids"] = token_type_ids
        if self.kind == "causal":
            # Positions count real tokens only, so left- and right-padded batches give the same answer.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            kwargs["use_cache"] = False  # one forward, no generation: a key/value cache is only work (and graph memory)
        hidden = self.backbone(**kwargs).last_hidden_state
        return hidden

    def hidden_at_answer(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the LM body (no vocabulary projection) and take each row's state at its answer position."""
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, answer_pos]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the (B, num_labels) label logits: the one function every backend implements."""
        head = self.head
        if self.use_fused_head and isinstance(head, LabelWordHead) and head.fusable and not torch.is_grad_enabled() and not tracing():
            return head.fused(self.hidden_states(input_ids, attention_mask, token_type_ids), answer_pos)
        return head(self.hidden_at_answer(input_ids, attention_mask, answer_pos, token_type_ids))

    label_logits = forward

    # -- convenience prediction -----------------------------------------------------------
    @torch.no_grad()
    def predict_logits(self, examples: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """Label logits for many examples, batched by length to waste little padding.

        With sampled demonstrations (LM-BFF's evaluation) each example is encoded ``num_sample`` times,
        by the Predictor's own encoder (per-query seeded draws), and its draws' logits are averaged.
        """
        if not examples:
            return torch.empty(0, self.head_outputs)
        was_training = self.training
        self.eval()
        if self.method == "prompt" and self.demo_index is not None and self.demo_config.eval_mode != "top1":
            from fsserve.demos.prompting import demo_encoder

            encoded = demo_encoder(self.prompt, self.demo_index, self.demo_config)(examples)  # draw by draw
        else:
            encoded = self.encode(examples)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        out = torch.empty(len(encoded), self.head_outputs)
        device = next(self.parameters()).device
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in self.collate([encoded[i] for i in idx]).items()}
            out[idx] = self(**batch).float().cpu()
        self.train(was_training)
        return out.reshape(len(encoded) // len(examples), len(examples), -1).mean(dim=0)

    @property
    def head_outputs(self) -> int:
        """Width of the head's output (num_labels, or 1 for fine-tuned regression)."""
        if self.method == "finetune" and self.prompt_config.is_regression:
            return 1
        return len(self.labels)

    def scores_to_predictions(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        """Turn label logits into probabilities and predicted labels (or values, for regression)."""
        if self.prompt_config.is_regression:
            lo, hi = self.prompt_config.regression_range  # type: ignore[misc]
            if self.head_outputs == 1:
                high = torch.sigmoid(logits[:, 0])
                probs = torch.stack([1 - high, high], dim=-1)
            else:
                probs = torch.softmax(logits, dim=-1)
            values = (lo + (hi - lo) * probs[:, 1]).tolist()
            return probs, values
        probs = torch.softmax(logits, dim=-1)
        return probs, [self.labels[i] for i in probs.argmax(-1).tolist()]

    def predict_proba(self, examples: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """Class probabilities (B, num_labels) for a list of texts or examples."""
        return self.scores_to_predictions(self.predict_logits(examples, batch_size))[0]

    def predict(self, examples: Sequence[Any], batch_size: int = 32) -> list[Any]:
        """Predicted labels (or regression values) for a list of texts or examples."""
        return self.scores_to_predictions(self.predict_logits(examples, batch_size))[1]

    def freeze(self, embeddings: bool = False) -> None:
        """Freeze parts of the LM so a large model trains at a practical speed on a CPU."""
        if embeddings:
            for param in self.lm.get_input_embeddings().parameters():
                param.requires_grad_(False)


def _forward_args(module: nn.Module) -> set[str]:
    """Names the module's forward accepts, to pass token_type_ids only where they exist."""
    import inspect

    return set(inspect.signature(module.forward).parameters)
