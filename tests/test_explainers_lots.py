"""LOTS visualisation: the update rule, the stopping criterion, Algorithm 2 against OpenCV, and a
constructed model whose class evidence sits in a known square."""

from __future__ import annotations

from collections import OrderedDict

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from ptame.explainers import LOTSExplainer
from ptame.explainers.lots import class_mean_features, lots_activation_map, opencv_sigma
from ptame.metrics.cost import measure_cost
from ptame.networks import Backbone

BOX = (4, 12, 18, 26)  # rows 4..11, columns 18..25 of a 32 x 32 image


class MeanLogit(nn.Module):
    """One logit: the mean of all pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None]


class SquareEvidence(nn.Module):
    """Logit c = scale * mean of channel c inside BOX (3 classes); nothing outside matters."""

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0, y1, x0, x1 = BOX
        return self.scale * x[:, :, y0:y1, x0:x1].mean(dim=(2, 3))


def identity_backbone(model: nn.Module) -> Backbone:
    return Backbone(model, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), name="constructed")


def square_images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.rand(batch, 3, 32, 32, generator=generator)
    y0, y1, x0, x1 = BOX
    images[:, 0, y0:y1, x0:x1] += 0.6
    return images


def test_one_update_follows_the_scaled_gradient_step():
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 2, bias=False))
    explainer = LOTSExplainer(identity_backbone(linear), tau=0.0, alpha=0.1, max_iterations=1)
    images = torch.rand(2, 3, 2, 2)
    weight = linear[1].weight.detach()
    features = images.flatten(1) @ weight.T  # F_s; zero target
    gradient = features @ weight  # d/dx 1/2 ||F_s||^2
    expected = (images.flatten(1) - 0.1 * gradient / gradient.abs().amax(dim=1, keepdim=True)).clamp(0, 1)
    adversarial = explainer.synthesise(images, None)
    assert torch.allclose(adversarial.flatten(1), expected, atol=1e-6)
    assert explainer.last_iterations.tolist() == [1, 1]
    assert (adversarial - images).abs().amax() == pytest.approx(0.1, abs=1e-6)


def test_class_target_step_moves_towards_the_class_features():
    torch.manual_seed(1)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 2, bias=False))
    class_features = torch.tensor([[2.0, -1.0], [0.5, 3.0], [0.0, 0.0]])
    explainer = LOTSExplainer(identity_backbone(linear), target="class", class_features=class_features,
                              tau=0.0, alpha=0.05, max_iterations=1)
    images = torch.rand(2, 3, 2, 2)
    targets = torch.tensor([1, 0])
    weight = linear[1].weight.detach()
    gradient = (images.flatten(1) @ weight.T - class_features[targets]) @ weight
    expected = (images.flatten(1) - 0.05 * gradient / gradient.abs().amax(dim=1, keepdim=True)).clamp(0, 1)
    adversarial = explainer.synthesise(images, explainer.target_features(images, targets))
    assert torch.allclose(adversarial.flatten(1), expected, atol=1e-6)


def test_synthesis_stops_at_tau_per_image():
    # feature = mean pixel; every step lowers it by exactly alpha = 1/64 (uniform gradient)
    explainer = LOTSExplainer(identity_backbone(MeanLogit()), tau=0.25, alpha=1 / 64, max_iterations=100)
    images = torch.stack([torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), 0.375), torch.full((3, 4, 4), 0.125)])
    adversarial = explainer.synthesise(images, None)
    assert explainer.last_iterations.tolist() == [16, 8, 0]  # (0.5 - 0.25) * 64, (0.375 - 0.25) * 64
    assert adversarial[:, 0, 0, 0].tolist() == [0.25, 0.25, 0.125]
    capped = LOTSExplainer(identity_backbone(MeanLogit()), tau=0.25, alpha=1 / 64, max_iterations=10)
    assert capped.synthesise(images[:1], None)[0, 0, 0, 0].item() == 0.5 - 10 / 64
    assert capped.last_iterations.tolist() == [10]


def test_an_image_already_at_the_target_gets_an_all_zero_map():
    explainer = LOTSExplainer(identity_backbone(MeanLogit()), tau=0.3, max_iterations=5, blur_size=3)
    maps = explainer(torch.full((1, 3, 8, 8), 0.2), torch.tensor([0]))
    assert maps.abs().max() == 0


def test_activation_map_matches_grey_difference_and_opencv_blur():
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 20, 24, generator=generator, dtype=torch.float64)
    adversarial = (images + 0.1 * torch.randn(2, 3, 20, 24, generator=generator, dtype=torch.float64)).clamp(0, 1)
    maps = lots_activation_map(images, adversarial, blur_size=11)
    for index in range(2):
        grey = lambda t: (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2]).numpy()  # noqa: E731
        perturbation = np.abs(grey(adversarial[index]) - grey(images[index]))
        perturbation = (perturbation - perturbation.min()) / (perturbation.max() - perturbation.min())
        # sigma 0: OpenCV derives it from the size (tabulated kernels only up to 9 px)
        blurred = cv2.GaussianBlur(perturbation, (11, 11), 0, borderType=cv2.BORDER_REFLECT_101)
        expected = (blurred - blurred.min()) / (blurred.max() - blurred.min())
        assert np.allclose(maps[index].numpy(), expected, atol=1e-6)
    assert opencv_sigma(49) == pytest.approx(7.7)


def test_constructed_model_map_peaks_in_the_evidence_square():
    explainer = LOTSExplainer(identity_backbone(SquareEvidence()), max_iterations=15, blur_size=5)
    images = square_images()
    maps = explainer(images)
    adversarial = explainer.synthesise(images, None)
    assert torch.equal(maps, lots_activation_map(images, adversarial, 5))
    y0, y1, x0, x1 = BOX
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    for single in maps:
        peak = int(single.argmax())
        assert inside.flatten()[peak], divmod(peak, 32)
        assert single[inside].sum() / single.sum() > 0.6  # 64 of 1024 pixels hold > 60 % of the mass
    # the perturbation itself never leaves the square: the gradient is zero outside
    assert torch.equal(adversarial[:, :, ~inside], images[:, :, ~inside])
    assert (adversarial[:, :, inside] != images[:, :, inside]).any()


def test_named_layer_features_and_class_mean_targets():
    torch.manual_seed(3)
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 3, padding=1), relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(), fc=nn.Linear(4, 3),
    ))
    backbone = identity_backbone(model)
    explainer = LOTSExplainer(backbone, layer="pool", max_iterations=3, blur_size=3)
    images = torch.rand(4, 3, 8, 8)
    direct = model.pool(model.relu(model.conv(images))).flatten(1)
    assert torch.allclose(explainer.features(images), direct)
    labels = torch.tensor([0, 1, 0, 2])
    means = class_mean_features(explainer, [(images[:2], labels[:2]), (images[2:], labels[2:])], 3)
    assert torch.allclose(means, torch.stack([direct[[0, 2]].mean(0), direct[1], direct[3]]), atol=1e-6)
    with pytest.raises(ValueError, match=r"no images of class\(es\) \[3\]"):
        class_mean_features(explainer, [(images, labels)], 4)
    cosine = LOTSExplainer(backbone, layer="pool", target="class", class_features=means,
                           distance="cosine", tau=0.5, max_iterations=4, blur_size=3)
    maps = cosine(images, labels)
    assert maps.shape == (4, 8, 8) and torch.isfinite(maps).all()


def test_works_under_no_grad_and_leaves_the_images_alone():
    backbone = identity_backbone(SquareEvidence())
    explainer = LOTSExplainer(backbone, max_iterations=10, blur_size=3)
    images = square_images(2)
    copy = images.clone()
    with torch.no_grad():
        first = explainer(images)
    second = explainer(images)
    assert torch.equal(images, copy) and not images.requires_grad
    assert torch.equal(first, second)  # deterministic
    assert first.max() == 1 and first.min() == 0


def test_default_blur_size_scales_the_thesis_filter():
    explainer = LOTSExplainer(identity_backbone(MeanLogit()))
    assert explainer.blur_size_for(224, 224) == 49
    assert explainer.blur_size_for(64, 64) == 15  # round(64 * 49 / 224) = 14 -> odd
    assert LOTSExplainer(identity_backbone(MeanLogit()), blur_size=7).blur_size_for(64, 64) == 7


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": "layer9"}, "has no module 'layer9'"),
    ({"target": "mean"}, "unknown LOTS target 'mean'"),
    ({"distance": "manhattan"}, "unknown LOTS distance"),
    ({"distance": "cosine"}, "cosine distance to the zero target is undefined"),
    ({"tau": -1.0}, "tau >= 0"),
    ({"alpha": 0.0}, "alpha > 0"),
    ({"max_iterations": 0}, "max_iterations >= 1"),
    ({"blur_size": 4}, "positive odd number"),
    ({"target": "class"}, "needs class_features"),
])
def test_bad_options_fail_clearly(kwargs, message):
    model = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(12, 2)))
    with pytest.raises(ValueError, match=message):
        LOTSExplainer(identity_backbone(model), **kwargs)


def test_class_target_outside_the_class_features_fails_clearly():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))  # 3 classes, features of 2 of them
    explainer = LOTSExplainer(identity_backbone(model), target="class", class_features=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="outside the 2 classes"):
        explainer(torch.rand(1, 3, 2, 2), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"target class 5 is not a class of the backbone \(valid: \[0, 2\]"):
        explainer(torch.rand(1, 3, 2, 2), torch.tensor([5]))


def test_cost_measurement_counts_one_forward_per_iteration():
    # 16 updates + the final check that stops the synthesis + the prediction pass = 18 per image
    explainer = LOTSExplainer(identity_backbone(MeanLogit()), tau=0.25, alpha=1 / 64, blur_size=3)
    cost = measure_cost(explainer, torch.full((2, 3, 4, 4), 0.5))
    assert cost.forward_passes == 18
    assert explainer.last_iterations.tolist() == [16, 16]


def test_inference_mode_is_refused_clearly_but_inference_tensors_are_fine():
    explainer = LOTSExplainer(identity_backbone(SquareEvidence()), max_iterations=3, blur_size=3)
    with torch.inference_mode():
        images = square_images(1)
        with pytest.raises(RuntimeError, match="outside torch.inference_mode"):
            explainer(images)
    assert torch.equal(explainer(images), explainer(square_images(1)))


def test_class_features_load_from_a_file(tmp_path):
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.save(features, tmp_path / "means.pt")
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    explainer = LOTSExplainer(identity_backbone(model), target="class",
                              class_features=str(tmp_path / "means.pt"))
    assert torch.equal(explainer.class_features, features)
    with pytest.raises(FileNotFoundError, match="LOTS class_features not found"):
        LOTSExplainer(identity_backbone(model), target="class", class_features=tmp_path / "none.pt")
