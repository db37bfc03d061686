"""Old module paths of fsserve 0.1 that moved into subpackages: importable for one more release, with a DeprecationWarning.

``import fsserve.ensemble`` (say) still works and yields a module whose names are the new module's
own objects (``fsserve.ensemble.PromptEnsemble is fsserve.search.ensemble.PromptEnsemble``); the
warning names the new path. Names that moved to another module rather than a new path
(``fsserve.bundle.load_bundle_predictor`` and co.) are listed in the README's changelog.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any

# old module -> its new home (the old paths go away one release after the layout ships)
MOVED = {
    "fsserve.templates": "fsserve.prompts.templates",
    "fsserve.plain_inputs": "fsserve.prompts.plain",
    "fsserve.demo_prompts": "fsserve.demos.prompting",
    "fsserve.template_search": "fsserve.search.templates",
    "fsserve.ensemble": "fsserve.search.ensemble",
    "fsserve.ensemble_predictor": "fsserve.predictor",
    "fsserve.experiment_report": "fsserve.experiment.report",
    "fsserve.cell_lock": "fsserve.experiment.cell_lock",
    "fsserve.published": "fsserve.experiment.published",
    "fsserve.baselines": "fsserve.experiment.baselines",
    "fsserve.bench_backends": "fsserve.bench.backends",
    "fsserve.bench_extras": "fsserve.bench.extras",
    "fsserve.bench_memory": "fsserve.bench.memory",
    "fsserve.bench_report": "fsserve.bench.report",
    "fsserve.cli_bench": "fsserve.cli.bench",
    "fsserve.cli_experiment": "fsserve.cli.experiment",
    "fsserve.cli_export": "fsserve.cli.export",
    "fsserve.cli_methods": "fsserve.cli.methods",
    "fsserve.cli_search": "fsserve.cli.search",
    "fsserve.cli_serve": "fsserve.cli.serve",
}
_OWN = {"__name__", "__spec__", "__loader__", "__file__", "__path__", "__package__", "__cached__", "__builtins__"}


class _AliasLoader(importlib.abc.Loader):
    """Fill the old module with the new module's names, warning once per import."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        """Use the default module object."""
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        """Warn, import the new module and expose its names (late ones through ``__getattr__``)."""
        warnings.warn(f"{module.__name__} moved to {self.new}; the old path goes away in the release after next",
                      DeprecationWarning, stacklevel=2)
        target = importlib.import_module(self.new)
        module.__dict__.update({k: v for k, v in vars(target).items() if k not in _OWN})

        def __getattr__(name: str) -> Any:
            """Names the new module gains later (lazy packages) are found there too."""
            return getattr(target, name)

        module.__getattr__ = __getattr__  # type: ignore[method-assign]


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Find the old paths in :data:`MOVED` (consulted after the normal finders, which no longer see them)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        """A spec for an old path, None for everything else."""
        new = MOVED.get(fullname)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new)) if new else None


def install() -> None:
    """Add the finder to ``sys.meta_path`` once per process."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
