"""Evaluate trained explainers (AD/IC, ROAD, ...): not yet implemented (issue 3)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    print("evaluate.py: not yet - the faithfulness evaluation suite comes with issue 3.")
    sys.exit(2)
