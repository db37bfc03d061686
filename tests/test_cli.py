"""The CLI end to end on a tiny model: train, eval, predict, and errors that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fsserve.cli import main

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "sentiment_train.jsonl"
DEV = REPO / "examples" / "sentiment_dev.jsonl"


def test_train_eval_predict(tiny_lm_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    code = main(["train", "--model", str(tiny_lm_dir("bert")), "--train", str(TRAIN), "--dev", str(DEV),
                 "--template", "{sent_0} It was {mask}.", "--label-words", "0:terrible,1:great",
                 "--steps", "4", "--eval-steps", "2", "--lr", "1e-3", "--out", str(out)])
    assert code == 0 and (out / "fsserve.json").is_file()
    assert "best dev acc" in capsys.readouterr().out

    assert main(["eval", str(out), "--file", str(DEV), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n"] == 32 and 0.0 <= report["score"] <= 1.0 and report["metric"] == "acc"

    assert main(["predict", str(out), "What a joy.", "A waste of time.", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["text"] for r in rows] == ["What a joy.", "A waste of time."]
    assert all(r["label"] in ("0", "1") and abs(sum(r["probs"]) - 1) < 1e-5 for r in rows)


def test_eval_zero_shot_on_a_kshot_task(tiny_lm_dir, capsys: pytest.CaptureFixture[str]) -> None:
    data = REPO.parent / "shared" / "data" / "k-shot"
    if not data.is_dir():
        pytest.skip("../shared/data is not present")
    assert main(["eval", str(tiny_lm_dir("gpt2")), "--task", "RTE", "--data", str(data), "--split", "dev", "--max-examples", "8"]) == 0
    out = capsys.readouterr().out
    assert "RTE 16-42/dev (8 examples): acc =" in out


def test_errors_name_the_problem(tiny_lm_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--model", str(tiny_lm_dir("bert")), "--train", str(TRAIN), "--template", "{sent_0} It was good.",
                 "--label-words", "0:terrible,1:great", "--out", str(tmp_path / "m")])
    assert code == 2 and "{mask}" in capsys.readouterr().err
    assert main(["predict", str(tmp_path)]) == 2
    assert "give texts" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "hello"]) == 2
    assert "not a saved fsserve model" in capsys.readouterr().err


def test_train_with_an_adaptation_method(tiny_lm_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lora"
    code = main(["train", "--model", str(tiny_lm_dir("bert")), "--train", str(TRAIN), "--template", "{sent_0} It was {mask}.",
                 "--label-words", "0:terrible,1:great", "--method", "lora", "--method-option", "lora_r=4",
                 "--steps", "2", "--lr", "1e-3", "--out", str(out)])
    assert code == 0
    meta = json.loads((out / "fsserve.json").read_text())
    assert meta["method"] == "lora"
    assert main(["predict", str(out), "What a joy.", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["label"] in ("0", "1")
