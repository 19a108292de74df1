"""Lightning callbacks of ptame."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import lightning as L
import torch

from ptame.io import write_json_atomic
from ptame.metrics.localisation import check_pointing_tolerance

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


class FaithfulnessEvaluation(L.Callback):
    """After validation epochs, evaluate the explainer being trained with the faithfulness
    metrics (AD/IC, ROAD, ...) on the first ``max_images`` validation images and log them as
    ``val/AD@100``, ``val/ROAD_MoRF_AUC``, ...

    The same images are used on 1 or N processes (split with a non-shuffling distributed
    sampler, padded duplicates counted once), so the logged numbers do not depend on the
    process count.

    Args:
        every_n_epochs: run after every n-th validation epoch.
        max_images: validation images used (None: all).
        batch_size: images per batch.
        metrics: metric settings, see :func:`ptame.evaluation.suite.build_metrics` (localisation
            is added when the data has masks); None: AD/IC and ROAD with their metrics' own
            defaults. The configs pass the ``metrics`` group's settings.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_images: int | None = 256,
        batch_size: int = 64,
        metrics: dict | None = None,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be at least 1, got {every_n_epochs}")
        self.every_n_epochs = int(every_n_epochs)
        self.max_images = max_images
        self.batch_size = int(batch_size)
        self.metrics = dict(metrics) if metrics is not None else {"adic": {}, "road": {}}
        # refused now rather than after the first training epoch
        check_pointing_tolerance(self.metrics.get("pointing_tolerance") or 0.0)
        self.last_results: dict[str, float] = {}

    def _loader(self, trainer: L.Trainer) -> torch.utils.data.DataLoader:
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        dataset = trainer.datamodule.val_dataloader().dataset
        count = len(dataset) if self.max_images is None else min(self.max_images, len(dataset))
        subset = Subset(dataset, range(count))
        sampler = None
        if trainer.world_size > 1:
            sampler = DistributedSampler(
                subset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(subset, batch_size=self.batch_size, sampler=sampler, shuffle=False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        from ptame.evaluation.suite import build_metrics, evaluate_explainers

        has_masks = bool(getattr(trainer.datamodule, "has_masks", False))
        backbone = pl_module.ptame.backbone
        suite = {k: m.to(pl_module.device) for k, m in build_metrics(backbone, self.metrics, has_masks).items()}
        results = evaluate_explainers({"ptame": pl_module.explainer()}, {"ptame": suite},
                                      self._loader(trainer), pl_module.device,
                                      description="faithfulness")
        figures = results["ptame"]
        self.last_results = figures
        for key, value in figures.items():
            if "@" in key and key.startswith("ROAD_"):
                continue  # curve points: keep the log short; the AUCs summarise them
            pl_module.log(f"val/{key}", value, sync_dist=False)
