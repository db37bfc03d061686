"""The CLI end to end on a tiny model: train, eval, predict, and errors that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fsserve.cli import main
from fsserve.data import default_data_dir

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
    data = default_data_dir() / "k-shot"
    if not data.is_dir():
        pytest.skip(f"no k-shot data under {data} (set FSSERVE_DATA_DIR)")
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


# -- a new user's first tries ----------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_and_bundle(tiny_lm_dir, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One tiny trained model and its exported bundle, shared by the tests below."""
    root = tmp_path_factory.mktemp("cli")
    saved, bundle = root / "model", root / "bundle"
    assert main(["train", "--model", str(tiny_lm_dir("bert")), "--train", str(TRAIN), "--template", "{sent_0} It was {mask}.",
                 "--label-words", "0:terrible,1:great", "--steps", "1", "--out", str(saved)]) == 0
    assert main(["export", str(saved), str(bundle)]) == 0
    return saved, bundle


def test_texts_may_follow_options(saved_and_bundle: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, bundle = saved_and_bundle
    capsys.readouterr()
    assert main(["predict", str(bundle), "--backend", "onnx", "A fine film."]) == 0
    assert main(["predict", str(bundle), "What a joy.", "--json", "--backend", "onnx", "A waste of time.", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].endswith("\tA fine film.") and "onnx backend" in out[1]
    assert [json.loads(line)["text"] for line in out[2:]] == ["What a joy.", "A waste of time."]
    from fsserve.cli import build_parser

    args = build_parser().parse_args(["client", "a", "--url", "localhost:1", "b", "--model", "m", "c"])
    assert args.texts == ["a", "b", "c"] and args.url == "localhost:1"


MISSING = "/no/such/folder"


@pytest.mark.parametrize("argv", [
    ["train", "--model", MISSING, "--task", "SST-2", "--out", "unused"],
    ["eval", MISSING, "--task", "SST-2"],
    ["eval", MISSING, "--task", "SST-2", "--methods", "zero-shot/probe"],
    ["predict", MISSING, "A fine film."],
    ["export", MISSING, "unused"],
    ["serve", MISSING],
    ["serve", f"sst2={MISSING}"],
    ["bench", MISSING],
    ["search", "labels", "--model", MISSING, "--task", "SST-2"],
    ["search", "templates", "--model", MISSING, "--task", "SST-2"],
    ["probe-layers", MISSING, "--task", "SST-2"],
    ["compare", MISSING, "--task", "SST-2", "--methods", "zero-shot"],
    ["experiment", "--model", MISSING, "--tasks", "SST-2", "--methods", "zero-shot", "--seeds", "13"],
], ids=lambda argv: " ".join(argv[:2]))
def test_a_missing_model_is_one_line_naming_it(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{MISSING}: no such folder" in err and err.startswith(f"fsserve {argv[0]}: error:")
    assert not list(tmp_path.iterdir())  # nothing written before the check


def test_a_file_is_not_a_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "model.txt"
    file.write_text("not a model")
    assert main(["predict", str(file), "A fine film."]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_an_unknown_model_name_is_one_line_too(tmp_path: Path) -> None:
    # a name shaped like a Hugging Face id is tried once (offline here), then refused in one line
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "fsserve", "eval", "no-such-model-xyz", "--task", "SST-2"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "no-such-model-xyz: no such folder, and no model of that name could be loaded" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_on_a_published_split_with_a_blank_row(tiny_lm_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    # LM-BFF's 8-shot CR train.csv has a row whose text is one space: the run goes on, naming the row
    split = tmp_path / "k-shot" / "cr" / "8-13"
    split.mkdir(parents=True)
    rows = [(1, "Great sound and a bright screen."), (0, " "), (0, "It broke in a week."), (1, "Works well, light to carry."),
            (0, "The battery is terrible.")]
    (split / "train.csv").write_text("".join(f'{label},"{text}"\n' for label, text in rows))
    (split / "dev.csv").write_text('1,"Really good value."\n0,"Awful buttons."\n')
    with caplog.at_level("WARNING", logger="fsserve.data"):
        code = main(["train", "--model", str(tiny_lm_dir("bert")), "--task", "cr", "--data", str(tmp_path / "k-shot"), "--k", "8",
                     "--seed", "13", "--steps", "1", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert any(f"{split / 'train.csv'}:2: blank text" in r.getMessage() for r in caplog.records)
    # the user's own files keep the clear error
    mine = tmp_path / "mine.csv"
    mine.write_text("text,label\nGood.,1\n ,0\n")
    assert main(["train", "--model", str(tiny_lm_dir("bert")), "--train", str(mine), "--template", "{sent_0} It was {mask}.",
                 "--label-words", "0:terrible,1:great", "--steps", "1", "--out", str(tmp_path / "out2")]) == 2
    assert "mine.csv:3: empty text" in capsys.readouterr().err


def test_train_takes_the_demonstration_format(tiny_lm_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo-model"
    assert main(["train", "--model", str(tiny_lm_dir("gemma")), "--train", str(TRAIN), "--template", "{sent_0} It was {mask}.",
                 "--label-words", "0:terrible,1:great", "--steps", "1", "--demos", "similar", "--demo-order", "shuffle",
                 "--demo-separator", r"\n", "--demos-per-class", "2", "--no-demo-label-after", "--out", str(out)]) == 0
    saved = json.loads((out / "fsserve.json").read_text())["demos"]["config"]
    assert (saved["order"], saved["separator"], saved["per_class"], saved["label_after"]) == ("shuffle", "\n", 2, False)
    capsys.readouterr()
    assert main(["predict", str(out), "What a joy.", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["label"] in ("0", "1")
    assert main(["train", "--model", str(tiny_lm_dir("gemma")), "--train", str(TRAIN), "--template", "{sent_0} It was {mask}.",
                 "--label-words", "0:terrible,1:great", "--steps", "1", "--demos", "similar", "--demos-per-class", "0",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "per_class must be an integer of at least 1, got 0" in capsys.readouterr().err
