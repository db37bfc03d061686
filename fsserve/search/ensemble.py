"""Prompt ensembles: several prompts (templates × label words) whose label logits are averaged, served as one graph.

A batch holds ``P`` rows per example, one per member prompt, example-major (row ``i·P + p`` is
example ``i`` under prompt ``p``). When the members share one LM (built with :meth:`PromptEnsemble.from_prompts`
and trained jointly) the LM runs once over all ``B·P`` rows; members trained separately each run
their own LM on their own rows. Each member's label-word head scores its rows and the ensemble
averages them: ``(B, num_labels)``, the same function as ``PromptModel.forward``. The exporter
traces exactly this forward, so the ONNX graph computes every prompt in one batch;
``rows_per_example`` tells it to trace and validate on whole examples.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fsserve.config import DemoConfig, PromptConfig
from fsserve.heads import LabelWordHead, tracing
from fsserve.modeling import FORMAT_VERSION, MODEL_CONFIG, PromptModel
from fsserve.prompts import Encoded
from fsserve.utils.atomic import atomic_directory, write_json_atomic

logger = logging.getLogger(__name__)

COMBINES = ("logits", "log_probs")


@dataclass
class EncodedGroup:
    """One example encoded by every member prompt (what :meth:`PromptEnsemble.collate` flattens)."""

    members: list[Encoded]

    @property
    def length(self) -> int:
        """The longest member encoding, for batching examples of similar length together."""
        return max(len(e.input_ids) for e in self.members)


class PromptEnsemble(nn.Module):
    """Several prompts over one LM (or several LMs of one tokenizer) whose label logits are averaged.

    >>> ensemble = PromptEnsemble.from_prompts("embedded", [  # doctest: +SKIP
    ...     PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}),
    ...     PromptConfig("{sent_0} A {mask} film.", {"0": "bad", "1": "good"})])
    >>> ensemble.predict(["A gorgeous, moving film."])  # doctest: +SKIP
    ['1']
    """

    def __init__(self, members: Sequence[PromptModel], combine: str = "logits") -> None:
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member prompt model")
        if combine not in COMBINES:
            raise ValueError(f"unknown combine {combine!r}: use one of {', '.join(COMBINES)}")
        first = members[0]
        for i, m in enumerate(members):
            if m.method != "prompt" or not isinstance(m.head, LabelWordHead):
                raise ValueError(f"member {i} is not a label-word prompt model (method {m.method!r}); ensembles average label logits")
            if m.labels != first.labels:
                raise ValueError(f"member {i} has labels {m.labels}, member 0 has {first.labels}; all members must share one label list")
            if m.kind != first.kind or (m.tokenizer is not first.tokenizer and m.tokenizer.get_vocab() != first.tokenizer.get_vocab()):
                raise ValueError(f"member {i} uses another LM kind or tokenizer; members must read the same token ids")
            if m.demo_index is not None:
                raise ValueError(f"member {i} has demonstrations attached; ensembles of demonstration prompts are not supported")
            if m.prompt_config.is_regression:
                raise ValueError("ensembles are for classification prompts, not regression")
        self.members = nn.ModuleList(members)
        self.combine = combine
        self.method = "prompt"
        self.kind = first.kind
        self.labels = list(first.labels)
        self.tokenizer = first.tokenizer
        self.lm = first.lm
        self.pad_token_id = first.pad_token_id
        self.uses_token_types = first.uses_token_types
        self.rows_per_example = len(members)
        self.shared_lm = all(m.lm is first.lm for m in members)
        self.demo_index = None
        self.demo_config = DemoConfig()
        self.source = getattr(first, "source", None)
        self.eval()

    @classmethod
    def from_prompts(cls, lm: str | Path | PromptModel, prompts: Sequence[PromptConfig], combine: str = "logits") -> PromptEnsemble:
        """One LM shared by every prompt (zero-shot, or trained jointly with a Trainer): the LM runs once per batch."""
        if not prompts:
            raise ValueError("give at least one PromptConfig")
        base = lm if isinstance(lm, PromptModel) else PromptModel.from_pretrained(lm, prompt=prompts[0])
        members = [PromptModel(base.lm, base.tokenizer, p, kind=base.kind) for p in prompts]
        for m in members:
            m.source = getattr(base, "source", None)
        return cls(members, combine)

    @property
    def prompt_config(self) -> PromptConfig:
        """The first member's prompt with the longest member's max_length (what padding and export read)."""
        first = self.members[0].prompt_config
        return dataclasses.replace(first, max_length=max(m.prompt_config.max_length for m in self.members))

    @property
    def head_outputs(self) -> int:
        """Width of the ensemble's output: one logit per label."""
        return len(self.labels)

    # -- encoding -------------------------------------------------------------------------
    def encode(self, examples: Sequence[Any], demo_mode: str | None = None, rng: Any = None, embeddings: Any = None) -> list[EncodedGroup]:
        """Encode every example with every member prompt: one group of P encodings per example."""
        per_member = [m.prompt.encode(examples) for m in self.members]
        return [EncodedGroup([encoded[i] for encoded in per_member]) for i in range(len(examples))]

    def collate(self, groups: Sequence[EncodedGroup], pad_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad a batch of groups into B·P example-major rows (the layout the forward and the graph expect)."""
        return self.members[0].collate([e for g in groups for e in g.members], pad_side=pad_side)

    # -- the forward ----------------------------------------------------------------------
    def member_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each member's label logits on its own rows: (B, P, num_labels)."""
        n = len(self.members)
        if not self.shared_lm:
            types = [None if token_type_ids is None else token_type_ids[p::n] for p in range(n)]
            return torch.stack([m(input_ids[p::n], attention_mask[p::n], answer_pos[p::n], types[p]) for p, m in enumerate(self.members)], 1)
        hidden = self.members[0].hidden_at_answer(input_ids, attention_mask, answer_pos, token_type_ids)  # one LM pass, B·P rows
        fused = not torch.is_grad_enabled() and not tracing() and all(m.use_fused_head and m.head.fusable for m in self.members)
        if fused:  # the fused op gathers at answer_pos; the states are already gathered, so each row answers at 0
            zeros = torch.zeros(hidden.shape[0] // n, dtype=torch.long, device=hidden.device)
            return torch.stack([m.head.fused(hidden[p::n].unsqueeze(1).contiguous(), zeros) for p, m in enumerate(self.members)], 1)
        return torch.stack([m.head(hidden[p::n]) for p, m in enumerate(self.members)], 1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_pos: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the (B, num_labels) ensemble label logits from B·P example-major rows."""
        logits = self.member_logits(input_ids, attention_mask, answer_pos, token_type_ids)
        if self.combine == "log_probs":
            logits = torch.log_softmax(logits.float(), dim=-1)
        return logits.mean(1)

    label_logits = forward

    @torch.no_grad()
    def predict_logits(self, examples: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """Ensemble label logits for many examples, batched by length."""
        was_training = self.training
        self.eval()
        groups = self.encode(examples)
        order = sorted(range(len(groups)), key=lambda i: groups[i].length)
        out = torch.empty(len(groups), len(self.labels))
        device = next(self.parameters()).device
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in self.collate([groups[i] for i in idx]).items()}
            out[idx] = self(**batch).float().cpu()
        self.train(was_training)
        return out

    def scores_to_predictions(self, logits: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        """Probabilities and predicted labels from ensemble logits."""
        return self.members[0].scores_to_predictions(logits)

    def predict_proba(self, examples: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """Class probabilities (B, num_labels)."""
        return self.scores_to_predictions(self.predict_logits(examples, batch_size))[0]

    def predict(self, examples: Sequence[Any], batch_size: int = 32) -> list[Any]:
        """Predicted labels."""
        return self.scores_to_predictions(self.predict_logits(examples, batch_size))[1]

    def freeze(self, embeddings: bool = False) -> None:
        """Freeze every member LM's embeddings (the Trainer's ``freeze_embeddings``)."""
        for m in self.members:
            m.freeze(embeddings=embeddings)

    # -- saving, loading, export -----------------------------------------------------------
    def _lm_owners(self) -> list[int]:
        """For each member, the index of the first member holding the same LM (whose folder stores it)."""
        return [next(j for j in range(i + 1) if self.members[j].lm is m.lm) for i, m in enumerate(self.members)]

    def metadata(self) -> dict[str, Any]:
        """What a saved ensemble or its bundle records: every member's prompt and which folder holds its LM."""
        members = [
            {"prompt": m.prompt_config.to_dict(), "label_word_ids": m.prompt.label_word_ids, "word_to_class": m.prompt.word_to_class, "lm": f"member_{owner}"}
            for m, owner in zip(self.members, self._lm_owners())
        ]
        return {
            "format_version": FORMAT_VERSION,
            "method": "prompt",
            "kind": self.kind,
            "labels": self.labels,
            "model_type": self.lm.config.model_type,
            "source": self.source,
            "demos": None,
            "ensemble": {"combine": self.combine, "members": members},
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """Write each distinct LM once (as a saved PromptModel) and the ensemble's JSON, atomically."""
        with atomic_directory(directory) as tmp:
            for i, owner in enumerate(self._lm_owners()):
                if owner == i:
                    self.members[i].save_pretrained(tmp / f"member_{i}")
            write_json_atomic(tmp / MODEL_CONFIG, self.metadata())

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PromptEnsemble:
        """Load an ensemble written by :meth:`save_pretrained` (LMs shared again where they were)."""
        path = Path(directory)
        try:
            meta = json.loads((path / MODEL_CONFIG).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path / MODEL_CONFIG} is not a readable saved ensemble: {exc}") from exc
        if not isinstance(meta.get("ensemble"), dict):
            raise ValueError(f"{path} holds a single prompt model, not an ensemble; load it with PromptModel.from_pretrained")
        loaded: dict[str, PromptModel] = {}
        members = []
        for record in meta["ensemble"]["members"]:
            folder = record["lm"]
            prompt = PromptConfig.from_dict(record["prompt"])
            if folder not in loaded:
                loaded[folder] = PromptModel.from_pretrained(path / folder)
                members.append(loaded[folder])
            else:
                base = loaded[folder]
                members.append(PromptModel(base.lm, base.tokenizer, prompt, kind=base.kind))
        return cls(members, meta["ensemble"]["combine"])

    def export(self, directory: str | Path, format: str = "onnx", **kwargs: Any) -> Path:
        """Write one bundle whose graph computes every member prompt in one batch (validated against torch)."""
        from fsserve.exporters.bundle import export_bundle

        if kwargs.get("validation_texts") is not None:
            raise ValueError("validation_texts are not supported for ensembles yet; the random shape grid validates them")
        return export_bundle(self, directory, format=format, **kwargs)
