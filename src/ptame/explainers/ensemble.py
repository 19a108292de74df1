"""Ensemble aggregation of saliency maps (Mahlau & Nolde, "Fidelity of Ensemble Aggregation for
Saliency Map Explanations using Bayesian Optimization Techniques", 2022).

Each member explainer gives a map e^k (B, H, W) for the same images and targets. Every map is
normalised on its own (Sec. 3.1, Eq. 1-4), then the K normalised maps are merged pixel by pixel
(Sec. 3.2, Eq. 5-16) with mu and sigma the mean and the population standard deviation over the
members at each pixel (Eq. 6-7). The aggregated map is finally min-max rescaled to [0, 1] per
image, as the paper does for display ("linearly normalised to the full colour range").

The pure functions :func:`normalise_member_maps` and :func:`aggregate_maps` work on plain
tensors; :class:`EnsembleExplainer` puts them behind the explainer interface.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ptame.explainers.base import Explainer
from ptame.maps import minmax_maps
from ptame.networks.frozen import Backbone

NORMALISATIONS = ("none", "minmax", "zscore", "l1", "l2")
AGGREGATIONS = ("mean", "percentile", "ucb", "pi", "ei", "ci", "api", "aei", "var")
_ALIASES = {"min-max": "minmax", "linear": "minmax", "z-score": "zscore", "avg": "mean",
            "average": "mean"}

#: The exploration rates of the paper's Table 1 (tuned on ImageNet with z-score normalisation),
#: used when ``epsilon`` is not given.
DEFAULT_EPSILON = {"ucb": -0.5, "pi": -4.0, "ei": -6.0, "var": 1e-7}
#: The intervals [a, b] of Table 1 for the averaged acquisition functions (Eq. 12-15).
DEFAULT_EPSILON_RANGE = {"api": (-7.0, 2.0), "aei": (-10.0, 5.0)}


def _canonical(name: str, choices: Sequence[str], what: str) -> str:
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in choices:
        raise ValueError(f"unknown ensemble {what} {name!r}; choose one of {list(choices)}")
    return key


def _check_stack(maps: Tensor) -> None:
    if not isinstance(maps, Tensor) or maps.ndim != 4 or not maps.is_floating_point():
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"expected float member maps of shape (K, B, H, W), got {shape}")
    if maps.shape[0] < 1:
        raise ValueError("an ensemble needs at least one member map")


def normalise_member_maps(maps: Tensor, method: str) -> Tensor:
    """Normalise every member map over its own pixels (Eq. 1-4).

    Args:
        maps: (K, B, H, W) member maps.
        method: ``"none"``; ``"minmax"`` (e - min) / (max - min); ``"zscore"`` (e - mean) / std
            with the population std over the map's pixels; ``"l1"`` e / sum|e|;
            ``"l2"`` e / sqrt(sum e^2).

    Returns:
        (K, B, H, W). A map whose denominator is 0 (a constant map for min-max and z-score, an
        all-zero map for l1/l2) becomes all zeros: it carries no ranking information.
    """
    _check_stack(maps)
    method = _canonical(method, NORMALISATIONS, "normalisation")
    if method == "none":
        return maps
    if method == "minmax":
        return minmax_maps(maps)
    flat = maps.flatten(2)
    if method == "zscore":
        shifted = flat - flat.mean(dim=2, keepdim=True)
        scale = flat.std(dim=2, unbiased=False, keepdim=True)
    else:
        shifted = flat
        scale = flat.norm(p=1 if method == "l1" else 2, dim=2, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, shifted / safe, torch.zeros_like(shifted)).view_as(maps)


def member_statistics(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel mean mu and population standard deviation sigma over the K members
    (Eq. 6-7). maps: (K, B, H, W) -> two (B, H, W) tensors."""
    _check_stack(maps)
    return maps.mean(dim=0), maps.std(dim=0, unbiased=False)


def percentile_maps(maps: Tensor, k: float) -> Tensor:
    """The k-th percentile over members per pixel with linear interpolation between the
    sorted members (numpy's default; k=50 is the median). maps: (K, B, H, W) -> (B, H, W).

    Sorting instead of ``torch.quantile`` because the latter refuses inputs above 2^24
    elements (a batch of 224 px maps of a 5-member ensemble reaches that)."""
    if not 0 <= k <= 100:
        raise ValueError(f"ensemble percentile k must lie in [0, 100], got {k}")
    ordered = maps.sort(dim=0).values
    position = k / 100 * (maps.shape[0] - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _normal_pdf(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2))


def _best_mean(mu: Tensor) -> Tensor:
    """E+ = max over pixels of mu, per image, broadcastable against (B, H, W)."""
    return mu.flatten(1).amax(dim=1).view(-1, 1, 1)


def probability_of_improvement(mu: Tensor, sigma: Tensor, epsilon: float | Tensor) -> Tensor:
    """PI = Phi(Z), Z = (mu - E+ - eps) / sigma (Eq. 9). mu, sigma: (B, H, W).

    Where sigma = 0 the limit sigma -> 0+ is returned: 1 where mu - E+ - eps > 0, 0 where it
    is < 0 and 1/2 where it is exactly 0 (no NaN or inf)."""
    gap = mu - _best_mean(mu) - epsilon
    positive = sigma > 0
    z = gap / torch.where(positive, sigma, torch.ones_like(sigma))
    limit = (gap > 0).to(mu.dtype) + 0.5 * (gap == 0).to(mu.dtype)
    return torch.where(positive, _normal_cdf(z), limit)


def expected_improvement(mu: Tensor, sigma: Tensor, epsilon: float | Tensor) -> Tensor:
    """EI = Phi(Z) (mu - E+ - eps) + sigma phi(Z) (Eq. 10). mu, sigma: (B, H, W).

    Where sigma = 0 the limit max(mu - E+ - eps, 0) is returned (the expected improvement of a
    certain value; no NaN or inf)."""
    gap = mu - _best_mean(mu) - epsilon
    positive = sigma > 0
    z = gap / torch.where(positive, sigma, torch.ones_like(sigma))
    value = _normal_cdf(z) * gap + sigma * _normal_pdf(z)
    return torch.where(positive, value, gap.clamp_min(0))


def contextual_epsilon(mu: Tensor, sigma: Tensor) -> Tensor:
    """CI's exploration rate eps = sum sigma^2 / (m n E+) per image (Eq. 11), shape (B, 1, 1).

    Where E+ = 0 the rate is undefined; 0 is returned there (plain EI)."""
    best = _best_mean(mu)
    mean_variance = (sigma * sigma).flatten(1).mean(dim=1).view(-1, 1, 1)
    safe = torch.where(best != 0, best, torch.ones_like(best))
    return torch.where(best != 0, mean_variance / safe, torch.zeros_like(best))


def aggregate_maps(
    maps: Tensor,
    method: str,
    epsilon: float | None = None,
    percentile: float = 25.0,
    epsilon_range: Sequence[float] | None = None,
    epsilon_samples: int = 10,
    delta: float = 1.0,
) -> Tensor:
    """Merge K normalised member maps per pixel (Sec. 3.2), before any rescaling.

    Args:
        maps: (K, B, H, W) normalised member maps.
        method: ``mean`` (Eq. 5); ``percentile`` (k-th percentile, linear interpolation);
            ``ucb`` mu + eps sigma (Eq. 8); ``pi`` (Eq. 9); ``ei`` (Eq. 10); ``ci`` EI with the
            contextual eps of Eq. 11; ``api`` / ``aei`` the mean of PI / EI over
            ``epsilon_samples`` rates evenly spaced in ``epsilon_range`` = [a, b] (Eq. 14-15);
            ``var`` mean_k e^k / (eps sigma + delta) (Eq. 16).
        epsilon: exploration rate of ucb/pi/ei/var; None takes the paper's Table 1 value
            (ucb -0.5, pi -4, ei -6, var 1e-7).
        percentile: k in [0, 100] for ``percentile`` (Table 1: 25).
        epsilon_range: [a, b] for api/aei; None takes Table 1 (api [-7, 2], aei [-10, 5]).
        epsilon_samples: N >= 2 rates for api/aei (the paper does not state its N).
        delta: VAR's additive constant, > 0 (the paper does not state its value; 1 makes VAR
            tend to the mean as eps -> 0, as the paper reports).

    Returns:
        (B, H, W) aggregated scores (any real range); finite wherever the maps are.
    """
    _check_stack(maps)
    method = _canonical(method, AGGREGATIONS, "aggregation")
    if method == "percentile":
        return percentile_maps(maps, float(percentile))
    mu, sigma = member_statistics(maps)
    if method == "mean":
        return mu
    if method == "ci":
        return expected_improvement(mu, sigma, contextual_epsilon(mu, sigma))
    if method in ("api", "aei"):
        low, high = epsilon_range if epsilon_range is not None else DEFAULT_EPSILON_RANGE[method]
        if int(epsilon_samples) < 2 or not low < high:
            raise ValueError(
                f"ensemble {method} needs epsilon_range [a, b] with a < b and epsilon_samples "
                f">= 2, got {list(epsilon_range or [])} and {epsilon_samples}"
            )
        function = probability_of_improvement if method == "api" else expected_improvement
        rates = torch.linspace(float(low), float(high), int(epsilon_samples)).tolist()
        return torch.stack([function(mu, sigma, rate) for rate in rates]).mean(dim=0)
    eps = DEFAULT_EPSILON[method] if epsilon is None else float(epsilon)
    if method == "ucb":
        return mu + eps * sigma
    if method == "pi":
        return probability_of_improvement(mu, sigma, eps)
    if method == "ei":
        return expected_improvement(mu, sigma, eps)
    if eps < 0 or not delta > 0:  # var: a positive denominator everywhere, also where sigma = 0
        raise ValueError(f"ensemble var needs epsilon >= 0 and delta > 0, got {eps} and {delta}")
    return mu / (eps * sigma + float(delta))


class EnsembleExplainer(Explainer):
    """Aggregate the maps of several explainers pixel by pixel (Mahlau & Nolde 2022).

    The targets are resolved once (the backbone's predictions when none are given) and every
    member explains those same classes. Member maps are normalised per map
    (:func:`normalise_member_maps`), merged (:func:`aggregate_maps`) and min-max rescaled to [0, 1]
    per image (:func:`~ptame.maps.minmax_maps`; a constant result becomes all zeros). The paper's
    recommendation, z-score + UCB with eps = -0.5, is the default.

    Args:
        members: the member explainers, a list or a ``{name: explainer}`` mapping (>= 1).
        backbone: resolves the targets; None takes the first member's backbone.
        normalisation: none | minmax | zscore | l1 | l2.
        aggregation: mean | percentile | ucb | pi | ei | ci | api | aei | var.
        epsilon, percentile, epsilon_range, epsilon_samples, delta: see :func:`aggregate_maps`.
    """

    name = "ensemble"

    def __init__(
        self,
        members: Sequence[Explainer] | Mapping[str, Explainer],
        backbone: Backbone | None = None,
        normalisation: str = "zscore",
        aggregation: str = "ucb",
        epsilon: float | None = None,
        percentile: float = 25.0,
        epsilon_range: Sequence[float] | None = None,
        epsilon_samples: int = 10,
        delta: float = 1.0,
    ) -> None:
        names, modules = self._split_members(members)
        if backbone is None:
            backbone = next((m.backbone for m in modules if getattr(m, "backbone", None)), None)
        super().__init__(backbone)
        self.members = nn.ModuleList(modules)
        self.member_names = names
        self.normalisation = _canonical(normalisation, NORMALISATIONS, "normalisation")
        self.aggregation = _canonical(aggregation, AGGREGATIONS, "aggregation")
        self.options = {
            "epsilon": None if epsilon is None else float(epsilon),
            "percentile": float(percentile),
            "epsilon_range": None if epsilon_range is None else [float(v) for v in epsilon_range],
            "epsilon_samples": int(epsilon_samples),
            "delta": float(delta),
        }
        # validate the options once on a dummy stack of two maps
        aggregate_maps(torch.rand(2, 1, 2, 2), self.aggregation, **self.options)

    @staticmethod
    def _split_members(
        members: Sequence[Explainer] | Mapping[str, Explainer],
    ) -> tuple[list[str], list[nn.Module]]:
        if isinstance(members, Mapping):
            names, modules = [str(k) for k in members], list(members.values())
        elif isinstance(members, Sequence) and not isinstance(members, str):
            modules = list(members)
            names = [str(getattr(m, "name", type(m).__name__)) for m in modules]
        else:
            raise TypeError(f"ensemble members must be a list or a mapping of explainers, got "
                            f"{type(members).__name__}")
        if not modules:
            raise ValueError("an ensemble needs at least one member explainer")
        for name, module in zip(names, modules):
            if not isinstance(module, nn.Module) or not callable(module):
                raise TypeError(f"ensemble member {name!r} is not an explainer module: "
                                f"{type(module).__name__}")
        return names, modules

    def member_maps(self, images: Tensor, targets: Tensor | None) -> Tensor:
        """The members' maps (K, B, H, W) for the same images and targets."""
        return torch.stack([member(images, targets).to(images.dtype) for member in self.members])

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        maps = normalise_member_maps(self.member_maps(images, targets), self.normalisation)
        return minmax_maps(aggregate_maps(maps, self.aggregation, **self.options))
