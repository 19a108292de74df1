"""Explanation figures: overlay grids, the images x methods grid and the checkpoint grid CLI."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ptame.checkpoint import checkpoint_metadata
from ptame.evaluation.figures import explanation_grid, overlay_grid, resize_map
from ptame.explainers import PTAMEExplainer, SobelEdgeExplainer, load_explainer
from ptame.explainers.base import batched_maps
from ptame.model import PTAME
from ptame.networks import AuxiliaryFeatureExtractor, Backbone
from ptame.pipelines.figures import main

from .helpers.networks import make_auxiliary, make_backbone


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_nearest_upsampling_keeps_the_raw_pixels_and_bilinear_blends_them():
    raw = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    nearest = resize_map(raw, (4, 4), "nearest")
    assert torch.equal(nearest, raw.repeat_interleave(2, 0).repeat_interleave(2, 1))
    bilinear = resize_map(raw, (4, 4), "bilinear")
    assert bilinear[0, 0] == 0 and 0 < bilinear[1, 1] < 1
    with pytest.raises(ValueError, match="'bilinear' or 'nearest'"):
        resize_map(raw, (4, 4), "bicubic")


def test_overlay_grid_png_has_the_cell_size_times_the_grid(tmp_path):
    maps = {"a": torch.rand(2, 8, 8), "b": torch.rand(2, 4, 4), "c": torch.rand(2, 16, 16)}
    path = overlay_grid(torch.rand(2, 3, 16, 16), maps, tmp_path / "grid.png", row_titles=["x", "y"],
                        upsampling="nearest", cell_titles={"b": ["one", "two"]}, cell_size=1.0, dpi=50)
    assert png_size(path) == (4 * 50, 2 * 50)
    assert png_size(overlay_grid(torch.rand(3, 3, 8, 8), {"m": torch.rand(3, 8, 8)}, tmp_path / "d.png")) == (380, 570)


def ptame(backbone: Backbone, auxiliary: AuxiliaryFeatureExtractor) -> PTAMEExplainer:
    return PTAMEExplainer(PTAME(backbone, auxiliary, input_size=(32, 32))).eval()


def test_methods_grid_and_backbones_grid_have_the_expected_pixel_size(tmp_path):
    images = torch.rand(3, 3, 32, 32)
    backbone = make_backbone()
    explainer = ptame(backbone, make_auxiliary())
    assert batched_maps(explainer, images, torch.zeros(3, dtype=torch.long), raw=True).shape == (3, 16, 16)
    assert batched_maps(explainer, images, torch.zeros(3, dtype=torch.long), raw=False).shape == (3, 32, 32)
    methods = explanation_grid({"ptame": explainer, "sobel": SobelEdgeExplainer(backbone)}, images,
                               tmp_path / "methods.png", class_names=list("abcde"), dpi=40)
    assert png_size(methods) == (round(1.9 * 3 * 40), round(1.9 * 3 * 40))
    other = ptame(make_backbone(seed=5, name="other"), make_auxiliary())
    backbones = explanation_grid({"A": explainer, "B": other}, images[:2], tmp_path / "backbones.png",
                                 upsampling="nearest", cell_size=1.0, dpi=60)
    assert png_size(backbones) == (180, 120)


# Factories named by the recipes stored in the tiny checkpoints below (seeded: same weights).
def tiny_backbone(seed: int) -> Backbone:
    backbone = make_backbone(seed=seed, name=f"tiny-{seed}")
    backbone.config = {"_target_": f"{__name__}.tiny_backbone", "seed": seed}
    return backbone


def tiny_auxiliary() -> AuxiliaryFeatureExtractor:
    auxiliary = make_auxiliary()
    auxiliary.config = {"_target_": f"{__name__}.tiny_auxiliary"}
    return auxiliary


def write_tiny_checkpoint(path, seed: int) -> PTAMEExplainer:
    """A P-TAME checkpoint in the format training writes (head + metadata with recipes)."""
    explainer = ptame(tiny_backbone(seed), tiny_auxiliary())
    state = {f"ptame.attention.{k}": v for k, v in explainer.model.attention.state_dict().items()}
    torch.save({"state_dict": state, "ptame": checkpoint_metadata(explainer.model)}, path)
    return explainer


def test_figures_command_line_builds_one_column_per_checkpoint(tmp_path):
    first = write_tiny_checkpoint(tmp_path / "a.ckpt", seed=0)
    write_tiny_checkpoint(tmp_path / "b.ckpt", seed=4)
    files = []
    for index in range(2):
        file = tmp_path / f"image{index}.png"
        Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(file)
        files.append(str(file))
    output = tmp_path / "figure.png"
    path = main([str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt"), "--labels", "A", "B",
                 "--images", *files, "--size", "32", "--upsampling", "nearest", "--cell-size", "1",
                 "--dpi", "50", "--output", str(output)])
    assert path == output and png_size(output) == (3 * 50, 2 * 50)
    # the columns are the checkpoints' heads: the same weights as the explainer written
    rebuilt = load_explainer(tmp_path / "a.ckpt")
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(rebuilt(images), first(images))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a.ckpt"), "--labels", "A", "B", "--images", *files, "--output", str(output)])


@pytest.mark.parametrize("count", [1, 10, 12, 20, 31])
def test_every_method_gets_its_own_look_in_the_road_curves(count):
    from ptame.evaluation.figures import method_styles

    methods = ["ptame", *[f"method{i}" for i in range(count - 1)]]
    styles = method_styles(methods)
    looks = {(tuple(round(c, 4) for c in s["color"]), s["marker"], s["linestyle"]) for s in styles.values()}
    assert len(looks) == count  # no two methods drawn alike (12 methods once repeated P-TAME's blue)
    assert styles["ptame"]["linewidth"] > max((s["linewidth"] for m, s in styles.items() if m != "ptame"), default=0)


def test_overlays_outline_the_ground_truth_when_masks_are_given(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from ptame.evaluation.figures import overlay_grid

    images, maps = torch.zeros(1, 3, 32, 32), {"ptame": torch.zeros(1, 32, 32)}
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, 8:24, 8:24] = True
    plain = np.asarray(Image.open(overlay_grid(images, maps, tmp_path / "plain.png")).convert("RGB"))
    outlined = np.asarray(Image.open(overlay_grid(images, maps, tmp_path / "outlined.png", masks=masks)).convert("RGB"))
    assert plain.shape == outlined.shape
    changed = np.abs(outlined.astype(int) - plain.astype(int)).sum(-1) > 100
    assert changed.mean() > 0.001  # white outlines drawn on the black cells
    drawn = outlined[changed].astype(int)  # white, anti-aliased: bright greys
    assert drawn.mean() > 120 and np.abs(drawn[:, 0] - drawn[:, 2]).max() <= 10
