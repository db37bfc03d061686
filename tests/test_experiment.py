"""The LM-BFF protocol (fsserve.experiment.protocol): end to end on a tiny Gemma, resume, grid selection, metrics, in-context."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from fsserve.cli import main
from fsserve.cli.experiment import add_experiment_parser, config_from_args
from fsserve.config import PromptConfig
from fsserve.data import Example, get_task, load_kshot
from fsserve.experiment.baselines import InContextPrompt
from fsserve.metrics import compute_metric
from fsserve.experiment.protocol import (
    Cell, ExperimentConfig, cache_path, cell_settings, demo_eval_mode, iter_cells, run_cell, run_experiment,
)
from fsserve.experiment.report import demo_gains, gains_table, markdown_table, summarize
from fsserve.modeling import PromptModel

POS = ["a warm and funny film", "a superb, moving story", "lovely acting throughout", "a gem of a movie", "pure joy"]
NEG = ["boring and far too long", "an awful, clumsy script", "dreadful pacing", "a dull mess", "tedious and flat"]


def _write_kshot(root: Path, k: int = 2, seeds: tuple[int, ...] = (13, 21)) -> Path:
    """A tiny k-shot tree in LM-BFF's layout for SST-2 (tsv, one sentence) and RTE (tsv, pairs)."""
    for seed in seeds:
        rng = np.random.default_rng(seed)
        sst = root / "SST-2" / f"{k}-{seed}"
        rte = root / "RTE" / f"{k}-{seed}"
        sst.mkdir(parents=True)
        rte.mkdir(parents=True)
        for split, n in (("train", k), ("dev", k), ("test", 4)):
            pos, neg = rng.permutation(POS)[:n], rng.permutation(NEG)[:n]
            rows = [f"{s}\t1" for s in pos] + [f"{s}\t0" for s in neg]
            (sst / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
            pairs = [f"{i}\t{p}.\t{p} indeed.\tentailment" for i, p in enumerate(pos)]
            pairs += [f"{i + n}\t{p}.\tit is not {q}.\tnot_entailment" for i, (p, q) in enumerate(zip(neg, pos))]
            (rte / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(pairs) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def kshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_kshot(tmp_path_factory.mktemp("kshot"))


def _config(kshot: Path, out: Path, model: Path, **kw) -> ExperimentConfig:
    base = dict(tasks=["SST-2", "RTE"], methods=["prompt", "finetune"], seeds=[13, 21], data_dir=str(kshot),
                out_dir=str(out), model=str(model), k=2, max_steps=2, eval_steps=2, learning_rates=[1e-3],
                batch_sizes=[2], max_length=64, eval_batch_size=8)
    base.update(kw)
    return ExperimentConfig(**base)


class _Interrupt(Exception):
    pass


def test_protocol_end_to_end_resumes_after_an_interruption(tiny_lm, kshot: Path, tmp_path: Path) -> None:
    config = _config(kshot, tmp_path / "run", "tiny-gemma")
    gemma = tiny_lm("gemma")  # loaded once; every cell trains its own deep copy
    calls: list[Cell] = []

    def dies_on_the_third_cell(cfg: ExperimentConfig, cell: Cell) -> dict:
        if len(calls) == 2:
            raise _Interrupt("killed")
        calls.append(cell)
        return run_cell(cfg, cell, pretrained=gemma)

    with pytest.raises(_Interrupt):
        run_experiment(config, runner=dies_on_the_third_cell)
    cells = sorted((tmp_path / "run" / "cells").rglob("*.json"))
    assert len(cells) == 2 and not (tmp_path / "run" / "results.json").exists()
    assert not list((tmp_path / "run").rglob("*.tmp"))  # nothing half-written
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells}

    resumed: list[Cell] = []
    report = run_experiment(config, runner=lambda cfg, cell: resumed.append(cell) or run_cell(cfg, cell, pretrained=gemma))
    everything = list(iter_cells(config))
    assert len(everything) == 8 and resumed == everything[2:]  # finished cells are not run again
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells} == before

    rows = {(r["task"], r["method"]): r for r in report["summary"]}
    assert set(rows) == {(t, m) for t in ("SST-2", "RTE") for m in ("prompt", "finetune")}
    for row in rows.values():
        per_seed = [c["test"] for c in report["cells"] if (c["settings"]["task"], c["settings"]["method"]) == (row["task"], row["method"])]
        assert row["n_seeds"] == 2 and row["seeds"] == [13, 21]
        assert row["mean"] == pytest.approx(np.mean(per_seed)) and row["std"] == pytest.approx(np.std(per_seed))
    for c in report["cells"]:
        assert 0.0 <= c["test"] <= 1.0 and c["n_test"] == 8 and c["best_step"] == 2
    out = tmp_path / "run"
    assert json.loads((out / "results.json").read_text())["config"]["max_steps"] == 2
    md = (out / "results.md").read_text()
    assert "| prompt |" in md and "SST-2 (acc)" in md and "RTE (acc)" in md
    ours, theirs = md.split("**Theirs**")  # ours first, LM-BFF's published numbers after, each marked
    assert "*theirs*" not in ours and "| *theirs* Prompt-based FT (man) | 92.7 (0.9) | 69.1 (3.6) |" in theirs
    assert "| *theirs* Fine-tuning | 81.4 (3.8) | 54.4 (3.9) |" in theirs
    published = json.loads((out / "results.json").read_text())["published"]
    assert {(c["task"], c["method"]) for c in published["cells"]} == {(t, m) for t in ("SST-2", "RTE") for m in ("prompt", "finetune")}
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again: list[Cell] = []
    run_experiment(config, runner=lambda cfg, cell: again.append(cell) or {})
    assert again == []  # a finished run computes nothing


def test_a_changed_setting_is_a_new_cell_and_the_grid_keeps_the_best_dev(kshot: Path, tmp_path: Path) -> None:
    def fake(cfg: ExperimentConfig, cell: Cell) -> dict:
        # dev prefers the larger learning rate on seed 13 and the smaller one on seed 21; test says which won
        dev = cell.learning_rate if cell.seed == 13 else -cell.learning_rate
        return {"metric": "acc", "n_test": 4, "dev": dev, "test": 0.5 + 100 * dev, "best_step": 1}

    config = _config(kshot, tmp_path, "tiny", tasks=["SST-2"], methods=["prompt"], learning_rates=[1e-3, 2e-3])
    report = run_experiment(config, runner=fake)
    (row,) = report["summary"]
    assert sorted(row["scores"]) == pytest.approx([0.5 - 0.1, 0.5 + 0.2])
    assert {c["seed"]: c["learning_rate"] for c in row["chosen"]} == {13: 2e-3, 21: 1e-3}

    calls: list[Cell] = []
    run_experiment(_config(kshot, tmp_path, "tiny", tasks=["SST-2"], methods=["prompt"], learning_rates=[1e-3, 2e-3], max_steps=3),
                   runner=lambda cfg, cell: calls.append(cell) or fake(cfg, cell))
    assert len(calls) == 4  # max_steps is part of the cache key
    one = _config(kshot, tmp_path, "tiny", num_sample=1)
    assert demo_eval_mode(one, "prompt-demo-similar") == "top1" and demo_eval_mode(config, "prompt-demo-similar") == "similar"
    assert demo_eval_mode(one, "prompt-demo") == "random"
    assert cell_settings(one, Cell("SST-2", "prompt-demo-similar", 13, 1e-3, 2))["demo_eval_mode"] == "top1"
    a = cell_settings(config, Cell("SST-2", "prompt", 13, 1e-3, 2))
    assert cache_path(config, a) != cache_path(config, cell_settings(config, Cell("SST-2", "prompt", 13, 2e-3, 2)))


def test_untrained_methods_and_similar_demos_run_through_the_protocol(tiny_lm, kshot: Path, tmp_path: Path) -> None:
    config = _config(kshot, tmp_path, "tiny-gemma", tasks=["RTE"], seeds=[13], max_steps=1,
                     methods=["zero-shot", "in-context", "prompt-demo-similar"], num_sample=2, demo_max_length=128,
                     context_length=200)
    lm, tokenizer = tiny_lm("gemma")
    seen: dict[str, list[str]] = {m: [] for m in config.methods}  # every row the LM was given, decoded, per method
    current = [""]
    # The hook on the embedding sees the token ids of every forward; each cell's deep copy of the LM keeps it.
    lm.get_input_embeddings().register_forward_pre_hook(
        lambda _, args: seen[current[0]].extend(tokenizer.batch_decode(args[0], skip_special_tokens=True)))

    def runner(cfg: ExperimentConfig, cell: Cell) -> dict:
        current[0] = cell.method
        return run_cell(cfg, cell, pretrained=(lm, tokenizer))

    records = {c["settings"]["method"]: c for c in run_experiment(config, runner)["cells"]}
    assert records["zero-shot"]["best_step"] is None and records["zero-shot"]["dev"] is not None
    assert records["in-context"]["context_examples"]["max"] >= 1
    assert all(0.0 <= r["test"] <= 1.0 for r in records.values())
    # Demonstrations entered every prompt of the demo cell (the training step, both draws over dev and over test):
    # one labelled training example per class before the query, "<premise>? <hypothesis>? <Yes|No>" (RTE, decoder form).
    train = {ex.text.rstrip("."): ex.label for ex in load_kshot(get_task("RTE"), kshot, 2, 13, "train")}
    word_of = {"entailment": "Yes", "not_entailment": "No"}
    rows = seen["prompt-demo-similar"]
    assert len(rows) == 2 + 2 * (4 + 8)  # one step of batch 2, then num_sample=2 draws over dev (4) and test (8)
    for row in rows:
        *demos, query = re.split(r"\? (Yes|No) ", row)
        shown = [(demo.split("?")[0], word) for demo, word in zip(demos[::2], demos[1::2])]
        assert sorted(word for _, word in shown) == ["No", "Yes"] and "?" in query, row
        assert all(premise in train and word_of[train[premise]] == word for premise, word in shown), row
    assert seen["zero-shot"] and not any(re.search(r"\? (Yes|No) ", row) for row in seen["zero-shot"])


def test_the_demo_format_enters_the_cache_key_only_when_it_is_not_lmbffs(tiny_lm, kshot: Path, tmp_path: Path, monkeypatch) -> None:
    demo, plain = Cell("SST-2", "prompt-demo-similar", 13, 1e-3, 2), Cell("SST-2", "prompt", 13, 1e-3, 2)
    config = _config(kshot, tmp_path, "tiny")
    default = cell_settings(config, demo)
    # The keys of every demo cell cached before the format was a setting: such cells keep their files.
    # (Sampled evaluation adds "draws": per-query draws replaced one generator per call, so those cells are new.)
    assert set(default) - {"draws"} == {"version", "task", "method", "seed", "model", "k", "data_sha256", "max_test", "max_length",
                                        "max_steps", "eval_steps", "learning_rate", "batch_size", "freeze_embeddings", "demo_mode",
                                        "demo_eval_mode", "num_sample", "filter_rate", "demo_encoder"}
    assert ("draws" in default) == (default["demo_eval_mode"] != "top1")
    top1 = cell_settings(_config(kshot, tmp_path, "tiny", num_sample=1), demo)
    assert top1["demo_eval_mode"] == "top1" and "draws" not in top1
    sampled = cell_settings(_config(kshot, tmp_path, "tiny", num_sample=4), demo)
    assert sampled["draws"] == "per-query"
    explicit = _config(kshot, tmp_path, "tiny", demo_order="class", demo_separator=" ", demo_per_class=1, demo_label_after=True)
    assert cache_path(explicit, cell_settings(explicit, demo)) == cache_path(config, default)
    paths = {cache_path(config, default)}
    for change in ({"demo_order": "shuffle"}, {"demo_order": "similar-last"}, {"demo_separator": "\n"}, {"demo_separator": "\n\n"},
                   {"demo_per_class": 2}, {"demo_label_after": False}, {"demo_order": "shuffle", "demo_per_class": 2}):
        other = _config(kshot, tmp_path, "tiny", **change)
        settings = cell_settings(other, demo)
        assert settings["demo_format"] == other.demo_format() and cache_path(other, settings) not in paths
        paths.add(cache_path(other, settings))
        assert cell_settings(other, plain) == cell_settings(config, plain)  # a cell without demonstrations is shared
        assert ExperimentConfig.from_dict(json.loads(other.to_json())) == other  # what --workers hands its helpers
    for bad, message in (({"demo_order": "best"}, "demo_order must"), ({"demo_per_class": 0}, "demo_per_class must"),
                         ({"demo_separator": 1}, "demo_separator must"), ({"demo_label_after": "no"}, "demo_label_after must")):
        with pytest.raises(ValueError, match=message):
            _config(kshot, tmp_path, "tiny", **bad)
    # run_cell builds its DemoConfig with the format
    import fsserve.modeling

    class Stop(Exception):
        pass

    def attach(self, index, config=None):
        raise Stop(config)

    monkeypatch.setattr(fsserve.modeling.PromptModel, "attach_demos", attach)
    with pytest.raises(Stop) as stopped:
        run_cell(_config(kshot, tmp_path, "tiny", demo_order="similar-last", demo_per_class=2, demo_separator="\n"), demo,
                 pretrained=tiny_lm("gemma"))
    used = stopped.value.args[0]
    assert (used.order, used.per_class, used.separator, used.label_after, used.train_mode) == ("similar-last", 2, "\n", True, "similar")


@pytest.mark.parametrize("arch", ("bert", "gemma"))
def test_in_context_fills_the_length_with_whole_labelled_examples_before_the_query(tiny_lm, arch: str) -> None:
    lm, tok = tiny_lm(arch)
    model = PromptModel(lm, tok, PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=60))
    pool = [Example(t, label="1") for t in POS] + [Example(t, label="0") for t in NEG]
    icl = InContextPrompt(model.prompt, pool, seed=13)
    enc, n = icl.encode_one("what a lovely film", position=0)
    text = tok.decode(enc.input_ids)
    assert 1 <= n < len(pool) and len(enc.input_ids) < 60
    more = icl._encode_with("what a lovely film", icl.order_for(0)[: n + 1])
    assert len(more.input_ids) >= 60  # one more example would not fit whole
    shown = [pool[i] for i in icl.order_for(0)[:n]]
    for ex in shown:
        assert ex.text in text
    assert text.count("terrible") == sum(ex.label == "0" for ex in shown)
    assert text.count("great") == sum(ex.label == "1" for ex in shown)
    assert text.rindex("what a lovely film") > max(text.index(ex.text) for ex in shown)
    assert 0 <= enc.answer_pos < len(enc.input_ids)
    if arch == "gemma":
        assert enc.answer_pos == len(enc.input_ids) - 1
    else:
        assert enc.input_ids[enc.answer_pos] == tok.mask_token_id
    assert icl.encode_one("what a lovely film", position=1)[0].input_ids != enc.input_ids  # each query its own draw


def test_metrics_match_hand_computed_values() -> None:
    ref = ["1", "1", "1", "0", "0", "0", "1", "0"]
    pred = ["1", "1", "0", "0", "0", "1", "1", "0"]
    # tp=3 fn=1 fp=1 tn=3
    assert compute_metric("acc", pred, ref) == pytest.approx(6 / 8)
    assert compute_metric("f1", pred, ref) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert compute_metric("mcc", pred, ref) == pytest.approx((3 * 3 - 1 * 1) / math.sqrt(4 * 4 * 4 * 4))
    assert compute_metric("mcc", ["1", "1", "0", "0"], ["0", "0", "1", "1"]) == pytest.approx(-1.0)
    assert compute_metric("f1", ["0", "0"], ["0", "0"]) == 0.0
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    # means 2.5, 2.75; cov sum = -1.5*-1.75 + -.5*.25 + .5*-.75 + 1.5*2.25 = 5.5; sx^2 = 5, sy^2 = 8.75
    assert compute_metric("pearson", x, y) == pytest.approx(5.5 / math.sqrt(5 * 8.75))
    assert compute_metric("pearson", [2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)


def test_summary_table_marks_missing_seeds() -> None:
    rec = lambda seed, test: {"settings": {"task": "CoLA", "method": "prompt", "seed": seed}, "metric": "mcc", "dev": 0.1, "test": test}
    rows = summarize([rec(13, 0.2), rec(21, 0.4)])
    assert rows[0]["mean"] == pytest.approx(0.3) and rows[0]["std"] == pytest.approx(0.1)
    table = markdown_table(rows, ["CoLA", "STS-B"], ["prompt", "finetune"], n_seeds=3)
    assert "| prompt | 30.0 (10.0) [2/3 seeds] | – |" in table and "CoLA (MCC)" in table and "| finetune | – | – |" in table


def test_the_report_marks_tasks_where_demonstrations_do_not_help() -> None:
    def rec(task: str, method: str, seed: int, test: float, dev: float = 0.5, lr: float = 1e-5) -> dict:
        return {"settings": {"task": task, "method": method, "seed": seed, "learning_rate": lr}, "metric": "acc", "dev": dev, "test": test}

    records = [rec("SST-2", "prompt", 13, 0.90), rec("SST-2", "prompt", 21, 0.80), rec("SST-2", "prompt-demo-similar", 13, 0.85),
               rec("SST-2", "prompt-demo-similar", 21, 0.84),
               # the grid's other point has the better test but the worse dev: the paired score is the best-on-dev one
               rec("SST-2", "prompt-demo-similar", 21, 0.99, dev=0.1, lr=2e-5),
               rec("trec", "prompt", 13, 0.60), rec("trec", "prompt-demo-similar", 13, 0.70),
               rec("trec", "prompt-demo-similar", 42, 0.10)]  # no prompt cell for seed 42: not paired
    gains = {(g["task"], g["method"]): g for g in demo_gains(records)}
    sst2, trec = gains[("SST-2", "prompt-demo-similar")], gains[("trec", "prompt-demo-similar")]
    assert sst2["seeds"] == [13, 21] and sst2["delta"] == pytest.approx(-0.005) and sst2["wins"] == 1 and not sst2["helps"]
    assert trec["seeds"] == [13] and trec["delta"] == pytest.approx(0.10) and trec["helps"]
    table = gains_table(list(gains.values()))
    assert "| SST-2 | prompt-demo-similar | 85.0 | 84.5 | -0.5 | 1/2 | **does not help** |" in table
    assert "| trec | prompt-demo-similar | 60.0 | 70.0 | +10.0 | 1/1 | helps |" in table


def test_bad_configs_name_the_problem(kshot: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown method"):
        _config(kshot, tmp_path, "m", methods=["prompt", "gpt3"])
    with pytest.raises(ValueError, match="unknown task"):
        _config(kshot, tmp_path, "m", tasks=["SST-3"])
    with pytest.raises(ValueError, match="seeds must not be empty"):
        _config(kshot, tmp_path, "m", seeds=[])
    with pytest.raises(ValueError, match="max_test"):
        _config(kshot, tmp_path, "m", max_test=0)
    with pytest.raises(ValueError, match="missing k-shot file"):
        run_experiment(_config(kshot, tmp_path, "m", seeds=[87]), runner=lambda cfg, cell: {})


def test_cli_parses_grids_and_runs_an_experiment(kshot: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_experiment_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["experiment", "--tasks", "SST-2,RTE", "--methods", "prompt,finetune", "--seeds", "13,21",
                              "--data", str(kshot), "--lr", "1e-5,2e-5", "--finetune-lr", "1e-4", "--batch-size", "4,8",
                              "--max-steps", "30", "--max-test", "100", "--num-sample", "4"])
    config = config_from_args(args)
    assert config.grid("prompt") == [(1e-5, 4), (1e-5, 8), (2e-5, 4), (2e-5, 8)] and config.grid("finetune") == [(1e-4, 4), (1e-4, 8)]
    assert (config.max_steps, config.eval_steps, config.max_test, config.num_sample) == (30, 100, 100, 4)
    assert config.demo_format() == {"order": "class", "separator": " ", "per_class": 1, "label_after": True}
    args = parser.parse_args(["experiment", "--tasks", "SST-2", "--data", str(kshot), "--demo-order", "shuffle",
                              "--demo-separator", "\\n\\n", "--demos-per-class", "2", "--no-demo-label-after"])
    assert config_from_args(args).demo_format() == {"order": "shuffle", "separator": "\n\n", "per_class": 2, "label_after": False}
    import fsserve.experiment.protocol

    seen: list[ExperimentConfig] = []
    monkeypatch.setattr(fsserve.experiment.protocol, "run_cell", lambda cfg, cell: seen.append(cfg) or
                        {"metric": "acc", "n_test": 8, "dev": None, "best_step": None, "test": 0.625})
    code = main(["experiment", "--tasks", "SST-2", "--methods", "zero-shot", "--seeds", "13", "--k", "2", "--data", str(kshot),
                 "--model", "some-lm", "--out", str(tmp_path / "cli"), "--max-length", "64"])
    out = capsys.readouterr().out
    assert code == 0 and "[1/1] SST-2 zero-shot seed 13: test 62.5 (acc, n=8)" in out and "| zero-shot | 62.5 (0.0) |" in out
    assert out.index("| zero-shot | 62.5 (0.0) |") < out.index("| *theirs* Prompt-based zero-shot | 83.6 |")
    assert seen[0].model == "some-lm" and seen[0].max_length == 64 and (tmp_path / "cli" / "results.png").is_file()
    assert main(["experiment", "--tasks", "SST-2", "--seeds", "5", "--data", str(kshot), "--out", str(tmp_path / "x")]) == 2
