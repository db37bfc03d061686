"""The ``fsserve`` command line (the library never prints; these modules do).

- ``main``: the parser and the entry point (``fsserve``, ``python -m fsserve``);
- ``args``: the argument groups and checks every command shares;
- one module per command group: ``train`` (train, eval, predict), ``export``, ``serve`` (serve,
  client), ``search``, ``methods`` (probe-layers, compare), ``experiment``, ``bench``.

May import the whole library; nothing in the library imports it, and no command module imports
this package or ``main`` back.

>>> from fsserve.cli import main
>>> main(["predict", "/no/such/bundle", "A fine film."])  # doctest: +SKIP
2
"""

from __future__ import annotations

from fsserve.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
