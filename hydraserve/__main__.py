"""``python -m hydraserve``: the ``hydraserve`` command."""
import sys

from hydraserve.cli import main

sys.exit(main())
