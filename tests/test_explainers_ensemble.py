"""Ensemble aggregation (Mahlau & Nolde 2022): normalisers and aggregators against hand
computations, the sigma = 0 guard, the explainer, and configs built through build_explainer."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from ptame.pipelines.evaluate import build_explainer
from ptame.explainers import AISEExplainer, EnsembleExplainer, LOTSExplainer
from ptame.explainers.base import Explainer
from ptame.explainers.baselines import CentreGaussianExplainer, RandomExplainer
from ptame.explainers.ensemble import aggregate_maps, normalise_member_maps
from ptame.maps import minmax_maps
from ptame.metrics.cost import measure_cost

from .helpers.networks import make_backbone
from .helpers.configs import compose_config, hydra_search_path
from .helpers.entry_points import CONF_DIR

# two members, one image of 2 x 2 pixels: mu = [.5, 1, 1, 4], sigma = [.5, 0, 1, 1], E+ = 4
E1 = [[0.0, 1.0], [2.0, 3.0]]
E2 = [[1.0, 1.0], [0.0, 5.0]]
MU = [0.5, 1.0, 1.0, 4.0]
SIGMA = [0.5, 0.0, 1.0, 1.0]


def stack(*maps) -> torch.Tensor:
    return torch.tensor([[m] for m in maps], dtype=torch.float64)  # (K, 1, H, W)


def pixels(result: torch.Tensor) -> list[float]:
    return result.flatten().tolist()


def phi(z: float) -> float:
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def pi_by_hand(mu: float, sigma: float, best: float, eps: float) -> float:
    gap = mu - best - eps
    if sigma == 0:
        return 1.0 if gap > 0 else (0.5 if gap == 0 else 0.0)
    return cdf(gap / sigma)


def ei_by_hand(mu: float, sigma: float, best: float, eps: float) -> float:
    gap = mu - best - eps
    if sigma == 0:
        return max(gap, 0.0)
    return cdf(gap / sigma) * gap + sigma * phi(gap / sigma)


# ---------------------------------------------------------------------------------------------
# normalisation (Eq. 1-4)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, expected", [
    ("none", [0, 1, 2, 3]),
    ("minmax", [0, 1 / 3, 2 / 3, 1]),
    ("zscore", [(v - 1.5) / math.sqrt(1.25) for v in (0, 1, 2, 3)]),
    ("l1", [0, 1 / 6, 2 / 6, 3 / 6]),
    ("l2", [v / math.sqrt(14) for v in (0, 1, 2, 3)]),
])
def test_normalisations_match_hand_computation(method, expected):
    result = normalise_member_maps(stack(E1, [[5.0, 5.0], [5.0, 5.0]]), method)
    assert pixels(result[0]) == pytest.approx(expected, abs=1e-12)


def test_normalisations_are_per_map():
    both = normalise_member_maps(stack(E1, E2), "minmax")
    assert pixels(both[1]) == pytest.approx([0.2, 0.2, 0.0, 1.0])


@pytest.mark.parametrize("method", ["minmax", "zscore"])
def test_constant_map_normalises_to_zeros(method):
    result = normalise_member_maps(stack([[5.0, 5.0], [5.0, 5.0]]), method)
    assert pixels(result) == [0.0] * 4


@pytest.mark.parametrize("method", ["l1", "l2"])
def test_zero_map_normalises_to_zeros(method):
    assert pixels(normalise_member_maps(stack([[0.0, 0.0], [0.0, 0.0]]), method)) == [0.0] * 4


# ---------------------------------------------------------------------------------------------
# aggregation (Eq. 5-16)
# ---------------------------------------------------------------------------------------------


def test_mean_is_the_member_average():
    assert pixels(aggregate_maps(stack(E1, E2), "mean")) == pytest.approx(MU)


def test_percentile_interpolates_linearly_between_sorted_members():
    three = stack(E1, E2, [[2.0, 0.0], [4.0, 1.0]])  # sorted per pixel: (0,1,2) (0,1,1) (0,2,4) (1,3,5)
    assert pixels(aggregate_maps(three, "percentile", percentile=25)) == pytest.approx([0.5, 0.5, 1.0, 2.0])
    assert pixels(aggregate_maps(three, "percentile", percentile=50)) == pytest.approx([1, 1, 2, 3])
    assert pixels(aggregate_maps(three, "percentile", percentile=100)) == pytest.approx([2, 1, 4, 5])
    assert pixels(aggregate_maps(three, "percentile", percentile=0)) == pytest.approx([0, 0, 0, 1])


def test_ucb_is_mean_plus_eps_sigma():
    result = aggregate_maps(stack(E1, E2), "ucb", epsilon=-0.5)
    assert pixels(result) == pytest.approx([0.25, 1.0, 0.5, 3.5])
    assert pixels(aggregate_maps(stack(E1, E2), "ucb")) == pytest.approx([0.25, 1.0, 0.5, 3.5])  # Table 1


@pytest.mark.parametrize("eps", [-4.0, 0.0, 0.5])
def test_probability_of_improvement_matches_hand_computation(eps):
    expected = [pi_by_hand(m, s, 4.0, eps) for m, s in zip(MU, SIGMA)]
    assert pixels(aggregate_maps(stack(E1, E2), "pi", epsilon=eps)) == pytest.approx(expected, abs=1e-12)


def test_probability_of_improvement_literal_values():
    # eps = -4: gap = mu, Z = (1, sigma 0 and gap > 0, 1, 4)
    result = aggregate_maps(stack(E1, E2), "pi", epsilon=-4.0)
    assert pixels(result) == pytest.approx([0.8413447, 1.0, 0.8413447, 0.9999683], abs=1e-6)


@pytest.mark.parametrize("eps", [-6.0, 0.0, 1.0])
def test_expected_improvement_matches_hand_computation(eps):
    expected = [ei_by_hand(m, s, 4.0, eps) for m, s in zip(MU, SIGMA)]
    assert pixels(aggregate_maps(stack(E1, E2), "ei", epsilon=eps)) == pytest.approx(expected, abs=1e-12)


def test_expected_improvement_literal_value_at_the_best_pixel():
    # eps = 0, pixel (1,1): gap 0, sigma 1 -> phi(0) = 0.398942
    assert aggregate_maps(stack(E1, E2), "ei", epsilon=0.0)[0, 1, 1].item() == pytest.approx(0.3989423)


def test_contextual_improvement_uses_the_mean_variance_over_best():
    eps = (0.25 + 0 + 1 + 1) / 4 / 4.0  # Eq. 11: sum sigma^2 / (m n E+) = 0.140625
    expected = [ei_by_hand(m, s, 4.0, eps) for m, s in zip(MU, SIGMA)]
    result = aggregate_maps(stack(E1, E2), "ci")
    assert pixels(result) == pytest.approx(expected, abs=1e-12)
    assert result[0, 1, 1].item() == pytest.approx(0.332568, abs=1e-5)


@pytest.mark.parametrize("method, hand", [("api", pi_by_hand), ("aei", ei_by_hand)])
def test_averaged_improvements_average_over_evenly_spaced_rates(method, hand):
    rates = [-1.0, 0.0, 1.0]  # Eq. 14-15 with [a, b] = [-1, 1], N = 3
    expected = [sum(hand(m, s, 4.0, r) for r in rates) / 3 for m, s in zip(MU, SIGMA)]
    result = aggregate_maps(stack(E1, E2), method, epsilon_range=[-1, 1], epsilon_samples=3)
    assert pixels(result) == pytest.approx(expected, abs=1e-12)


def test_variance_aggregation_divides_by_eps_sigma_plus_delta():
    result = aggregate_maps(stack(E1, E2), "var", epsilon=1.0, delta=1.0)
    assert pixels(result) == pytest.approx([0.5 / 1.5, 1.0, 0.5, 2.0])
    tiny = aggregate_maps(stack(E1, E2), "var")  # Table 1's eps = 1e-7, delta 1: about the mean
    assert pixels(tiny) == pytest.approx(MU, rel=1e-6)


@pytest.mark.parametrize("method", ["mean", "percentile", "ucb", "pi", "ei", "ci", "api", "aei", "var"])
def test_identical_members_give_finite_maps_with_sigma_zero(method):
    same = stack(E1, E1, E1)
    result = aggregate_maps(same, method)
    assert torch.isfinite(result).all()
    assert torch.isfinite(minmax_maps(result)).all()


def test_sigma_zero_limits():
    same = stack(E1, E1)  # sigma = 0 everywhere, mu = E1, E+ = 3
    # PI: gap = mu - 3 - eps; eps = -1 -> gaps (-2, -1, 0, 1) -> 0, 0, 1/2, 1
    assert pixels(aggregate_maps(same, "pi", epsilon=-1.0)) == [0.0, 0.0, 0.5, 1.0]
    # EI: max(gap, 0) with eps = -2 -> gaps (-1, 0, 1, 2)
    assert pixels(aggregate_maps(same, "ei", epsilon=-2.0)) == [0.0, 0.0, 1.0, 2.0]
    # CI: eps = 0 (no variance) -> max(mu - 3, 0)
    assert pixels(aggregate_maps(same, "ci")) == [0.0, 0.0, 0.0, 0.0]
    assert pixels(aggregate_maps(same, "ucb", epsilon=-0.5)) == [0.0, 1.0, 2.0, 3.0]


def test_contextual_improvement_with_zero_best_uses_eps_zero():
    maps = stack([[0.0, -1.0], [-2.0, -3.0]], [[0.0, -3.0], [-2.0, -1.0]])  # E+ = 0
    result = aggregate_maps(maps, "ci")
    expected = [ei_by_hand(m, s, 0.0, 0.0) for m, s in zip([0, -2, -2, -2], [0, 1, 0, 1])]
    assert pixels(result) == pytest.approx(expected, abs=1e-12)


def test_final_rescaling_is_min_max_per_image_and_zero_for_constants():
    maps = torch.tensor([[[1.0, 3.0], [5.0, 9.0]], [[2.0, 2.0], [2.0, 2.0]]])
    assert pixels(minmax_maps(maps)) == [0.0, 0.25, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "median"}, "unknown ensemble aggregation 'median'"),
    ({"method": "percentile", "percentile": 120}, "percentile k must lie in [0, 100]"),
    ({"method": "var", "epsilon": -1.0}, "var needs epsilon >= 0 and delta > 0"),
    ({"method": "var", "delta": 0.0}, "var needs epsilon >= 0 and delta > 0"),
    ({"method": "api", "epsilon_range": [2, -7]}, "a < b"),
    ({"method": "aei", "epsilon_samples": 1}, "epsilon_samples >= 2"),
])
def test_bad_aggregation_options_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        aggregate_maps(stack(E1, E2), **kwargs)


def test_bad_normalisation_and_shapes_fail_clearly():
    with pytest.raises(ValueError, match="unknown ensemble normalisation 'softmax'"):
        normalise_member_maps(stack(E1), "softmax")
    with pytest.raises(ValueError, match=r"\(K, B, H, W\)"):
        aggregate_maps(torch.zeros(2, 2, 2), "mean")


# ---------------------------------------------------------------------------------------------
# the explainer
# ---------------------------------------------------------------------------------------------


class RecordingExplainer(Explainer):
    """Returns a fixed map and records the targets it was asked for."""

    name = "recording"

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__(None)
        self.value = value
        self.seen: list[torch.Tensor | None] = []

    def explain(self, images, targets):
        self.seen.append(targets)
        return self.value.expand(images.shape[0], *self.value.shape).to(images.device)


def test_ensemble_of_random_and_centre_gaussian_matches_manual_aggregation():
    backbone = make_backbone()
    members = [RandomExplainer(backbone, seed=3), CentreGaussianExplainer(backbone, sigma=0.2)]
    ensemble = EnsembleExplainer(members)
    assert ensemble.backbone is backbone  # taken from the members
    images = torch.rand(3, 3, 12, 10)
    targets = torch.tensor([0, 1, 2])
    maps = ensemble(images, targets)
    raw = torch.stack([m(images, targets) for m in members])
    z = (raw - raw.mean(dim=(2, 3), keepdim=True)) / raw.std(dim=(2, 3), unbiased=False, keepdim=True)
    ucb = z.mean(0) - 0.5 * z.std(0, unbiased=False)
    low, high = ucb.amin(dim=(1, 2), keepdim=True), ucb.amax(dim=(1, 2), keepdim=True)
    assert torch.allclose(maps, (ucb - low) / (high - low), atol=1e-5)
    assert maps.shape == (3, 12, 10) and maps.amin() == 0 and maps.amax() == 1


def test_single_member_mean_ensemble_is_the_member_rescaled():
    backbone = make_backbone()
    member = CentreGaussianExplainer(backbone, sigma=0.3)
    ensemble = EnsembleExplainer({"centre": member}, normalisation="none", aggregation="mean")
    images = torch.rand(2, 3, 9, 9)
    expected = minmax_maps(member(images, torch.tensor([0, 0])))
    assert torch.allclose(ensemble(images, torch.tensor([0, 0])), expected)
    assert ensemble.member_names == ["centre"]


def test_targets_are_resolved_once_and_shared_by_every_member():
    backbone = make_backbone()
    first = RecordingExplainer(torch.rand(6, 6))
    second = RecordingExplainer(torch.rand(6, 6))
    ensemble = EnsembleExplainer([first, second], backbone=backbone, aggregation="mean")
    images = torch.rand(4, 3, 6, 6)
    ensemble(images)
    predictions = backbone(images).argmax(dim=1)
    assert torch.equal(first.seen[0], predictions) and torch.equal(second.seen[0], predictions)
    ensemble(images, torch.tensor([4, 3, 2, 1]))
    assert first.seen[1].tolist() == [4, 3, 2, 1] == second.seen[1].tolist()


def test_ensemble_with_identical_members_is_finite():
    value = torch.tensor([[0.0, 0.5], [0.25, 1.0]])
    for aggregation in ("pi", "ei", "ci", "api", "aei", "ucb", "var"):
        ensemble = EnsembleExplainer([RecordingExplainer(value), RecordingExplainer(value)],
                                     aggregation=aggregation)
        maps = ensemble(torch.rand(1, 3, 2, 2), torch.tensor([0]))
        assert torch.isfinite(maps).all() and 0 <= maps.min() and maps.max() <= 1, aggregation


def test_bad_ensembles_fail_clearly():
    backbone = make_backbone()
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleExplainer([])
    with pytest.raises(TypeError, match="not an explainer module"):
        EnsembleExplainer([lambda images, targets: images])
    with pytest.raises(ValueError, match="unknown ensemble aggregation 'best'"):
        EnsembleExplainer([RandomExplainer(backbone)], aggregation="best")
    with pytest.raises(ValueError, match="unknown ensemble normalisation"):
        EnsembleExplainer([RandomExplainer(backbone)], normalisation="max")


# ---------------------------------------------------------------------------------------------
# configs through build_explainer
# ---------------------------------------------------------------------------------------------


def compose_evaluate(overrides):
    return compose_config("evaluate", ["experiment=smoke", *overrides])


def test_build_lots_aise_and_ensemble_from_the_smoke_config(configs):
    cfg = configs("evaluate", ["experiment=smoke",
        "+explainer_options.ensemble.members=[random,centre_gaussian]",
        "+explainer_options.centre_gaussian.sigma=0.1",
        "+explainer_options.lots.max_iterations=5",
        "+explainer_options.aise.budget=12",
    ])
    backbone = make_backbone(num_classes=8)
    images = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([1, 5])
    ensemble = build_explainer("ensemble", cfg, backbone)
    assert isinstance(ensemble, EnsembleExplainer) and ensemble.name == "ensemble"
    assert ensemble.member_names == ["random", "centre_gaussian"]
    assert ensemble.normalisation == "zscore" and ensemble.aggregation == "ucb"
    assert ensemble.options["epsilon"] == -0.5
    random_member, centre_member = ensemble.members
    assert random_member.seed == cfg.seed and centre_member.sigma == 0.1  # their own options
    assert not ensemble.training and ensemble.backbone is backbone
    expected = EnsembleExplainer([RandomExplainer(backbone, seed=cfg.seed),
                                  CentreGaussianExplainer(backbone, sigma=0.1)])
    assert torch.allclose(ensemble(images, targets), expected(images, targets))

    lots = build_explainer("lots", cfg, backbone)
    assert isinstance(lots, LOTSExplainer) and lots.max_iterations == 5
    assert lots.tau == 0.1 and lots.alpha == pytest.approx(1 / 255) and lots.target == "zero"
    aise = build_explainer("aise", cfg, backbone)
    assert isinstance(aise, AISEExplainer) and aise.samples_per_kernel == [2, 2, 2]
    assert aise.sigmas == [0.1, 0.175, 0.25] and aise.seed == cfg.seed
    for explainer in (lots, aise):
        maps = explainer(images, targets)
        assert maps.shape == (2, 64, 64) and 0 <= maps.min() and maps.max() == 1


def test_default_ensemble_config_follows_the_paper():
    node = OmegaConf.load(CONF_DIR / "explainer" / "ensemble.yaml")
    assert list(node.members) == ["gradcam", "gradcampp", "scorecam", "ablationcam", "rise"]
    assert (node.normalisation, node.aggregation, node.epsilon) == ("zscore", "ucb", -0.5)


def test_an_ensemble_cannot_contain_itself(tmp_path):
    (tmp_path / "explainer").mkdir()
    (tmp_path / "explainer" / "loop.yaml").write_text(
        "_target_: ptame.explainers.EnsembleExplainer\nmembers: [random, loop]\n")
    (tmp_path / "explainer" / "random.yaml").write_text(
        "_target_: ptame.explainers.RandomExplainer\nseed: 0\n")
    cfg = compose_evaluate([])
    with hydra_search_path(tmp_path), pytest.raises(
        ValueError, match="'loop' lists itself among its members: loop -> loop"
    ):
        build_explainer("loop", cfg, make_backbone())


def test_bad_member_lists_fail_clearly(configs):
    backbone = make_backbone()
    for members, message in [("[]", "non-empty list"), ("[random,random]", "distinct"),
                             ("[random,nope]", "unknown explainer 'nope'")]:
        cfg = configs("evaluate", ["experiment=smoke", f"+explainer_options.ensemble.members={members}"])
        with pytest.raises(ValueError, match=message):
            build_explainer("ensemble", cfg, backbone)


def test_cost_measurement_counts_the_members_passes():
    backbone = make_backbone()
    lots = LOTSExplainer(backbone, max_iterations=2, tau=0.0, blur_size=3)
    aise = AISEExplainer(backbone, budget=6)
    ensemble = EnsembleExplainer([lots, aise, CentreGaussianExplainer(backbone)])
    cost = measure_cost(ensemble, torch.rand(2, 3, 8, 8))
    # 1 prediction + LOTS 2 iterations (tau 0: no early stop) + AISE 6 inferences
    assert cost.forward_passes == 1 + 2 + 6
