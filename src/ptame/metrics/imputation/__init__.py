"""Imputers of ROAD: how removed pixels are filled in.

Each imputer maps ``(images (B, C, H, W) in [0, 1], keep (B, H, W) bool, False = removed)`` to
imputed images of the same shape, on the images' device. Noisy linear imputation (the ROAD
paper's) is solved exactly in :mod:`ptame.metrics.imputation.noisy_linear`; the metric adds its
per-image seeded noise itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ptame.metrics.imputation.noisy_linear import (
    ATOL,
    MAX_ITERATIONS,
    ImputationNotConvergedError,
    available_memory,
    noisy_linear_imputation,
)

CALL_BYTES_PER_VALUE = 40
"""Device memory per image value of one imputer call on top of the solver's own chunks: the
repeated input images, the float64 copy the solver works on and its float64 results, the
imputed output and the metric's noise (8 + 8 + 8 + 4 + 4 bytes, and some slack)."""

__all__ = [
    "ATOL",
    "IMPUTERS",
    "MAX_ITERATIONS",
    "CALL_BYTES_PER_VALUE",
    "ImputationNotConvergedError",
    "imputations_per_call",
    "mean_imputation",
    "noisy_linear_exact",
    "noisy_linear_imputation",
    "telea_imputation",
    "telea_release_imputation",
    "zero_imputation",
]


def imputations_per_call(imputations: int, values_per_image: int, device: torch.device,
                         cpu_call: int) -> int:
    """Imputed images per imputer call. On CPU ``cpu_call``. On a GPU every imputation at once
    when a quarter of the available memory holds them at :data:`CALL_BYTES_PER_VALUE` (a call's
    fixed cost, hundreds of small kernel launches per solver iteration, is then paid once), else
    as many as it holds, at least ``cpu_call``."""
    if device.type != "cuda":
        return cpu_call
    fitting = available_memory(device) // 4 // (CALL_BYTES_PER_VALUE * values_per_image)
    return max(min(imputations, fitting), cpu_call, 1)


def zero_imputation(images: Tensor, keep: Tensor) -> Tensor:
    """Removed pixels become 0 (black)."""
    return images * keep.unsqueeze(1).to(images.dtype)


def mean_imputation(images: Tensor, keep: Tensor) -> Tensor:
    """Removed pixels take the per-image, per-channel mean of the kept pixels (0 if none kept)."""
    weights = keep.unsqueeze(1).to(images.dtype)
    count = weights.sum(dim=(2, 3), keepdim=True)
    mean = (images * weights).sum(dim=(2, 3), keepdim=True) / count.clamp_min(1)
    return torch.where(keep.unsqueeze(1), images, mean.expand_as(images))


def telea_imputation(images: Tensor, keep: Tensor, radius: int = 3, release: bool = False) -> Tensor:
    """OpenCV Telea inpainting (radius 3: the release's default), per image on the CPU, 8-bit.

    The image is rounded to 8 bits for OpenCV and only the removed pixels take inpainted values.
    With ``release``, as the authors' released code does: the image is truncated to 8 bits
    (``astype(uint8)``) and every pixel comes back from the 8-bit inpainted image.
    """
    import cv2
    import numpy as np

    results = []
    for image, kept in zip(images, keep, strict=True):
        scaled = image.detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy().astype(np.float32) * 255
        pixels = scaled.astype(np.uint8) if release else scaled.round().astype(np.uint8)
        holes = (~kept).cpu().numpy().astype(np.uint8)
        filled = cv2.inpaint(np.ascontiguousarray(pixels), holes, radius, cv2.INPAINT_TELEA)
        filled_tensor = torch.from_numpy(filled).permute(2, 0, 1).to(images.dtype) / 255
        results.append(filled_tensor if release else torch.where(kept.cpu().unsqueeze(0), image.cpu(), filled_tensor))
    return torch.stack(results).to(images.device)


def telea_release_imputation(images: Tensor, keep: Tensor) -> Tensor:
    """:func:`telea_imputation` exactly as the authors' release runs it (``release=True``)."""
    return telea_imputation(images, keep, release=True)


def noisy_linear_exact(images: Tensor, keep: Tensor) -> Tensor:
    """Noisy linear imputation without its noise (the metric adds per-image seeded noise)."""
    return noisy_linear_imputation(images, keep, noise_std=0.0)


IMPUTERS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "noisy_linear": noisy_linear_exact,
    "telea": telea_imputation,
    "telea_release": telea_release_imputation,
    "mean": mean_imputation,
    "zero": zero_imputation,
}
