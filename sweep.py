"""BoTorch sweep of the loss weights: not yet implemented (issue 5)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    print("sweep.py: not yet - the BoTorch sweep of the loss weights comes with issue 5.")
    sys.exit(2)
