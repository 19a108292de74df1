"""Cost figures of an explainer, measured (never declared): backbone forward passes, GFLOPs and
milliseconds per explanation, and the explanation resolution R."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

logger = logging.getLogger(__name__)


@dataclass
class ExplainerCost:
    """Per-explanation cost of one explainer on one batch of images."""

    #: fewer passes, FLOPs and milliseconds are better; a finer explanation (larger R) too
    directions: ClassVar[dict[str, str]] = {
        "forward_passes": "min", "gflops": "min", "ms_per_image": "min", "resolution": "max",
    }

    forward_passes: float
    gflops: float
    ms_per_image: float
    resolution: int

    def as_dict(self) -> dict[str, float]:
        return {
            "forward_passes": self.forward_passes,
            "gflops": self.gflops,
            "ms_per_image": self.ms_per_image,
            "resolution": float(self.resolution),
        }


class _ForwardCounter:
    """Counts the images that pass through a module's forward."""

    def __init__(self, module: nn.Module) -> None:
        self.images = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, module: nn.Module, inputs: tuple) -> None:
        if inputs and isinstance(inputs[0], Tensor):
            self.images += int(inputs[0].shape[0])

    def close(self) -> None:
        self.handle.remove()


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_cost(
    explainer: nn.Module, images: Tensor, repeats: int = 5, warmup: int = 2, budget_seconds: float = 20.0
) -> ExplainerCost:
    """Measure an explainer explaining the backbone's predictions for ``images`` (B, 3, H, W).

    Forward passes = images seen by the explainer's backbone / images explained (the backbone
    call that finds the prediction counts). GFLOPs by ``torch.utils.flop_counter`` over the whole
    explanation (backbone, auxiliary, explainer), per image. Milliseconds: median of ``repeats``
    timed runs after ``warmup`` untimed ones (besides the FLOP count's: on GPUs the first calls
    at a new shape autotune kernels), synchronised on CUDA, per image; measure on a batch of the
    evaluation's size so that the figure is the method's cost, not launch latency. Warm-up and
    timed runs stop once ``budget_seconds`` have passed (at least one timed run); an explainer
    whose FLOP-counting run takes over half of ``budget_seconds`` is timed once, without further
    warm-up. The first call's and every timed call's durations are logged (INFO). R: the
    explainer's ``resolution`` attribute (h * w before upsampling) or H * W when it has none.
    """
    batch = images.shape[0]
    backbone = getattr(explainer, "backbone", None)
    counter = _ForwardCounter(backbone) if isinstance(backbone, nn.Module) else None
    try:
        started = time.perf_counter()
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            explainer(images)
        _synchronise(images.device)
        first = time.perf_counter() - started
        passes = counter.images / batch if counter is not None else float("nan")
    finally:
        if counter is not None:
            counter.close()
    if 2 * first > budget_seconds:  # a slow method: one timed call, the FLOP count as warm-up
        warmup, repeats = 0, 1
    deadline = time.perf_counter() + budget_seconds
    timings = []
    with torch.no_grad():
        for _ in range(warmup):
            explainer(images)
            if time.perf_counter() > deadline:
                break
        for _ in range(max(1, repeats)):
            _synchronise(images.device)
            start = time.perf_counter()
            explainer(images)
            _synchronise(images.device)
            timings.append(time.perf_counter() - start)
            if time.perf_counter() > deadline:
                break
    logger.info("cost of %s on %d images: first call %.3f s, timed calls %s ms", type(explainer).__name__,
                batch, first, ", ".join(f"{t * 1e3:.2f}" for t in timings))
    timings.sort()
    resolution = getattr(explainer, "resolution", None) or images.shape[-2] * images.shape[-1]
    return ExplainerCost(
        forward_passes=passes,
        gflops=flops.get_total_flops() / batch / 1e9,
        ms_per_image=timings[len(timings) // 2] / batch * 1000,
        resolution=int(resolution),
    )
