"""The embedded Gemma 3 270M on real data (slow: run with `pytest -m slow`)."""

from __future__ import annotations

import pytest

from fsserve.config import PromptConfig, TrainingArguments
from fsserve.data import default_data_dir, get_task, load_kshot
from fsserve.modeling import PromptModel
from fsserve.training import Trainer, evaluate_model

KSHOT = default_data_dir() / "k-shot"  # $FSSERVE_DATA_DIR, else ../shared/data

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not KSHOT.is_dir(), reason=f"no k-shot data under {KSHOT} (set FSSERVE_DATA_DIR)")
def test_prompt_finetuning_on_sst2_16shot_beats_zero_shot() -> None:
    task = get_task("SST-2")
    train = load_kshot(task, KSHOT, k=16, seed=42, split="train")
    dev = load_kshot(task, KSHOT, k=16, seed=42, split="dev")
    test = load_kshot(task, KSHOT, k=16, seed=42, split="test")[:300]
    prompt = PromptConfig(task.template, dict(task.label_words), labels=list(task.labels))
    model = PromptModel.from_pretrained("embedded", prompt=prompt)
    zero_shot = evaluate_model(model, test, task.metric)["score"]
    args = TrainingArguments(max_steps=60, eval_steps=20, learning_rate=1e-5, batch_size=8, freeze_embeddings=True, seed=42, progress=False)
    result = Trainer(model, args, train, dev, metric=task.metric).train()
    tuned = evaluate_model(model, test, task.metric)["score"]
    print(f"SST-2 16-42, first 300 test: zero-shot {zero_shot:.4f}, prompt FT {tuned:.4f} (best dev {result.best_score} at {result.best_step})")
    assert tuned >= 0.75
    assert tuned > zero_shot
