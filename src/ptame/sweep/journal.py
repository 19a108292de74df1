"""The sweep's journal: an append-only JSON-lines file, one object per event.

Every line is ``json.dumps(record)`` (Python's default separators) with at least the keys
``trial`` (int id), ``status`` (proposed, running, completed, failed), ``params`` (the trial's
hyperparameters, derived values included), ``objectives`` ({"MoRF": ..., "LeRF": ...} once the
trial has ended, else null), ``run_dir`` and ``seconds`` (the trial's wall time once it has
ended, else null), plus ``time`` (ISO-8601 UTC) and optional extras (``source``, ``overrides``,
``error``, ``measured``...). A trial's state is its last line.

Writers (the sweep process and every trial's job, possibly on other machines sharing the
filesystem) append under a file lock and fsync, so a finished trial is on disk before anything
else happens. A line cut short by a crash is skipped when reading (with a warning) and the next
append starts on a fresh line.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger(__name__)

STATUSES = ("proposed", "running", "completed", "failed")
FINISHED = ("completed", "failed")
REQUIRED_KEYS = ("trial", "status", "params", "objectives", "run_dir", "seconds")


def make_record(
    trial: int,
    status: str,
    params: Mapping[str, Any],
    objectives: Mapping[str, float] | None = None,
    run_dir: str | None = None,
    seconds: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One journal line (keys in the documented order, then ``time`` and the extras)."""
    if status not in STATUSES:
        raise ValueError(f"journal status must be one of {STATUSES}, got {status!r}")
    if objectives is not None:
        for name, value in objectives.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"objective {name} must be a finite number, got {value!r}")
    record = {
        "trial": int(trial),
        "status": status,
        "params": dict(params),
        "objectives": None if objectives is None else {k: float(v) for k, v in objectives.items()},
        "run_dir": None if run_dir is None else str(run_dir),
        "seconds": None if seconds is None else round(float(seconds), 3),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
    }
    record.update(extra)
    return record


_WARNED_LINES: set[tuple[str, int, str]] = set()  # (journal, line number, line): warned once per process


def _warn_once(path: Path, number: int, line: str, message: str) -> None:
    key = (str(path.resolve()), number, line)
    if key not in _WARNED_LINES:
        _WARNED_LINES.add(key)
        log.warning(message, path, number)


class Journal:
    """Append-only JSON-lines journal at ``path`` (a ``<path>.lock`` file serialises writers)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = FileLock(str(self.path) + ".lock")

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as a line and fsync it."""
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"journal record lacks {missing}: {dict(record)}")
        line = json.dumps(dict(record), allow_nan=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            with open(self.path, "ab") as handle:
                # a previous writer may have died mid-line: never glue onto its fragment
                if handle.tell() > 0 and not self._ends_with_newline():
                    handle.write(b"\n")
                handle.write(line.encode())
                handle.flush()
                os.fsync(handle.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as reader:
            reader.seek(-1, os.SEEK_END)
            return reader.read(1) == b"\n"

    def records(self) -> list[dict[str, Any]]:
        """Every readable record in order (damaged lines are skipped, with a warning once per
        line and process however often the journal is read)."""
        if not self.path.is_file():
            return []
        records = []
        with self._lock:
            lines = self.path.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                _warn_once(self.path, number, line,
                           "journal %s: line %d is damaged (cut short by a crash?) and is skipped")
                continue
            if (
                not isinstance(record, dict)
                or any(k not in record for k in REQUIRED_KEYS)
                or record["status"] not in STATUSES
            ):
                _warn_once(self.path, number, line, "journal %s: line %d is not a trial record and is skipped")
                continue
            records.append(record)
        return records

    def latest(self) -> dict[int, dict[str, Any]]:
        """``{trial id: its last record}``, ordered by trial id. Keys that the last record
        leaves null (e.g. ``overrides`` on a ``running`` line) are filled from earlier lines."""
        state: dict[int, dict[str, Any]] = {}
        for record in self.records():
            trial = int(record["trial"])
            merged = dict(state.get(trial, {}))
            merged.update(
                {
                    k: v
                    for k, v in record.items()
                    if v is not None or k not in merged or k in ("objectives", "seconds")
                }
            )
            state[trial] = merged
        return dict(sorted(state.items()))
