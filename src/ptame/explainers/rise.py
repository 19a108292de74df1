"""RISE (Petsiuk, Das & Saenko, BMVC 2018): randomised input sampling, model-agnostic.

N random binary grids of s x s cells (each cell kept with probability p) are upsampled
bilinearly to (s + 1) * cell pixels (cell = ceil(H / s) by ceil(W / s)) and cropped at a random
shift in [0, cell), giving smooth masks M_i (H, W) in [0, 1]. The saliency of class c is

    S_c = sum_i softmax(f(x * M_i))_c * M_i / (N * p),

returned min-max normalised per image. Masks are drawn once from ``seed`` (grids and shifts),
so they are the same for every image, batch size and run; they are rebuilt on the images'
device in chunks, so memory stays bounded by ``max_batch`` masked images.

Forward passes per image: N (+ 1 to predict the target when none is given).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ptame.explainers.base import Explainer
from ptame.maps import finite_minmax_maps
from ptame.networks.architectures import rise_masks
from ptame.networks.frozen import Backbone


class RISEExplainer(Explainer):
    """RISE saliency maps for any backbone (only its outputs are used).

    Args:
        backbone: the classifier (any :class:`~ptame.networks.Backbone`, a plain callable too).
        num_masks: N; None takes the paper's Table 1 value for the backbone's architecture
            (:data:`~ptame.networks.architectures.RISE_MASKS`: 4000 VGG-16, 8000 ResNet-50 and ViT-B-16; 4000 otherwise).
        grid_size: s, cells per side of the random grid.
        keep_probability: p in (0, 1), probability that a cell is kept.
        max_batch: most masked images per backbone forward (memory bound).
        seed: seed of the mask grids and shifts.
    """

    name = "rise"

    def __init__(
        self,
        backbone: Backbone,
        num_masks: int | None = None,
        grid_size: int = 7,
        keep_probability: float = 0.5,
        max_batch: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone)
        if num_masks is None:
            num_masks = rise_masks(backbone)
        for label, value in (("num_masks", num_masks), ("grid_size", grid_size),
                             ("max_batch", max_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"rise: {label} must be a positive int, got {value!r}")
        if not 0.0 < float(keep_probability) < 1.0:
            raise ValueError(f"rise: keep_probability must be in (0, 1), got {keep_probability!r}")
        self.num_masks = num_masks
        self.grid_size = grid_size
        self.keep_probability = float(keep_probability)
        self.max_batch = max_batch
        self.seed = int(seed)
        generator = torch.Generator().manual_seed(self.seed)
        # the only randomness: binary grids and shift fractions, fixed at construction
        self.grids = (torch.rand((num_masks, 1, grid_size, grid_size), generator=generator)
                      < self.keep_probability).float()
        self.shift_fractions = torch.rand((num_masks, 2), generator=generator)

    @property
    def resolution(self) -> int:
        """R = s * s, the cells of the random grid."""
        return self.grid_size * self.grid_size

    def masks(self, height: int, width: int, start: int = 0, stop: int | None = None,
              device: torch.device | str = "cpu") -> Tensor:
        """Masks ``start:stop`` as float (n, H, W) in [0, 1] for images of ``height`` x ``width``.

        Grid i is upsampled bilinearly (align_corners=False) to ((s+1) cell_h, (s+1) cell_w) and
        cropped to (H, W) from row floor(f_y * cell_h) and column floor(f_x * cell_w), where
        (f_y, f_x) in [0, 1)^2 are mask i's shift fractions.
        """
        stop = self.num_masks if stop is None else stop
        grids = self.grids[start:stop].to(device)
        fractions = self.shift_fractions[start:stop].to(device)
        cell_h = math.ceil(height / self.grid_size)
        cell_w = math.ceil(width / self.grid_size)
        size = ((self.grid_size + 1) * cell_h, (self.grid_size + 1) * cell_w)
        upsampled = F.interpolate(grids, size=size, mode="bilinear", align_corners=False)[:, 0]
        rows = (fractions[:, 0] * cell_h).long().clamp_max(cell_h - 1)
        cols = (fractions[:, 1] * cell_w).long().clamp_max(cell_w - 1)
        row_index = rows[:, None] + torch.arange(height, device=device)  # (n, H)
        col_index = cols[:, None] + torch.arange(width, device=device)  # (n, W)
        index = torch.arange(len(grids), device=device)[:, None, None]
        return upsampled[index, row_index[:, :, None], col_index[:, None, :]]

    def saliency(self, images: Tensor, targets: Tensor) -> Tensor:
        """Unnormalised RISE saliency (B, H, W): sum_i softmax(f(x*M_i))[target] M_i / (N p)."""
        batch, _, height, width = images.shape
        total = torch.zeros((batch, height, width), device=images.device, dtype=torch.float32)
        group = min(batch, self.max_batch)  # images explained together
        per_forward = max(1, self.max_batch // group)  # masks per forward for that group
        with torch.no_grad():
            for mask_start in range(0, self.num_masks, per_forward):
                mask_stop = min(mask_start + per_forward, self.num_masks)
                masks = self.masks(height, width, mask_start, mask_stop, images.device)
                for image_start in range(0, batch, group):
                    part = slice(image_start, image_start + group)
                    total[part] += self._weighted_masks(images[part], targets[part], masks)
        return total / (self.num_masks * self.keep_probability)

    def _weighted_masks(self, images: Tensor, targets: Tensor, masks: Tensor) -> Tensor:
        """sum_i softmax(f(x * M_i))[target] * M_i for one chunk: (b, H, W)."""
        b, m = images.shape[0], masks.shape[0]
        masked = images[:, None] * masks[None, :, None].to(images.dtype)  # (b, m, 3, H, W)
        logits = self.backbone(masked.flatten(0, 1)).float()
        probs = logits.softmax(dim=1).view(b, m, -1)
        scores = probs.gather(2, targets.view(b, 1, 1).expand(b, m, 1))[..., 0]  # (b, m)
        return torch.einsum("bm,mhw->bhw", scores, masks.float())

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        assert targets is not None  # RISE always has a backbone
        return finite_minmax_maps(self.saliency(images, targets))
