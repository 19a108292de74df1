"""Explanation figures: images x methods (the paper's Fig. 4) and images x backbones or
auxiliaries (Fig. 6, 7) from several P-TAME checkpoints.

    python -m ptame.figures A.ckpt B.ckpt C.ckpt --labels VGG-16 ResNet-50 ViT-B-16 \\
        --images cat.jpg barometer.jpg --output figure6.png
    python -m ptame.figures r18.ckpt mnv3.ckpt --labels ResNet-18 MobileNetV3 \\
        --generated 4 --upsampling nearest --output figure7.png

Every explainer explains the prediction of its own backbone. With ``upsampling="nearest"``
the maps of explainers that expose their raw maps (P-TAME, T-TAME: ``low_resolution_maps``)
are shown at their raw resolution R (Fig. 7); other explainers' maps are already at image size.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import Tensor

from ptame.checkpoint import read_checkpoint
from ptame.explainers.base import Explainer
from ptame.explainers.ptame import PTAMEExplainer, load_explainer
from ptame.visualise import overlay_grid

ClassNames = Sequence[str] | Mapping[str, Sequence[str] | None] | None


def grid_maps(
    explainer: Explainer, images: Tensor, targets: Tensor, raw: bool, batch_size: int = 32
) -> Tensor:
    """Maps (B, h, w) for ``targets`` (B,), on the images' device: raw (before upsampling) when
    ``raw`` and the explainer exposes them (``low_resolution_maps``: P-TAME, T-TAME), else at
    the images' size. ``batch_size`` images per explainer call."""
    low = getattr(explainer, "low_resolution_maps", None) if raw else None
    pieces = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            chunk, wanted = images[start:start + batch_size], targets[start:start + batch_size]
            pieces.append(low(chunk, wanted) if low is not None else explainer(chunk, wanted))
    return torch.cat(pieces).float()


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
        maps[label] = grid_maps(explainer, images, predictions, raw=upsampling == "nearest")
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


# --------------------------------------------------------------------------------------------
# Explainers from checkpoints (the command line)
# --------------------------------------------------------------------------------------------


def _with_cache_dir(recipe: Mapping[str, Any], cache_dir: str | None) -> dict[str, Any]:
    recipe = dict(recipe)
    if cache_dir is not None and "cache_dir" in recipe:
        recipe["cache_dir"] = str(cache_dir)
    return recipe


def _recipe(saved: Mapping[str, Any], part: str, path: str | Path) -> dict[str, Any]:
    recipe = (saved.get(part) or {}).get("config")
    if not recipe:
        raise ValueError(f"{path} stores no {part} recipe; build its explainer in Python and "
                         "call ptame.analysis.figures.explanation_grid")
    return dict(recipe)


def explainer_from_checkpoint(
    path: str | Path,
    map_normalisation: str = "sigmoid",
    cache_dir: str | None = None,
    backbones: dict[str, Any] | None = None,
) -> PTAMEExplainer:
    """A P-TAME (or T-TAME) explainer with the backbone and auxiliary rebuilt from the recipes
    stored in the checkpoint.

    Args:
        path: a P-TAME ``.ckpt``.
        map_normalisation: ``"sigmoid"`` or ``"minmax"``.
        cache_dir: replaces the recipes' ``cache_dir`` (generated-dataset classifiers).
        backbones: a cache recipe (JSON) -> backbone, shared between checkpoints of one backbone.
    """
    saved = read_checkpoint(path)["ptame"]
    recipe = _with_cache_dir(_recipe(saved, "backbone", path), cache_dir)
    key = json.dumps(recipe, sort_keys=True, default=str)
    backbones = {} if backbones is None else backbones
    if key not in backbones:
        backbones[key] = instantiate(recipe)
    backbone = backbones[key]
    if str(saved["auxiliary"].get("name", "")).startswith("backbone-features:"):
        from ptame.explainers.ttame import load_ttame_explainer

        return load_ttame_explainer(path, backbone, map_normalisation=map_normalisation)
    auxiliary = instantiate(_with_cache_dir(_recipe(saved, "auxiliary", path), cache_dir))
    return load_explainer(path, backbone, auxiliary=auxiliary, map_normalisation=map_normalisation)


def class_names_of(recipe: Mapping[str, Any]) -> list[str] | None:
    """Class names for a backbone recipe: the generated dataset's shapes, or the categories of
    torchvision weights; None when unknown."""
    target = str(recipe.get("_target_", ""))
    if target.endswith("generated_backbone"):
        from ptame.data.generated import CLASS_NAMES

        return list(CLASS_NAMES[: int(recipe["dataset"]["num_classes"])])
    if target.endswith("torchvision_backbone") and recipe.get("weights"):
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(recipe["arch"])
            chosen = weights.DEFAULT if recipe["weights"] == "DEFAULT" else weights[recipe["weights"]]
            return list(chosen.meta["categories"])
        except (KeyError, ValueError):
            return None
    return None


def load_images(files: Sequence[str], size: int) -> Tensor:
    """Image files -> (N, 3, size, size) in [0, 1]: Resize(size * 256 / 224) then CenterCrop."""
    from ptame.data.imagefolder import eval_transform, load_rgb_image

    transform = eval_transform(round(size * 256 / 224), size)
    return torch.stack([transform(load_rgb_image(file)) for file in files])


def generated_images(recipe: Mapping[str, Any], count: int, split: str = "test") -> Tensor:
    """The first ``count`` images (N, 3, H, W) in [0, 1] of the generated dataset a backbone
    recipe was trained on."""
    from ptame.data.generated import GeneratedShapesSpec, load_or_generate

    if "dataset" not in recipe:
        raise ValueError("--generated needs checkpoints of a generated-dataset backbone; use --images")
    spec = GeneratedShapesSpec.from_config(dict(recipe["dataset"]))
    data = load_or_generate(spec, recipe["cache_dir"])[split]
    return data.images[:count].float() / 255


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ptame.figures",
        description="Images x checkpoints explanation grid (the paper's Fig. 6 / 7).",
    )
    parser.add_argument("checkpoints", nargs="+", help="P-TAME checkpoints, one column each")
    parser.add_argument("--labels", nargs="+", help="column titles (default: file names)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files (resized and centre-cropped)")
    source.add_argument("--generated", type=int, metavar="N",
                        help="the first N images of the generated dataset of the first checkpoint")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--size", type=int, default=224, help="image side for --images (px)")
    parser.add_argument("--upsampling", default="bilinear", choices=["bilinear", "nearest"])
    parser.add_argument("--map-normalisation", default="sigmoid", choices=["sigmoid", "minmax"])
    parser.add_argument("--cache-dir", help="cache of the generated data and classifiers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cell-size", type=float, default=1.9, help="inches per cell")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument("--output", required=True, help="PNG to write")
    arguments = parser.parse_args(argv)
    if arguments.labels is not None and len(arguments.labels) != len(arguments.checkpoints):
        parser.error(f"--labels has {len(arguments.labels)} names for "
                     f"{len(arguments.checkpoints)} checkpoints")
    if arguments.generated is not None and arguments.generated < 1:
        parser.error("--generated must be at least 1")
    return arguments


def main(argv: Sequence[str] | None = None) -> Path:
    """The command line: build one explainer per checkpoint and write the grid PNG."""
    arguments = parse_arguments(argv)
    # default titles: the run folder of <run>/checkpoints/last.ckpt
    labels = arguments.labels or [Path(c).parent.parent.name or Path(c).stem
                                  for c in arguments.checkpoints]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"column labels must be distinct, got {labels}; pass --labels")
    backbones: dict[str, Any] = {}
    explainers: dict[str, Explainer] = {}
    class_names: dict[str, Sequence[str] | None] = {}
    for label, checkpoint in zip(labels, arguments.checkpoints, strict=True):
        explainer = explainer_from_checkpoint(checkpoint, arguments.map_normalisation,
                                              arguments.cache_dir, backbones)
        explainers[label] = explainer.to(arguments.device).eval()
        class_names[label] = class_names_of(explainer.backbone.config or {})
    if arguments.generated is not None:
        first = next(iter(explainers.values()))
        recipe = _with_cache_dir(first.backbone.config or {}, arguments.cache_dir)
        images = generated_images(recipe, arguments.generated, arguments.split)
    else:
        images = load_images(arguments.images, arguments.size)
    path = explanation_grid(explainers, images.to(arguments.device), arguments.output, class_names,
                            arguments.upsampling, arguments.cell_size, arguments.dpi)
    print(f"wrote {path}")
    return path
