"""Conventions that change published numbers, each pinned by a hand computation and by the public
implementation it comes from: rankings that only break ties (RISE's evaluation code) and the
release's pixel counts (the authors' released thresholding code)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptame.metrics import ROAD, AverageDropIncrease, InsertionDeletion
from ptame.metrics.base import pixel_count, release_kept_pixels, top_pixels
from ptame.metrics.ranking import per_image_normal, per_image_uniform, rank_positions, ranking
from ptame.networks import Backbone

# Fixed 64 x 64 maps: distinct values, and runs of 16 equal values.
DISTINCT = (torch.randperm(4096, generator=torch.Generator().manual_seed(0)).float() / 4096).view(1, 64, 64)
TIED = ((torch.arange(4096) // 16).float() / 256).view(1, 64, 64)

# The authors' released thresholding (IDT-ITI/P-TAME, commit 9576ec8,
# src/ptame/utils/masking_utils.py: classic_mask_thresholding for AD/IC, binary_mask_thresholding
# for ROAD) run on DISTINCT and TIED; counted with the two functions extracted from that file:
#   (classic(maps[None], v) > 0).sum(), (~binary(maps, p, most=MoRF)).sum()
RELEASE_AD_KEPT = {"distinct": {0.5: 2048, 0.15: 615}, "tied": {0.5: 2048, 0.15: 608}}
RELEASE_ROAD_REMOVED = {
    "distinct": {"MoRF": {0.1: 411, 0.3: 1230, 0.5: 2049, 0.7: 2869},
                 "LeRF": {0.1: 409, 0.3: 1228, 0.5: 2048, 0.7: 2867}},
    "tied": {"MoRF": {0.1: 416, 0.3: 1232, 0.5: 2064, 0.7: 2880},
             "LeRF": {0.1: 416, 0.3: 1232, 0.5: 2048, 0.7: 2880}},
}
MAPS = {"distinct": DISTINCT, "tied": TIED}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=6, max_size=30), st.integers(0, 10**6), st.integers(0, 3))
def test_ranking_orders_distinct_values_and_breaks_exact_ties_only(levels, index, seed):
    values = torch.tensor(levels, dtype=torch.float32).view(1, 1, -1)
    order = ranking(values, torch.tensor([index]), seed)[0]
    ordered = values.flatten()[order]
    assert torch.all(ordered[:-1] >= ordered[1:])  # never reorders distinct values
    # the same image (dataset index) gets the same order in another batch, at another position
    batch = torch.cat([torch.rand(2, 1, values.shape[-1]), values])
    assert torch.equal(ranking(batch, torch.tensor([7, 8, index]), seed)[2], order)


def test_ties_are_broken_differently_per_image_and_seed_but_reproducibly():
    maps = torch.zeros(3, 8, 8)
    orders = ranking(maps, torch.tensor([0, 1, 0]), seed=0)
    assert torch.equal(orders[0], orders[2]) and not torch.equal(orders[0], orders[1])
    assert not torch.equal(ranking(maps[:1], torch.tensor([0]), seed=1)[0], orders[0])
    assert torch.equal(torch.sort(orders[1]).values, torch.arange(64))  # a permutation


def test_exact_rule_keeps_round_n_p_pixels_whatever_the_ties():
    for maps in (DISTINCT, TIED):
        assert int(top_pixels(maps, 0.15, torch.tensor([3]), 0).sum()) == 614 == pixel_count(0.15, 4096)
    # by hand: the 4 highest of 0..15 are 12..15
    assert top_pixels(torch.arange(16.0).view(1, 4, 4), 0.25, torch.tensor([0]), 0)[0].flatten().nonzero().flatten().tolist() == [12, 13, 14, 15]


@pytest.mark.parametrize("name", ["distinct", "tied"])
def test_release_rules_reproduce_the_released_code(name):
    maps = MAPS[name]
    for fraction, kept in RELEASE_AD_KEPT[name].items():
        assert int(release_kept_pixels(maps, fraction).sum()) == kept
    assert bool(release_kept_pixels(maps, 1.0).all())
    for pixels, percentages in (("release", [10, 30, 50, 70]),):
        road = ROAD(lambda x: x, percentages=percentages, pixels=pixels)
        keep = road.removal_masks(maps, torch.tensor([0]))
        removed = (~keep).flatten(3).sum(dim=3)[0]
        for order, row in zip(("MoRF", "LeRF"), removed):
            expected = RELEASE_ROAD_REMOVED[name][order]
            assert row.tolist() == [expected[p / 100] for p in percentages], order


def test_release_rules_by_hand():
    # 10 distinct values 0..9: MoRF 10 % -> k = int(10 * 0.9) = 9th smallest = 8: remove >= 8 (2);
    # LeRF 10 % -> k = int(10 * 0.1) = 1st smallest = 0: remove <= 0 (1); AD 15 % keeps > the
    # int(10 * 0.85) = 8th smallest = 7: 2 pixels
    maps = torch.arange(10.0).view(1, 1, 10)
    keep = ROAD(lambda x: x, percentages=[10], pixels="release").removal_masks(maps, torch.tensor([0]))
    assert (~keep[0, 0, 0]).flatten().nonzero().flatten().tolist() == [8, 9]
    assert (~keep[0, 1, 0]).flatten().nonzero().flatten().tolist() == [0]
    assert release_kept_pixels(maps, 0.15).flatten().nonzero().flatten().tolist() == [8, 9]
    exact = ROAD(lambda x: x, percentages=[10]).removal_masks(maps, torch.tensor([0]))
    assert (~exact[0, 0, 0]).flatten().nonzero().flatten().tolist() == [9]  # round(1.0) = 1
    assert (~exact[0, 1, 0]).flatten().nonzero().flatten().tolist() == [0]


def test_ad_ic_pixel_rules_differ_as_the_release_does():
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for pixels, kept in (("exact", 614), ("release", 615)):
        metric = AverageDropIncrease(lambda x: x.mean(dim=(2, 3)), thresholds=[15], pixels=pixels)
        assert int(metric.kept(DISTINCT, 0.15, torch.tensor([0])).sum()) == kept
        metric.update(images, DISTINCT, torch.tensor([0]))
    with pytest.raises(ValueError, match="pixels must be one of"):
        AverageDropIncrease(lambda x: x, pixels="floor")


def test_counter_based_numbers_depend_on_the_image_not_the_batch():
    first = per_image_normal(torch.tensor([5, 9]), (3, 4, 4), seed=2)
    again = per_image_normal(torch.tensor([1, 9, 5]), (3, 4, 4), seed=2)
    assert torch.equal(first[0], again[2]) and torch.equal(first[1], again[1])
    large = per_image_normal(torch.arange(64), (3, 32, 32), seed=0)
    assert abs(float(large.mean())) < 0.01 and abs(float(large.std()) - 1) < 0.01
    uniform = per_image_uniform(torch.arange(16), (1000,), seed=0)
    assert 0 <= float(uniform.min()) and float(uniform.max()) < 1 and abs(float(uniform.mean()) - 0.5) < 0.01
    assert torch.equal(rank_positions(torch.tensor([[2, 0, 1]])), torch.tensor([[1, 2, 0]]))


# RISE's own insertion / deletion (eclique/RISE d91ea00, evaluation.py: CausalMetric.single_run
# with step = 224 * 224 // 16 and substrate_fn = torch.zeros_like, scores of a model ending in a
# softmax, auc()), run on CPU (Tensor.cuda patched to the identity) on rise_parity_inputs() and
# pixel_classifier() below. Its ranking is np.flip(np.argsort(map)): exact on distinct values.
RISE_DELETION_AUC = 0.3780600769969169
RISE_INSERTION_AUC = 0.699831695004832


def rise_parity_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth 224 px image and a sigmoid map of distinct values, 60 % of them below 1e-6."""
    generator = torch.Generator().manual_seed(11)
    coarse = torch.rand(1, 3, 8, 8, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(224, 224), mode="bilinear", align_corners=False)
    scores = torch.linspace(-40.0, 4.0, 224 * 224)[torch.randperm(224 * 224, generator=generator)]
    return image, torch.sigmoid(scores).view(1, 224, 224)


def pixel_classifier() -> Backbone:
    """A linear classifier of the raw pixels: its confidence depends on which pixels are removed."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(3 * 224 * 224, 5)
    with torch.no_grad():
        linear.weight.mul_(20.0)
    return Backbone(torch.nn.Sequential(torch.nn.Flatten(), linear), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), name="pixels")


def test_insertion_deletion_rank_exactly_as_rises_evaluation_code():
    image, saliency = rise_parity_inputs()
    assert saliency.flatten().unique().numel() == 224 * 224 and float((saliency < 1e-6).float().mean()) > 0.5
    backbone = pixel_classifier()

    def aucs(maps: torch.Tensor) -> dict[str, float]:
        metric = InsertionDeletion(backbone, steps=16, insertion_substrate="zero", deletion_substrate="zero")
        metric.update(image, maps, torch.tensor([0]))
        return {key: float(value) for key, value in metric.compute().items()}

    exact = aucs(saliency)
    assert exact["deletion_AUC"] == pytest.approx(RISE_DELETION_AUC, abs=1e-6)
    assert exact["insertion_AUC"] == pytest.approx(RISE_INSERTION_AUC, abs=1e-6)
    # the former 1e-6 jitter reorders the many values below 1e-6: deletion moves to 0.3627
    jitter = 1e-6 * torch.rand(saliency.shape, generator=torch.Generator().manual_seed(0))
    assert aucs(saliency + jitter)["deletion_AUC"] < RISE_DELETION_AUC - 0.01
