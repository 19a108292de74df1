"""What happens to an image file that cannot be read: ``data.bad_images: error | skip``.

``error`` stops the run at the first unreadable file (its message names the file). ``skip``
leaves the file out of its batch (:class:`SkippingCollate`, in the DataLoader workers), and the
main process records it (:class:`SkippedImages`): each file is logged once, counted, appended to
``skipped_images.txt`` in the run directory, and the run fails once more than ``max_bad_share``
of the images are bad. A batch whose files are all bad comes out empty (0 images). Training
defaults to ``skip``, evaluation to ``error``; with ``skip`` the evaluation writes the number of
images actually evaluated and the skipped files into its results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
#: batch key of the files left out of a batch: "<path>: <error>" strings
SKIPPED_KEY = "skipped"


def check_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`BAD_IMAGE_POLICIES`, else a ValueError naming the setting."""
    if policy not in BAD_IMAGE_POLICIES:
        raise ValueError(f"data.bad_images must be one of {BAD_IMAGE_POLICIES}, got {policy!r}")
    return policy


class TooManyBadImagesError(RuntimeError):
    """More than the allowed share of a run's images could not be read."""


def skipped_item(path: str, error: Exception, index: int) -> dict[str, Any]:
    """The item a dataset returns for an unreadable file under the ``skip`` policy."""
    return {SKIPPED_KEY: f"{path}: {error}", "index": index}


class SkippingCollate:
    """Collate the readable items with ``collate`` (default: torch's) and list the skipped ones
    under ``batch["skipped"]``. A batch of skipped items only is an empty batch: ``image``
    (0, 3, size, size) of ``dtype``, empty ``label``, ``index`` and ``path``."""

    def __init__(self, image_size: int, dtype: torch.dtype,
                 collate: Callable[[Sequence[Any]], Any] | None = None) -> None:
        self.image_size, self.dtype = int(image_size), dtype
        self.collate = collate or default_collate

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        readable = [item for item in items if SKIPPED_KEY not in item]
        skipped = [item[SKIPPED_KEY] for item in items if SKIPPED_KEY in item]
        if readable:
            batch = dict(self.collate(readable))
        else:
            size = self.image_size
            batch = {"image": torch.zeros((0, 3, size, size), dtype=self.dtype),
                     "label": torch.zeros(0, dtype=torch.int64), "index": torch.zeros(0, dtype=torch.int64),
                     "path": []}
        batch[SKIPPED_KEY] = skipped
        return batch


class SkippedImages:
    """The unreadable files of a run, recorded in the main process.

    Args:
        total: images the share is counted against (e.g. the training set's size); None: no limit.
        max_share: the run fails (:class:`TooManyBadImagesError`) once more than this share of
            ``total`` is bad.
        file: where each skipped file is appended as it is met (``skipped_images.txt``), or None.
    """

    def __init__(self, total: int | None = None, max_share: float = 0.01, file: str | Path | None = None) -> None:
        if not 0.0 <= float(max_share) <= 1.0:
            raise ValueError(f"data.max_bad_share must be in [0, 1], got {max_share}")
        self.total, self.max_share = total, float(max_share)
        self.file = Path(file) if file is not None else None
        self.entries: dict[str, str] = {}  # path -> "path: error", in the order met

    def __len__(self) -> int:
        return len(self.entries)

    def record(self, batch: Any) -> Any:
        """Take ``batch["skipped"]`` out of a batch (returned without it), logging and writing
        each file the first time it is met, and enforce the share."""
        if not isinstance(batch, Mapping) or SKIPPED_KEY not in batch:
            return batch
        batch = dict(batch)
        for entry in batch.pop(SKIPPED_KEY):
            path = entry.split(": ", 1)[0]
            if path in self.entries:
                continue
            self.entries[path] = entry
            log.warning("skipped an unreadable image (data.bad_images=skip): %s", entry)
            if self.file is not None:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                with open(self.file, "a") as handle:
                    handle.write(entry + "\n")
            self._check_share()
        return batch

    def _check_share(self) -> None:
        if self.total and len(self.entries) > self.max_share * self.total:
            where = f"; the list is in {self.file}" if self.file is not None else ""
            raise TooManyBadImagesError(
                f"{len(self.entries)} of {self.total} images could not be read, more than "
                f"data.max_bad_share={self.max_share:g} allows{where}; repair the dataset or raise "
                "data.max_bad_share"
            )


#: records what reaches a loop without a recorder of its own: logged once per file, never lost
UNOWNED = SkippedImages()
