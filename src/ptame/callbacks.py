"""Lightning callbacks of ptame."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

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

        validation = trainer.datamodule.val_dataloader()
        dataset = validation.dataset
        count = len(dataset) if self.max_images is None else min(self.max_images, len(dataset))
        subset = Subset(dataset, range(count))
        sampler = None
        if trainer.world_size > 1:
            sampler = DistributedSampler(
                subset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(subset, batch_size=self.batch_size, sampler=sampler, shuffle=False,
                          collate_fn=validation.collate_fn)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        from ptame.evaluation.suite import build_metrics, evaluate_explainers

        has_masks = bool(getattr(trainer.datamodule, "has_masks", False))
        backbone = pl_module.ptame.backbone
        suite = {k: m.to(pl_module.device) for k, m in build_metrics(backbone, self.metrics, has_masks).items()}
        results = evaluate_explainers({"ptame": pl_module.explainer()}, {"ptame": suite},
                                      self._loader(trainer), pl_module.device,
                                      description="faithfulness",
                                      precision=str(self.metrics.get("precision", "float32")),
                                      skipped=getattr(trainer.datamodule, "skipped_images", None))
        figures = results["ptame"]
        self.last_results = figures
        for key, value in figures.items():
            if "@" in key and key.startswith("ROAD_"):
                continue  # curve points: keep the log short; the AUCs summarise them
            pl_module.log(f"val/{key}", value, sync_dist=False)


class TrainingThroughput(L.Callback):
    """Training images per second, in the progress bar and the loggers (``train/images_per_second``),
    and the estimated epoch time, printed once near the start.

    The rate is measured on the host clock between logging steps (every ``log_every_n_steps``),
    with no synchronisation of its own: with asynchronous GPU work the host waits for the device
    within each window, so over a window the two rates agree. The epoch-time estimate uses the
    window from step ``warmup_steps`` (after cuDNN's autotuning and the workers' start) to step
    ``warmup_steps + estimate_steps``, with one device synchronisation at each end.

    Args:
        warmup_steps: steps left out before the estimate's window.
        estimate_steps: length of the estimate's window.
    """

    def __init__(self, warmup_steps: int = 10, estimate_steps: int = 20) -> None:
        if warmup_steps < 0 or estimate_steps < 1:
            raise ValueError(f"need warmup_steps >= 0 and estimate_steps >= 1, got {warmup_steps}, {estimate_steps}")
        self.warmup_steps = int(warmup_steps)
        self.estimate_steps = int(estimate_steps)
        self.estimate: dict[str, float] | None = None
        self._window_start: float | None = None
        self._window_images = 0
        self._estimate_start: float | None = None
        self._estimate_images = 0

    @staticmethod
    def _synchronise(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window_start, self._window_images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        images = int(batch["index"].shape[0]) * trainer.world_size
        self._window_images += images
        self._estimate(trainer, pl_module, batch_idx, images)
        every = max(1, int(trainer.log_every_n_steps))
        if (batch_idx + 1) % every == 0 and self._window_start is not None:
            now = time.perf_counter()
            rate = self._window_images / max(now - self._window_start, 1e-9)
            pl_module.log("train/images_per_second", rate, prog_bar=True, on_step=True,
                          on_epoch=False, rank_zero_only=True)
            self._window_start, self._window_images = now, 0

    def _estimate(self, trainer: L.Trainer, pl_module: L.LightningModule, batch_idx: int,
                  images: int) -> None:
        if self.estimate is not None or trainer.current_epoch > 0:
            return
        if batch_idx + 1 == self.warmup_steps or (self.warmup_steps == 0 and batch_idx == 0):
            self._synchronise(pl_module)
            self._estimate_start, self._estimate_images = time.perf_counter(), 0
            return
        if self._estimate_start is None:
            return
        self._estimate_images += images
        if batch_idx + 1 < self.warmup_steps + self.estimate_steps:
            return
        self._synchronise(pl_module)
        seconds = time.perf_counter() - self._estimate_start
        rate = self._estimate_images / max(seconds, 1e-9)
        steps = trainer.num_training_batches
        per_step = seconds / self.estimate_steps
        self.estimate = {"images_per_second": rate, "seconds_per_step": per_step,
                         "epoch_seconds": per_step * steps if math.isfinite(steps) else math.nan}
        if trainer.is_global_zero:
            message = (f"throughput {rate:.0f} images/s ({per_step * 1000:.1f} ms per step, steps "
                       f"{self.warmup_steps + 1}-{batch_idx + 1}); estimated epoch time "
                       f"{self.estimate['epoch_seconds'] / 60:.1f} min for {steps} steps")
            log.info(message)
