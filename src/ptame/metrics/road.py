"""ROAD: RemOve And Debias (Rong et al., ICML 2022), MoRF and LeRF orders.

For each percentage p, the top (MoRF, most relevant first) or bottom (LeRF) p% of pixels by map
rank are removed and infilled by an imputer; the backbone's accuracy on the imputed images
(argmax f(x_imputed) == c*, c* = argmax f(x)) and its mean softmax(c*) form a curve over p.

AUC conventions (``auc=``):
- ``"normalised"`` (default): trapezoid over the curve points (p as a fraction) divided by the
  span of p, i.e. the mean height of the curve between the smallest and largest p, in [0, 1].
- ``"padded"``: the authors' release: the curve extended with (0, 1.0) and (1.0, 0.0), trapezoid
  over [0, 1]. Use it to compare with the published Table 1 numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ptame.metrics.base import (
    PIXEL_RULES,
    BackboneFn,
    PerImageMetric,
    check_batch,
    classify,
    original_logits,
    kth_value_threshold,
    pixel_count,
)
from ptame.metrics.imputation import IMPUTERS, imputations_per_call
from ptame.metrics.ranking import per_image_normal, rank_positions, ranking

ORDERS = ("MoRF", "LeRF")


def curve_auc(fractions: Sequence[float], heights: Tensor, convention: str = "normalised") -> Tensor:
    """Area under a curve sampled at ``fractions`` (ascending, in [0, 1]).

    Args:
        fractions: x positions.
        heights: (..., len(fractions)) y values.
        convention: ``"normalised"`` or ``"padded"`` (see the module docstring).
    """
    x = torch.tensor(list(fractions), dtype=heights.dtype, device=heights.device)
    y = heights
    if convention == "padded":
        x = torch.cat([x.new_zeros(1), x, x.new_ones(1)])
        y = torch.cat([y.new_ones(*y.shape[:-1], 1), y, y.new_zeros(*y.shape[:-1], 1)], dim=-1)
        return torch.trapezoid(y, x, dim=-1)
    if convention == "normalised":
        if len(fractions) == 1:
            return y[..., 0]
        return torch.trapezoid(y, x, dim=-1) / (x[-1] - x[0])
    raise ValueError(f"unknown AUC convention {convention!r}; use 'normalised' or 'padded'")


class ROAD(PerImageMetric):
    """ROAD MoRF / LeRF curves and their AUC.

    Args:
        backbone: frozen classifier taking [0, 1] images.
        percentages: removal percentages, ascending (paper: 10, 20, 30, 40, 50, 70, 90).
        imputer: ``"noisy_linear"`` (default; the ROAD paper's), ``"telea"``, ``"mean"``,
            ``"zero"``, or a callable ``(images, keep) -> images``.
        noise_std: std of the Gaussian noise added to imputed pixels (noisy linear only).
        auc: AUC convention, ``"normalised"`` or ``"padded"``.
        seed: seeds the tie-breaking keys and the noise, per image via its dataset index.
        chunk_size: imputed images per backbone call (memory bound; on CPU calls of at most
            :data:`~ptame.metrics.base.CPU_IMAGES_PER_FORWARD`), and per imputer call on CPU. On a GPU the imputer gets all the imputations of a batch in one call where a
            quarter of the free memory holds them (the noisy linear solver sizes its own chunks
            from it too): its fixed cost per call, hundreds of small kernel launches per
            iteration, is then paid once per batch.
        pixels: which pixels a percentage removes, ``"exact"`` or ``"release"`` (see
            :meth:`removal_masks`).
    """

    higher_is_better = None
    takes_logits = True
    directions = {
        "ROAD_MoRF_AUC": "min", "ROAD_LeRF_AUC": "max",
        "ROAD_MoRF_confidence_AUC": "min", "ROAD_LeRF_confidence_AUC": "max",
        "ROAD_MoRF@": "min", "ROAD_LeRF@": "max",
    }

    def __init__(
        self,
        backbone: BackboneFn,
        percentages: Sequence[float] = (10, 20, 30, 40, 50, 70, 90),
        imputer: str | Callable[[Tensor, Tensor], Tensor] = "noisy_linear",
        noise_std: float = 0.01,
        auc: str = "normalised",
        seed: int = 0,
        chunk_size: int = 128,
        pixels: str = "exact",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if pixels not in PIXEL_RULES:
            raise ValueError(f"ROAD pixels must be one of {PIXEL_RULES}, got {pixels!r}")
        percentages = [float(p) for p in percentages]
        if not percentages or sorted(percentages) != percentages or not all(0 < p < 100 for p in percentages):
            raise ValueError(f"ROAD percentages must be ascending, in (0, 100), got {percentages}")
        if isinstance(imputer, str) and imputer not in IMPUTERS:
            raise ValueError(f"unknown ROAD imputer {imputer!r}; choose from {sorted(IMPUTERS)}")
        curve_auc([0.5], torch.zeros(1), auc)  # validates the convention name
        self.__dict__["backbone"] = backbone
        self.percentages = percentages
        self.imputer_name = imputer if isinstance(imputer, str) else getattr(imputer, "__name__", "custom")
        self.__dict__["impute"] = IMPUTERS[imputer] if isinstance(imputer, str) else imputer
        self.noise_std = float(noise_std)
        self.auc = auc
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)
        self.pixels = pixels

    def removal_masks(self, maps: Tensor, indices: Tensor) -> Tensor:
        """keep masks (B, 2, P, H, W): False = removed, for MoRF then LeRF, per percentage.

        ``"exact"``: round(p% H W) pixels, the highest (MoRF) or the lowest (LeRF) of the map,
        ties broken by seeded per-image keys. ``"release"``: the authors' released rule: MoRF
        removes every pixel >= the k-th smallest value with k = int(H W (1 - p%)), LeRF every
        pixel <= the k-th smallest value with k = int(H W p%) (floor(H W p%) pixels for LeRF
        when the values are distinct, ceil + 1 for MoRF).
        """
        batch, height, width = maps.shape
        flat = maps.flatten(1)
        if self.pixels == "release":
            morf = [flat < kth_value_threshold(maps, 1 - p / 100) for p in self.percentages]
            lerf = [flat > kth_value_threshold(maps, p / 100) for p in self.percentages]
        else:
            positions = rank_positions(ranking(maps, indices, self.seed, descending=True))
            pixels = height * width
            counts = [pixel_count(p / 100, pixels) for p in self.percentages]
            morf = [positions >= count for count in counts]  # the highest are removed
            lerf = [positions < pixels - count for count in counts]  # the lowest are removed
        keep = torch.stack([torch.stack(morf, dim=1), torch.stack(lerf, dim=1)], dim=1)
        return keep.view(batch, 2, len(self.percentages), height, width)

    def imputations_per_call(self, imputations: int, values_per_image: int, device: torch.device) -> int:
        """Imputed images per imputer call: on a GPU all of a batch's where memory allows
        (:func:`ptame.metrics.imputation.imputations_per_call`), ``chunk_size`` on CPU."""
        return imputations_per_call(imputations, values_per_image, device, self.chunk_size)

    def _imputed(self, images: Tensor, keep: Tensor, indices: Tensor) -> Tensor:
        imputed = self.impute(images, keep)
        if self.imputer_name == "noisy_linear" and self.noise_std > 0:
            # counter-based noise on the images' device: the same for an image in any batch
            noise = per_image_normal(indices, tuple(images.shape[1:]), self.seed, stream=1)
            imputed = torch.where(keep.unsqueeze(1), imputed, imputed + self.noise_std * noise.to(imputed.dtype))
        return imputed

    @torch.no_grad()
    def update(self, images: Tensor, maps: Tensor, indices: Tensor | None = None,
               logits: Tensor | None = None) -> None:
        """images (B, 3, H, W) in [0, 1]; maps (B, H, W); indices (B,) dataset indices; logits
        (B, C): the backbone's logits of the images if the caller has them."""
        images, maps, indices = check_batch(images, maps, indices, "ROAD")
        if images.shape[0] == 0:
            return
        batch, channels, height, width = images.shape
        predictions = original_logits(self.backbone, images, logits, "ROAD").argmax(dim=1)
        keep = self.removal_masks(maps, indices)  # (B, 2, P, H, W)
        steps = keep.shape[1] * keep.shape[2]
        flat_keep = keep.reshape(batch * steps, height, width)
        flat_images = images.unsqueeze(1).expand(batch, steps, channels, height, width).reshape(-1, channels, height, width)
        flat_indices = indices.repeat_interleave(steps) * steps + torch.arange(steps, device=indices.device).repeat(batch)
        flat_targets = predictions.repeat_interleave(steps)
        correct, confidence = [], []
        per_call = self.imputations_per_call(flat_keep.shape[0], channels * height * width, images.device)
        for start in range(0, flat_keep.shape[0], per_call):
            call = slice(start, start + per_call)
            imputed = self._imputed(flat_images[call], flat_keep[call], flat_indices[call])
            targets = flat_targets[call]
            for offset in range(0, imputed.shape[0], self.chunk_size):
                part = slice(offset, offset + self.chunk_size)
                probabilities = classify(self.backbone, imputed[part]).float().softmax(dim=1)
                correct.append((probabilities.argmax(dim=1) == targets[part]).double())
                confidence.append(probabilities.gather(1, targets[part].view(-1, 1)).squeeze(1).double())
        values = torch.stack([torch.cat(correct), torch.cat(confidence)], dim=1)
        self._record(indices, values.view(batch, 2, len(self.percentages), 2))

    def curves(self) -> dict[str, Tensor]:
        """Mean accuracy and confidence per percentage: keys ``MoRF``, ``LeRF`` (accuracy) and
        ``MoRF_confidence``, ``LeRF_confidence``, each (P,), and the accuracies' standard errors
        over images ``MoRF_se``, ``LeRF_se`` (NaN for one image)."""
        _, values = self.per_image()
        means = values.mean(dim=0)  # (2, P, 2)
        count = values.shape[0]
        errors = (values[..., 0].std(dim=0, unbiased=True) / count**0.5 if count > 1
                  else torch.full_like(means[..., 0], float("nan")))  # (2, P)
        return {
            **{order: means[o, :, 0] for o, order in enumerate(ORDERS)},
            **{f"{order}_confidence": means[o, :, 1] for o, order in enumerate(ORDERS)},
            **{f"{order}_se": errors[o] for o, order in enumerate(ORDERS)},
        }

    def per_image_figures(self) -> dict[str, Tensor]:
        """Every figure of :meth:`compute` per image (N,): the AUC is linear in the curve, so
        the mean of the per-image AUCs is the AUC of the mean curve."""
        _, values = self.per_image()  # (N, 2, P, 2)
        fractions = [p / 100 for p in self.percentages]
        figures = {}
        for o, order in enumerate(ORDERS):
            figures[f"ROAD_{order}_AUC"] = curve_auc(fractions, values[:, o, :, 0], self.auc)
            figures[f"ROAD_{order}_confidence_AUC"] = curve_auc(fractions, values[:, o, :, 1], self.auc)
            for j, p in enumerate(self.percentages):
                figures[f"ROAD_{order}@{p:g}"] = values[:, o, j, 0]
        return figures

    def compute(self) -> dict[str, Tensor]:
        """``ROAD_MoRF_AUC``, ``ROAD_LeRF_AUC`` (accuracy AUCs, fractions), the confidence AUCs,
        and the curve points ``ROAD_MoRF@p`` / ``ROAD_LeRF@p``."""
        curves = self.curves()
        fractions = [p / 100 for p in self.percentages]
        results = {}
        for order in ORDERS:
            results[f"ROAD_{order}_AUC"] = curve_auc(fractions, curves[order], self.auc).float()
            results[f"ROAD_{order}_confidence_AUC"] = curve_auc(
                fractions, curves[f"{order}_confidence"], self.auc
            ).float()
            for p, value in zip(self.percentages, curves[order], strict=True):
                results[f"ROAD_{order}@{p:g}"] = value.float()
        return results
