"""Evaluation loops shared by train.py and evaluate.py."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ptame.explainers.base import Explainer
from ptame.metrics import EnergyPointingGame, PointingGame


@torch.no_grad()
def evaluate_localisation(
    explainers: Mapping[str, Explainer],
    batches: Iterable[dict[str, Tensor]],
    device: str | torch.device = "cpu",
    max_images: int | None = None,
) -> dict[str, float]:
    """Pointing game and energy-based pointing game of each explainer on the same images.

    Args:
        explainers: name -> explainer; every explainer explains the backbone's prediction.
        batches: dict batches with ``image`` (B, 3, H, W) in [0, 1] and ``mask`` (B, H, W).
        device: where explainers and metrics run.
        max_images: stop after this many images (None: all).

    Returns:
        flat ``{"<name>/pointing_game": value, "<name>/energy_pointing_game": value}``.
    """
    metrics = {
        name: (PointingGame().to(device), EnergyPointingGame().to(device)) for name in explainers
    }
    seen = 0
    for batch in tqdm(batches, desc="localisation", leave=False):
        images = batch["image"].to(device)
        masks = batch["mask"].to(device)
        if max_images is not None:
            images, masks = images[: max_images - seen], masks[: max_images - seen]
        for name, explainer in explainers.items():
            maps = explainer(images)
            metrics[name][0].update(maps, masks)
            metrics[name][1].update(maps, masks)
        seen += images.shape[0]
        if max_images is not None and seen >= max_images:
            break
    results = {}
    for name, (pointing, energy) in metrics.items():
        results[f"{name}/pointing_game"] = float(pointing.compute())
        results[f"{name}/energy_pointing_game"] = float(energy.compute())
    return results


def format_localisation_table(results: Mapping[str, float], names: Iterable[str]) -> str:
    """A plain-text table: one row per method, pointing game and energy columns."""
    lines = [f"{'method':<18}{'pointing game':>15}{'energy':>10}"]
    for name in names:
        pointing = results.get(f"{name}/pointing_game", math.nan)
        energy = results.get(f"{name}/energy_pointing_game", math.nan)
        lines.append(f"{name:<18}{pointing:>15.3f}{energy:>10.3f}")
    return "\n".join(lines)


def write_json_atomic(path: str | Path, payload: Mapping) -> Path:
    """Write ``payload`` as JSON via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    temporary.replace(path)
    return path
