"""``python -m fsserve``: the ``fsserve`` command without its console script."""

import sys

from fsserve.cli.main import main

sys.exit(main())
