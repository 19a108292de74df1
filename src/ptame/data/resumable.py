"""Training data order that a resumed run continues exactly.

:class:`EpochOrderSampler` gives epoch e the order that ``DataLoader(shuffle=True,
generator=torch.Generator().manual_seed(seed))`` (single-process loading) gives its e-th epoch, as
a function of (seed, epoch) alone, and can start an epoch after the batches a checkpoint already
trained on. With ``keyed=True`` it yields ``(index, epoch)`` keys, so that a dataset draws its
random augmentation from (seed, epoch, index) and not from a worker's random stream: the same
crops whichever worker loads the image, before or after a resume. :func:`batches_already_trained`
reads from Lightning's restored loop state how many batches of the current epoch that is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import logging

import torch
from torch.utils.data import DataLoader, Sampler

log = logging.getLogger(__name__)


def epoch_order(length: int, seed: int, epoch: int) -> list[int]:
    """The dataset order of ``epoch`` (0-based) under ``DataLoader(shuffle=True,
    generator=Generator().manual_seed(seed))``: per epoch the loader draws a base seed (int64)
    from its generator, then the random sampler draws a permutation of ``length`` and one more,
    empty, permutation for the remainder."""
    generator = torch.Generator().manual_seed(int(seed))
    for _ in range(int(epoch)):
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        torch.randperm(length, generator=generator)
        torch.randperm(length, generator=generator)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(length, generator=generator).tolist()


class EpochOrderSampler(Sampler):
    """Shuffled indices of a dataset of ``length`` items, epoch by epoch (:func:`epoch_order`).

    Args:
        length: number of items.
        seed: the order's seed.
        keyed: yield ``(index, epoch)`` instead of ``index`` (for datasets with random
            augmentation: :meth:`ptame.data.imagefolder.ImageSampleDataset.__getitem__`).
    """

    def __init__(self, length: int, seed: int, keyed: bool = False) -> None:
        self.length, self.seed, self.keyed = int(length), int(seed), bool(keyed)
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch."""
        self.epoch = int(epoch)

    def resume_at(self, position: dict[str, int], batch_size: int) -> None:
        """Continue from a checkpoint's :func:`training_position`: its epoch, after the batches
        already trained on (the next epoch when it had finished), for the next iteration only.
        Set before the first iteration: Lightning may create the training iterator before it
        restores its loops."""
        epoch, batches = int(position["epoch"]), int(position["batches"])
        if batches >= self.length // batch_size:  # the epoch had ended
            epoch, batches = epoch + 1, 0
        self.epoch, self._skip = epoch, batches * batch_size

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        order = epoch_order(self.length, self.seed, self.epoch)[self._skip:]
        self._skip = 0
        if self.keyed:
            return iter([(index, self.epoch) for index in order])
        return iter(order)


def training_position(trainer: Any) -> dict[str, int] | None:
    """Where a fit stands in its training data, for a checkpoint: ``{"epoch", "batches"}``
    (batches of that epoch already trained on: Lightning's ``batch_progress.current.processed``),
    or None outside a fit."""
    loop = getattr(trainer, "fit_loop", None) if trainer is not None else None
    if loop is None or not getattr(trainer, "training", False):
        return None
    return {"epoch": int(trainer.current_epoch), "batches": int(loop.epoch_loop.batch_progress.current.processed)}


def resume_sampler(sampler: EpochOrderSampler, datamodule: Any, batch_size: int) -> None:
    """Apply (once) the position a datamodule restored from a checkpoint
    (``datamodule.resume_position``) to its training sampler. Under DDP, where Lightning shards
    the order across processes, a mid-epoch resume restarts the interrupted epoch instead (a
    warning says so)."""
    position = getattr(datamodule, "resume_position", None)
    if position is None:
        return
    datamodule.resume_position = None
    trainer = getattr(datamodule, "trainer", None)
    if trainer is not None and trainer.world_size > 1:
        if position["batches"] and position["batches"] < sampler.length // batch_size:
            log.warning("resuming mid-epoch under DDP: epoch %d restarts from its first batch (exact "
                        "mid-epoch resume is single-process)", position["epoch"])
        return
    sampler.resume_at(position, batch_size)


class ResumableLoader(DataLoader):
    """A DataLoader over an :class:`EpochOrderSampler` that Lightning recognises as resumable
    (``state_dict`` / ``load_state_dict``): its state is the order's seed and the batch size,
    checked on resume (another batch size or seed cannot continue the interrupted order); the
    position in the epoch is the datamodule's (:func:`training_position`). Its own generator
    (seeded like the order) seeds the workers, so iterating never draws from the global one: the
    global random stream of a resumed run is the interrupted run's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        sampler = kwargs.get("sampler")
        kwargs.setdefault("generator", torch.Generator().manual_seed(int(getattr(sampler, "seed", 0))))
        super().__init__(*args, **kwargs)

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        return {"seed": int(getattr(sampler, "seed", -1)), "batch_size": int(self.batch_size or 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        current = self.state_dict()
        for key in ("seed", "batch_size"):
            if key in state and state[key] != current[key]:
                raise ValueError(
                    f"the checkpoint's training data order was made with {key}={state[key]}, this run "
                    f"has {key}={current[key]}: resume with the interrupted run's data settings "
                    f"(data.batch_size / seed) to continue its order exactly"
                )
