"""AISE-style adaptive sampling: masks, KDE and LIPO steps against hand computations, the exact
forward-pass budget, a constructed model with evidence in a known square, seeding, and speed on
the generated dataset."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from ptame.data.generated import GeneratedShapesSpec, generate_split
from ptame.explainers import AISEExplainer
from ptame.explainers.aise import gaussian_masks, lipo_choice, lipschitz_estimate, weighted_kde
from ptame.networks.small import small_vgg
from ptame.metrics.cost import _ForwardCounter, measure_cost
from ptame.networks import Backbone

BOX = (4, 12, 18, 26)  # rows 4..11, columns 18..25 of a 32 x 32 image


class SquareEvidence(nn.Module):
    """Logit c = scale * mean of channel c inside BOX (3 classes); nothing outside matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0, y1, x0, x1 = BOX
        return 20.0 * x[:, :, y0:y1, x0:x1].mean(dim=(2, 3))


def square_backbone() -> Backbone:
    return Backbone(SquareEvidence(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), name="square-evidence")


def square_images(batch: int = 3) -> torch.Tensor:
    images = 0.3 * torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y0, y1, x0, x1 = BOX
    images[:, 0, y0:y1, x0:x1] += 0.6
    return images


def test_gaussian_masks_follow_eq_7_and_8():
    centre = torch.tensor([[1.5 / 4, 2.5 / 4]])  # the centre of pixel (1, 2) of a 4 x 4 grid
    mask = gaussian_masks(centre, torch.tensor([0.25]), 4, 4)[0]
    for i in range(4):
        for j in range(4):
            dy, dx = (i - 1) / 4, (j - 2) / 4
            assert mask[i, j].item() == pytest.approx(math.exp(-(dy**2 + dx**2) / (2 * 0.25**2)), rel=1e-6)
    off_grid = gaussian_masks(torch.tensor([[0.3, 0.9]]), torch.tensor([0.1]), 5, 7)[0]
    assert off_grid.max().item() == pytest.approx(1.0)  # Eq. 8: divided by its maximum
    ratio = off_grid[0, 0] / off_grid[1, 0]  # unnormalised Gaussian ratio is unchanged
    expected = math.exp(-((0.1 - 0.3) ** 2 - (0.3 - 0.3) ** 2) / (2 * 0.01))
    assert ratio.item() == pytest.approx(expected, rel=1e-5)


def test_weighted_kde_matches_hand_computation():
    centres = torch.tensor([[[0.25, 0.25], [0.75, 0.5]]])
    weights = torch.tensor([[1.0, 3.0]])
    sigma = 0.2
    density = weighted_kde(centres, weights, sigma, 2, 2)[0]
    for i, y in enumerate((0.25, 0.75)):
        for j, x in enumerate((0.25, 0.75)):
            value = sum(w * math.exp(-((y - py) ** 2 + (x - px) ** 2) / (2 * sigma**2))
                        for w, (py, px) in [(1.0, (0.25, 0.25)), (3.0, (0.75, 0.5))])
            assert density[i, j].item() == pytest.approx(value / (4 * 2 * math.pi * sigma**2), rel=1e-5)
    assert weighted_kde(centres, torch.zeros(1, 2), sigma, 2, 2).abs().max() == 0


def test_lipschitz_estimate_is_the_largest_slope():
    positions = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 1.0], [0.0, 1.0]])
    scores = torch.tensor([0.0, 1.0, 0.5, 0.9])  # coincident points are ignored
    assert lipschitz_estimate(positions, scores).item() == pytest.approx(2.0)
    assert lipschitz_estimate(positions[:1], scores[:1]).item() == 0.0


def test_lipo_step_takes_the_first_potential_maximiser():
    positions = torch.tensor([[0.1, 0.1], [0.9, 0.9]])
    scores = torch.tensor([1.0, 0.0])  # k = 1 / (0.8 sqrt 2)
    candidates = torch.tensor([[0.85, 0.85], [0.2, 0.1], [0.05, 0.05], [0.0, 0.0]])
    # U = min(s_i + k d_i): 0.0625, 0.9396, 1.0625, 1.125 -> the first with U >= 1 is (0.05, 0.05)
    choice = lipo_choice(positions, scores, candidates, torch.tensor(False))
    assert choice.tolist() == pytest.approx([0.05, 0.05])
    explored = lipo_choice(positions, scores, candidates, torch.tensor(True))
    assert explored.tolist() == pytest.approx([0.85, 0.85])
    # no candidate qualifies: the largest upper bound wins
    fallback = lipo_choice(positions, scores, candidates[:2], torch.tensor(False))
    assert fallback.tolist() == pytest.approx([0.2, 0.1])
    # batched searches are independent
    batched = lipo_choice(torch.stack([positions, positions]), torch.stack([scores, 1 - scores]),
                          torch.stack([candidates, candidates]), torch.tensor([False, False]))
    assert batched[0].tolist() == pytest.approx([0.05, 0.05])
    assert batched[1].tolist() == pytest.approx([0.85, 0.85])  # none qualifies; largest U (0.9375)


@pytest.mark.parametrize("paradigm, budget, per_kernel", [
    ("both", 30, [5, 5, 5]), ("preserve", 7, [3, 2, 2]), ("delete", 4, [2, 1, 1]),
])
def test_the_forward_pass_budget_is_exact(paradigm, budget, per_kernel):
    backbone = square_backbone()
    explainer = AISEExplainer(backbone, budget=budget, paradigm=paradigm, max_batch=5)
    assert explainer.samples_per_kernel == per_kernel
    images = square_images(3)
    counter = _ForwardCounter(backbone)
    try:
        explainer(images, torch.tensor([0, 1, 2]))
        assert counter.images == budget * 3
        explainer(images)  # + the prediction pass of the interface
        assert counter.images == budget * 3 + budget * 3 + 3
    finally:
        counter.close()


def test_sample_split_follows_the_supplementary():
    backbone = square_backbone()
    assert AISEExplainer(backbone).samples_per_kernel == [25, 25, 25]  # 150 inferences
    assert AISEExplainer(backbone, budget=300).samples_per_kernel == [50, 50, 50]
    four = AISEExplainer(backbone, budget=700, sigmas=[0.075, 0.13, 0.19, 0.25])
    assert four.samples_per_kernel == [88, 88, 87, 87]


def test_scores_combine_preserve_and_delete():
    backbone = square_backbone()
    images = square_images(1)
    centres = torch.tensor([[[0.25, 0.69], [0.8, 0.2]]])  # on the square, far from it
    sigmas = torch.tensor([0.1, 0.1])
    targets = torch.tensor([0])
    masks = gaussian_masks(centres, sigmas, 32, 32)[:, :, None]
    keep = backbone((images[:, None] * masks).flatten(0, 1)).softmax(1)[:, 0]
    drop = backbone((images[:, None] * (1 - masks)).flatten(0, 1)).softmax(1)[:, 0]
    both = AISEExplainer(backbone, paradigm="both").score_positions(images, targets, centres, sigmas)
    assert torch.allclose(both[0], (keep + 1 - drop) / 2, atol=1e-6)
    preserve = AISEExplainer(backbone, paradigm="preserve").score_positions(images, targets, centres, sigmas)
    assert torch.allclose(preserve[0], keep, atol=1e-6)
    assert both[0, 0] > 0.45 and both[0, 1] < 0.2  # on the evidence vs away from it


def test_constructed_model_map_peaks_at_the_evidence_square():
    explainer = AISEExplainer(square_backbone(), budget=150, seed=0)
    maps = explainer(square_images(3), torch.tensor([0, 0, 0]))
    y0, y1, x0, x1 = BOX
    near = torch.zeros(32, 32, dtype=torch.bool)
    near[y0 - 2:y1 + 2, x0 - 2:x1 + 2] = True  # the square and a 2 px margin
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    for single in maps:
        assert near.flatten()[int(single.argmax())]
        assert single[inside].mean() > 2.5 * single[~near].mean()
    assert maps.amin() == 0 and maps.amax() == 1


def test_seeded_and_independent_of_the_batch():
    backbone = square_backbone()
    images = square_images(3)
    targets = torch.tensor([0, 1, 0])
    first = AISEExplainer(backbone, budget=24, seed=5)(images, targets)
    again = AISEExplainer(backbone, budget=24, seed=5)(images, targets)
    other = AISEExplainer(backbone, budget=24, seed=6)(images, targets)
    alone = AISEExplainer(backbone, budget=24, seed=5)(images[1:2], targets[1:2])
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert torch.allclose(first[1:2], alone, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 31}, "multiple of 2 inference"),
    ({"budget": 4}, "at least one sample for each of the 3 kernels"),
    ({"sigmas": [0.1, 0.0]}, "positive widths"),
    ({"sigmas": []}, "positive widths"),
    ({"paradigm": "insert"}, "unknown AISE paradigm 'insert'"),
    ({"explore_probability": 1.5}, "explore_probability in"),
    ({"candidates": 0}, "candidates >= 1"),
    ({"fill": 2.0}, "fill must lie in"),
])
def test_bad_options_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AISEExplainer(square_backbone(), **kwargs)


def test_fast_enough_on_the_generated_dataset():
    """A modest budget on 64 px generated images and the small VGG: a few 100 ms per image."""
    spec = GeneratedShapesSpec(num_train=1, num_val=1, num_test=8, seed=0)
    split = generate_split(spec, "test")
    images = split.images.float() / 255
    torch.manual_seed(0)
    backbone = Backbone(small_vgg(spec.num_classes), (0.5,) * 3, (0.25,) * 3, name="small-vgg")
    explainer = AISEExplainer(backbone, budget=60, seed=0)
    counter = _ForwardCounter(backbone)
    start = time.perf_counter()
    try:
        maps = explainer(images, split.labels)
    finally:
        counter.close()
    seconds = time.perf_counter() - start
    assert counter.images == 60 * 8
    assert maps.shape == (8, 64, 64) and maps.amin() == 0 and maps.amax() == 1
    assert seconds < 30, f"AISE took {seconds:.1f} s for 8 images at budget 60"


def test_cost_measurement_sees_the_budget_plus_the_prediction():
    explainer = AISEExplainer(square_backbone(), budget=12)
    assert measure_cost(explainer, square_images(2)).forward_passes == 13
