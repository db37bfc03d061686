"""Tests for fsserve.data: the task registry, loaders on the real LM-BFF files, metrics, k-shot sampling."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from fsserve.data import (
    TASKS,
    Example,
    default_data_dir,
    get_task,
    load_examples,
    load_kshot,
    load_split,
    regression_class,
)
from fsserve.metrics import compute_metric
from fsserve.sampling import sample_kshot

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = default_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set FSSERVE_DATA_DIR)")
    return path


# --- registry -------------------------------------------------------------------------------

def test_registry_has_lm_bffs_fifteen_tasks():
    assert set(TASKS) == {"SST-2", "sst-5", "mr", "cr", "mpqa", "subj", "trec", "CoLA", "MNLI", "SNLI",
                          "QNLI", "RTE", "MRPC", "QQP", "STS-B"}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_is_well_formed(name):
    spec = TASKS[name]
    assert spec.name == name
    assert len(spec.labels) == len(set(spec.labels)) >= 2
    assert set(spec.label_words) == set(spec.labels)
    assert all(word.strip() for word in spec.label_words.values())
    assert spec.metric in {"acc", "f1", "mcc", "pearson"}
    assert spec.template.startswith("*cls*") and "*mask*" in spec.template and "sent" in spec.template
    assert ("_1*" in spec.template) == spec.is_pair == (spec.text_b_column is not None)
    assert spec.is_regression == (spec.label_range is not None) == (spec.metric == "pearson")
    assert set(spec.split_files) >= {"train", "dev", "test"}
    hash(spec)  # frozen specs can key caches


def test_manual_prompts_match_lm_bff():
    assert get_task("SST-2").template == "*cls**sent_0*_It_was*mask*.*sep+*"
    assert get_task("trec").template == "*cls**mask*:*+sent_0**sep+*"
    assert get_task("RTE").template == "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
    assert get_task("MRPC").template == "*cls**sent_0**mask*,*+sentl_1**sep+*"
    assert get_task("MNLI").label_words == {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"}
    assert get_task("QNLI").label_words == {"entailment": "Yes", "not_entailment": "No"}
    assert get_task("sst-5").label_words["2"] == "okay"
    assert get_task("subj").label_words == {"0": "subjective", "1": "objective"}
    assert get_task("CoLA").metric == "mcc" and get_task("QQP").metric == "f1"
    assert get_task("STS-B").label_range == (0.0, 5.0)


@pytest.mark.parametrize("spelling", ["sst2", "SST-2", "sst-2", "Sst_2"])
def test_get_task_ignores_case_and_dashes(spelling):
    assert get_task(spelling).name == "SST-2"


def test_get_task_unknown_lists_known_names():
    with pytest.raises(ValueError, match="unknown task 'imdb'.*SST-2.*STS-B"):
        get_task("imdb")


def test_default_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("FSSERVE_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("FSSERVE_DATA_DIR")
    assert default_data_dir().parts[-2:] == ("shared", "data")


# --- real data ------------------------------------------------------------------------------

def test_sst2_full_dev_and_16_shot(data_dir):
    dev = load_split("SST-2", data_dir / "original/SST-2/dev.tsv")
    assert len(dev) == 872 and dev[0].text.startswith("it 's a charming") and dev[0].label == "1"
    for seed in (13, 42):
        train = load_kshot("sst2", data_dir / "k-shot", 16, seed, "train")
        assert sorted(e.label for e in train) == ["0"] * 16 + ["1"] * 16
    assert len(load_kshot("SST-2", data_dir / "k-shot", split="test")) == 872


def test_sst5_and_trec_csv(data_dir):
    sst5 = load_kshot("sst-5", data_dir / "k-shot", 16, 21, "train")
    assert sorted({e.label for e in sst5}) == list("01234") and len(sst5) == 80
    trec = load_split("trec", data_dir / "original/trec/test.csv")
    assert len(trec) == 500 and {e.label for e in trec} == set("012345")
    assert trec[1].text == "What county is Modesto , California in ?"  # quoted csv field
    assert all(e.text_b is None for e in trec)


def test_rte_is_a_pair_task(data_dir):
    rte = load_kshot("RTE", data_dir / "k-shot", 16, 42, "dev")
    assert len(rte) == 32 and all(e.text_b for e in rte)
    assert {e.label for e in rte} == {"entailment", "not_entailment"}


def test_cola_has_no_header(data_dir):
    cola = load_split("CoLA", data_dir / "original/CoLA/dev.tsv")
    assert len(cola) == 1043 and cola[0].text == "The sailors rode the breeze clear of the rocks."


def test_stsb_scores_are_floats(data_dir):
    stsb = load_kshot("STS-B", data_dir / "k-shot", 16, 42, "train")
    assert len(stsb) == 32 and all(isinstance(e.label, float) and 0 <= e.label <= 5 for e in stsb)
    assert all(e.text_b for e in stsb)


@pytest.mark.parametrize("task,test_size", [("MRPC", 408), ("QNLI", 5463)])
def test_8_shot_pair_tasks(data_dir, task, test_size):
    train = load_kshot(task, data_dir / "k-shot-8", k=8, seed=13)
    spec = get_task(task)
    assert sorted(e.label for e in train) == sorted(spec.labels * 8)
    assert len(load_kshot(task, data_dir / "k-shot-8", k=8, seed=13, split="test")) == test_size


@pytest.mark.parametrize("task,original", [("SST-2", "train.tsv"), ("RTE", "train.tsv"),
                                           ("STS-B", "train.tsv"), ("sst-5", "train.csv")])
def test_sample_kshot_reproduces_published_splits(data_dir, task, original):
    full = load_split(task, data_dir / "original" / get_task(task).name / original)
    train, dev = sample_kshot(full, get_task(task).labels, 16, 42, task=task)
    assert train == load_kshot(task, data_dir / "k-shot", 16, 42, "train")
    assert dev == load_kshot(task, data_dir / "k-shot", 16, 42, "dev")


def test_wrong_task_for_file_names_the_header(data_dir):
    with pytest.raises(ValueError, match=r"dev.tsv:1: header .* not RTE's"):
        load_split("RTE", data_dir / "original/SST-2/dev.tsv")


def test_kshot_bad_split_and_missing_file(data_dir):
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        load_kshot("SST-2", data_dir / "k-shot", split="valid")
    with pytest.raises(ValueError, match="no such file .*16-7"):
        load_kshot("SST-2", data_dir / "k-shot", seed=7)


def test_mnli_dev_split_is_dev_matched(tmp_path):
    header = ["index", "promptID", "pairID", "genre", "s1b", "s2b", "s1p", "s2p", "sentence1", "sentence2",
              "label1", "gold_label"]
    row = ["0", "1", "2", "fiction", "", "", "", "", "A man sleeps.", "Nobody sleeps.", "contradiction",
           "contradiction"]
    folder = tmp_path / "MNLI" / "16-13"
    folder.mkdir(parents=True)
    (folder / "dev_matched.tsv").write_text("\t".join(header) + "\n" + "\t".join(row) + "\n")
    [example] = load_kshot("mnli", tmp_path, 16, 13, "dev")
    assert example == Example("A man sleeps.", "Nobody sleeps.", "contradiction")


# --- bad task files -------------------------------------------------------------------------

@pytest.mark.parametrize("body,message", [
    ("sentence\tlabel\ngood film \t1\nbad film \t7\n", r"bad.tsv:3: unknown label '7'"),
    ("sentence\tlabel\ngood film\n", r"bad.tsv:2: expected at least 2 columns"),
])
def test_load_split_bad_rows(tmp_path, body, message):
    path = tmp_path / "bad.tsv"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_split("SST-2", path)


def test_load_split_header_only(tmp_path):
    path = tmp_path / "empty.tsv"
    path.write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match="empty.tsv: no examples"):
        load_split("SST-2", path)


def test_load_split_skips_a_blank_published_row_and_names_it(tmp_path, caplog):
    # LM-BFF's own 8-shot CR train.csv has a row whose text is one space: published data keeps loading
    path = tmp_path / "train.csv"
    path.write_text('1,"A sharp, bright screen."\n0," "\n0,"The battery died in a day."\n')
    with caplog.at_level(logging.WARNING, logger="fsserve.data"):
        examples = load_split("cr", path)
    assert [e.text for e in examples] == ["A sharp, bright screen.", "The battery died in a day."]
    assert [e.label for e in examples] == ["1", "0"]
    assert any(f"{path}:2: blank text" in r.getMessage() and "row skipped" in r.getMessage() for r in caplog.records)


def test_load_split_pair_without_text_b(tmp_path, caplog):
    path = tmp_path / "rte.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\tA cat sat.\t\tentailment\n1\tA dog ran.\tA dog moved.\tentailment\n")
    with caplog.at_level(logging.WARNING, logger="fsserve.data"):
        [example] = load_split("RTE", path)
    assert example.text_b == "A dog moved."
    assert any(f"{path}:2: blank text" in r.getMessage() for r in caplog.records)
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\tA cat sat.\t\tentailment\n")
    with pytest.raises(ValueError, match=r"rte.tsv: no examples"):
        load_split("RTE", path)


def test_load_split_score_out_of_range(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    path = tmp_path / "stsb.tsv"
    path.write_text(header + "0\tg\tf\t2012\t0\tn\tn\tA dog.\tA cat.\t5.5\n")
    with pytest.raises(ValueError, match=r"stsb.tsv:2: score '5.5' is outside"):
        load_split("STS-B", path)


def test_qqp_skips_malformed_rows_like_lm_bff(tmp_path):
    path = tmp_path / "qqp.tsv"
    path.write_text("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                    "0\t1\t2\tHow old is it?\tWhat age is it?\t1\n3\t4\tbroken row\n")
    assert load_split("QQP", path) == [Example("How old is it?", "What age is it?", "1")]


# --- user files -----------------------------------------------------------------------------

def test_shipped_examples_load():
    train = load_examples(EXAMPLES_DIR / "sentiment_train.jsonl", labels=["0", "1"])
    dev = load_examples(EXAMPLES_DIR / "sentiment_dev.jsonl", labels=["0", "1"])
    new = load_examples(EXAMPLES_DIR / "sentiment_new.txt")
    for split in (train, dev):
        assert sorted(e.label for e in split) == ["0"] * 16 + ["1"] * 16
    assert not {e.text for e in train} & {e.text for e in dev}
    assert len(new) == 6 and all(e.label is None for e in new)


def test_csv_and_jsonl_loaders(tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text('text,text_b,label\n"Hi, there",Hello,1\nA cat.,A dog.,0\n')
    assert load_examples(csv_path, labels=["0", "1"], pair=True) == [
        Example("Hi, there", "Hello", "1"), Example("A cat.", "A dog.", "0")]
    jsonl = tmp_path / "scores.jsonl"
    jsonl.write_text('{"text": "a", "text_b": "b", "label": 3.5}\n\n{"text": "c", "text_b": "d", "label": "1"}\n')
    assert [e.label for e in load_examples(jsonl, regression=True)] == [3.5, 1.0]
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text('{"text": "good", "label": 1}\n')
    assert load_examples(numeric)[0].label == "1"  # numeric labels stay label names


@pytest.mark.parametrize("name,body,kwargs,message", [
    ("a.csv", "text,label\ngood,1\nbad,neg\n", {"labels": ["0", "1"]}, r"a.csv:3: unknown label 'neg'"),
    ("a.csv", "sentence,label\ngood,1\n", {}, r"a.csv:1: header .*unknown: \['sentence'\]"),
    ("a.jsonl", '{"sentence": "ok", "label": "1"}\n', {}, r"a.jsonl:1: keys .*unknown: \['sentence'\]"),
    ("a.csv", "text,label\n ,1\n", {}, r"a.csv:2: empty text"),
    ("a.csv", "text,label\ngood,1,extra\n", {}, r"a.csv:2: more cells than header"),
    ("a.csv", "text,label\ngood,\n", {}, r"a.csv:2: missing or invalid label ''"),
    ("a.csv", "text,text_b,label\ngood,,1\n", {"pair": True}, r"a.csv:2: empty text_b"),
    ("a.csv", "", {}, r"a.csv: empty file"),
    ("a.jsonl", '{"text": "ok", "label": "1"}\n{"text": "x", "label": "2"}\n', {"labels": ["0", "1"]},
     r"a.jsonl:2: unknown label '2'"),
    ("a.jsonl", '{"text": "ok"\n', {}, r"a.jsonl:1: invalid JSON"),
    ("a.jsonl", '["ok", 1]\n', {}, r"a.jsonl:1: expected a JSON object"),
    ("a.jsonl", '{"text": "", "label": "1"}\n', {}, r"a.jsonl:1: empty text"),
    ("a.jsonl", '{"text": 5, "label": "1"}\n', {}, r"a.jsonl:1: text and text_b must be strings"),
    ("a.jsonl", '{"text": "ok", "label": "high"}\n', {"regression": True}, r"a.jsonl:1: .*'high' is not a number"),
    ("a.tsv", "text\tlabel\n", {}, r"unsupported file type '.tsv'"),
])
def test_load_examples_bad_inputs(tmp_path, name, body, kwargs, message):
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_examples(path, **kwargs)


def test_load_examples_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such file .*nope.jsonl"):
        load_examples(tmp_path / "nope.jsonl")


# --- metrics --------------------------------------------------------------------------------

def test_accuracy():
    # 2 of 4 agree -> 0.5; ints and strings name the same label
    assert compute_metric("acc", [1, 0, 1, 1], ["1", "1", "1", "0"]) == 0.5


def test_f1_and_mcc_by_hand():
    pred = ["1", "1", "0", "1", "0"]
    ref = ["1", "0", "0", "1", "1"]
    # TP=2 (0,3), FP=1 (1), FN=1 (4), TN=1 (2)
    # F1 = 2TP / (2TP + FP + FN) = 4/6
    assert compute_metric("f1", pred, ref) == pytest.approx(2 / 3)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    assert compute_metric("mcc", pred, ref) == pytest.approx(1 / 6)


def test_mcc_edges_and_multiclass():
    assert compute_metric("mcc", [0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)
    assert compute_metric("mcc", ["0", "1"], ["1", "0"]) == pytest.approx(-1.0)
    assert compute_metric("mcc", ["1", "1", "1"], ["0", "1", "1"]) == 0.0  # undefined -> 0, as sklearn
    assert compute_metric("f1", ["0", "0"], ["0", "0"]) == 0.0  # no positives anywhere


def test_pearson_by_hand():
    # x = [1,2,3], y = [1,2,4]: deviations [-1,0,1] and [-4/3,-1/3,5/3]
    # cov sum = 4/3 + 5/3 = 3; sum dx^2 = 2; sum dy^2 = 42/9 -> r = 3 / sqrt(2 * 42/9) = sqrt(27/28)
    assert compute_metric("pearson", [1, 2, 3], [1.0, 2.0, 4.0]) == pytest.approx(math.sqrt(27 / 28))
    assert compute_metric("pearson", [2.0, 2.0], [1.0, 3.0]) == 0.0


@pytest.mark.parametrize("metric,pred,ref,message", [
    ("auc", ["1"], ["1"], "unknown metric 'auc'"),
    ("acc", ["1"], ["1", "0"], "1 predictions but 2 references"),
    ("acc", [], [], "no predictions"),
])
def test_metric_bad_inputs(metric, pred, ref, message):
    with pytest.raises(ValueError, match=message):
        compute_metric(metric, pred, ref)


# --- sampling -------------------------------------------------------------------------------

def _pool(per_label: int) -> list[Example]:
    return [Example(f"sentence {label} {i}", label=label) for label in "012" for i in range(per_label)]


def test_sample_kshot_counts_and_determinism():
    pool = _pool(40)
    train, dev = sample_kshot(pool, ["0", "1", "2"], k=4, seed=13)
    assert sorted(e.label for e in train) == sorted(e.label for e in dev) == sorted("012" * 4)
    assert not set(train) & set(dev)
    assert (train, dev) == sample_kshot(pool, ["0", "1", "2"], k=4, seed=13)
    assert train != sample_kshot(pool, ["0", "1", "2"], k=4, seed=21)[0]


def test_sample_kshot_errors():
    with pytest.raises(ValueError, match="label '2' has 3 examples, fewer than k=4"):
        sample_kshot([e for e in _pool(5) if e.label != "2"] + _pool(3)[-3:], ["0", "1", "2"], k=4, seed=1)
    with pytest.raises(ValueError, match="unknown label '2'"):
        sample_kshot(_pool(10), ["0", "1"], k=4, seed=1)
    with pytest.raises(ValueError, match="needs a regression task"):
        sample_kshot([Example("a", "b", 1.0)], ["0", "1"], k=1, seed=1)


def test_regression_class_uses_lm_bff_median():
    assert regression_class(2.5, "STS-B") == "0"  # LM-BFF's demonstrations: <= median is low
    assert regression_class(2.6, "stsb") == "1"
    with pytest.raises(ValueError, match="SST-2 is not a regression task"):
        regression_class(1.0, "SST-2")


def test_example_json_roundtrip_shape():
    # the shipped files are plain {"text", "label"} objects, the format load_examples documents
    line = (EXAMPLES_DIR / "sentiment_train.jsonl").read_text().splitlines()[0]
    assert set(json.loads(line)) == {"text", "label"}
