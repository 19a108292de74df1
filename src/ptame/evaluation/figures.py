"""Figures: images with their explanation overlays (training's ``overlays.png``, the paper's
Fig. 4, 6, 7) and the ROAD curves of an evaluation. Every PNG is written atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from ptame.explainers.base import Explainer, batched_maps  # noqa: E402
from ptame.io import save_figure_atomic  # noqa: E402

ClassNames = Sequence[str] | Mapping[str, Sequence[str] | None] | None


#: perceptually uniform: equal steps of saliency look equally different (jet's bands do not)
COLORMAP = "inferno"


def overlay(image: Tensor, saliency: Tensor, alpha: float = 0.5, colormap: str = COLORMAP) -> np.ndarray:
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
    masks: Tensor | None = None,
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
        masks: optional (N, H, W) ground-truth object masks, outlined in white on every cell.

    Returns:
        the written path.
    """
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
        if masks is not None and float(masks[row].max()) > 0:  # the ground truth, outlined on every cell
            outline = masks[row].detach().float().cpu().numpy()
            for axis in axes[row]:
                axis.contour(outline, levels=[0.5], colors="white", linewidths=0.8)
    if count:
        axes[0][0].set_title("image", fontsize=9)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    # one colour bar for every overlay: the maps share the [0, 1] scale
    bar_width = 0.25 / columns
    figure.tight_layout(rect=(0, 0, 1 - 1.6 * bar_width, 1))
    colour_axis = figure.add_axes((1 - 1.3 * bar_width, 0.15, 0.3 * bar_width, 0.7))
    scale = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=COLORMAP)
    figure.colorbar(scale, cax=colour_axis).set_label("saliency", fontsize=7)
    colour_axis.tick_params(labelsize=6)
    try:
        return save_figure_atomic(figure, path, dpi=dpi)
    finally:
        plt.close(figure)


def _names_for(class_names: ClassNames, label: str) -> Sequence[str] | None:
    if isinstance(class_names, Mapping):
        return class_names.get(label)
    return class_names


def _class_text(names: Sequence[str] | None, index: int) -> str:
    return str(names[index]) if names is not None and 0 <= index < len(names) else str(index)


def explanation_grid(
    explainers: Mapping[str, Explainer],
    images: Tensor,
    path: str | Path,
    class_names: ClassNames = None,
    upsampling: str = "bilinear",
    cell_size: float = 1.9,
    dpi: int = 100,
) -> Path:
    """Save a PNG of ``images`` (rows) x ``explainers`` (columns after the image).

    Args:
        explainers: column label -> explainer; each explains its own backbone's prediction.
        images: (N, 3, H, W) in [0, 1], on the explainers' device.
        path: output PNG.
        class_names: class names for the row / cell captions: one list for every column, or
            column label -> list (backbones with different classes); None shows indices.
        upsampling: ``"bilinear"`` or ``"nearest"`` (raw resolution, Fig. 7).
        cell_size, dpi: the PNG is ``round(cell_size * dpi)`` pixels per cell.

    When every column shares one backbone (Fig. 4), rows are titled with its predicted class;
    otherwise (Fig. 6, 7) each overlay is captioned with the class its backbone predicts.

    Returns:
        the written path.
    """
    if not explainers:
        raise ValueError("explanation_grid needs at least one explainer")
    maps: dict[str, Tensor] = {}
    captions: dict[str, list[str]] = {}
    for label, explainer in explainers.items():
        with torch.no_grad():
            predictions = explainer.backbone(images).argmax(dim=1)
        maps[label] = batched_maps(explainer, images, predictions, raw=upsampling == "nearest")
        names = _names_for(class_names, label)
        captions[label] = [_class_text(names, int(p)) for p in predictions]
    backbones = {id(explainer.backbone) for explainer in explainers.values()}
    first = next(iter(explainers))
    shared = len(backbones) == 1
    return overlay_grid(
        images, maps, path,
        row_titles=captions[first] if shared else None,
        upsampling=upsampling,
        cell_titles=None if shared else captions,
        cell_size=cell_size, dpi=dpi,
    )


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def method_styles(methods: Sequence[str]) -> dict[str, dict[str, object]]:
    """A distinct (colour, marker, line style) per method, for any number of methods: tab10
    colours up to 10 methods, tab20 up to 20, evenly spaced hues beyond; markers cycle
    independently of the colours, and P-TAME is drawn thicker and on top."""
    count = len(methods)
    if count <= 10:
        colours = [plt.get_cmap("tab10")(i) for i in range(count)]
    elif count <= 20:
        colours = [plt.get_cmap("tab20")(i) for i in range(count)]
    else:
        colours = [plt.get_cmap("nipy_spectral")(0.05 + 0.9 * i / (count - 1)) for i in range(count)]
    styles = {}
    for index, method in enumerate(methods):
        emphasis = method in ("ptame", "ttame")
        styles[method] = {"color": colours[index], "marker": MARKERS[index % len(MARKERS)],
                          "linestyle": "-" if (index // len(MARKERS)) % 2 == 0 else "--",
                          "linewidth": 2.4 if emphasis else 1.4, "zorder": 3 if emphasis else 2}
    return styles


def plot_road_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path) -> Path:
    """MoRF and LeRF accuracy against the removed percentage, one line per method (a distinct
    colour and marker each, :func:`method_styles`) with its 95 % band (mean +- 1.96 standard
    errors over images, when the curves carry ``MoRF_se`` / ``LeRF_se``), the legend beside the
    plots."""
    methods = [method for method, method_curves in curves.items() if method_curves]
    styles = method_styles(methods)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, order in zip(axes, ("MoRF", "LeRF"), strict=True):
        for method in methods:
            method_curves = curves[method]
            if order in method_curves:
                x, y = np.asarray(method_curves["percentages"]), np.asarray(method_curves[order], dtype=float)
                axis.plot(x, y, label=method, markersize=5, **styles[method])
                errors = np.asarray(method_curves.get(f"{order}_se", []), dtype=float)
                if errors.shape == y.shape and np.isfinite(errors).all():  # 95 % band of the mean
                    axis.fill_between(x, y - 1.96 * errors, y + 1.96 * errors, color=styles[method]["color"],
                                      alpha=0.12, linewidth=0)
        axis.set_title(f"ROAD {order}")
        axis.set_xlabel("pixels removed (%)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (prediction kept)")
    if methods:
        axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                       ncol=1 if len(methods) <= 16 else 2)
    figure.tight_layout()
    try:
        return save_figure_atomic(figure, path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(figure)
