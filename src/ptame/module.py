"""LightningModule that trains the P-TAME attention mechanism (paper Sec. III-D)."""

from __future__ import annotations

import ast
import math
import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
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
from ptame.networks.inference import inference_copy

FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: ``torch.compile`` modes of ``model.compile_mode``
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: devices with a fused AdamW kernel (the attention's optimiser uses it there)
FUSED_OPTIMIZER_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps"})


def rng_states() -> dict[str, Any]:
    """The process's random states (torch CPU and CUDA, NumPy, Python), as checkpoint values
    (tensors and plain Python, readable with ``weights_only=True``)."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": numpy_state[0], "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
                  "position": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                  "cached_gaussian": float(numpy_state[4])},
        "python": repr(random.getstate()),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back the random states of :func:`rng_states` (CUDA ones where the device count matches)."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(ast.literal_eval(states["python"]))


class PTAMEModule(L.LightningModule):
    """Trains only the attention mechanism; backbone and auxiliary stay frozen in eval mode.

    One training step: c* = argmax f(x) and the auxiliary features (no gradient, computed once);
    the map of c* and the raw scores of the class subset S; x_m = x * up(E_c*) in [0, 1]; f(x_m)
    with gradients to x_m only (the frozen backbone's parameters never require a gradient); loss
    (Eq. 4), its area and variation terms fused into one kernel on GPUs. The three frozen passes
    run on an inference copy of each frozen network (:func:`ptame.networks.inference.inference_copy`:
    BatchNorm folded, weights in the training dtype, channels_last), built on first use on the
    module's device; the explainer and the metrics use the original float32 networks. A step
    makes no host synchronisation: a non-finite loss is detected on the device and raised at the
    next logging step.

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
        upsampling: ``"one_step"`` (the paper) or ``"stepwise"`` (the release's repeated x2
            bilinear steps; stored in checkpoints).
        map_normalisation: how maps are normalised by :meth:`explainer` at evaluation.
        channels_last: channels_last memory format for the frozen networks' training copies and
            the training images (faster convolutions on GPUs and on CPUs: the ResNet-50 step took
            0.74-0.85x the time on 2 CPU cores at batches 8 and 16). The original networks and the
            attention, which the explainer and the metrics use, keep their format.
        compile: wrap the frozen networks' training copies in ``torch.compile``.
        compile_mode: ``torch.compile``'s mode with ``compile=True``: ``"default"``,
            ``"reduce-overhead"`` (the compiled passes replayed as CUDA graphs: one launch per pass
            instead of one per kernel, for batches whose step is bound by the host's kernel
            launches), ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``. On CPU there are no
            CUDA graphs and the modes compile alike.
        fold_batchnorm: fold BatchNorm into the preceding convolutions of the frozen networks'
            training copies (exact up to float rounding).
        frozen_dtype: dtype of the training copies: ``"auto"`` (bf16 / fp16 under the trainer's
            bf16 / 16 precision, float32 otherwise), ``"float32"``, ``"bfloat16"``, ``"float16"``.
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
        upsampling: str = "one_step",
        map_normalisation: MapNormalisation = "sigmoid",
        channels_last: bool = True,
        compile: bool = False,
        compile_mode: str = "default",
        fold_batchnorm: bool = True,
        frozen_dtype: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"model.lr must be positive, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"model.weight_decay must be non-negative, got {weight_decay}")
        if scheduler not in ("onecycle", "none"):
            raise ValueError(f"model.scheduler must be 'onecycle' or 'none', got {scheduler!r}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.compile_mode must be one of {list(COMPILE_MODES)}, got {compile_mode!r}")
        if frozen_dtype != "auto" and frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(
                f"model.frozen_dtype must be 'auto' or one of {sorted(FROZEN_DTYPES)}, got {frozen_dtype!r}"
            )
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
                "upsampling": str(upsampling),
                "map_normalisation": str(map_normalisation),
                "channels_last": bool(channels_last),
                "compile": bool(compile),
                "compile_mode": str(compile_mode),
                "fold_batchnorm": bool(fold_batchnorm),
                "frozen_dtype": str(frozen_dtype),
                "seed": int(seed),
            }
        )
        self.ptame = PTAME(backbone, auxiliary, num_classes, input_size, activation, upsampling)
        self.loss = loss
        self._subset_generator: torch.Generator | None = None
        self._subset_generator_state: Tensor | None = None
        self._rng_states_to_restore: dict[str, Any] | None = None
        #: {"experiment", "seed"} of the run that trains this module, stored in its checkpoints
        self.trained_with: dict[str, Any] | None = None
        # Training copies of the frozen networks live outside the module tree: never in the
        # state dict, never seen by DDP.
        self.__dict__["_training_networks"] = {}
        self._nonfinite_step: Tensor | None = None  # first step with a non-finite loss, or -1

    # ------------------------------------------------------------------ setup
    def training_dtype(self) -> torch.dtype:
        """The dtype of the frozen networks' training copies (see ``frozen_dtype``)."""
        if self.hparams.frozen_dtype != "auto":
            return FROZEN_DTYPES[self.hparams.frozen_dtype]
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        if precision.startswith("bf16"):
            return torch.bfloat16
        if precision.startswith("16"):
            return torch.float16
        return torch.float32

    def frozen_networks(self) -> tuple[Any, Any]:
        """(backbone, auxiliary) used by the training step: inference copies of the frozen
        networks on the module's device, compiled with ``compile=true``; rebuilt when the device
        or the dtype changes."""
        dtype = self.training_dtype()
        key = (str(self.device), dtype)
        cache = self._training_networks
        if cache.get("key") != key:
            copies = [
                inference_copy(network, dtype, self.hparams.channels_last,
                               self.hparams.fold_batchnorm).to(self.device)
                for network in (self.ptame.backbone, self.ptame.auxiliary)
            ]
            if self.hparams.compile:
                mode = self.hparams.compile_mode
                options = {} if mode == "default" else {"mode": mode}
                copies = [torch.compile(network, **options) for network in copies]
            cache.clear()
            cache.update(key=key, dtype=dtype, backbone=copies[0], auxiliary=copies[1])
        return cache["backbone"], cache["auxiliary"]

    def _replays_cuda_graphs(self) -> bool:
        """Whether the frozen passes are compiled in a mode that replays CUDA graphs."""
        return (bool(self.hparams.compile) and self.device.type == "cuda"
                and self.hparams.compile_mode in ("reduce-overhead", "max-autotune"))

    def _frozen_forward(self, network: Any, images: Tensor) -> Any:
        """``network(images)`` under autocast to the training copies' dtype (float32: none).
        Outside an autocast region (e.g. ``precision=32-true`` with ``frozen_dtype=bfloat16``)
        the outputs come back in the images' dtype, as the trainable head expects them."""
        dtype = self._training_networks["dtype"]
        if dtype == torch.float32:
            return network(images)
        device = images.device.type
        outer = torch.is_autocast_enabled(device)
        with torch.autocast(device, dtype=dtype):
            outputs = network(images)
        if outer:
            return outputs
        if isinstance(outputs, Tensor):
            return outputs.to(images.dtype)
        return [output.to(images.dtype) for output in outputs]

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
    def compute_loss(self, images: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Loss terms for a batch of [0, 1] images (B, 3, H, W); see :class:`PTAMELoss`. The
        random class subset is drawn from ``generator`` (None: the training stream, saved in
        checkpoints)."""
        images = self._prepare_images(images)
        backbone, auxiliary = self.frozen_networks()
        if self._replays_cuda_graphs():
            # a new step: the previous step's graph outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            predictions = self._frozen_forward(backbone, images).argmax(dim=1)
            features = self._frozen_forward(auxiliary, images)
        subset = self.loss.select_classes(predictions, self.ptame.num_classes, generator or self._generator())
        attention = self.ptame.attention
        processed = attention.process(features)
        target_scores, scores = self._target_and_subset_scores(processed, predictions, subset)
        target_maps = torch.sigmoid(target_scores)  # (B, h, w), the map of c*
        masked = mask_images(images, target_maps)
        masked_logits = self._frozen_forward(backbone, masked)
        terms = self.loss(masked_logits, predictions, subset_scores=scores)
        terms["mean_map"] = target_maps.detach().float().mean()
        return terms

    def _target_and_subset_scores(
        self, processed: Sequence[Tensor], predictions: Tensor, subset: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Raw scores of c* (B, h, w) and of the subset S (B, S, h, w), from one projection and
        resize per branch. The map of c* is already among S's
        (:func:`ptame.losses.select_class_subset`): column 0 of a per-image subset (``random``),
        column i for image i of the shared subset of the batch's predictions (``batch``); so it
        is read from S's scores instead of being computed a second time (about 50 kernel
        launches fewer per step, the same values)."""
        attention = self.ptame.attention
        batch = predictions.shape[0]
        scores = attention.class_scores(processed, subset)  # (B, S, h, w)
        if subset.shape[0] == batch:  # per image, c* first
            return scores[:, 0], scores
        if subset.shape[1] == batch:  # (1, B): the batch's predictions in order
            return scores.diagonal(dim1=0, dim2=1).permute(2, 0, 1), scores
        target = attention.class_scores(processed, predictions.unsqueeze(1))[:, 0]
        return target, scores

    def on_train_start(self) -> None:
        """A resumed run continues the random streams of the interrupted one from here."""
        if self._rng_states_to_restore is not None:
            restore_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        if batch["image"].shape[0] == 0:  # every file of the batch was skipped (data.bad_images)
            return None
        terms = self.compute_loss(batch["image"])
        logging_step = self._is_logging_step()
        self._watch_finite(terms, logging_step)
        if logging_step:
            # Only these steps reach the loggers and the progress bar (refreshed every
            # log_every_n_steps); logging each term every step cost about 0.3 ms of Python
            # per term and step.
            batch_size = batch["image"].shape[0]
            for key, value in terms.items():
                self.log(f"train/{key}", value, prog_bar=key == "loss", batch_size=batch_size)
        return terms["loss"]

    def _is_logging_step(self) -> bool:
        """Whether Lightning writes this training step's logs: every ``log_every_n_steps``-th
        step and the last one (so the final logged terms are the last step's)."""
        trainer = self._trainer
        if trainer is None:
            return True
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        return (self.global_step + 1) % every == 0 or self.global_step + 1 >= trainer.estimated_stepping_batches

    def _watch_finite(self, terms: dict[str, Tensor], logging_step: bool = True) -> None:
        """Record on the device the first step whose loss is not finite (no synchronisation), and
        raise at every logging step (:meth:`_is_logging_step`; every step on CPU), if there was
        one."""
        loss = terms["loss"].detach()
        step = torch.full((), self.global_step, device=loss.device, dtype=torch.long)
        if self._nonfinite_step is None or self._nonfinite_step.device != loss.device:
            self._nonfinite_step = torch.full((), -1, device=loss.device, dtype=torch.long)
        first = (self._nonfinite_step < 0) & ~torch.isfinite(loss)
        self._nonfinite_step = torch.where(first, step, self._nonfinite_step)
        if logging_step or self.device.type == "cpu":
            bad_step = int(self._nonfinite_step)
            if bad_step >= 0:
                values = {k: float(v.detach()) for k, v in terms.items()}
                raise FloatingPointError(
                    f"P-TAME loss is not finite at step {bad_step} (terms at step "
                    f"{self.global_step}: {values}); lower model.lr or check the loss weights"
                )

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if batch["image"].shape[0] == 0:  # every file of the batch was skipped (data.bad_images)
            return
        # its own draws, the same at every validation: the training stream is left as it is
        generator = torch.Generator(device=self.device).manual_seed(int(self.hparams.seed) + 7919 * (batch_idx + 1))
        terms = self.compute_loss(batch["image"], generator)
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
    def make_optimizer(self) -> torch.optim.AdamW:
        """AdamW over the attention's parameters with the module's settings; fused (one
        multi-tensor kernel per step instead of a handful per tensor: fewer kernel launches on
        GPUs, 3.3x faster than the per-tensor loop on CPU; the same update rule) on the devices
        that have the kernel."""
        parameters = list(self.ptame.attention.parameters())
        return torch.optim.AdamW(
            parameters,
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            amsgrad=self.hparams.amsgrad,
            betas=tuple(self.hparams.betas),
            fused=all(p.device.type in FUSED_OPTIMIZER_DEVICES for p in parameters) or None,
        )

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer()
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
        if self.trained_with:  # names the run in mismatch messages (set by the training pipeline)
            checkpoint["ptame"]["trained_with"] = dict(self.trained_with)
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = plain_python(checkpoint["hyper_parameters"])
        if self._subset_generator is not None:
            checkpoint["ptame_subset_generator"] = self._subset_generator.get_state()
        checkpoint["ptame_rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse checkpoints of other networks; put the frozen weights back for strict loading."""
        if "ptame" not in checkpoint:
            raise ValueError("not a P-TAME checkpoint (no 'ptame' metadata)")
        verify_metadata(checkpoint["ptame"], self.ptame)
        frozen = {k: v for k, v in self.state_dict().items() if k.startswith(FROZEN_PREFIXES)}
        checkpoint["state_dict"] = {**checkpoint["state_dict"], **frozen}
        self._subset_generator_state = checkpoint.get("ptame_subset_generator")
        self._subset_generator = None
        # put back when training resumes (on_train_start): Lightning draws from the global
        # generator in between (it may build the data iterator before restoring its loops)
        self._rng_states_to_restore = checkpoint.get("ptame_rng_states")

    # -------------------------------------------------------------- inference
    def explainer(self) -> PTAMEExplainer:
        """The trained model behind the explainer interface (shares weights with this module)."""
        return PTAMEExplainer(self.ptame, self.hparams.map_normalisation)
