"""Automatic templates (LM-BFF §5.2), for encoder-decoder (T5) or decoder LMs.

A T5-family model fills ``<extra_id_0>``/``<extra_id_1>`` spans around the label word; a decoder
LM continues ``{sent_0}`` so that the label word follows. Both use beam search whose step scores are
summed over all training examples, so the result is one template for the task, not one per example.
Candidates are ranked zero-shot or after short fine-tuning on dev with
:func:`fsserve.search.label_words.score_prompts` and :func:`fsserve.search.label_words.rerank`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fsserve.config import PromptConfig
from fsserve.prompts import Prompt, Template
from fsserve.search.label_words import class_targets, vocab_projection

logger = logging.getLogger(__name__)

_SENTINEL = re.compile(r"<extra_id_(\d+)>")
_CONTROL = re.compile(r"<[^<>\s]+>|\[[A-Z_]+\]")  # <start_of_image>, <unused3>, <0x0A>, [CLS]: never template text
DEFAULT_T5_FORMS = {1: ("{sent_0} <extra_id_0> {mask} <extra_id_1>",), 2: ("{sent-_0} <extra_id_0> {mask} <extra_id_1> {+sentl_1}",)}
DEFAULT_DECODER_FORMS = {1: "{sent_0} <extra_id_0> {mask}", 2: "{sent-_0}?{+sentl_1} <extra_id_0> {mask}"}


@dataclass(frozen=True)
class TemplateCandidate:
    """One generated template with its beam score (summed log-probability over the training set).

    >>> Template.parse(TemplateCandidate("{sent_0} It was {mask}.", -12.5).template).num_sentences
    1
    """

    template: str
    score: float
    dev_score: float | None = None


# -- template search: shared beam step --------------------------------------------------------------
def _expand(beams: list[tuple[list[int], float]], step: torch.Tensor, allowed: torch.Tensor, width: int) -> list[tuple[int, int, float]]:
    """The ``width`` best (beam, token, score) extensions, given per-beam summed log-probs (Bm, V)."""
    total = torch.tensor([s for _, s in beams], dtype=step.dtype)[:, None] + step.masked_fill(~allowed, float("-inf"))
    best = total.flatten().topk(min(width, int(torch.isfinite(total).sum())))
    vocab = step.shape[1]
    return [(i // vocab, i % vocab, float(v)) for v, i in zip(best.values.tolist(), best.indices.tolist())]


def _banned_tokens(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Tokens a template may not contain: special and control tokens, sentinels, newlines, braces and ``*``."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    banned = torch.ones(vocab_size, dtype=torch.bool)
    for i, tok in enumerate(tokens):
        banned[i] = tok is None or bool(_SENTINEL.search(tok) or _CONTROL.fullmatch(tok)) or any(ch in tok for ch in "\n\r\t{}*")
    banned[list(set(getattr(tokenizer, "all_special_ids", [])))] = True
    return banned


def _template_from_form(form: str, spans: Sequence[str]) -> str | None:
    """Fill a form's ``<extra_id_i>`` markers with decoded spans; None if the result does not parse."""
    text = form
    for i, span in enumerate(spans):
        clean = span.replace("*", "").replace("{", "{{").replace("}", "}}").strip()
        text = text.replace(f"<extra_id_{i}>", clean)
    text = re.sub(r" +", " ", text)
    text = re.sub(r" ([.,!?;:])", r"\1", text).strip()
    try:
        Template.parse(text)
    except ValueError:
        return None
    return text


def _render_form(form: Template, sentences: Sequence[str], word: str) -> str:
    """One T5 input: the form with the example's sentences and its label word in place of the mask."""
    out = []
    for part in form.parts:
        if part.kind == "mask":
            out.append((" " if part.space else "") + word)
        elif part.kind in ("text", "sent"):
            out.append(part.render(sentences))
    return "".join(out)


# -- template search with T5 -------------------------------------------------------------------------
@torch.no_grad()
def t5_templates(
    t5: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    label_words: dict[str, Any],
    form: str | None = None,
    beam_width: int = 8,
    max_tokens: int = 12,
    num_templates: int = 10,
) -> list[TemplateCandidate]:
    """LM-BFF's template generation: T5 fills the spans around each example's label word; scores sum over examples."""
    from fsserve.prompts import example_texts

    if isinstance(t5, str):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(t5)
        t5 = AutoModelForSeq2SeqLM.from_pretrained(t5).eval()
    if not getattr(t5.config, "is_encoder_decoder", False):
        raise ValueError(f"{type(t5).__name__} is not an encoder-decoder (T5-family) model")
    pair = any(getattr(ex, "text_b", None) for ex in examples)
    form = form or DEFAULT_T5_FORMS[2 if pair else 1][0]
    parsed = Template.parse(form)
    spans = sorted({int(m) for m in _SENTINEL.findall(form)})
    if spans != list(range(len(spans))) or not spans:
        raise ValueError(f"form {form!r} must mark spans <extra_id_0>, <extra_id_1>, ... in order")
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(len(spans) + 1)])
    if any(s is None or s == tokenizer.unk_token_id for s in sentinels):
        raise ValueError(f"the tokenizer lacks the sentinel tokens <extra_id_0..{len(spans)}>")
    labels = list(label_words)
    first = [w if isinstance(w, str) else list(w)[0] for w in label_words.values()]
    targets = class_targets(examples, labels)
    inputs = [_render_form(parsed, example_texts(ex, parsed.num_sentences), first[t]) for ex, t in zip(examples, targets.tolist())]
    enc = tokenizer(inputs, padding=True, return_tensors="pt")
    device = next(t5.parameters()).device
    encoder_states = t5.get_encoder()(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).last_hidden_state
    vocab = t5.get_output_embeddings().weight.shape[0]
    base_allowed = ~_banned_tokens(tokenizer, vocab)
    eos = t5.config.eos_token_id
    n = len(examples)
    beams: list[tuple[list[int], float]] = [([int(t5.config.decoder_start_token_id), sentinels[0]], 0.0)]
    finished: list[tuple[list[int], float]] = []
    for step_index in range(max_tokens):
        ids = torch.tensor([b for b, _ in beams], device=device).repeat_interleave(n, 0)
        out = t5(
            encoder_outputs=(encoder_states.repeat(len(beams), 1, 1),), attention_mask=enc["attention_mask"].to(device).repeat(len(beams), 1), decoder_input_ids=ids
        )
        step = torch.log_softmax(out.logits[:, -1].float(), -1).view(len(beams), n, -1).sum(1).cpu()
        allowed = base_allowed[None].repeat(len(beams), 1)
        for b, (tokens, _) in enumerate(beams):
            opened = sum(t in sentinels for t in tokens[1:])
            if max_tokens - step_index <= len(sentinels) - opened:  # just enough steps left: close the spans now
                allowed[b] = False
            allowed[b, sentinels[opened]] = True
            if opened == len(spans) and eos is not None:
                allowed[b, eos] = True
        beams_next = []
        for b, token, score in _expand(beams, step, allowed, 2 * beam_width):
            tokens = beams[b][0] + [token]
            done = token == eos or token == sentinels[-1]
            (finished if done else beams_next).append((tokens, score))
        beams = beams_next[:beam_width]
        if not beams:
            break
    return _t5_candidates(finished, sentinels, eos, tokenizer, form, num_templates)


def _t5_candidates(finished: list[tuple[list[int], float]], sentinels: list[int], eos: int | None, tokenizer: Any, form: str, num: int) -> list[TemplateCandidate]:
    """Turn finished T5 beams (sentinel-delimited spans) into distinct parseable templates, best first."""
    out: dict[str, float] = {}
    for tokens, score in sorted(finished, key=lambda f: -f[1]):
        spans: list[list[int]] = [[]]
        for token in tokens[2:]:
            if token in sentinels or token == eos:
                spans.append([])
            else:
                spans[-1].append(token)
        texts = [tokenizer.decode(s, skip_special_tokens=True) for s in spans[: len(sentinels) - 1]]
        template = _template_from_form(form, texts)
        if template is not None and template not in out:
            out[template] = score
    return [TemplateCandidate(t, s) for t, s in list(out.items())[:num]]


# -- template search with a decoder LM --------------------------------------------------------------
@torch.no_grad()
def decoder_templates(
    model: Any,
    examples: Sequence[Any],
    form: str | None = None,
    beam_width: int = 8,
    max_tokens: int = 5,
    num_templates: int = 10,
    batch_size: int = 64,
) -> list[TemplateCandidate]:
    """Beam search over a decoder LM's continuations of the sentence so that each example's label word follows.

    A candidate span X is scored ``Σ_n log p(X | s_n) + log p(w_{y_n} | s_n, X)`` over the training set.
    """
    if model.kind != "causal":
        raise ValueError("decoder_templates needs a decoder LM; use t5_templates (or a decoder) for encoders")
    pair = any(getattr(ex, "text_b", None) for ex in examples)
    form = form or DEFAULT_DECODER_FORMS[2 if pair else 1]
    if form.count("<extra_id_0>") != 1 or not re.search(r"<extra_id_0>\s*\{mask\}\s*$", form):
        raise ValueError(f"decoder form {form!r} must end with '<extra_id_0> {{mask}}' (the span comes right before the answer)")
    head, _ = form.split("<extra_id_0>")
    cfg = model.prompt_config
    prefix = Prompt(PromptConfig(head.rstrip() + " {mask}", cfg.label_words, cfg.labels, cfg.max_length), model.tokenizer, "causal")
    words = Prompt(PromptConfig(form.replace("<extra_id_0>", ""), cfg.label_words, cfg.labels, cfg.max_length), model.tokenizer, "causal")
    targets = class_targets(examples, model.labels)
    first_word = [words.label_word_ids[words.word_to_class.index(c)] for c in range(len(model.labels))]
    gold = torch.tensor([first_word[t] for t in targets.tolist()])
    prefixes = [e.input_ids for e in prefix.encode(examples)]
    device = next(model.parameters()).device
    vocab = model.head.decoder.weight.shape[0]
    allowed = ~_banned_tokens(model.tokenizer, vocab)
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    candidates: dict[tuple[int, ...], float] = {}
    for step in range(max_tokens + 1):
        rows = [p + span for span, _ in beams for p in prefixes]
        logp = torch.cat([_next_token_logp(model, rows[i : i + batch_size], device) for i in range(0, len(rows), batch_size)])
        logp = logp.view(len(beams), len(prefixes), -1)
        completion = logp.gather(-1, gold.view(1, -1, 1).expand(len(beams), -1, 1)).squeeze(-1).sum(1)
        for (span, score), extra in zip(beams, completion.tolist()):
            candidates[tuple(span)] = score + extra
        if step == max_tokens:
            break
        beams = [(beams[b][0] + [t], s) for b, t, s in _expand(beams, logp.sum(1), allowed[None], beam_width)]
    out: dict[str, float] = {}
    for span, score in sorted(candidates.items(), key=lambda c: -c[1]):
        template = _template_from_form(form, [_span_text(model.tokenizer, prefixes[0], list(span))])
        if template is not None and template not in out:
            out[template] = score
    return [TemplateCandidate(t, s) for t, s in list(out.items())[:num_templates]]


def _next_token_logp(model: Any, rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Log-probabilities of the next token after each (unpadded) row, (len(rows), V), via the LM body and head."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), model.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    last = torch.tensor([len(r) - 1 for r in rows])
    hidden = model.hidden_at_answer(ids.to(device), mask.to(device), last.to(device))
    return torch.log_softmax(vocab_projection(model, hidden), -1).cpu()


def _span_text(tokenizer: Any, prefix: list[int], span: list[int]) -> str:
    """Decode a generated span as it reads after the prefix (keeps its leading space, which decode alone may drop)."""
    whole = tokenizer.decode(prefix + span, skip_special_tokens=True)
    start = tokenizer.decode(prefix, skip_special_tokens=True)
    return whole[len(start) :] if whole.startswith(start) else tokenizer.decode(span, skip_special_tokens=True)
