"""Trainer: AdamW with a linear schedule, eval every N steps, best-on-dev weights, deterministic seeds.

The loss is cross-entropy over the label logits (the same function that is exported and served),
or for regression LM-BFF's KL form: log-softmax over the two label words against [1 − y′, y′].
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fsserve.config import ADAPTATION_METHODS, TrainingArguments
from fsserve.modeling import PromptModel

logger = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so a run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    """What training did: steps, the best dev score and when, the loss curve, time taken."""

    steps: int = 0
    best_score: float | None = None
    best_step: int | None = None
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    trainable_parameters: int = 0


class Trainer:
    """Train a :class:`PromptModel` on labelled examples, keeping the best weights on dev.

    >>> trainer = Trainer(model, TrainingArguments(max_steps=60), train, dev, metric="acc")  # doctest: +SKIP
    >>> trainer.train().best_score  # doctest: +SKIP
    """

    def __init__(
        self,
        model: PromptModel,
        args: TrainingArguments,
        train_examples: Sequence[Any],
        dev_examples: Sequence[Any] | None = None,
        metric: str = "acc",
    ) -> None:
        if not train_examples and args.method != "zero-shot" and args.max_steps > 0:
            raise ValueError("no training examples were given")
        adaptation = getattr(model, "adaptation", None)
        # evaluate_model scores any model under method "zero-shot"; training must name the model's own method.
        if args.method != "zero-shot" and (args.method in ADAPTATION_METHODS or adaptation is not None) and args.method != adaptation:
            raise ValueError(
                f"TrainingArguments.method is {args.method!r} but the model was built for {adaptation or model.method!r}: "
                f"build it with PromptModel.from_pretrained(..., method={args.method!r})"
            )
        self.model = model
        self.args = args
        self.train_examples = list(train_examples)
        self.dev_examples = list(dev_examples or [])
        self.metric = metric
        labels = set(model.labels)
        if not model.prompt_config.is_regression:
            for ex in self.train_examples + self.dev_examples:
                if str(ex.label) not in labels:
                    raise ValueError(f"label {ex.label!r} of example {ex.text[:60]!r} is not in the label list {model.labels}")

    # -- targets and loss -----------------------------------------------------------------
    def _targets(self, examples: Sequence[Any]) -> torch.Tensor:
        """Class indices, or for regression the value scaled to [0, 1]."""
        cfg = self.model.prompt_config
        if cfg.is_regression:
            lo, hi = cfg.regression_range  # type: ignore[misc]
            return torch.tensor([(float(ex.label) - lo) / (hi - lo) for ex in examples]).clamp(0.0, 1.0)
        index = {label: i for i, label in enumerate(self.model.labels)}
        return torch.tensor([index[str(ex.label)] for ex in examples], dtype=torch.long)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over label logits; LM-BFF's KL to [1 − y′, y′] for regression."""
        if not self.model.prompt_config.is_regression:
            return F.cross_entropy(logits.float(), targets)
        if logits.shape[-1] == 1:
            return F.binary_cross_entropy_with_logits(logits[:, 0].float(), targets.float())
        target = torch.stack([1 - targets, targets], dim=-1).float()
        return F.kl_div(F.log_softmax(logits.float(), dim=-1), target, reduction="batchmean")

    # -- the loop -------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run ``max_steps`` optimiser steps; evaluate every ``eval_steps``; restore the best weights."""
        args = self.args
        result = TrainResult()
        if args.method == "zero-shot" or args.max_steps == 0:
            return result
        set_seed(args.seed)
        model = self.model
        model.freeze(embeddings=args.freeze_embeddings)
        params = [p for p in model.parameters() if p.requires_grad]
        result.trainable_parameters = sum(p.numel() for p in {id(p): p for p in params}.values())
        decay = [p for n, p in model.named_parameters() if p.requires_grad and not _no_decay(n)]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and _no_decay(n)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.learning_rate,
        )
        warmup = int(args.warmup_ratio * args.max_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (step + 1) / max(1, warmup) if step < warmup else max(0.0, (args.max_steps - step) / max(1, args.max_steps - warmup))
        )
        demos = model.demo_index
        encoded = model.encode(self.train_examples) if demos is None else None
        vectors = None
        if demos is not None and (model.demo_config.train_mode != "random" or model.demo_config.order == "similar-last"):
            from fsserve.demos import pair_text

            vectors = demos.embed([pair_text(ex.text, ex.text_b) for ex in self.train_examples])
        demo_rng = np.random.default_rng(args.seed)
        targets = self._targets(self.train_examples)
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(args.seed)
        order: list[int] = []
        best_state: dict[str, torch.Tensor] | None = None
        start = time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(total=args.max_steps, desc="training", disable=not args.progress, unit="step")
        model.train()
        for step in range(1, args.max_steps + 1):
            if len(order) < args.batch_size:
                order.extend(torch.randperm(len(self.train_examples), generator=generator).tolist())
            idx, order = order[: args.batch_size], order[args.batch_size :]
            if encoded is not None:
                rows = [encoded[i] for i in idx]
            else:  # fresh demonstrations for every example at every step (LM-BFF)
                rows = model.encode(
                    [self.train_examples[i] for i in idx], demo_mode=model.demo_config.train_mode, rng=demo_rng,
                    embeddings=None if vectors is None else vectors[idx],
                )
            batch = {k: v.to(device) for k, v in model.collate(rows).items()}
            loss = self.loss(model(**batch), targets[idx].to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            schedule.step()
            result.losses.append(float(loss.item()))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.dev_examples and (step % args.eval_steps == 0 or step == args.max_steps):
                score = self.evaluate(self.dev_examples)["score"]
                model.train()
                result.evals.append((step, score))
                logger.info("step %d: dev %s = %.4f", step, self.metric, score)
                if result.best_score is None or score > result.best_score:
                    result.best_score, result.best_step = score, step
                    best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        bar.close()
        result.steps = args.max_steps
        if best_state is not None:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in best_state:
                        param.copy_(best_state[name])
            logger.info("restored the best dev weights (step %s, %s = %.4f)", result.best_step, self.metric, result.best_score)
        model.eval()
        result.seconds = time.perf_counter() - start
        return result

    def evaluate(self, examples: Sequence[Any]) -> dict[str, Any]:
        """Score examples with the task metric; returns the score and the predictions."""
        from fsserve.metrics import compute_metric

        logits = self.model.predict_logits(examples, batch_size=self.args.eval_batch_size)
        _, predictions = self.model.scores_to_predictions(logits)
        if self.model.prompt_config.is_regression:
            references: list[Any] = [float(ex.label) for ex in examples]
        else:
            references = [str(ex.label) for ex in examples]
        score = compute_metric(self.metric, predictions, references)
        return {"metric": self.metric, "score": float(score), "predictions": predictions, "n": len(examples)}


def _no_decay(name: str) -> bool:
    """Biases and norms are not weight-decayed (the usual BERT recipe)."""
    lowered = name.lower()
    return lowered.endswith("bias") or "norm" in lowered


def evaluate_model(model: PromptModel, examples: Sequence[Any], metric: str, batch_size: int = 32) -> dict[str, Any]:
    """Score a model on examples without training it (zero-shot or after loading)."""
    args = TrainingArguments(method="zero-shot", eval_batch_size=batch_size, progress=False)
    return Trainer(model, args, [], examples, metric=metric).evaluate(examples)
