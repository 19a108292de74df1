"""Insertion and deletion (Petsiuk et al., RISE, BMVC 2018).

Deletion starts from the image and replaces pixels by a substrate, most salient first; insertion
starts from the substrate and puts the image's pixels back, most salient first. After each of
``steps`` equal steps the backbone's softmax(c*) is recorded (c* = argmax f(x)); the score is
the normalised trapezoid AUC of that curve over [0, 1] (each curve has steps + 1 points).
Deletion: lower is better; insertion: higher is better.

Substrates: ``"zero"`` (black) or ``"blur"`` (Gaussian blur of the image; RISE's insertion
default: kernel 11, sigma 5). Defaults: deletion on zeros, insertion on blur, as in RISE.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from ptame.metrics.base import BackboneFn, PerImageMetric, check_batch, classify, original_logits
from ptame.metrics.ranking import rank_positions, ranking

MODES = ("insertion", "deletion")


def substrate(images: Tensor, kind: str, blur_kernel: int = 11, blur_sigma: float = 5.0) -> Tensor:
    """The image every pixel is taken from / put into: zeros or a Gaussian-blurred copy."""
    if kind == "zero":
        return torch.zeros_like(images)
    if kind == "blur":
        return TF.gaussian_blur(images, kernel_size=[blur_kernel, blur_kernel], sigma=[blur_sigma, blur_sigma])
    raise ValueError(f"unknown substrate {kind!r}; use 'zero' or 'blur'")


class InsertionDeletion(PerImageMetric):
    """Insertion and deletion AUCs (and curves) of the backbone's confidence in c*.

    Args:
        backbone: frozen classifier taking [0, 1] images.
        steps: number of equal steps from 0% to 100% of the pixels (the curve has steps+1 points).
        insertion_substrate, deletion_substrate: ``"blur"`` or ``"zero"``.
        seed: seeds the tie-breaking keys per image (via its dataset index): only pixels of
            equal value are ordered by them.
        chunk_size: curve points (partly switched images, across the batch's images) built and
            classified together; on CPU the backbone sees at most
            :data:`~ptame.metrics.base.CPU_IMAGES_PER_FORWARD` of them per call.
    """

    higher_is_better = None
    takes_logits = True
    directions = {"insertion_AUC": "max", "deletion_AUC": "min"}

    def __init__(
        self,
        backbone: BackboneFn,
        steps: int = 32,
        insertion_substrate: str = "blur",
        deletion_substrate: str = "zero",
        seed: int = 0,
        chunk_size: int = 128,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if steps < 1:
            raise ValueError(f"insertion/deletion steps must be at least 1, got {steps}")
        for kind in (insertion_substrate, deletion_substrate):
            if kind not in ("zero", "blur"):
                raise ValueError(f"unknown substrate {kind!r}; use 'zero' or 'blur'")
        self.__dict__["backbone"] = backbone
        self.steps = int(steps)
        self.substrates = {"insertion": insertion_substrate, "deletion": deletion_substrate}
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)

    def _curve(self, images: Tensor, order: Tensor, start: Tensor, end: Tensor, targets: Tensor) -> Tensor:
        """Confidence (B, steps+1) in ``targets`` while pixels switch from ``start`` to ``end``
        (B, C, H, W) in ``order`` (B, H W).

        The B x (steps + 1) partly switched images are built and classified ``chunk_size`` at a
        time across images, not image by image: one backbone call per ``chunk_size`` curve
        points (e.g. 17 calls for a batch of 64 images at 32 steps, where one call per image
        made 64), and no Python loop over images."""
        batch, _, height, width = images.shape
        pixels = height * width
        points = self.steps + 1
        rank = rank_positions(order).view(batch, 1, height, width)
        counts = torch.tensor([math.ceil(pixels * s / self.steps) for s in range(points)],
                              device=images.device)  # pixels switched at each point
        confidences = torch.empty(batch * points, device=images.device)
        for first in range(0, batch * points, self.chunk_size):
            point = torch.arange(first, min(first + self.chunk_size, batch * points), device=images.device)
            image, step = point // points, point % points
            switched = rank[image] < counts[step].view(-1, 1, 1, 1)
            sequence = torch.where(switched, end[image], start[image])
            probabilities = classify(self.backbone, sequence).float().softmax(dim=1)
            confidences[first : first + point.shape[0]] = probabilities.gather(1, targets[image].view(-1, 1))[:, 0]
        return confidences.view(batch, points)

    @torch.no_grad()
    def update(self, images: Tensor, maps: Tensor, indices: Tensor | None = None,
               logits: Tensor | None = None) -> None:
        """images (B, 3, H, W) in [0, 1]; maps (B, H, W); indices (B,) dataset indices; logits
        (B, C): the backbone's logits of the images if the caller has them."""
        images, maps, indices = check_batch(images, maps, indices, "InsertionDeletion")
        if images.shape[0] == 0:
            return
        targets = original_logits(self.backbone, images, logits, "InsertionDeletion").argmax(dim=1)
        order = ranking(maps, indices, self.seed, descending=True)
        insertion = self._curve(images, order, substrate(images, self.substrates["insertion"]), images, targets)
        deletion = self._curve(images, order, images, substrate(images, self.substrates["deletion"]), targets)
        self._record(indices, torch.stack([insertion, deletion], dim=1))

    def curves(self) -> dict[str, Tensor]:
        """Mean confidence curves ``insertion`` and ``deletion``, each (steps + 1,)."""
        _, values = self.per_image()
        means = values.mean(dim=0)
        return {mode: means[m] for m, mode in enumerate(MODES)}

    def per_image_figures(self) -> dict[str, Tensor]:
        """``insertion_AUC`` and ``deletion_AUC`` per image (N,)."""
        _, values = self.per_image()
        x = torch.linspace(0, 1, self.steps + 1, dtype=values.dtype, device=values.device)
        aucs = torch.trapezoid(values, x, dim=-1)  # (N, 2)
        return {f"{mode}_AUC": aucs[:, m] for m, mode in enumerate(MODES)}

    def compute(self) -> dict[str, Tensor]:
        """``insertion_AUC`` and ``deletion_AUC`` (normalised trapezoid, in [0, 1])."""
        _, values = self.per_image()
        x = torch.linspace(0, 1, self.steps + 1, dtype=values.dtype, device=values.device)
        aucs = torch.trapezoid(values, x, dim=-1).mean(dim=0)
        return {f"{mode}_AUC": aucs[m].float() for m, mode in enumerate(MODES)}
