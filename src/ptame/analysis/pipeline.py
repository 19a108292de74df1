"""The optional analyses of ``evaluate.py`` (config group ``analysis``): the images x methods
figure (``methods_grid.png``) and the model parameter randomisation test (``mprt.json``,
``mprt.png``). Called by :func:`ptame.evaluation_pipeline.run_evaluation` on rank 0."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ptame.analysis.figures import explanation_grid
from ptame.analysis.mprt import MPRTResult, model_parameter_randomisation, plot_mprt
from ptame.evaluation import write_json_atomic
from ptame.explainers.base import Explainer

log = logging.getLogger(__name__)


def first_images(batches: Iterable[Mapping[str, Tensor]], count: int) -> Tensor:
    """The first ``count`` images (N, 3, H, W) of a dataloader (fewer if it has fewer)."""
    pieces, seen = [], 0
    for batch in batches:
        pieces.append(batch["image"][: count - seen])
        seen += pieces[-1].shape[0]
        if seen >= count:
            break
    if not pieces:
        raise ValueError("the test set is empty")
    return torch.cat(pieces)


def run_mprt(
    explainers: Mapping[str, Explainer], images: Tensor, options: Mapping[str, Any]
) -> dict[str, MPRTResult]:
    """MPRT for every explainer with ``options`` (keys of ``analysis.mprt_options``: blocks,
    order, targets, resolution, threshold, seed, batch_size)."""
    results = {}
    for name, explainer in explainers.items():
        results[name] = model_parameter_randomisation(
            explainer, images,
            blocks=options.get("blocks"),
            order=str(options.get("order", "bottom_up")),
            targets=list(options.get("targets") or ("original", "randomised")),
            seed=int(options.get("seed", 0)),
            resolution=str(options.get("resolution", "explanation")),
            threshold=float(options.get("threshold", 0.5)),
            batch_size=int(options.get("batch_size", 32)),
        )
    return results


def format_mprt(results: Mapping[str, MPRTResult]) -> str:
    """One line per explainer and target mode: SSIM after each block, and the verdict."""
    lines = []
    for name, result in results.items():
        lines.append(f"MPRT {name} ({result.order.replace('_', '-')}, {result.images} images, "
                     f"maps {result.map_size[0]}x{result.map_size[1]}); "
                     f"blocks: {', '.join(result.blocks)}")
        for mode, values in result.ssim.items():
            verdict = "passes" if result.passes[mode] else "fails"
            lines.append(f"  {mode:<10} targets: SSIM " + " ".join(f"{v:.3f}" for v in values)
                         + f"  -> {verdict} (first step {'<' if result.passes[mode] else '>='} "
                         f"{result.threshold})")
        lines.append("  prediction kept: " + " ".join(f"{v:.2f}" for v in result.prediction_agreement))
    return "\n".join(lines)


def run_analyses(
    settings: Mapping[str, Any] | None,
    run_dir: str | Path,
    explainers: Mapping[str, Explainer],
    batches: Iterable[Mapping[str, Tensor]],
    device: torch.device | str,
    build: Callable[[str], Explainer],
    class_names: Any = None,
) -> dict[str, Path]:
    """Write the analyses switched on in ``settings`` (the ``analysis`` config) into ``run_dir``.

    Args:
        settings: ``figure_images`` (N > 0: methods_grid.png of the first N test images),
            ``figure_upsampling``, ``mprt`` (bool) and ``mprt_options``.
        explainers: the evaluated explainers (name -> explainer).
        batches: the test dataloader.
        device: where images go.
        build: builds an explainer by config name (MPRT explainers not evaluated).
        class_names: the dataset's class names (row titles), or None.

    Returns:
        name -> written path.
    """
    settings = settings or {}
    run_dir = Path(run_dir)
    paths: dict[str, Path] = {}
    figure_count = int(settings.get("figure_images") or 0)
    options = settings.get("mprt_options") or {}
    mprt_count = int(options.get("images", 32)) if settings.get("mprt") else 0
    if max(figure_count, mprt_count) <= 0:
        return paths
    images = first_images(batches, max(figure_count, mprt_count)).to(device)
    if figure_count > 0:
        paths["methods_grid"] = explanation_grid(
            explainers, images[:figure_count], run_dir / "methods_grid.png", class_names,
            str(settings.get("figure_upsampling", "bilinear")),
        )
    if mprt_count > 0:
        names = list(options.get("explainers") or ["ptame"])
        chosen = {name: explainers[name] if name in explainers else build(name).to(device)
                  for name in names}
        results = run_mprt(chosen, images[:mprt_count], options)
        summary = {"settings": {key: value for key, value in options.items() if key != "explainers"},
                   **{name: result.as_dict() for name, result in results.items()}}
        paths["mprt_json"] = write_json_atomic(run_dir / "mprt.json", summary)
        paths["mprt_png"] = plot_mprt(results, run_dir / "mprt.png")
        print(f"\nModel parameter randomisation test:\n{format_mprt(results)}")
    log.info("analyses written: %s", ", ".join(str(p) for p in paths.values()))
    return paths
