"""The probe-layers report: one probe per layer of a frozen LM, accuracy by layer.

The LM is frozen and runs without dropout, so each layer's pooled features are computed once for
all examples; every layer's probe then trains on those cached features with the Trainer's recipe
(AdamW, linear decay, cross-entropy, best-on-dev), which gives the same probe as training a
``ProbeModel`` on that layer, at a fraction of the cost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fsserve.config import TrainingArguments
from fsserve.methods.probe import ProbeHead, ProbeModel, pool
from fsserve.training import set_seed

logger = logging.getLogger(__name__)


@dataclass
class LayerScore:
    """One layer's probe: its dev accuracy (used to pick a layer) and, when given, its test accuracy."""

    layer: int
    dev: float | None
    test: float | None


@torch.no_grad()
def layer_features(model: ProbeModel, examples: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
    """Pooled features of every layer for every example: (layers + 1, N, H), in the examples' order."""
    model.eval()
    encoded = model.encode(examples)
    out: torch.Tensor | None = None
    device = next(model.parameters()).device
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in model.collate(encoded[start : start + batch_size]).items()}
        states = model.layer_states(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        pooled = torch.stack([pool(s, batch["attention_mask"], model.pooling) for s in states]).float().cpu()
        if out is None:
            out = torch.empty(pooled.shape[0], len(encoded), pooled.shape[-1])
        out[:, start : start + pooled.shape[1]] = pooled
    if out is None:
        raise ValueError("no examples to compute features for")
    return out


def _accuracy(head: ProbeHead, features: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of examples whose argmax matches the target."""
    head.eval()
    with torch.no_grad():
        return float((head(features).argmax(-1) == targets).float().mean())


def fit_probe(features: torch.Tensor, targets: torch.Tensor, num_labels: int, args: TrainingArguments, hidden: int = 0,
              dev: tuple[torch.Tensor, torch.Tensor] | None = None, dropout: float = 0.1) -> tuple[ProbeHead, float | None]:
    """Train one probe head on cached features; keep the best dev weights. Returns (head, best dev accuracy)."""
    set_seed(args.seed)
    head = ProbeHead(features.shape[-1], num_labels, hidden, dropout)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (args.max_steps - step) / max(1, args.max_steps)))
    generator = torch.Generator().manual_seed(args.seed)
    order: list[int] = []
    best, best_state = None, None
    for step in range(1, args.max_steps + 1):
        if len(order) < args.batch_size:
            order.extend(torch.randperm(len(targets), generator=generator).tolist())
        idx, order = order[: args.batch_size], order[args.batch_size :]
        head.train()
        loss = F.cross_entropy(head(features[idx]), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if dev is not None and (step % args.eval_steps == 0 or step == args.max_steps):
            score = _accuracy(head, *dev)
            if best is None or score > best:
                best, best_state = score, {k: v.clone() for k, v in head.state_dict().items()}
    if best_state is not None:
        head.load_state_dict(best_state)
    return head.eval(), best


def probe_layers(model: ProbeModel, train: Sequence[Any], dev: Sequence[Any], args: TrainingArguments,
                 test: Sequence[Any] | None = None) -> list[LayerScore]:
    """Train one probe per layer (0 = embeddings) on the frozen LM; dev (and test) accuracy by layer."""
    if model.prompt_config.is_regression:
        raise ValueError("probe-layers reports accuracy; it takes classification tasks, not regression")
    if not train:
        raise ValueError("probe-layers needs training examples")
    index = {label: i for i, label in enumerate(model.labels)}

    def targets(examples: Sequence[Any]) -> torch.Tensor:
        return torch.tensor([index[str(ex.label)] for ex in examples], dtype=torch.long)

    sets = {"train": train, "dev": dev, "test": test or []}
    features = {name: layer_features(model, rows, args.eval_batch_size) for name, rows in sets.items() if rows}
    labels = {name: targets(rows) for name, rows in sets.items() if rows}
    cfg = model.method_config
    scores = []
    for layer in range(features["train"].shape[0]):
        dev_set = (features["dev"][layer], labels["dev"]) if "dev" in features else None
        head, dev_score = fit_probe(features["train"][layer], labels["train"], len(model.labels), args, cfg.probe_hidden, dev_set, cfg.dropout)
        test_score = _accuracy(head, features["test"][layer], labels["test"]) if "test" in features else None
        logger.info("layer %d: dev %s, test %s", layer, dev_score, test_score)
        scores.append(LayerScore(layer, dev_score, test_score))
    return scores


def best_layer(scores: Sequence[LayerScore]) -> int:
    """The layer with the best dev accuracy (the later layer on a tie); never chosen on test."""
    if not scores or any(s.dev is None for s in scores):
        raise ValueError("choosing a layer needs dev scores for every layer")
    return max(scores, key=lambda s: (s.dev, s.layer)).layer
