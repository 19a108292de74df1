"""A callback that ends a training run at a given step, as a kill would (tests of resume)."""

from __future__ import annotations

import os
import signal

import lightning as L


class Interrupted(RuntimeError):
    """Raised by :class:`KillAtStep` in ``mode="raise"``."""


class KillAtStep(L.Callback):
    """End the run when ``trainer.global_step`` reaches ``step`` after a training batch:
    ``mode="sigkill"`` kills the process (nothing runs after it), ``"raise"`` raises
    :class:`Interrupted` (in-process tests). Lightning runs checkpoint callbacks after the others,
    so the checkpoint of that very step is not written: the run resumes from an earlier one."""

    def __init__(self, step: int, mode: str = "sigkill") -> None:
        self.step, self.mode = int(step), mode

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            if self.mode == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise Interrupted(f"interrupted at step {self.step}")
