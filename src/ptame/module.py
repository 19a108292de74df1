"""LightningModule that trains the P-TAME attention mechanism (paper Sec. III-D)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ptame.checkpoint import (
    FROZEN_PREFIXES,
    checkpoint_metadata,
    plain_python,
    strip_frozen_weights,
    verify_metadata,
)
from ptame.explainers.ptame import PTAMEExplainer
from ptame.losses import PTAMELoss
from ptame.model import PTAME, MapNormalisation, mask_images
from ptame.networks.frozen import AuxiliaryFeatureExtractor, Backbone


class PTAMEModule(L.LightningModule):
    """Trains only the attention mechanism; backbone and auxiliary stay frozen in eval mode.

    One training step: c* = argmax f(x) and the auxiliary features (no gradient, computed once);
    maps of c* and of the class subset S; x_m = x * up(E_c*) in [0, 1]; f(x_m) with gradients to
    x_m only (the frozen backbone's parameters never require a gradient); loss (Eq. 4).

    Args:
        backbone, auxiliary: frozen networks (see :mod:`ptame.networks`).
        loss: the :class:`ptame.losses.PTAMELoss` (paper or reference preset).
        lr: AdamW learning rate and OneCycleLR max_lr.
        weight_decay, amsgrad, betas: AdamW settings (release: wd 0.01, amsgrad).
        scheduler: ``"onecycle"`` (stepped every step) or ``"none"``.
        pct_start: OneCycleLR warm-up fraction.
        num_classes: None infers C from the backbone.
        input_size: (H, W) of training images (probe for the attention's shapes).
        activation: the feature branches' activation.
        map_normalisation: how maps are normalised by :meth:`explainer` at evaluation.
        channels_last: use channels_last memory format (faster convolutions on GPU).
        compile: wrap the backbone and the auxiliary in ``torch.compile``.
        seed: seed of the class-subset generator (offset by the process rank).
    """

    def __init__(
        self,
        backbone: Backbone,
        auxiliary: AuxiliaryFeatureExtractor,
        loss: PTAMELoss,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        amsgrad: bool = True,
        betas: Sequence[float] = (0.9, 0.999),
        scheduler: str = "onecycle",
        pct_start: float = 0.3,
        num_classes: int | None = None,
        input_size: Sequence[int] = (224, 224),
        activation: str = "relu",
        map_normalisation: MapNormalisation = "sigmoid",
        channels_last: bool = False,
        compile: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"model.lr must be positive, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"model.weight_decay must be non-negative, got {weight_decay}")
        if scheduler not in ("onecycle", "none"):
            raise ValueError(f"model.scheduler must be 'onecycle' or 'none', got {scheduler!r}")
        # Plain Python values only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                "amsgrad": bool(amsgrad),
                "betas": [float(b) for b in betas],
                "scheduler": str(scheduler),
                "pct_start": float(pct_start),
                "num_classes": None if num_classes is None else int(num_classes),
                "input_size": [int(s) for s in input_size],
                "activation": str(activation),
                "map_normalisation": str(map_normalisation),
                "channels_last": bool(channels_last),
                "compile": bool(compile),
                "seed": int(seed),
            }
        )
        self.ptame = PTAME(backbone, auxiliary, num_classes, input_size, activation)
        self.loss = loss
        self._subset_generator: torch.Generator | None = None
        self._subset_generator_state: Tensor | None = None
        # Compiled wrappers live outside the module tree so they never enter the state dict.
        self.__dict__["_compiled"] = {}

    # ------------------------------------------------------------------ setup
    def configure_model(self) -> None:
        """Memory format and compilation, applied once the module is on its device."""
        if self.hparams.channels_last:
            self.ptame.to(memory_format=torch.channels_last)
        if self.hparams.compile and not self._compiled:
            self._compiled["backbone"] = torch.compile(self.ptame.backbone)
            self._compiled["auxiliary"] = torch.compile(self.ptame.auxiliary)

    def _backbone_forward(self, images: Tensor) -> Tensor:
        return self._compiled.get("backbone", self.ptame.backbone)(images)

    def _auxiliary_forward(self, images: Tensor) -> list[Tensor]:
        return self._compiled.get("auxiliary", self.ptame.auxiliary)(images)

    def _prepare_images(self, images: Tensor) -> Tensor:
        if self.hparams.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def _generator(self) -> torch.Generator:
        if self._subset_generator is None or self._subset_generator.device != self.device:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(self.hparams.seed) + 1000003 * self.global_rank)
            if self._subset_generator_state is not None:
                generator.set_state(self._subset_generator_state)
                self._subset_generator_state = None
            self._subset_generator = generator
        return self._subset_generator

    # ------------------------------------------------------------------ steps
    def compute_loss(self, images: Tensor) -> dict[str, Tensor]:
        """Loss terms for a batch of [0, 1] images (B, 3, H, W); see :class:`PTAMELoss`."""
        images = self._prepare_images(images)
        with torch.no_grad():
            predictions = self._backbone_forward(images).argmax(dim=1)
            features = self._auxiliary_forward(images)
        subset = self.loss.select_classes(predictions, self.ptame.num_classes, self._generator())
        classes = torch.cat([predictions.unsqueeze(1), subset], dim=1)
        maps = torch.sigmoid(self.ptame.attention(features, classes))
        masked = mask_images(images, maps[:, 0])
        masked_logits = self._backbone_forward(masked)
        terms = self.loss(masked_logits, predictions, maps[:, 1:])
        terms["mean_map"] = maps[:, 0].detach().float().mean()
        return terms

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        terms = self.compute_loss(batch["image"])
        if not torch.isfinite(terms["loss"]):
            values = {k: float(v) for k, v in terms.items()}
            raise FloatingPointError(
                f"P-TAME loss is not finite at step {self.global_step} (terms {values}); "
                "lower model.lr or check the loss weights"
            )
        batch_size = batch["image"].shape[0]
        for key, value in terms.items():
            self.log(f"train/{key}", value, prog_bar=key == "loss", batch_size=batch_size)
        return terms["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        terms = self.compute_loss(batch["image"])
        batch_size = batch["image"].shape[0]
        for key, value in terms.items():
            self.log(f"val/{key}", value, prog_bar=key == "loss", batch_size=batch_size, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        """Give every process rank 0's BatchNorm statistics of the attention.

        DDP broadcasts rank 0's buffers before each forward, so after the last step each rank
        holds rank 0's statistics updated with its own last batch; without SyncBatchNorm (e.g.
        DDP on CPU) this makes the end-of-epoch state identical on all ranks.
        """
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            for buffer in self.ptame.attention.buffers():
                torch.distributed.broadcast(buffer, src=0)

    # -------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.ptame.attention.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            amsgrad=self.hparams.amsgrad,
            betas=tuple(self.hparams.betas),
        )
        if self.hparams.scheduler == "none":
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps) or total_steps < 1:
            raise ValueError(
                "OneCycleLR needs a finite number of steps: set trainer.max_epochs or max_steps"
            )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=self.hparams.lr,
            total_steps=int(total_steps),
            pct_start=self.hparams.pct_start,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable head; add the metadata that rebuilds and checks it."""
        checkpoint["state_dict"] = strip_frozen_weights(checkpoint["state_dict"])
        checkpoint["ptame"] = checkpoint_metadata(self.ptame)
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = plain_python(checkpoint["hyper_parameters"])
        if self._subset_generator is not None:
            checkpoint["ptame_subset_generator"] = self._subset_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse checkpoints of other networks; put the frozen weights back for strict loading."""
        if "ptame" not in checkpoint:
            raise ValueError("not a P-TAME checkpoint (no 'ptame' metadata)")
        verify_metadata(checkpoint["ptame"], self.ptame)
        frozen = {k: v for k, v in self.state_dict().items() if k.startswith(FROZEN_PREFIXES)}
        checkpoint["state_dict"] = {**checkpoint["state_dict"], **frozen}
        self._subset_generator_state = checkpoint.get("ptame_subset_generator")
        self._subset_generator = None

    # -------------------------------------------------------------- inference
    def explainer(self) -> PTAMEExplainer:
        """The trained model behind the explainer interface (shares weights with this module)."""
        return PTAMEExplainer(self.ptame, self.hparams.map_normalisation)
