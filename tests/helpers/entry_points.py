"""Repository paths and running the entry points (train.py, evaluate.py, sweep.py, modules)
as a user would: a fresh Python process started in the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"


def run_entry_point(
    *arguments: str, timeout: float = 900, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python <arguments>`` in the repository root with unbuffered output; stdout and stderr
    captured as text; never raises on a non-zero exit (the caller asserts on it)."""
    return subprocess.run(
        [sys.executable, *arguments], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def failure_output(result: subprocess.CompletedProcess) -> str:
    """The tails of a finished process's stdout and stderr, for assertion messages."""
    return result.stdout[-3000:] + result.stderr[-5000:]
