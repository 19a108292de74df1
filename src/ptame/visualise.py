"""Figures: images with their explanation overlays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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


def overlay_grid(
    images: Tensor,
    maps: Mapping[str, Tensor],
    path: str | Path,
    row_titles: Sequence[str] | None = None,
    alpha: float = 0.5,
) -> Path:
    """Save a PNG grid: one row per image, the image then one overlay per method.

    Args:
        images: (N, 3, H, W) in [0, 1].
        maps: method name -> (N, H, W) maps in [0, 1].
        path: output PNG path (parent folders are created).
        row_titles: optional label per row (e.g. the explained class).

    Returns:
        the written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = images.shape[0]
    columns = 1 + len(maps)
    figure, axes = plt.subplots(count, columns, figsize=(1.9 * columns, 1.9 * count), squeeze=False)
    for row in range(count):
        axes[row][0].imshow(images[row].detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
        if row_titles is not None:
            axes[row][0].set_ylabel(row_titles[row], fontsize=8)
        for column, (name, method_maps) in enumerate(maps.items(), start=1):
            axes[row][column].imshow(overlay(images[row], method_maps[row], alpha))
            if row == 0:
                axes[row][column].set_title(name, fontsize=9)
    if count:
        axes[0][0].set_title("image", fontsize=9)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    temporary.replace(path)
    return path
