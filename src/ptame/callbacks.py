"""Lightning callbacks of ptame."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import lightning as L
import torch

from ptame.evaluation import write_json_atomic

log = logging.getLogger(__name__)


def attention_state_digest(module: L.LightningModule) -> str:
    """SHA-256 of the attention mechanism's parameters and buffers (exact bytes, CPU)."""
    digest = hashlib.sha256()
    for name, tensor in module.ptame.attention.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class DistributedConsistencyCheck(L.Callback):
    """At the end of training, check that every process holds identical attention weights.

    Each rank hashes its attention parameters and buffers; the digests are gathered, written to
    ``<output_path>`` by rank 0 as ``{"world_size": N, "digests": [...], "identical": bool}``,
    and a mismatch raises (``fail_on_mismatch``) or is logged as an error.
    """

    def __init__(self, output_path: str | None = None, fail_on_mismatch: bool = True) -> None:
        self.output_path = output_path
        self.fail_on_mismatch = fail_on_mismatch

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        local = attention_state_digest(pl_module)
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            digests: list[str | None] = [None] * trainer.world_size
            torch.distributed.all_gather_object(digests, local)
        else:
            digests = [local]
        identical = len(set(digests)) == 1
        if trainer.is_global_zero:
            path = Path(self.output_path or Path(trainer.default_root_dir) / "ddp_consistency.json")
            write_json_atomic(
                path, {"world_size": trainer.world_size, "digests": digests, "identical": identical}
            )
        if not identical:
            message = f"attention weights differ between processes: {digests}"
            if self.fail_on_mismatch:
                raise RuntimeError(message)
            log.error(message)
