"""The real browser of the TensorBoard checks lives with the docs tools (docs/tools/browser.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "tools"))

from browser import Browser, TensorBoard  # noqa: E402

__all__ = ["Browser", "TensorBoard"]
