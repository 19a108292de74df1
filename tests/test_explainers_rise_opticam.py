"""RISE and Opti-CAM: masks against a hand computation, brute-force saliency, localisation on a
constructed model, optimisation progress, forward-pass counts, seeding, bad configurations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ptame.explainers import OptiCAMExplainer, RISEExplainer
from ptame.explainers.opticam import combine_maps
from ptame.metrics.cost import measure_cost

from .helpers.networks import make_backbone
from .helpers.constructed import (
    BLUE,
    RED,
    peak_in,
    region_mask,
    two_colour_backbone,
    two_colour_image,
)


def bilinear_1d(values: np.ndarray, size: int) -> np.ndarray:
    """Weights (size, len(values)) of 1-D bilinear upsampling with half-pixel centres."""
    n = len(values)
    weights = np.zeros((size, n))
    for i in range(size):
        source = max((i + 0.5) * n / size - 0.5, 0.0)
        low = min(math.floor(source), n - 1)
        high = min(low + 1, n - 1)
        weights[i, low] += 1 - (source - low)
        weights[i, high] += source - low
    return weights


def hand_mask(grid: np.ndarray, shift_fraction: np.ndarray, height: int, width: int) -> np.ndarray:
    """The RISE recipe written out: upsample the s x s grid to (s+1)*cell, crop at the shift."""
    s = grid.shape[0]
    cell_h, cell_w = math.ceil(height / s), math.ceil(width / s)
    rows = bilinear_1d(grid[:, 0], (s + 1) * cell_h)
    cols = bilinear_1d(grid[0], (s + 1) * cell_w)
    upsampled = rows @ grid @ cols.T
    y, x = int(shift_fraction[0] * cell_h), int(shift_fraction[1] * cell_w)
    return upsampled[y : y + height, x : x + width]


def test_masks_follow_the_rise_recipe_by_hand():
    explainer = RISEExplainer(make_backbone(), num_masks=5, grid_size=3, keep_probability=0.4,
                              seed=7)
    masks = explainer.masks(7, 10)
    assert masks.shape == (5, 7, 10)
    for i in range(5):
        grid = explainer.grids[i, 0].numpy().astype(np.float64)
        assert set(np.unique(grid)) <= {0.0, 1.0}
        expected = hand_mask(grid, explainer.shift_fractions[i].numpy(), 7, 10)
        np.testing.assert_allclose(masks[i].numpy(), expected, atol=1e-6)
    # chunks of masks equal the corresponding rows of all masks
    assert torch.allclose(explainer.masks(7, 10, 2, 4), masks[2:4])


def test_masks_keep_about_p_of_the_image():
    explainer = RISEExplainer(make_backbone(), num_masks=2000, grid_size=7, keep_probability=0.3)
    masks = explainer.masks(28, 28)
    assert masks.min() >= 0 and masks.max() <= 1
    assert float(masks.mean()) == pytest.approx(0.3, abs=0.015)


def test_saliency_equals_a_brute_force_loop_over_masks():
    backbone = make_backbone()
    images = torch.rand(3, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 3, 1])
    explainer = RISEExplainer(backbone, num_masks=5, grid_size=2, keep_probability=0.5, max_batch=2)
    masks = explainer.masks(9, 11)
    expected = torch.zeros(3, 9, 11)
    with torch.no_grad():
        for b in range(3):
            for mask in masks:
                probability = backbone(images[b : b + 1] * mask).softmax(dim=1)[0, targets[b]]
                expected[b] += probability * mask
    expected /= 5 * 0.5
    assert torch.allclose(explainer.saliency(images, targets), expected, atol=1e-6)
    maps = explainer(images, targets)
    low = expected.flatten(1).amin(1)[:, None, None]
    high = expected.flatten(1).amax(1)[:, None, None]
    assert torch.allclose(maps, (expected - low) / (high - low), atol=1e-5)


def test_results_do_not_depend_on_the_memory_bound_and_repeat_with_the_seed():
    backbone = make_backbone()
    images = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, 2])
    def rise(max_batch: int, seed: int) -> torch.Tensor:
        return RISEExplainer(backbone, num_masks=20, grid_size=4, max_batch=max_batch,
                             seed=seed)(images, targets)

    small, large = rise(max_batch=7, seed=3), rise(max_batch=500, seed=3)
    assert torch.allclose(small, large, atol=1e-5)
    assert torch.equal(small, rise(max_batch=7, seed=3))
    other = rise(max_batch=7, seed=4)
    assert not torch.allclose(small, other, atol=1e-3)


def test_rise_localises_the_class_evidence():
    # cells (6 px) smaller than the squares, enough masks for a clear Monte-Carlo estimate
    explainer = RISEExplainer(two_colour_backbone(), num_masks=1000, grid_size=6, seed=0)
    maps = explainer(two_colour_image(2), torch.tensor([0, 1]))
    red, blue = region_mask(RED), region_mask(BLUE)
    assert peak_in(maps[0], RED) and peak_in(maps[1], BLUE)
    assert maps[0][red].mean() > maps[0][blue].mean() + 0.3
    assert maps[1][blue].mean() > maps[1][red].mean() + 0.3


def test_rise_costs_n_forward_passes_per_image():
    backbone = make_backbone()
    explainer = RISEExplainer(backbone, num_masks=12, grid_size=3, max_batch=5)
    cost = measure_cost(explainer, torch.rand(3, 3, 8, 8))
    assert cost.forward_passes == 12 + 1  # + the prediction
    assert cost.resolution == 9
    seen = []
    handle = backbone.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].shape[0]))
    explainer(torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2]))
    handle.remove()
    assert sum(seen) == 3 * 12 and max(seen) <= 5  # given targets: N per image, <= max_batch


@pytest.mark.parametrize(("arch", "expected"), [
    ("vgg16", 4000), ("resnet50", 8000), ("vit_b_16", 8000), ("small_vgg", 4000), (None, 4000),
])
def test_default_number_of_masks_follows_table_1(arch, expected):
    backbone = make_backbone()
    backbone.config = None if arch is None else {"arch": arch}
    explainer = RISEExplainer(backbone)
    assert explainer.num_masks == expected and explainer.grids.shape == (expected, 1, 7, 7)
    assert RISEExplainer(backbone, num_masks=10).num_masks == 10


@pytest.mark.parametrize(("options", "message"), [
    ({"num_masks": 0}, "num_masks must be a positive int"),
    ({"num_masks": -5}, "num_masks must be a positive int"),
    ({"keep_probability": 0.0}, r"keep_probability must be in \(0, 1\)"),
    ({"keep_probability": 1.0}, r"keep_probability must be in \(0, 1\)"),
    ({"keep_probability": 1.5}, r"keep_probability must be in \(0, 1\)"),
    ({"grid_size": 0}, "grid_size must be a positive int"),
    ({"max_batch": 0}, "max_batch must be a positive int"),
])
def test_rise_rejects_bad_configurations(options, message):
    with pytest.raises(ValueError, match=message):
        RISEExplainer(make_backbone(), **options)


def test_combine_maps_by_hand():
    features = torch.tensor([[[[0.0, 2.0], [4.0, 0.0]], [[1.0, 1.0], [0.0, 3.0]]]])  # (1, 2, 2, 2)
    weights = torch.tensor([[math.log(3.0), 0.0]])  # softmax -> 0.75, 0.25
    combined = 0.75 * features[0, 0] + 0.25 * features[0, 1]  # [[0.25, 1.75], [3, 0.75]]
    expected = (combined - 0.25) / (3.0 - 0.25)
    assert torch.allclose(combine_maps(features, weights, (2, 2))[0], expected, atol=1e-6)
    assert combine_maps(features, weights, (6, 8)).shape == (1, 6, 8)


def test_opticam_improves_its_objective_and_localises():
    explainer = OptiCAMExplainer(two_colour_backbone(), target_layer="features", iterations=30)
    images = two_colour_image(2)
    maps = explainer(images, torch.tensor([0, 1]))
    history = explainer.objective_history
    assert history.shape == (30, 2)
    assert (history[-1] > history[0] + 0.1).all()  # the score of each target rose
    assert (history[1:] >= history[:-1] - 1e-4).float().mean() > 0.9  # mostly monotone
    red, blue = region_mask(RED), region_mask(BLUE)
    assert peak_in(maps[0], RED) and peak_in(maps[1], BLUE)
    assert maps[0][blue].mean() < 0.5 * maps[0][red].mean()
    assert maps[1][red].mean() < 0.5 * maps[1][blue].mean()


def test_opticam_softmax_objective_and_no_grad_callers():
    explainer = OptiCAMExplainer(two_colour_backbone(), target_layer="features", iterations=10,
                                 score="softmax")
    with torch.inference_mode():
        maps = explainer(two_colour_image(1))  # target: the prediction (class 0)
    history = explainer.objective_history
    assert 0 < float(history[0, 0]) < float(history[-1, 0]) <= 1
    assert peak_in(maps[0], RED) and maps.min() >= 0 and maps.max() == 1


def test_opticam_forward_passes_batches_and_default_targets():
    backbone = make_backbone()
    images = torch.rand(3, 3, 10, 10, generator=torch.Generator().manual_seed(5))
    explainer = OptiCAMExplainer(backbone, target_layer="features", iterations=4, batch_size=2)
    cost = measure_cost(explainer, images[:1])
    assert cost.forward_passes == 1 + 4 and cost.resolution == 100
    chunked = explainer(images)  # chunks of 2 + 1 images
    predictions = backbone(images).argmax(1)
    whole = OptiCAMExplainer(backbone, target_layer="features", iterations=4, batch_size=3)
    assert torch.allclose(whole(images, predictions), chunked, atol=1e-5)  # images independent


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"iterations": 0}, ValueError, "iterations must be a positive int"),
    ({"lr": 0.0}, ValueError, "lr must be positive"),
    ({"score": "probability"}, ValueError, "score must be 'logit' or 'softmax'"),
    ({"target_layer": "head.weight"}, ValueError, "no layer 'head.weight'"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
])
def test_opticam_rejects_bad_configurations(options, error, message):
    with pytest.raises(error, match=message):
        OptiCAMExplainer(make_backbone(), **{"target_layer": "features", **options})
