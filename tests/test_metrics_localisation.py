import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptame.explainers import CentreGaussianExplainer, RandomExplainer
from ptame.metrics import EnergyPointingGame, PointingGame
from ptame.metrics.localisation import (
    dilate_masks,
    energy_shares,
    pointing_hits,
    scaled_pointing_tolerance,
)


def test_pointing_and_energy_by_hand():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, 1:3, 1:3] = True
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 2] = 1.0  # peak inside
    maps[0, 0, 0] = 0.5  # some mass outside
    maps[1, 3, 3] = 1.0  # peak outside
    maps[1, 2, 2] = 0.25
    assert pointing_hits(maps, masks).tolist() == [1.0, 0.0]
    assert energy_shares(maps, masks).tolist() == pytest.approx([1 / 1.5, 0.25 / 1.25])
    pointing, energy = PointingGame(), EnergyPointingGame()
    pointing.update(maps[:1], masks[:1])  # batches of different sizes: per-image average
    pointing.update(maps[1:], masks[1:])
    energy.update(maps, masks)
    assert pointing.compute().item() == pytest.approx(0.5)
    assert energy.compute().item() == pytest.approx((1 / 1.5 + 0.2) / 2)


def test_ties_score_the_fraction_of_tied_maxima_inside():
    masks = torch.zeros(1, 2, 2, dtype=torch.bool)
    masks[0, 0, 0] = True
    assert pointing_hits(torch.ones(1, 2, 2), masks).item() == pytest.approx(0.25)
    assert energy_shares(torch.zeros(1, 2, 2), masks).item() == 0.0


def test_nan_maps_and_shape_mismatch_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        pointing_hits(torch.full((1, 2, 2), float("nan")), torch.ones(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        energy_shares(torch.rand(1, 2, 2), torch.ones(1, 3, 3, dtype=torch.bool))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.integers(2, 12))
def test_scores_are_fractions_and_the_true_mask_is_perfect(seed, size):
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(3, size, size, generator=generator) > 0.5
    masks[:, 0, 0] = True
    maps = torch.rand(3, size, size, generator=generator)
    assert ((0 <= energy_shares(maps, masks)) & (energy_shares(maps, masks) <= 1)).all()
    assert ((0 <= pointing_hits(maps, masks)) & (pointing_hits(maps, masks) <= 1)).all()
    assert torch.all(energy_shares(masks.float(), masks) == 1)
    assert torch.all(pointing_hits(masks.float(), masks) == 1)


def test_random_map_scores_the_object_area_on_average():
    masks = torch.zeros(400, 16, 16, dtype=torch.bool)
    masks[:, :4, :] = True  # a quarter of the image
    maps = RandomExplainer(seed=0)(torch.rand(400, 3, 16, 16))
    assert energy_shares(maps, masks).mean().item() == pytest.approx(0.25, abs=0.01)
    assert pointing_hits(maps, masks).mean().item() == pytest.approx(0.25, abs=0.06)


def test_centre_gaussian_peaks_at_the_centre_and_is_in_unit_range():
    maps = CentreGaussianExplainer(sigma=0.25)(torch.rand(2, 3, 9, 9))
    assert maps.shape == (2, 9, 9)
    assert maps[0, 4, 4].item() == pytest.approx(1.0)
    assert maps.min() > 0 and maps.max() <= 1
    assert torch.allclose(maps[0], maps[0].T) and torch.equal(maps[0], maps[1])


def test_random_explainer_is_reproducible_per_seed_and_independent_of_batching():
    images = torch.rand(2, 3, 5, 5)
    assert torch.equal(RandomExplainer(seed=3)(images), RandomExplainer(seed=3)(images))
    assert not torch.equal(RandomExplainer(seed=3)(images), RandomExplainer(seed=4)(images))
    whole = RandomExplainer(seed=3)(images)
    assert torch.equal(RandomExplainer(seed=3)(images[1:]), whole[1:])
    assert not torch.equal(whole[0], whole[1])


def test_pointing_tolerance_counts_maxima_closer_than_the_tolerance():
    masks = torch.zeros(4, 9, 9, dtype=torch.bool)
    masks[:, 4, 4] = True  # a one-pixel object
    maps = torch.zeros(4, 9, 9)
    maps[0, 4, 6] = 1.0  # 2 px away (Euclidean 2.0)
    maps[1, 6, 6] = 1.0  # diagonal: Euclidean 2.83 px away
    maps[2, 4, 4] = 1.0  # inside
    maps[3, 5, 5] = 1.0  # touching diagonally: Euclidean 1.41 px away
    assert pointing_hits(maps, masks).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert pointing_hits(maps, masks, tolerance=1).tolist() == [0.0, 0.0, 1.0, 0.0]  # < 1: strict
    # TorchRay's strict inequality: at exactly 2.0 px a tolerance of 2 misses
    assert pointing_hits(maps, masks, tolerance=2).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert pointing_hits(maps, masks, tolerance=2.5).tolist() == [1.0, 0.0, 1.0, 1.0]
    assert pointing_hits(maps, masks, tolerance=3).tolist() == [1.0, 1.0, 1.0, 1.0]
    metric = PointingGame(tolerance=2)
    metric.update(maps, masks)
    assert metric.compute().item() == pytest.approx(2 / 4)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tolerance"):
            PointingGame(tolerance=bad)


def torchray_hit(mask: torch.Tensor, point_yx: tuple[int, int], tolerance: float) -> bool:
    """TorchRay's ``PointingGame.evaluate`` written out: is an object pixel at squared distance
    < tolerance**2 from the point (tolerance 0: the point itself)?"""
    if tolerance == 0:
        return bool(mask[point_yx])
    ys, xs = mask.nonzero(as_tuple=True)
    distances2 = (ys - point_yx[0]) ** 2 + (xs - point_yx[1]) ** 2
    return bool((distances2 < tolerance**2).any())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.integers(3, 20),
       tolerance=st.sampled_from([0, 0.5, 1, 1.5, 1.92, 2, 2.5, 3, 4.2, 7]))
def test_pointing_hits_match_torchray_point_by_point(seed, size, tolerance):
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(6, size, size, generator=generator) > 0.85
    masks[0] = False  # an empty object is never hit
    maps = torch.rand(6, size, size, generator=generator)  # continuous: one maximum each
    hits = pointing_hits(maps, masks, tolerance)
    for image in range(6):
        point = divmod(int(maps[image].argmax()), size)
        assert hits[image].item() == float(torchray_hit(masks[image], point, tolerance))


def test_scaled_tolerance_is_torchrays_15_px_at_500_px():
    assert scaled_pointing_tolerance(500) == pytest.approx(15.0)
    assert scaled_pointing_tolerance(64) == pytest.approx(1.92)
    assert scaled_pointing_tolerance(224) == pytest.approx(6.72)
    # on the pixel grid 1.92 px accepts exactly what 2 px accepts (the 8 neighbours)
    masks = torch.rand(20, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.9
    assert torch.equal(dilate_masks(masks, scaled_pointing_tolerance(64)), dilate_masks(masks, 2))
    with pytest.raises(ValueError, match="positive"):
        scaled_pointing_tolerance(0)


def test_class_specific_localisation_by_hand():
    from ptame.metrics import ClassSpecificLocalisation
    from ptame.metrics.localisation import CLASS_SPECIFIC_KEYS

    object_masks = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    object_masks[:, 0, 0, 0:2] = True  # object A: top-left pair of pixels
    object_masks[:, 1, 3, 2:4] = True  # object B: bottom-right pair
    object_labels = torch.tensor([[2, 5], [5, 1]])
    asked = []

    def explain(targets):
        """Image 0: every class's map peaks on object A (mass 3 there, 1 on B); image 1: each
        class's map sits on its own object (all mass there)."""
        asked.append(targets.tolist())
        maps = torch.zeros(2, 4, 4)
        maps[0, 0, 0], maps[0, 3, 3] = 3.0, 1.0
        own = 0 if targets[1] == object_labels[1, 0] else 1
        maps[1][object_masks[1, own]] = 1.0
        return maps

    metric = ClassSpecificLocalisation()
    metric.update(explain, object_labels, object_masks, torch.tensor([0, 1]))
    assert asked == [[2, 5], [5, 1]]  # each object's class, object by object
    figures = {key: float(value) for key, value in metric.compute().items()}
    # image 0: object A explained -> hit A, miss B; object B explained -> miss B, hit A (the other)
    #   pointing (own, other) = mean((1, 0), (0, 1)) = (0.5, 0.5); energy 0.75 on A, 0.25 on B
    # image 1: pointing (1, 0), energy (1, 0)
    assert figures == pytest.approx({"class_pointing_game": 0.75, "class_pointing_game_other": 0.25,
                                     "class_energy_pointing_game": 0.75, "class_energy_pointing_game_other": 0.25})
    assert list(figures) == list(CLASS_SPECIFIC_KEYS)
    assert ClassSpecificLocalisation.direction("class_pointing_game_other") == "min"
    with pytest.raises(ValueError, match="object_labels"):
        metric.update(explain, object_labels[:, :1], object_masks[:, :1], torch.tensor([0, 1]))


def test_class_specific_pointing_uses_the_tolerance_rule():
    from ptame.metrics import ClassSpecificLocalisation

    object_masks = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    object_masks[0, 0, 2, 2] = True
    object_masks[0, 1, 6, 6] = True
    maps = torch.zeros(1, 8, 8)
    maps[0, 3, 3] = 1.0  # sqrt(2) px from object 0, far from object 1
    for tolerance, expected in ((0.0, 0.0), (2.0, 0.5)):  # hits object 0's map only within 2 px
        metric = ClassSpecificLocalisation(tolerance=tolerance)
        metric.update(lambda targets: maps, torch.tensor([[0, 1]]), object_masks, torch.tensor([0]))
        assert float(metric.compute()["class_pointing_game"]) == expected
