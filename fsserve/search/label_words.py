"""Automatic prompts (LM-BFF §5): label-word search and template search, for encoder or decoder LMs.

**Label words.** One forward pass over the training set gives the (N, V) matrix of logits at the
answer position. Each class keeps its top-k whole-word tokens by mean log-probability over its own
examples; every combination (one word per class) is then scored from that same matrix — the
zero-shot prediction of a combination is an argmax over k-wide slices of it — so thousands of
combinations cost one gather, not one forward pass each. The best ``n`` can be re-ranked by short
fine-tuning on train, scored on dev (:func:`score_prompts`).

**Templates** are generated in :mod:`fsserve.search.templates`; their candidates are ranked here
too (:func:`score_prompts`, :func:`rerank`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fsserve.config import PromptConfig, TrainingArguments

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class LabelWordsCandidate:
    """One combination of label words (one per class) with its zero-shot train score and loss.

    >>> LabelWordsCandidate({"0": "bad", "1": "good"}, 0.9, 0.31).label_words["1"]
    'good'
    """

    label_words: dict[str, str]
    score: float
    loss: float
    dev_score: float | None = None


# -- the answer-position matrix -----------------------------------------------------------------
def vocab_projection(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Project answer-position states onto the whole vocabulary with the LM's own head (MLM transform, softcap)."""
    head = model.head
    if getattr(head, "decoder", None) is None:
        raise ValueError("vocabulary logits need a prompt model (method='prompt'), not a classification head")
    if head.transform is not None:
        hidden = head.transform(hidden)
    logits = head.decoder(hidden).float()
    if head.softcap:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


@torch.no_grad()
def answer_logits(model: Any, examples: Sequence[Any], batch_size: int = 16) -> torch.Tensor:
    """Full-vocabulary logits at the answer position, (N, V): the one matrix label search reads."""
    if not examples:
        raise ValueError("label search needs training examples")
    encoded = model.prompt.encode(examples)
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in model.collate(encoded[start : start + batch_size]).items()}
        rows.append(vocab_projection(model, model.hidden_at_answer(**batch)).cpu())
    return torch.cat(rows)


def _word_marker(tokenizer: Any) -> str:
    """The prefix a word-initial token carries: ``Ġ`` (byte BPE), ``▁`` (SentencePiece), ``""`` (WordPiece)."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(" great", add_special_tokens=False)["input_ids"])
    first = pieces[0] if pieces else ""
    return first[0] if first and first[0] in ("Ġ", "▁") else ""


def whole_word_mask(tokenizer: Any, vocab_size: int, space: bool) -> torch.Tensor:
    """Which vocabulary ids are alphabetic whole words (LM-BFF's filter), so no sub-word becomes a label word."""
    marker = _word_marker(tokenizer) if space else ""
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    special = set(getattr(tokenizer, "all_special_ids", []))
    keep = torch.zeros(vocab_size, dtype=torch.bool)
    for i, tok in enumerate(tokens):
        if tok is None or i in special or not tok.startswith(marker):
            continue
        word = tok[len(marker) :]
        keep[i] = len(word) >= 2 and word.isalpha()
    return keep


def _single_token_word(tokenizer: Any, token_id: int, space: bool) -> str | None:
    """The word of a token if the prompt would tokenize it back to exactly that token (else None)."""
    word = tokenizer.decode([token_id]).strip()
    ids = tokenizer((" " + word) if space else word, add_special_tokens=False)["input_ids"]
    return word if word and list(ids) == [token_id] else None


def top_words_per_class(
    logits: torch.Tensor, targets: torch.Tensor, num_labels: int, allowed: torch.Tensor, tokenizer: Any, space: bool, k: int
) -> tuple[torch.Tensor, list[list[str]]]:
    """Each class's k best whole-word tokens by mean log-probability over that class's examples."""
    logp = torch.log_softmax(logits, dim=-1)
    ids = torch.empty(num_labels, k, dtype=torch.long)
    words: list[list[str]] = []
    for c in range(num_labels):
        mean = logp[targets == c].mean(0).masked_fill(~allowed, float("-inf"))
        chosen: list[tuple[int, str]] = []
        for token in mean.argsort(descending=True).tolist():
            if not torch.isfinite(mean[token]):
                break
            word = _single_token_word(tokenizer, token, space)
            if word is not None:
                chosen.append((token, word))
            if len(chosen) == k:
                break
        if len(chosen) < k:
            raise ValueError(f"only {len(chosen)} whole-word candidates found for class {c}; lower k")
        ids[c] = torch.tensor([t for t, _ in chosen])
        words.append([w for _, w in chosen])
    return ids, words


def score_combinations(
    logits: torch.Tensor, targets: torch.Tensor, candidate_ids: torch.Tensor, metric: str = "acc", chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-shot metric and cross-entropy of every combination (one candidate per class) from one logit matrix.

    Returns ``(combos (M, C) candidate indexes, scores (M,), losses (M,))``; combinations that give
    two classes the same token are dropped.
    """
    from fsserve.metrics import compute_metric

    num_labels, k = candidate_ids.shape
    gathered = logits[:, candidate_ids]  # (N, C, k): the only logits any combination reads
    classes = torch.arange(num_labels)
    combos = torch.tensor(list(itertools.product(range(k), repeat=num_labels)), dtype=torch.long).view(-1, num_labels)
    token_ids = candidate_ids[classes, combos]  # (M, C)
    distinct = torch.tensor([len(set(row)) == num_labels for row in token_ids.tolist()], dtype=torch.bool)
    combos = combos[distinct]
    scores, losses = [], []
    for start in range(0, len(combos), chunk):
        part = combos[start : start + chunk]
        picked = gathered[:, classes, part]  # (N, M, C)
        log_probs = torch.log_softmax(picked, dim=-1)
        gold = log_probs.gather(-1, targets.view(-1, 1, 1).expand(-1, len(part), 1)).squeeze(-1)  # (N, M)
        losses.append(-gold.mean(0))
        predictions = picked.argmax(-1)  # (N, M)
        if metric == "acc":
            scores.append((predictions == targets[:, None]).float().mean(0))
        else:
            refs = [str(t) for t in targets.tolist()]
            scores.append(torch.tensor([compute_metric(metric, [str(p) for p in col], refs) for col in predictions.t().tolist()]))
    return combos, torch.cat(scores), torch.cat(losses)


def search_label_words(
    model: Any,
    examples: Sequence[Any],
    k: int = 10,
    num_candidates: int = 20,
    metric: str = "acc",
    max_combinations: int = 1_000_000,
    batch_size: int = 16,
) -> list[LabelWordsCandidate]:
    """LM-BFF's automatic label words for the model's template: best ``num_candidates`` combinations, best first."""
    if model.prompt_config.is_regression:
        raise ValueError("label-word search is for classification tasks; regression keeps its two ordered words")
    if k < 1 or num_candidates < 1:
        raise ValueError(f"k and num_candidates must be at least 1, got k={k}, num_candidates={num_candidates}")
    labels = list(model.labels)
    targets = class_targets(examples, labels)
    missing = [label for c, label in enumerate(labels) if not bool((targets == c).any())]
    if missing:
        raise ValueError(f"label search needs training examples of every class; none for {missing}")
    if k ** len(labels) > max_combinations:
        k = max(1, int(max_combinations ** (1.0 / len(labels))))
        logger.info("%d classes: k lowered to %d so that at most %d combinations are scored", len(labels), k, max_combinations)
    logits = answer_logits(model, examples, batch_size)
    space = model.prompt.template.parts[model.prompt.template.mask_index].space
    allowed = whole_word_mask(model.tokenizer, logits.shape[1], space)
    candidate_ids, words = top_words_per_class(logits, targets, len(labels), allowed, model.tokenizer, space, k)
    for label, top in zip(labels, words):
        logger.info("class %s: top words %s", label, ", ".join(top[:10]))
    combos, scores, losses = score_combinations(logits, targets, candidate_ids, metric)
    order = np.lexsort((losses.numpy(), -scores.numpy()))[:num_candidates]
    return [
        LabelWordsCandidate({label: words[c][int(combos[i, c])] for c, label in enumerate(labels)}, float(scores[i]), float(losses[i]))
        for i in order
    ]


def class_targets(examples: Sequence[Any], labels: list[str]) -> torch.Tensor:
    """Class indexes of labelled examples, refusing labels outside the model's list."""
    index = {label: i for i, label in enumerate(labels)}
    out = []
    for ex in examples:
        if str(getattr(ex, "label", None)) not in index:
            raise ValueError(f"example label {getattr(ex, 'label', None)!r} is not one of the model's labels {labels}")
        out.append(index[str(ex.label)])
    return torch.tensor(out, dtype=torch.long)


# -- ranking on dev ------------------------------------------------------------------------------
def score_prompts(
    model: Any,
    prompts: Sequence[PromptConfig],
    dev: Sequence[Any],
    train: Sequence[Any] = (),
    args: TrainingArguments | None = None,
    metric: str = "acc",
) -> list[float]:
    """Dev score of each prompt on the model's LM: zero-shot, or after short fine-tuning of a copy when ``args`` trains."""
    from fsserve.modeling import PromptModel
    from fsserve.training import Trainer, evaluate_model

    if not dev:
        raise ValueError("ranking prompts needs dev examples")
    trains = args is not None and args.max_steps > 0
    if trains and not train:
        raise ValueError("ranking by fine-tuning needs training examples")
    scores = []
    for config in prompts:
        lm = copy.deepcopy(model.lm) if trains else model.lm
        candidate = PromptModel(lm, model.tokenizer, config, kind=model.kind)
        if trains:
            Trainer(candidate, args, train, dev, metric=metric).train()  # type: ignore[arg-type]
        scores.append(float(evaluate_model(candidate, dev, metric)["score"]))
        logger.info("dev %s = %.4f for %s %s", metric, scores[-1], config.template, config.label_words)
        del candidate, lm
    return scores


def rerank(candidates: Sequence[Any], dev_scores: Sequence[float]) -> list[Any]:
    """Attach dev scores and sort best first (stable: ties keep the search's own order)."""
    scored = [dataclasses.replace(c, dev_score=float(s)) for c, s in zip(candidates, dev_scores, strict=True)]
    return sorted(scored, key=lambda c: -c.dev_score)


def prompts_for(templates: Sequence[str], label_words: Sequence[dict[str, Any]], base: PromptConfig) -> list[PromptConfig]:
    """Every template × label-words combination as a PromptConfig that keeps the base's labels and lengths."""
    return [PromptConfig(t, dict(w), list(base.labels or []), base.max_length) for t in templates for w in label_words]
