"""LM-BFF's published numbers (fsserve.experiment.published): keyed like fsserve's tasks and methods, unconfirmed cells marked."""

from __future__ import annotations

from fsserve.data import get_task
from fsserve.experiment.protocol import METHODS
from fsserve.experiment.published import _ROWS, SOURCES, published_rows, published_score, published_table


def test_every_published_cell_names_a_registered_task_a_method_and_a_source() -> None:
    for method, (row, source, cells) in _ROWS.items():
        assert method in METHODS and row
        assert not cells or source in SOURCES  # a number always says where it was read
        for task, (mean, std) in cells.items():
            assert get_task(task).name == task  # the registry's spelling, so lookups from a run match
            assert -100.0 <= mean <= 100.0
            assert (std is None) == (method == "zero-shot")  # nothing trained, nothing to vary over seeds


def test_lookup_and_table_mark_what_is_theirs_and_what_is_unconfirmed() -> None:
    score = published_score("SST-2", "prompt")
    assert score is not None and (score.mean, score.std) == (92.7, 0.9) and str(score) == "92.7 (0.9)"
    assert str(published_score("sst-5", "zero-shot")) == "35.0"
    assert published_score("STS-B", "prompt") is None and published_score("SST-2", "prompt-demo") is None
    table = published_table(["SST-2", "trec"], ["zero-shot", "prompt", "prompt-demo", "prompt-demo-similar"])
    lines = table.splitlines()
    assert lines[0] == "| method (LM-BFF row) | SST-2 | trec |"
    assert lines[2] == "| *theirs* Prompt-based zero-shot | 83.6 | not confirmed |"
    assert lines[3] == "| *theirs* Prompt-based FT (man) | 92.7 (0.9) | 84.8 (5.1) |"
    assert lines[4] == "| *theirs* Prompt-based FT (man) + demonstrations | not confirmed | not confirmed |"
    assert len(lines) == 5  # random demonstrations have no row in LM-BFF's Table 3
    assert published_table(["SST-2"], ["prompt-demo"]) == ""
    rows = published_rows(["RTE", "STS-B"], ["finetune", "prompt"])
    assert [(r["task"], r["method"], r["mean"]) for r in rows] == [("RTE", "finetune", 54.4), ("RTE", "prompt", 69.1)]
    assert all(r["source"] in SOURCES.values() for r in rows)
