"""The figures command behind ``figures.py``: images x checkpoints explanation grids (the paper's
Fig. 6 and 7), each checkpoint's backbone and auxiliary rebuilt from the recipes stored in it.

    python figures.py A.ckpt B.ckpt C.ckpt --labels VGG-16 ResNet-50 ViT-B-16 \\
        --images cat.jpg barometer.jpg --output figure6.png
    python figures.py r18.ckpt mnv3.ckpt --labels ResNet-18 MobileNetV3 \\
        --generated 4 --upsampling nearest --output figure7.png

Every explainer explains the prediction of its own backbone. With ``--upsampling nearest`` the
maps of P-TAME and T-TAME are shown at their raw resolution R (Fig. 7). In Python:
:func:`ptame.evaluation.figures.explanation_grid`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ptame.checkpoint import current_recipe, read_checkpoint, rebuild_backbone
from ptame.evaluation.figures import explanation_grid
from ptame.explainers.base import Explainer
from ptame.explainers.ptame import load_explainer
from ptame.networks.frozen import Backbone


def shared_backbone(
    path: str | Path, backbones: dict[str, Backbone], cache_dir: str | Path | None = None
) -> Backbone:
    """The backbone of checkpoint ``path`` rebuilt from its stored recipe, one instance per
    distinct recipe in ``backbones`` (recipe JSON -> backbone), so that checkpoints trained for
    the same backbone explain the same network."""
    saved = read_checkpoint(path)["ptame"]
    key = json.dumps(current_recipe(saved["backbone"].get("config") or {}, cache_dir),
                     sort_keys=True, default=str)
    if key not in backbones:
        backbones[key] = rebuild_backbone(saved, path, cache_dir)
    return backbones[key]


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
    return torch.stack([transform(load_rgb_image(file, exif_orientation=True)) for file in files])


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
        prog="python figures.py",
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
    backbones: dict[str, Backbone] = {}
    explainers: dict[str, Explainer] = {}
    class_names: dict[str, Sequence[str] | None] = {}
    for label, checkpoint in zip(labels, arguments.checkpoints, strict=True):
        backbone = shared_backbone(checkpoint, backbones, arguments.cache_dir)
        explainer = load_explainer(checkpoint, backbone, map_normalisation=arguments.map_normalisation,
                                   device=arguments.device, cache_dir=arguments.cache_dir)
        explainers[label] = explainer
        class_names[label] = class_names_of(explainer.backbone.config or {})
    if arguments.generated is not None:
        first = next(iter(explainers.values()))
        recipe = current_recipe(first.backbone.config or {}, arguments.cache_dir)
        images = generated_images(recipe, arguments.generated, arguments.split)
    else:
        images = load_images(arguments.images, arguments.size)
    path = explanation_grid(explainers, images.to(arguments.device), arguments.output, class_names,
                            arguments.upsampling, arguments.cell_size, arguments.dpi)
    print(f"wrote {path}")
    return path
