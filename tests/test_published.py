"""LM-BFF's published numbers (fsserve.experiment.published): keyed like fsserve's tasks and methods, unconfirmed cells marked."""

from __future__ import annotations

from fsserve.data import get_task
from fsserve.experiment.protocol import METHODS
import pytest

from fsserve.experiment.published import _ROWS, NOT_RUN, SOURCES, _merge, published_rows, published_score, published_table


def test_every_published_cell_names_a_registered_task_a_method_and_a_source() -> None:
    for method, (row, cells) in _ROWS.items():
        assert (method in METHODS) != (method in NOT_RUN) and row
        for task, (mean, std, sources) in cells.items():
            assert sources and all(s in SOURCES for s in sources)  # a number always says where it was read
            assert get_task(task).name == task  # the registry's spelling, so lookups from a run match
            assert -100.0 <= mean <= 100.0
            assert (std is None) == (method == "zero-shot")  # nothing trained, nothing to vary over seeds


def test_sources_that_show_the_same_cell_must_agree() -> None:
    label, cells = _merge("row", ("dart", {"SST-2": (92.3, 1.0)}), ("amulap", {"SST-2": (92.3, 1.0), "RTE": (1.0, 0.5)}))
    assert cells == {"SST-2": (92.3, 1.0, ("dart", "amulap")), "RTE": (1.0, 0.5, ("amulap",))}
    with pytest.raises(ValueError, match="SST-2: amulap shows"):
        _merge("row", ("dart", {"SST-2": (92.3, 1.0)}), ("amulap", {"SST-2": (92.7, 1.0)}))


def test_dart_fills_trec_and_the_automatic_template_row() -> None:
    dart = SOURCES["dart"]
    assert str(published_score("trec", "zero-shot")) == "32.0" and published_score("trec", "zero-shot").source == dart
    assert str(published_score("QQP", "zero-shot")) == "49.7"  # the reproduction README's 32.0 here is TREC's
    assert str(published_score("trec", "finetune")) == "88.8 (2.1)" and str(published_score("trec", "in-context")) == "26.2 (2.4)"
    auto = published_score("SST-2", "prompt-auto")
    assert auto is not None and (auto.mean, auto.std, auto.row) == (92.3, 1.0, "Prompt-based FT (auto)")
    assert published_score("SST-2", "finetune").source == f"{SOURCES['amulap']}; {dart}"  # two sources, one number
    assert published_score("mpqa", "zero-shot") is None  # the one source that shows it contradicts itself
    assert published_score("sst-5", "prompt-auto") is None  # no readable source shows it


def test_lookup_and_table_mark_what_is_theirs_and_what_is_unconfirmed() -> None:
    score = published_score("SST-2", "prompt")
    assert score is not None and (score.mean, score.std) == (92.7, 0.9) and str(score) == "92.7 (0.9)"
    assert str(published_score("sst-5", "zero-shot")) == "35.0"
    assert published_score("STS-B", "prompt") is None and published_score("SST-2", "prompt-demo") is None
    table = published_table(["SST-2", "trec"], ["zero-shot", "prompt", "prompt-demo", "prompt-demo-similar"])
    lines = table.splitlines()
    assert lines[0] == "| method (LM-BFF row) | SST-2 | trec |"
    assert lines[2] == "| *theirs* Prompt-based zero-shot | 83.6 | 32.0 |"
    assert lines[3] == "| *theirs* Prompt-based FT (man) | 92.7 (0.9) | 84.8 (5.1) |"
    assert lines[4] == "| *theirs* Prompt-based FT (man) + demonstrations | not confirmed | not confirmed |"
    assert len(lines) == 5  # random demonstrations have no row in LM-BFF's Table 3
    assert published_table(["SST-2"], ["prompt-demo"]) == ""
    rows = published_rows(["RTE", "STS-B"], ["finetune", "prompt"])
    assert [(r["task"], r["method"], r["mean"]) for r in rows] == [("RTE", "finetune", 54.4), ("RTE", "prompt", 69.1)]
    assert all(set(r["source"].split("; ")) <= set(SOURCES.values()) for r in rows)
    assert not any("; " in source for source in SOURCES.values())  # "; " joins a cell's sources
