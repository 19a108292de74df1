"""The P-TAME training loss (paper Eq. 1-4) in its `paper` and `reference` (release) forms.

Notation: E (B, S, h, w) are the explanation maps of a class subset S for each image, in [0, 1];
c* (B,) is the backbone's own prediction on the unmasked image.

- Cross-entropy: CE(f(x * up(E_c*)), c*), averaged over the batch.
- Area: mean(E ** lambda_area) (paper). The release adds epsilon 0.0005 before the power and
  uses mean(E) when the power is 1.
- Variation: paper Eq. 3, (1/|E_S|) * sum(|dE/dx|^2 + |dE/dy|^2), averaged over the batch
  (``variation_normalisation="mean"``: divided by the element count B*|S|*h*w). The release
  (``"release"``) divides (sum |dx|^p + sum |dy|^p + border_penalty * border) by p * B, where
  border = sum over the first and last row and the first and last column of E^p (corners
  counted in both their row and column).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ClassSubsetMode = Literal["random", "batch"]
VariationNormalisation = Literal["mean", "release"]
RegulariserImplementation = Literal["auto", "triton", "torch"]
REGULARISER_IMPLEMENTATIONS = ("auto", "triton", "torch")

# Keeps E ** p differentiable at E = 0 for p < 1 (the sigmoid can underflow to exactly 0).
_AREA_FLOOR = 1e-12


def area_loss(maps: Tensor, power: float, epsilon: float = 0.0) -> Tensor:
    """Mean activation of the maps raised to ``power``.

    Args:
        maps: (..., h, w) maps in [0, 1].
        power: lambda_area (paper) / area_power (release).
        epsilon: added to the maps before the power (release: 0.0005); ignored when power == 1.

    Returns:
        scalar: mean((maps + epsilon) ** power), or mean(maps) when power == 1.
    """
    if power == 1:
        return maps.mean()
    return (maps + epsilon).clamp_min(_AREA_FLOOR).pow(power).mean()


def variation_loss(
    maps: Tensor,
    power: float = 2.0,
    border_penalty: float = 0.0,
    normalisation: VariationNormalisation = "mean",
) -> Tensor:
    """Spatial variation of each map, plus an optional penalty on the map border.

    Args:
        maps: (B, S, h, w) maps.
        power: exponent of the absolute finite differences (2 in the paper).
        border_penalty: weight of sum(E^power) over the border rows and columns (release: 0.3).
        normalisation: ``"mean"`` divides by the number of map elements (paper Eq. 3, averaged
            over the batch); ``"release"`` divides by power * B, as the released code does.

    Returns:
        scalar loss.
    """
    if maps.ndim != 4:
        raise ValueError(f"variation_loss expects maps (B, S, h, w), got {tuple(maps.shape)}")
    diff_x = (maps[..., :, 1:] - maps[..., :, :-1]).abs().pow(power).sum()
    diff_y = (maps[..., 1:, :] - maps[..., :-1, :]).abs().pow(power).sum()
    total = diff_x + diff_y
    if border_penalty:
        border = (
            maps[..., 0, :].pow(power).sum()
            + maps[..., -1, :].pow(power).sum()
            + maps[..., :, 0].pow(power).sum()
            + maps[..., :, -1].pow(power).sum()
        )
        total = total + border_penalty * border
    if normalisation == "mean":
        return total / maps.numel()
    if normalisation == "release":
        return total / (power * maps.shape[0])
    raise ValueError(f"unknown variation normalisation {normalisation!r}; use 'mean' or 'release'")


def _triton_usable(scores: Tensor) -> bool:
    on_device = scores.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (on_device and scores.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and importlib.util.find_spec("triton") is not None)


def regulariser_terms(
    scores: Tensor,
    area_power: float,
    area_epsilon: float = 0.0,
    variation_power: float = 2.0,
    border_penalty: float = 0.0,
    normalisation: VariationNormalisation = "mean",
    implementation: RegulariserImplementation = "auto",
) -> tuple[Tensor, Tensor]:
    """(:func:`area_loss`, :func:`variation_loss`) of the maps ``sigmoid(scores)``.

    Args:
        scores: (B, S, h, w) raw attention scores of the class subset S.
        area_power, area_epsilon, variation_power, border_penalty, normalisation: see
            :func:`area_loss` and :func:`variation_loss`.
        implementation: ``"torch"`` (PyTorch operations, float32), ``"triton"`` (one fused kernel
            per pass, :mod:`ptame.fused_regularisers`; CUDA tensors), ``"auto"`` (Triton on CUDA
            when it is installed, PyTorch elsewhere). Both give the same values and gradients up
            to float rounding (maps in float32 either way).

    Returns:
        two scalar float32 tensors, differentiable in ``scores``.
    """
    if scores.ndim != 4:
        raise ValueError(f"regulariser_terms expects scores (B, S, h, w), got {tuple(scores.shape)}")
    if implementation not in REGULARISER_IMPLEMENTATIONS:
        raise ValueError(f"regulariser implementation must be one of {REGULARISER_IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    fused = implementation == "triton" or (implementation == "auto" and _triton_usable(scores))
    if fused:
        from ptame.fused_regularisers import FusedRegularisers, RegulariserSettings

        settings = RegulariserSettings(
            float(area_power), float(area_epsilon), _AREA_FLOOR, float(variation_power),
            float(border_penalty), normalisation,
        )
        return FusedRegularisers.apply(scores, settings)
    maps = torch.sigmoid(scores.float())
    return (area_loss(maps, area_power, area_epsilon),
            variation_loss(maps, variation_power, border_penalty, normalisation))


def select_class_subset(
    predictions: Tensor,
    num_classes: int,
    mode: ClassSubsetMode,
    subset_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Class subset S whose maps enter the area and variation losses.

    Args:
        predictions: (B,) the backbone's predicted classes c*.
        num_classes: C.
        mode: ``"random"`` (paper): per image, c* plus ``subset_size - 1`` other classes drawn
            uniformly without replacement; ``subset_size`` None means the batch size (the paper
            sets lambda_rand = batch size), capped at C. ``"batch"`` (release): every image uses
            the B classes predicted in the batch, duplicates included, returned once as (1, B)
            (shared rows: the attention looks up B fusion rows, not B x B).
        generator: random generator for the ``"random"`` draw (on the predictions' device).

    Returns:
        (B, S) class indices per image, in ``"random"`` mode with c* in column 0; in ``"batch"``
        mode (1, B), the same classes for every image.
    """
    batch_size = predictions.shape[0]
    if mode == "batch":
        return predictions.unsqueeze(0)
    if mode != "random":
        raise ValueError(f"unknown class subset mode {mode!r}; use 'random' or 'batch'")
    size = batch_size if subset_size is None else int(subset_size)
    if size < 1:
        raise ValueError(f"class subset size must be at least 1, got {size}")
    size = min(size, num_classes)
    scores = torch.rand(
        (batch_size, num_classes), generator=generator, device=predictions.device
    )
    # c* gets the top score so it is always drawn first; the rest is a uniform random subset.
    scores.scatter_(1, predictions.view(-1, 1), 2.0)
    return scores.topk(size, dim=1).indices


class PTAMELoss(nn.Module):
    """lambda1 * CE + lambda2 * area + lambda3 * variation (paper Eq. 4).

    Args:
        ce_weight, area_weight, variation_weight: lambda1, lambda2, lambda3 (non-negative).
        area_power: lambda_area.
        area_epsilon: added to maps before the area power (release 0.0005, paper 0).
        variation_power: exponent of the finite differences (2).
        border_penalty: release border term weight (paper 0).
        variation_normalisation: ``"mean"`` (paper) or ``"release"``.
        class_subset: ``"random"`` (paper) or ``"batch"`` (release).
        subset_size: |S| = lambda_rand for ``"random"``; None = batch size.
        implementation: how the area and variation terms are computed from raw scores
            (:func:`regulariser_terms`): ``"auto"``, ``"triton"`` or ``"torch"``.
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        area_weight: float = 1.0,
        variation_weight: float = 0.0,
        area_power: float = 1.0,
        area_epsilon: float = 0.0,
        variation_power: float = 2.0,
        border_penalty: float = 0.0,
        variation_normalisation: VariationNormalisation = "mean",
        class_subset: ClassSubsetMode = "random",
        subset_size: int | None = None,
        implementation: RegulariserImplementation = "auto",
    ) -> None:
        super().__init__()
        for name, value in [
            ("ce_weight", ce_weight),
            ("area_weight", area_weight),
            ("variation_weight", variation_weight),
            ("area_epsilon", area_epsilon),
            ("border_penalty", border_penalty),
        ]:
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"loss.{name} must be a non-negative number, got {value}")
        if not area_power > 0:
            raise ValueError(f"loss.area_power must be positive, got {area_power}")
        if not variation_power > 0:
            raise ValueError(f"loss.variation_power must be positive, got {variation_power}")
        if variation_normalisation not in ("mean", "release"):
            raise ValueError(
                f"loss.variation_normalisation must be 'mean' or 'release', "
                f"got {variation_normalisation!r}"
            )
        if class_subset not in ("random", "batch"):
            raise ValueError(f"loss.class_subset must be 'random' or 'batch', got {class_subset!r}")
        if subset_size is not None and subset_size < 1:
            raise ValueError(f"loss.subset_size must be at least 1 or null, got {subset_size}")
        if implementation not in REGULARISER_IMPLEMENTATIONS:
            raise ValueError(
                f"loss.implementation must be one of {REGULARISER_IMPLEMENTATIONS}, got {implementation!r}"
            )
        self.ce_weight = float(ce_weight)
        self.area_weight = float(area_weight)
        self.variation_weight = float(variation_weight)
        self.area_power = float(area_power)
        self.area_epsilon = float(area_epsilon)
        self.variation_power = float(variation_power)
        self.border_penalty = float(border_penalty)
        self.variation_normalisation: VariationNormalisation = variation_normalisation
        self.class_subset: ClassSubsetMode = class_subset
        self.subset_size = subset_size
        self.implementation: RegulariserImplementation = implementation

    def select_classes(
        self, predictions: Tensor, num_classes: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """(B, S) or, shared by every image, (1, S) class indices of the subset S for this
        batch; see :func:`select_class_subset`."""
        return select_class_subset(
            predictions, num_classes, self.class_subset, self.subset_size, generator
        )

    def forward(
        self,
        masked_logits: Tensor,
        predictions: Tensor,
        subset_maps: Tensor | None = None,
        *,
        subset_scores: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms for one batch.

        Args:
            masked_logits: (B, C) backbone logits on the images masked with E_c*.
            predictions: (B,) c*, the backbone's predictions on the unmasked images.
            subset_maps: (B, S, h, w) maps E_S in [0, 1]; or instead
            subset_scores: (B, S, h, w) their raw scores (E_S = sigmoid(scores)), which lets the
                area and variation terms run as one fused kernel on GPUs
                (:func:`regulariser_terms`, ``implementation``).

        Returns:
            dict with scalar tensors ``loss`` (weighted total), ``ce``, ``area``, ``variation``
            (unweighted terms).
        """
        if (subset_maps is None) == (subset_scores is None):
            raise ValueError("PTAMELoss needs exactly one of subset_maps and subset_scores")
        ce = F.cross_entropy(masked_logits.float(), predictions)
        if subset_scores is not None:
            area, variation = regulariser_terms(
                subset_scores, self.area_power, self.area_epsilon, self.variation_power,
                self.border_penalty, self.variation_normalisation, self.implementation,
            )
        else:
            maps = subset_maps.float()
            area = area_loss(maps, self.area_power, self.area_epsilon)
            variation = variation_loss(
                maps, self.variation_power, self.border_penalty, self.variation_normalisation
            )
        total = self.ce_weight * ce + self.area_weight * area + self.variation_weight * variation
        return {"loss": total, "ce": ce, "area": area, "variation": variation}
