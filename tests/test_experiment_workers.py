"""Several processes on one experiment (fsserve.experiment.cell_lock + run_experiment): each cell computed once, dead workers' cells taken over."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fsserve.experiment.cell_lock import holder_alive, process_start_time, release, try_claim
from fsserve.experiment.protocol import Cell, ExperimentConfig, cache_path, cell_settings, iter_cells, run_experiment

from test_experiment import _write_kshot


def _config(root: Path) -> ExperimentConfig:
    return ExperimentConfig(tasks=["SST-2", "RTE"], methods=["prompt", "finetune"], seeds=[13, 21], k=2,
                            data_dir=str(root / "kshot"), out_dir=str(root / "run"), model="tiny", max_steps=1)


def _slow_fake(cfg: ExperimentConfig, cell: Cell) -> dict:
    """Stands in for training: records who computed the cell, takes a while, returns a valid record."""
    marks = Path(cfg.out_dir).parent / "computed"
    marks.mkdir(exist_ok=True)
    (marks / f"{cell.task}-{cell.method}-{cell.seed}-{os.getpid()}").touch()
    time.sleep(0.15)
    return {"metric": "acc", "n_test": 4, "dev": 0.5, "test": 0.25 + 0.25 * (cell.seed == 13), "best_step": 1}


def _worker(root: str) -> None:
    run_experiment(_config(Path(root)), runner=_slow_fake, poll_seconds=0.05)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    _write_kshot(tmp_path / "kshot")
    return tmp_path


def test_two_processes_share_the_cells_and_compute_each_once(root: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_worker, args=(str(root),)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    marks = [p.name.rsplit("-", 1) for p in (root / "computed").iterdir()]
    cells = [name for name, _ in marks]
    assert len(cells) == 8 and len(set(cells)) == 8  # every cell once, none twice
    assert len({pid for _, pid in marks}) == 2  # and both workers did some of them
    report = json.loads((root / "run" / "results.json").read_text())
    assert len(report["cells"]) == 8 and all(r["n_seeds"] == 2 for r in report["summary"])
    assert not list((root / "run").rglob("*.lock"))


def _lock_for(config: ExperimentConfig, cell: Cell) -> tuple[Path, Path]:
    path = cache_path(config, cell_settings(config, cell))
    return path, path.with_suffix(".lock")


def test_a_cell_held_by_a_live_worker_waits_and_a_dead_workers_cell_is_taken_over(root: Path) -> None:
    config = _config(root)
    first, second = list(iter_cells(config))[:2]
    path_a, lock_a = _lock_for(config, first)
    path_b, lock_b = _lock_for(config, second)
    other = subprocess.Popen(["sleep", "30"])  # plays a live worker on this host
    dead = subprocess.Popen(["true"])
    dead.wait()
    for lock, pid in ((lock_a, other.pid), (lock_b, dead.pid)):
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": time.time()}))
    settings_a = cell_settings(config, first)

    def the_other_worker_finishes() -> None:
        path_a.write_text(json.dumps({"settings": settings_a, "metric": "acc", "n_test": 4, "dev": 0.9,
                                      "test": 1.0, "best_step": 1, "by": "other"}))
        release(lock_a)
        other.kill()

    finisher = threading.Timer(0.5, the_other_worker_finishes)
    finisher.start()
    computed: list[Cell] = []
    try:
        report = run_experiment(config, runner=lambda cfg, cell: computed.append(cell) or _slow_fake(cfg, cell),
                                poll_seconds=0.05)
    finally:
        finisher.join()
        other.kill()
    assert first not in computed and second in computed  # waited for the live one, took the dead one's
    assert len(computed) == 7
    assert [c for c in report["cells"] if c.get("by") == "other"][0]["settings"] == settings_a
    assert not lock_a.exists() and not lock_b.exists()


def test_claims_are_exclusive_and_unreadable_fresh_locks_count_as_live(tmp_path: Path) -> None:
    lock = tmp_path / "a" / "cell.lock"
    assert try_claim(lock) and not try_claim(lock) and holder_alive(lock)
    release(lock)
    assert not holder_alive(lock) and try_claim(lock)
    lock.write_text("")  # a worker between creating and writing its claim
    assert holder_alive(lock) and not try_claim(lock)
    old = time.time() - 3600
    os.utime(lock, (old, old))  # ... or one that died there
    assert not holder_alive(lock) and try_claim(lock)
    lock.write_text(json.dumps({"pid": 1, "host": "another-machine", "since": 0}))
    assert holder_alive(lock)  # a pid on another host cannot be checked: wait for it


def test_a_reused_pid_does_not_keep_a_dead_workers_claim_alive(tmp_path: Path) -> None:
    lock = tmp_path / "cell.lock"
    newcomer = subprocess.Popen(["sleep", "30"])  # alive, but started long after the claim was written
    try:
        started = process_start_time(newcomer.pid)
        assert started is not None and abs(started - time.time()) < 60
        lock.write_text(json.dumps({"pid": newcomer.pid, "host": socket.gethostname(), "since": time.time() - 3600}))
        assert not holder_alive(lock) and try_claim(lock)
        lock.write_text(json.dumps({"pid": newcomer.pid, "host": socket.gethostname(), "since": time.time()}))
        assert holder_alive(lock)  # the same process claiming after it started is a live holder
    finally:
        newcomer.kill()


def test_cli_workers_flag_runs_a_real_experiment_in_two_processes(tiny_lm_dir, root: Path, capsys) -> None:
    from fsserve.cli import main

    out = root / "cli"
    argv = ["experiment", "--tasks", "SST-2,RTE", "--methods", "zero-shot,prompt", "--seeds", "13,21", "--k", "2",
            "--data", str(root / "kshot"), "--model", str(tiny_lm_dir("gemma")), "--out", str(out), "--max-steps", "2",
            "--eval-steps", "1", "--batch-size", "2", "--max-length", "64", "--workers", "2"]
    assert main(argv) == 0
    mine = capsys.readouterr().out.splitlines()
    theirs = (out / "worker-1.log").read_text().splitlines()
    computed = [line.split("]", 1)[1].rsplit("[", 1)[0] for line in mine + theirs
                if line.startswith("[") and not line.endswith("[cached]")]
    assert len(computed) == 8 and len(set(computed)) == 8  # each of the 8 cells computed by exactly one process
    assert any(line.startswith("[") and not line.endswith("[cached]") for line in theirs)  # the helper took part
    report = json.loads((out / "results.json").read_text())
    assert len(report["cells"]) == 8 and not list(out.rglob("*.lock"))
    assert main([*argv[:-1], "0"]) == 2  # --workers 0 is refused
