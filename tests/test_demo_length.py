"""Demonstrations by default: truncation counted, a cutting max_length warned about, the CLI sizing the prompt and its
demonstrations, and training and prediction defaulting to the study's format and averaged draws."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from fsserve.cli import main
from fsserve.cli.args import default_max_length
from fsserve.cli.main import build_parser
from fsserve.config import DEMO_EVAL, DEMO_MAX_LENGTH, DEMO_NUM_SAMPLE, DEMO_PER_CLASS, DemoConfig, PromptConfig
from fsserve.data import Example
from fsserve.demos import DemoIndex
from fsserve.demos.prompting import demo_encoder
from fsserve.modeling import PromptModel
from fsserve.prompts import Prompt

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "sentiment_train.jsonl"
LONG = " ".join(["a slow, muddled and overlong drama that never finds its story"] * 4)
POOL = [Example(LONG, label="0"), Example("dull and tired", label="0"),
        Example(LONG.replace("slow", "warm"), label="1"), Example("a lovely film", label="1")]


@pytest.fixture(scope="module")
def pool_index() -> DemoIndex:
    return DemoIndex(POOL, labels=["0", "1"])


def test_encoded_counts_the_sentence_tokens_truncation_dropped(minilm_tokenizer) -> None:
    words = {"0": "terrible", "1": "great"}
    full = Prompt(PromptConfig("{sent_0} It was {mask}.", words, max_length=128), minilm_tokenizer, "mlm").encode([LONG])[0]
    short = Prompt(PromptConfig("{sent_0} It was {mask}.", words, max_length=24), minilm_tokenizer, "mlm").encode([LONG])[0]
    assert full.cut == 0
    assert len(short.input_ids) == 24
    assert short.cut == len(full.input_ids) - len(short.input_ids) > 0


@pytest.mark.parametrize(("max_length", "warned"), ((48, True), (256, False)))
def test_attaching_demos_warns_when_max_length_cuts_the_pool_prompts(tiny_lm, pool_index: DemoIndex, caplog,
                                                                      max_length: int, warned: bool) -> None:
    lm, tok = tiny_lm("bert")
    model = PromptModel(lm, tok, PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=max_length))
    with caplog.at_level(logging.WARNING, logger="fsserve.modeling"):
        model.attach_demos(pool_index, DemoConfig())
    cuts = [r.getMessage() for r in caplog.records if "training prompts with demonstrations" in r.getMessage()]
    assert bool(cuts) is warned
    if warned:
        assert cuts[0].startswith(f"max_length {max_length} cuts 4 of 4 ")


def test_cli_length_is_lmbffs_without_demos_and_fits_them_with(tiny_lm_dir) -> None:
    model = str(tiny_lm_dir("bert"))  # its position table: 256
    parse = build_parser().parse_args
    assert default_max_length(parse(["train", "--task", "SST-2", "--out", "x", "--model", model])) == 128
    assert default_max_length(parse(["train", "--task", "SST-2", "--out", "x", "--model", model, "--demos", "similar"])) == 254
    assert default_max_length(parse(["train", "--task", "SST-2", "--out", "x", "--model", model, "--demos", "similar", "--max-length", "300"])) == 300


def test_cli_demo_length_is_the_studys_when_the_lm_has_room(tmp_path: Path, tiny_lm) -> None:
    lm, tok = tiny_lm("gemma")
    lm.config.max_position_embeddings = 4096
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    args = build_parser().parse_args(["train", "--task", "trec", "--out", "x", "--model", str(tmp_path), "--demos", "similar"])
    assert default_max_length(args) == DEMO_MAX_LENGTH == 768


def test_a_pool_of_one_per_class_attaches_without_a_length_check(tiny_lm) -> None:
    lm, tok = tiny_lm("bert")
    model = PromptModel(lm, tok, PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=48))
    index = DemoIndex([POOL[1], POOL[3]], labels=["0", "1"])  # each member's own class has nothing else to show
    model.attach_demos(index, DemoConfig())
    assert model.encode(["a new film"])[0].cut == 0


def test_train_defaults_to_the_studys_two_per_class_and_experiments_keep_lmbffs_one() -> None:
    parse = build_parser().parse_args
    assert parse(["train", "--task", "SST-2", "--out", "x", "--demos", "similar"]).demos_per_class == DEMO_PER_CLASS == 2
    assert parse(["eval", "embedded", "--task", "SST-2"]).demos_per_class == 2
    experiment = parse(["experiment", "--tasks", "SST-2", "--methods", "prompt-demo-similar", "--seeds", "13"])
    assert experiment.demos_per_class == 1  # the study's cache keys rest on LM-BFF's default


def test_train_and_predict_default_to_the_studys_averaged_draws(tiny_lm_dir, tmp_path: Path) -> None:
    out = tmp_path / "demo-model"
    assert main(["train", "--model", str(tiny_lm_dir("gemma")), "--train", str(TRAIN), "--template", "{sent_0} It was {mask}.",
                 "--label-words", "0:terrible,1:great", "--steps", "1", "--demos", "similar", "--out", str(out)]) == 0
    saved = json.loads((out / "fsserve.json").read_text())["demos"]["config"]
    assert (saved["eval_mode"], saved["num_sample"], saved["per_class"]) == (DEMO_EVAL, DEMO_NUM_SAMPLE, DEMO_PER_CLASS) == ("similar", 4, 2)
    model = PromptModel.from_pretrained(out)
    texts = ["What a joy.", "A dull, tired film."]
    draws = demo_encoder(model.prompt, model.demo_index, model.demo_config)(texts)
    assert len(draws) == 4 * len(texts)  # draw by draw: each query four times, with its own seeded demonstrations
    assert len({tuple(e.input_ids) for e in draws[::2]}) > 1  # the first query's four prompts are not one
    with torch.no_grad():
        each = torch.stack([model(**model.collate([e])).float()[0] for e in draws]).reshape(4, len(texts), -1)
    assert torch.allclose(model.predict_logits(texts), each.mean(dim=0), atol=1e-5)
    top1 = build_parser().parse_args(["train", "--task", "SST-2", "--out", "x", "--demos", "similar", "--demo-eval", "top1"])
    assert (top1.demo_eval, top1.num_sample) == ("top1", 4)  # top1 ignores the draws: one LM call a query
