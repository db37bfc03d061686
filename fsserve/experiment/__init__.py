"""The LM-BFF evaluation protocol (``fsserve experiment``): task × method × seed cells, cached and shared.

- ``protocol``: :class:`ExperimentConfig`, the cells, running one cell (train, best-on-dev, test)
  and the whole run, resumable;
- ``cell_lock``: claim files, so several worker processes share one run without computing a cell twice;
- ``baselines``: GPT-3-style in-context learning, the untrained baseline beside zero-shot;
- ``report``: best-on-dev per seed, mean ± std, markdown table, JSON and plot;
- ``published``: LM-BFF's published numbers with their sources, for "ours vs theirs".

May import every library layer below it (data, prompts, demos, modeling, training); never serving,
bench or the CLI. Names are imported lazily: ``import fsserve.experiment`` does not import torch.

>>> from fsserve.experiment import ExperimentConfig, run_experiment  # doctest: +SKIP
>>> run_experiment(ExperimentConfig(tasks=["SST-2"], methods=["zero-shot"], seeds=[13]))  # doctest: +SKIP
"""

from __future__ import annotations

from fsserve.utils.lazy import lazy_exports

_PROTOCOL = ("CACHE_VERSION", "DEMO_MODES", "METHODS", "TRAINED", "Cell", "ExperimentConfig", "Runner", "cache_path",
             "cell_settings", "demo_eval_mode", "iter_cells", "run_cell", "run_experiment", "split_files")
_LAZY = {name: "fsserve.experiment.protocol" for name in _PROTOCOL}
_LAZY |= {name: "fsserve.experiment.report" for name in ("summarize", "markdown_table", "write_reports")}
_LAZY |= {name: "fsserve.experiment.published" for name in ("PublishedScore", "published_score", "published_table")}
_LAZY["in_context_logits"] = "fsserve.experiment.baselines"

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
