"""Lazy public names for packages (PEP 562): ``import fsserve.x`` stays cheap, a name imports its module on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, table: Mapping[str, str], extra: tuple[str, frozenset[str]] | None = None,
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Build a package's ``__getattr__`` and ``__dir__`` from ``{public name: defining module}``.

    ``extra`` = (extra name, top-level modules it brings): a missing one becomes an ImportError that
    names the extra to install, instead of a bare ModuleNotFoundError deep in a traceback.

    >>> getattr_, dir_ = lazy_exports("fsserve.utils", {"sha256_file": "fsserve.utils.atomic"})
    >>> getattr_("sha256_file").__name__
    'sha256_file'
    """
    names = sorted(table)

    def __getattr__(name: str) -> Any:
        """Import a public name on first use and cache it in the package namespace."""
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            value = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as exc:
            if extra and exc.name and exc.name.split(".")[0] in extra[1]:
                raise ImportError(f"{package} needs the optional dependency {exc.name!r}: pip install 'fsserve[{extra[0]}]'") from exc
            raise
        importlib.import_module(package).__dict__[name] = value
        return value

    def __dir__() -> list[str]:
        """List the public names for tab completion."""
        return names

    return __getattr__, __dir__
