"""Files: atomic writes (a reader never sees half a file, a kill never leaves one) and safe reads.

Every file ptame writes goes through :func:`atomic_write` (a temporary file in the target's folder,
then ``os.replace``); every tensor file it reads goes through :func:`safe_torch_load`
(``weights_only=True``: no pickled code is executed).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(handle)`` on a temporary binary file next to ``path``, then rename it to
    ``path`` (parent folders are created). On any error the temporary file is removed and
    ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json_atomic(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented, key-sorted JSON (with a final newline) atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def torch_save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def save_figure_atomic(figure: Any, path: str | Path, **savefig_kwargs: Any) -> Path:
    """``figure.savefig`` (a matplotlib figure) to ``path`` atomically; the format follows the
    file name's suffix."""
    suffix = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda handle: figure.savefig(handle, format=suffix, **savefig_kwargs))


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickled objects that a weights-only load refuses (it could run code)."""


def _first_bytes(path: Path, count: int = 16) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(count)


def _unreadable_reason(path: Path, error: Exception) -> str:
    """Why torch.load failed on ``path``, in words: what the file is and what was expected."""
    start = _first_bytes(path)
    if not start.startswith(b"PK") and not start.startswith(b"\x80"):
        kind = "a text file" if all(32 <= b < 127 or b in b"\t\r\n" for b in start) else "not a torch.save file"
        return (f"it is {kind} (it starts with {start!r}), not a checkpoint written by torch.save "
                "(a zip archive starting with b'PK')")
    if "central directory" in str(error) or isinstance(error, EOFError):
        return f"the file is truncated or corrupt ({path.stat().st_size} bytes; {type(error).__name__}: {error})"
    return f"{type(error).__name__}: {error}"


def safe_torch_load(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (no pickled code is executed, whatever
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says: the argument is explicit), with errors that name
    ``what``, the file, what it is and what was expected.

    Raises:
        FileNotFoundError: ``path`` is not a file. UnsafeCheckpointError: it holds objects a
        weights-only load refuses (ptame never loads such a file). ValueError: it could not be
        read (empty, truncated, not a torch.save file).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"could not read {what} {path}: the file is empty (0 bytes), not a checkpoint "
                         "written by torch.save (an interrupted copy or save?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = next((line.strip() for line in str(error).splitlines()
                       if "unsupported GLOBAL" in line or "WeightsUnpickler error" in line), "")
        raise UnsafeCheckpointError(
            f"refusing {what} {path}: it holds pickled objects that a weights-only load does not allow "
            f"({detail or 'unsupported content'}). ptame only reads tensors and plain values; a "
            "checkpoint written by ptame never needs more, so this file was written by other code or "
            "altered. It was not loaded."
        ) from None
    except Exception as error:  # noqa: BLE001 - re-raised with the file name and what it is
        raise ValueError(f"could not read {what} {path}: {_unreadable_reason(path, error)}") from error
