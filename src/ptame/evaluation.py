"""Evaluation of explainers: the metric suite, a LightningModule that runs it on 1 or N
processes, and writers for the result tables and plots."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import Metric
from tqdm.auto import tqdm

from ptame.explainers.base import Explainer
from ptame.metrics import (
    ROAD,
    AverageDropIncrease,
    EnergyPointingGame,
    InsertionDeletion,
    PointingGame,
    measure_cost,
)
from ptame.networks import Backbone

# Column order of the result tables (Table 1 of the paper first).
TABLE_COLUMNS = [
    "AD@100", "AD@50", "AD@15", "IC@100", "IC@50", "IC@15", "ROAD_MoRF_AUC", "ROAD_LeRF_AUC",
    "insertion_AUC", "deletion_AUC", "pointing_game", "energy_pointing_game", "pointing_game_strict",
    "resolution", "forward_passes", "gflops", "ms_per_image",
]
# Metrics that compare maps with ground-truth object masks.
LOCALISATION_METRICS = ("pointing_game", "energy_pointing_game", "pointing_game_strict")


def build_metrics(
    backbone: Backbone, settings: Mapping[str, Any], has_masks: bool
) -> dict[str, Metric]:
    """The metric suite for one explainer.

    Args:
        backbone: the frozen classifier the metrics query.
        settings: ``{"adic": {...} | None, "road": {...} | None, "insertion_deletion": {...} |
            None, "localisation": bool}``: keyword arguments of :class:`AverageDropIncrease`,
            :class:`ROAD`, :class:`InsertionDeletion`; None (or absent) disables a metric.
        has_masks: whether ground-truth masks exist (localisation metrics need them).
    """
    metrics: dict[str, Metric] = {}
    if settings.get("adic") is not None:
        metrics["adic"] = AverageDropIncrease(backbone, **dict(settings["adic"]))
    if settings.get("road") is not None:
        metrics["road"] = ROAD(backbone, **dict(settings["road"]))
    if settings.get("insertion_deletion") is not None:
        metrics["insertion_deletion"] = InsertionDeletion(backbone, **dict(settings["insertion_deletion"]))
    if has_masks and settings.get("localisation", True):
        metrics.update(localisation_metrics(float(settings.get("pointing_tolerance") or 0.0)))
    return metrics


def localisation_metrics(pointing_tolerance: float, **metric_kwargs: Any) -> dict[str, Metric]:
    """``pointing_game`` (with ``pointing_tolerance`` pixels, TorchRay's convention),
    ``energy_pointing_game``, and ``pointing_game_strict`` (zero tolerance) when the tolerance is
    positive; ``metric_kwargs`` go to every metric (e.g. ``sync_on_compute=False``)."""
    metrics: dict[str, Metric] = {
        "pointing_game": PointingGame(tolerance=pointing_tolerance, **metric_kwargs),
        "energy_pointing_game": EnergyPointingGame(**metric_kwargs),
    }
    if pointing_tolerance > 0:
        metrics["pointing_game_strict"] = PointingGame(tolerance=0.0, **metric_kwargs)
    return metrics


def update_metrics(metrics: Mapping[str, Metric], images: Tensor, maps: Tensor, batch: Mapping[str, Tensor]) -> None:
    """Feed one batch of maps (B, H, W) for ``images`` (B, 3, H, W) into every metric."""
    indices = batch["index"].to(images.device)
    for name, metric in metrics.items():
        if name in LOCALISATION_METRICS:
            metric.update(maps, batch["mask"].to(images.device), indices)
        else:
            metric.update(images, maps, indices)


def compute_metrics(metrics: Mapping[str, Metric]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(flat figures, ROAD curves) of a metric suite (synchronised across processes)."""
    figures: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    for name, metric in metrics.items():
        value = metric.compute()
        if isinstance(value, dict):
            figures.update({key: float(v) for key, v in value.items()})
        else:
            figures[name] = float(value)
        if isinstance(metric, ROAD):
            curves = {key: [float(v) for v in values] for key, values in metric.curves().items()}
            curves["percentages"] = list(metric.percentages)
    return figures, curves


class ExplainerEvaluation(L.LightningModule):
    """Runs the metric suite for several explainers over a test dataloader with Lightning, so
    evaluation uses one GPU or many (DDP); duplicates padded by the distributed sampler are
    counted once (metrics keep one value per dataset index).

    After ``trainer.test``, :attr:`results` holds ``{method: {metric: value}}`` and
    :attr:`curves` the ROAD curves per method (identical on every process).
    """

    def __init__(
        self,
        explainers: Mapping[str, Explainer],
        backbone: Backbone,
        settings: Mapping[str, Any],
        has_masks: bool,
    ) -> None:
        super().__init__()
        self.explainers = torch.nn.ModuleDict(dict(explainers))
        self.__dict__["backbone"] = backbone
        self.metric_suites = torch.nn.ModuleDict(
            {name: torch.nn.ModuleDict(build_metrics(backbone, settings, has_masks)) for name in explainers}
        )
        self.results: dict[str, dict[str, float]] = {}
        self.curves: dict[str, dict[str, list[float]]] = {}

    def on_test_start(self) -> None:
        self.backbone.to(self.device)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        images = batch["image"]
        for name, explainer in self.explainers.items():
            maps = explainer(images)
            update_metrics(self.metric_suites[name], images, maps, batch)

    def on_test_epoch_end(self) -> None:
        for name, suite in self.metric_suites.items():
            figures, curves = compute_metrics(suite)
            self.results[name] = figures
            self.curves[name] = curves


def evaluate_costs(
    explainers: Mapping[str, Explainer], images: Tensor, repeats: int = 3
) -> dict[str, dict[str, float]]:
    """Measured forward passes, GFLOPs, ms/image and resolution per explainer on ``images``."""
    return {name: measure_cost(explainer, images, repeats).as_dict() for name, explainer in explainers.items()}


@torch.no_grad()
def evaluate_localisation(
    explainers: Mapping[str, Explainer],
    batches: Iterable[dict[str, Tensor]],
    device: str | torch.device = "cpu",
    max_images: int | None = None,
    pointing_tolerance: float = 0.0,
) -> dict[str, float]:
    """Pointing game and energy-based pointing game of each explainer on the same images.

    Args:
        explainers: name -> explainer; every explainer explains the backbone's prediction.
        batches: dict batches with ``image`` (B, 3, H, W) in [0, 1], ``mask`` (B, H, W) and
            ``index`` (B,).
        device: where explainers and metrics run.
        max_images: stop after this many images (None: all).
        pointing_tolerance: pixels; ``<name>/pointing_game`` counts a maximum at distance <
            this from the object as a hit (TorchRay's convention; 0 = strict). When > 0,
            ``<name>/pointing_game_strict`` (zero tolerance) is reported too.

    Returns:
        flat ``{"<name>/pointing_game": value, "<name>/energy_pointing_game": value, ...}``.
    """
    # One process sees every image here (e.g. rank 0 after DDP training): never sync.
    suites: dict[str, dict[str, Metric]] = {}
    for name in explainers:
        suites[name] = {
            key: metric.to(device)
            for key, metric in localisation_metrics(pointing_tolerance, sync_on_compute=False).items()
        }
    seen = 0
    for batch in tqdm(batches, desc="localisation", leave=False):
        count = batch["image"].shape[0] if max_images is None else min(batch["image"].shape[0], max_images - seen)
        images = batch["image"][:count].to(device)
        masks = batch["mask"][:count].to(device)
        indices = batch["index"][:count].to(device)
        for name, explainer in explainers.items():
            maps = explainer(images)
            for metric in suites[name].values():
                metric.update(maps, masks, indices)
        seen += count
        if max_images is not None and seen >= max_images:
            break
    results = {}
    for name, suite in suites.items():
        for key, metric in suite.items():
            results[f"{name}/{key}"] = float(metric.compute())
    return results


def format_localisation_table(
    results: Mapping[str, float], names: Iterable[str], pointing_tolerance: float = 0.0
) -> str:
    """A plain-text table: one row per method; pointing game (with its tolerance in the header),
    energy, and the strict pointing game when ``results`` has it."""
    names = list(names)
    strict = any(f"{name}/pointing_game_strict" in results for name in names)
    pointing_header = "pointing game"
    if pointing_tolerance > 0:
        pointing_header += f" (< {pointing_tolerance:g} px)"
    header = f"{'method':<18}{pointing_header:>26}{'energy':>10}"
    lines = [header + (f"{'pointing (strict)':>20}" if strict else "")]
    for name in names:
        pointing = results.get(f"{name}/pointing_game", math.nan)
        energy = results.get(f"{name}/energy_pointing_game", math.nan)
        line = f"{name:<18}{pointing:>26.3f}{energy:>10.3f}"
        if strict:
            line += f"{results.get(f'{name}/pointing_game_strict', math.nan):>20.3f}"
        lines.append(line)
    return "\n".join(lines)


def table_columns(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Known columns in Table 1 order, then any other metric, for the methods in ``results``."""
    present = {key for figures in results.values() for key in figures}
    return [c for c in TABLE_COLUMNS if c in present] + sorted(present - set(TABLE_COLUMNS))


def format_number(column: str, value: float | None) -> str | None:
    """A table cell's number without units or markup, or None when missing / NaN.

    AD and IC (percentages already): 2 decimals; R and forward passes as counts; GFLOPs and
    ms/image: 3 significant digits; AUCs and pointing games (fractions): 4 decimals.
    """
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    if column.startswith(("AD@", "IC@")):
        return f"{value:.2f}"
    if column in ("resolution", "forward_passes"):
        return f"{value:g}"
    if column in ("ms_per_image", "gflops"):
        return f"{value:.3g}"
    return f"{value:.4f}"


def _format_value(column: str, value: float | None) -> str:
    text = format_number(column, value)
    if text is None:
        return "-"
    return text + "%" if column.startswith(("AD@", "IC@")) else text


def markdown_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table: one row per method, AD/IC in percent, AUCs as fractions (the ROAD
    curve points and the layer contributions stay in results.json / results.csv)."""
    columns = [c for c in table_columns(results)
               if ("@" not in c or c.startswith(("AD@", "IC@"))) and not c.startswith("layer_contribution/")]
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, figures in results.items():
        cells = [_format_value(c, figures.get(c)) for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    run_dir: str | Path,
    results: Mapping[str, Mapping[str, float]],
    curves: Mapping[str, Mapping[str, Sequence[float]]],
) -> dict[str, Path]:
    """Write results.json, results.csv, results.md and road_curves.png into ``run_dir``."""
    run_dir = Path(run_dir)
    paths = {"json": write_json_atomic(run_dir / "results.json", results)}
    columns = table_columns(results)
    csv_path = run_dir / "results.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", *columns])
        for method, figures in results.items():
            writer.writerow([method, *[figures.get(c, "") for c in columns]])
    paths["csv"] = csv_path
    paths["md"] = run_dir / "results.md"
    paths["md"].write_text(markdown_table(results))
    if any(curves.get(method) for method in curves):
        paths["png"] = plot_road_curves(curves, run_dir / "road_curves.png")
    return paths


def plot_road_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path) -> Path:
    """MoRF and LeRF accuracy against the removed percentage, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, order in zip(axes, ("MoRF", "LeRF"), strict=True):
        for method, method_curves in curves.items():
            if method_curves and order in method_curves:
                axis.plot(method_curves["percentages"], method_curves[order], marker="o", label=method)
        axis.set_title(f"ROAD {order}")
        axis.set_xlabel("pixels removed (%)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (prediction kept)")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_json_atomic(path: str | Path, payload: Mapping) -> Path:
    """Write ``payload`` as JSON via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    temporary.replace(path)
    return path
