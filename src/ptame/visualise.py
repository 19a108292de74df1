"""Figures: images with their explanation overlays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402


def overlay(image: Tensor, saliency: Tensor, alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """Blend one map over one image.

    Args:
        image: (3, H, W) in [0, 1].
        saliency: (H, W) in [0, 1].

    Returns:
        (H, W, 3) float array in [0, 1].
    """
    rgb = image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
    heat = plt.get_cmap(colormap)(saliency.detach().float().cpu().clamp(0, 1).numpy())[..., :3]
    return (1 - alpha) * rgb + alpha * heat


def resize_map(saliency: Tensor, size: Sequence[int], upsampling: str = "bilinear") -> Tensor:
    """(h, w) map -> (H, W) by ``"bilinear"`` (smooth, as in most figures) or ``"nearest"``
    interpolation (shows the explanation's raw resolution, the paper's Fig. 7)."""
    if upsampling not in ("bilinear", "nearest"):
        raise ValueError(f"upsampling must be 'bilinear' or 'nearest', got {upsampling!r}")
    if tuple(saliency.shape[-2:]) == tuple(size):
        return saliency
    extra = {"align_corners": False} if upsampling == "bilinear" else {}
    resized = F.interpolate(saliency[None, None].float(), size=tuple(size), mode=upsampling, **extra)
    return resized[0, 0].clamp(0, 1)


def overlay_grid(
    images: Tensor,
    maps: Mapping[str, Tensor],
    path: str | Path,
    row_titles: Sequence[str] | None = None,
    alpha: float = 0.5,
    upsampling: str = "bilinear",
    cell_titles: Mapping[str, Sequence[str]] | None = None,
    cell_size: float = 1.9,
    dpi: int = 100,
) -> Path:
    """Save a PNG grid: one row per image, the image then one overlay per method.

    Args:
        images: (N, 3, H, W) in [0, 1].
        maps: method name -> (N, h, w) maps in [0, 1]; maps smaller than the images are resized
            with ``upsampling``.
        path: output PNG path (parent folders are created).
        row_titles: optional label per row (e.g. the explained class).
        alpha: weight of the heat map in the overlay.
        upsampling: ``"bilinear"`` or ``"nearest"`` (see :func:`resize_map`).
        cell_titles: optional method name -> one caption per row, shown under that overlay
            (e.g. the class each backbone predicts).
        cell_size: inches per grid cell; the PNG is ``round(cell_size * dpi)`` pixels per cell
            (``(1 + len(maps)) * cell`` wide, ``N * cell`` high).
        dpi: PNG resolution.

    Returns:
        the written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = images.shape[0]
    columns = 1 + len(maps)
    figure, axes = plt.subplots(
        count, columns, figsize=(cell_size * columns, cell_size * count), squeeze=False
    )
    size = images.shape[-2:]
    for row in range(count):
        axes[row][0].imshow(images[row].detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
        if row_titles is not None:
            axes[row][0].set_ylabel(row_titles[row], fontsize=8)
        for column, (name, method_maps) in enumerate(maps.items(), start=1):
            saliency = resize_map(method_maps[row].detach().float().cpu(), size, upsampling)
            axes[row][column].imshow(overlay(images[row], saliency, alpha))
            if row == 0:
                axes[row][column].set_title(name, fontsize=9)
            if cell_titles is not None and name in cell_titles:
                axes[row][column].set_xlabel(cell_titles[name][row], fontsize=7)
    if count:
        axes[0][0].set_title("image", fontsize=9)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=dpi)
    plt.close(figure)
    temporary.replace(path)
    return path
