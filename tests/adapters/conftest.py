"""Make the adapter tests' shared helpers (``_tiny.py``) importable by plain name."""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
