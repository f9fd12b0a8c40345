"""``python -m evolq.cli``: the same as ``evolq``."""
import sys

from . import main

sys.exit(main())
