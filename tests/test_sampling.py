"""Honest subsets (fsserve.sampling): every --max-examples / max_test / agreement subset is a seeded, stratified sample.

LM-BFF's MR, CR, MPQA and Subj test files are sorted by label, so "the first N rows" of them is one
class; these tests write such files and check that each consumer draws every class in its share
and records how it drew.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fsserve.bench.extras import agreement_examples
from fsserve.cli import main
from fsserve.data import Example, load_split
from fsserve.experiment.protocol import Cell, ExperimentConfig, cache_path, cell_settings, run_cell, run_experiment
from fsserve.sampling import describe_sample, stratified_sample

GOOD = ["a warm and funny film", "a superb, moving story", "lovely acting throughout", "a gem of a movie", "pure joy"]
BAD = ["boring and far too long", "an awful, clumsy script", "dreadful pacing", "a dull mess", "tedious and flat"]


def _sorted_rows(negatives: int, positives: int) -> list[tuple[str, str]]:
    """(label, sentence) rows sorted by label, as LM-BFF ships MR / CR / MPQA / Subj test files."""
    return [("0", f"{BAD[i % 5]} ({i})") for i in range(negatives)] + [("1", f"{GOOD[i % 5]} ({i})") for i in range(positives)]


def _write_lmbff_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    """LM-BFF's csv layout for the single-sentence tasks: ``label,sentence``, no header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f'{label},"{text}"\n' for label, text in rows), encoding="utf-8")
    return path


def test_a_label_sorted_test_file_gives_every_class_in_its_share(tmp_path: Path) -> None:
    examples = load_split("mr", _write_lmbff_csv(tmp_path / "test.csv", _sorted_rows(300, 200)))
    assert {ex.label for ex in examples[:100]} == {"0"}  # what "the first 100" used to score on
    sample = stratified_sample(examples, 100, seed=0, task="mr")
    labels = [ex.label for ex in sample.examples]
    assert (labels.count("0"), labels.count("1")) == (60, 40)  # 300:200 in the file, 60:40 in the sample
    positions = [examples.index(ex) for ex in sample.examples]
    assert positions == sorted(set(positions))  # distinct examples, kept in file order
    assert max(positions) > 300 and min(positions) < 300  # drawn from the whole file, not a prefix
    assert sample.record() == {"method": "stratified", "seed": 0, "size": 100, "population": 500, "strata": {"0": 60, "1": 40}}
    assert str(sample) == "100 of 500 examples, a stratified sample (seed 0)"


def test_the_seed_fixes_the_draw(tmp_path: Path) -> None:
    examples = [Example(text, label=label) for label, text in _sorted_rows(70, 30)]
    first, again, other = (stratified_sample(examples, 20, seed=s) for s in (7, 7, 8))
    assert first.examples == again.examples  # same seed, same examples
    assert first.examples != other.examples and first.strata == other.strata == {"0": 14, "1": 6}
    assert other.record()["seed"] == 8


def test_uneven_shares_round_to_the_requested_size() -> None:
    examples = [Example(f"s{i}", label=label) for label, count in (("a", 7), ("b", 2), ("c", 1)) for i in range(count)]
    for n in range(1, 10):
        strata = stratified_sample(examples, n, seed=1).strata
        assert sum(strata.values()) == n
        assert all(abs(strata[key] - n * count / 10) < 1 for key, count in (("a", 7), ("b", 2), ("c", 1)))


def test_regression_scores_are_stratified_over_bins() -> None:
    # STS-B-like scores sorted ascending, most of them low: the first 20 are all in the lowest bin.
    per_bin = (40, 20, 10, 20, 10)
    scores = [b + 0.9 * j / count for b, count in enumerate(per_bin) for j in range(count)]
    examples = [Example(f"a{i}", f"b{i}", round(s, 3)) for i, s in enumerate(scores)]
    assert all(ex.label < 1.0 for ex in examples[:20])
    sample = stratified_sample(examples, 20, seed=0, task="STS-B")
    assert sample.strata == {"score 0-1": 8, "score 1-2": 4, "score 2-3": 2, "score 3-4": 4, "score 4-5": 2}
    assert all(isinstance(ex.label, float) for ex in sample.examples)
    # Without a task the bins span the scores' own range, and still every part of it is drawn from.
    assert len(stratified_sample(examples, 20, seed=0).strata) == 5


def test_no_size_keeps_everything_and_says_so() -> None:
    examples = [Example(text, label=label) for label, text in _sorted_rows(3, 2)]
    for n in (None, 5, 50):
        sample = stratified_sample(examples, n, seed=3)
        assert sample.examples == examples and sample.seed is None
        assert sample.record() == {"method": "all", "seed": None, "size": 5, "population": 5, "strata": {"0": 3, "1": 2}}
    assert describe_sample(stratified_sample(examples, None).record()) == "all 5 examples"
    unlabelled = stratified_sample([Example(f"t{i}") for i in range(10)], 4, seed=0)
    assert unlabelled.strata == {"unlabelled": 4}
    with pytest.raises(ValueError, match="positive size"):
        stratified_sample(examples, 0)


def test_eval_max_examples_scores_a_stratified_sample_and_reports_it(tiny_lm_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _sorted_rows(30, 20)
    path = tmp_path / "sorted.jsonl"
    path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n" for label, text in rows), encoding="utf-8")
    code = main(["eval", str(tiny_lm_dir("bert")), "--file", str(path), "--template", "{sent_0} It was {mask}.",
                 "--label-words", "0:terrible,1:great", "--max-examples", "10", "--sample-seed", "5", "--json"])
    assert code == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["n"] == 10
    assert report["sample"] == {"method": "stratified", "seed": 5, "size": 10, "population": 50, "strata": {"0": 6, "1": 4}}
    assert "sample: 10 of 50 examples, a stratified sample (seed 5)" in out


def _sorted_sst2(root: Path) -> Path:
    """A 2-shot SST-2 split (seed 13) whose test file is sorted by label: 12 negative rows, then 8 positive."""
    folder = root / "SST-2" / "2-13"
    folder.mkdir(parents=True)
    for split, rows in (("train", _sorted_rows(2, 2)), ("dev", _sorted_rows(2, 2)), ("test", _sorted_rows(12, 8))):
        lines = [f"{text}\t{label}" for label, text in rows]
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return root


def _experiment(data: Path, out: Path, **kw) -> ExperimentConfig:
    return ExperimentConfig(tasks=["SST-2"], methods=["zero-shot"], seeds=[13], data_dir=str(data), out_dir=str(out),
                            model="tiny-gemma", k=2, max_length=64, eval_batch_size=8, **kw)


def test_experiment_max_test_is_a_stratified_sample_with_its_own_cache_key(tiny_lm, tmp_path: Path) -> None:
    data = _sorted_sst2(tmp_path / "kshot")
    cell = Cell("SST-2", "zero-shot", 13)
    full = cell_settings(_experiment(data, tmp_path / "run"), cell)
    assert "test_sample" not in full  # full-test cells keep the key they were cached under
    config = _experiment(data, tmp_path / "run", max_test=10, test_sample_seed=4)
    settings = cell_settings(config, cell)
    assert settings["test_sample"] == {"method": "stratified", "size": 10, "seed": 4}
    first_n = {k: v for k, v in settings.items() if k != "test_sample"}  # how a first-N cell was keyed before
    assert cache_path(config, settings) != cache_path(config, first_n)
    assert cache_path(config, settings) != cache_path(config, cell_settings(_experiment(data, tmp_path / "run", max_test=10), cell))

    gemma = tiny_lm("gemma")
    record = run_cell(config, cell, pretrained=gemma)
    assert record["n_test"] == 10
    assert record["test_sample"] == {"method": "stratified", "seed": 4, "size": 10, "population": 20, "strata": {"0": 6, "1": 4}}
    report = run_experiment(config, runner=lambda cfg, c: run_cell(cfg, c, pretrained=gemma))
    assert report["summary"][0]["test_sample"]["strata"] == {"0": 6, "1": 4}
    md = (tmp_path / "run" / "results.md").read_text(encoding="utf-8")
    assert "a stratified sample of at most 10 test examples per task (seed 4" in md


def test_bench_agreement_examples_are_a_stratified_sample(tmp_path: Path) -> None:
    rows = _sorted_rows(40, 10)
    path = tmp_path / "agreement.csv"
    path.write_text("text,label\n" + "".join(f'"{text}",{label}\n' for label, text in rows), encoding="utf-8")
    sample, where = agreement_examples(str(path), 10, seed=0)
    assert where == str(path) and sample.strata == {"0": 8, "1": 2}
    everything, _ = agreement_examples(str(path), None, seed=0)
    assert len(everything.examples) == 50 and everything.record()["method"] == "all"


def test_compare_and_probe_layers_report_their_sample(tiny_lm_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _sorted_sst2(tmp_path / "kshot")
    common = [str(tiny_lm_dir("bert")), "--task", "SST-2", "--data", str(data), "--k", "2", "--seed", "13", "--max-examples", "10",
              "--steps", "2", "--json"]
    assert main(["compare", *common, "--methods", "zero-shot", "--no-export"]) == 0
    out = capsys.readouterr().out
    assert "SST-2 2-13, test: 10 of 20 examples, a stratified sample (seed 0)" in out
    assert json.loads(out.strip().splitlines()[-1])["sample"]["strata"] == {"0": 6, "1": 4}
    assert main(["probe-layers", *common]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert rows and all(row["sample"]["size"] == 10 for row in rows)
