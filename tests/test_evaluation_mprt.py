"""Model parameter randomisation test (MPRT) on the tiny test networks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ptame.evaluation.mprt import (
    block_parameters,
    cumulative_randomisations,
    explanation_maps,
    format_mprt,
    map_ssim,
    model_parameter_randomisation,
    plot_mprt,
    randomise_block,
    ssim_kernel_sigma,
)
from ptame.explainers import CAMExplainer, PTAMEExplainer, SobelEdgeExplainer
from ptame.networks.architectures import MPRT_BLOCKS, default_mprt_blocks
from ptame.module import PTAMEModule
from ptame.losses import PTAMELoss
from ptame.networks import Backbone, weights_fingerprint

from .helpers.networks import make_auxiliary, make_backbone


class ThreeBlocks(nn.Module):
    """conv -> BN -> ReLU, conv, linear: three named blocks with parameters, one without."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.second = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.second(self.first(x))).flatten(1))


def three_block_backbone() -> Backbone:
    torch.manual_seed(3)
    network = ThreeBlocks()
    with torch.no_grad():  # "trained" normalisation statistics, so that a reset is visible
        norm = network.first[1]
        for tensor, value in ((norm.weight, 2.0), (norm.bias, 0.1), (norm.running_mean, 0.3),
                              (norm.running_var, 1.5)):
            tensor.fill_(value)
    return Backbone(network, (0.5,) * 3, (0.25,) * 3, name="three-blocks")


def states(explainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in explainer.backbone.model.state_dict().items()}


def test_blocks_are_randomised_cumulatively_in_either_order_and_the_original_is_untouched():
    explainer = SobelEdgeExplainer(three_block_backbone())
    before = weights_fingerprint(explainer.backbone.model)
    original = states(explainer)
    assert default_mprt_blocks(explainer.backbone) == {"first": ["first"], "second": ["second"], "head": ["head"]}
    for order, expected in (("bottom_up", ["first", "second", "head"]), ("top_down", ["head", "second", "first"])):
        seen = []
        for label, randomised in cumulative_randomisations(explainer, order=order, seed=7):
            seen.append(label)
            current = states(randomised)
            for key, value in current.items():
                changed = not torch.equal(value, original[key])
                block = key.split(".")[0]
                if key.endswith("num_batches_tracked"):
                    continue
                assert changed == (block in seen), (order, label, key)
        assert seen == expected
    assert weights_fingerprint(explainer.backbone.model) == before


def test_randomisation_is_seeded_per_block_and_resets_normalisation():
    first, second = three_block_backbone().model, three_block_backbone().model
    randomise_block(first, ["second"], seed=3)
    randomise_block(second, ["second"], seed=3)
    assert torch.equal(first.second.weight, second.second.weight)
    randomise_block(second, ["second"], seed=4)
    assert not torch.equal(first.second.weight, second.second.weight)
    count = randomise_block(first, ["first"], seed=0)
    assert count == 4 * 3 * 9 + 4 + 4 + 4
    norm = first.first[1]
    assert torch.equal(norm.weight, torch.ones(4)) and torch.equal(norm.running_mean, torch.zeros(4))
    # a bare parameter is drawn from N(0, 0.02^2)
    randomise_block(first, ["head.bias"], seed=0)
    assert first.head.bias.abs().max() < 0.1 and first.head.bias.abs().sum() > 0


def test_bad_blocks_are_refused_with_the_name():
    network = three_block_backbone().model
    with pytest.raises(ValueError, match="'nope' is neither a module nor a parameter"):
        randomise_block(network, ["nope"], seed=0)
    with pytest.raises(ValueError, match=r"block \['pool'\] has no parameters"):
        randomise_block(network, ["pool"], seed=0)
    with pytest.raises(ValueError, match="block 'pooling' \\(\\['pool'\\]\\) has no parameters"):
        cumulative_randomisations(SobelEdgeExplainer(three_block_backbone()), {"pooling": ["pool"]})
    with pytest.raises(ValueError, match="order must be one of"):
        cumulative_randomisations(SobelEdgeExplainer(three_block_backbone()), order="sideways")


def test_block_presets_name_real_modules_of_the_generated_classifiers():
    from ptame.networks.small import small_resnet, small_vgg

    for arch, factory in (("small_vgg", small_vgg), ("small_resnet", small_resnet)):
        network = factory(8)
        for names in MPRT_BLOCKS[arch].values():
            assert randomise_block(network, names, seed=0) > 0


@pytest.mark.parametrize("arch", ["vgg16", "resnet50", "vit_b_16"])
def test_block_presets_name_real_modules_of_the_paper_backbones(arch):
    import torchvision

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        network = torchvision.models.get_model(arch, weights=None)
    blocks = [block_parameters(network, names) for names in MPRT_BLOCKS[arch].values()]
    assert all(blocks)
    # the blocks cover every parameter of the network exactly once
    ids = [id(parameter) for block in blocks for parameter in block]
    assert len(ids) == len(set(ids)) == len(list(network.parameters()))


def test_ssim_is_one_for_identical_maps_and_low_for_inverted_ones():
    torch.manual_seed(0)
    maps = torch.rand(3, 16, 16)
    assert map_ssim(maps, maps) == pytest.approx(torch.ones(3))
    assert (map_ssim(1 - maps, maps) < 0).all()
    small = torch.rand(2, 4, 4)  # window shrinks to fit: 2 * int(3.5 sigma + 0.5) + 1 = 3
    assert ssim_kernel_sigma(4, 4) == pytest.approx(1 / 3.5) and ssim_kernel_sigma(56, 56) == 1.5
    assert map_ssim(small, small) == pytest.approx(torch.ones(2))
    with pytest.raises(ValueError, match="at least 3x3"):
        map_ssim(torch.rand(1, 2, 2), torch.rand(1, 2, 2))


def varied_images(count: int = 12, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(count, 3, size, size, generator=generator)
    # per-image colour casts, so that the tiny classifier predicts several classes
    return (images * torch.rand(count, 3, 1, 1, generator=generator) * 2).clamp(0, 1)


def test_an_edge_detector_that_ignores_the_model_fails_the_sanity_check():
    result = model_parameter_randomisation(SobelEdgeExplainer(make_backbone()), varied_images())
    assert result.blocks == ["features", "head"]
    for mode in ("original", "randomised"):
        assert result.ssim[mode] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert result.passes == {"original": False, "randomised": False}


def test_grad_cam_which_reads_the_backbone_is_sensitive_to_randomisation():
    explainer = CAMExplainer(make_backbone(), "gradcam", target_layer="features")
    result = model_parameter_randomisation(explainer, varied_images(), targets=["original"])
    assert result.ssim["original"][0] < 0.5 and result.passes == {"original": True}


def trained_tiny_ptame(steps: int = 15) -> PTAMEExplainer:
    """P-TAME on the tiny networks, trained for a few steps on random images."""
    torch.manual_seed(0)
    loss = PTAMELoss(ce_weight=1.5, area_weight=2.0, area_power=0.3, subset_size=2)
    module = PTAMEModule(make_backbone(), make_auxiliary(), loss, input_size=(32, 32), scheduler="none")
    optimiser = torch.optim.AdamW(module.ptame.attention.parameters(), lr=1e-2)
    images = varied_images(16)
    start = None
    for _ in range(steps):
        value = module.compute_loss(images)["loss"]
        start = float(value.detach()) if start is None else start
        optimiser.zero_grad()
        value.backward()
        optimiser.step()
    assert float(value.detach()) < start  # it did train
    return module.explainer().eval()


def test_ptame_maps_depend_on_the_backbone_only_through_the_explained_class(tmp_path):
    explainer = trained_tiny_ptame()
    images = varied_images()
    result = model_parameter_randomisation(explainer, images, seed=1)
    # explaining the original class, the maps are those of the original model at every step
    assert result.ssim["original"] == [1.0, 1.0]
    assert result.map_size == [16, 16]
    # explaining each randomised model's own prediction, a map changes exactly when the
    # randomised model predicts another class
    originals = explainer.backbone(images).argmax(1)
    changed, kept = [], []
    for step, (_, randomised) in enumerate(cumulative_randomisations(explainer, seed=1)):
        assert randomised.model.backbone is randomised.backbone is not explainer.backbone
        predictions = randomised.backbone(images).argmax(1)
        for index, ssim in enumerate(result.ssim_per_image["randomised"][step]):
            (kept if predictions[index] == originals[index] else changed).append(ssim)
    assert kept and changed
    assert min(kept) == pytest.approx(1.0) and max(changed) < 0.99
    path = plot_mprt({"ptame": result}, tmp_path / "mprt.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(json.dumps(result.as_dict()))["passes"]["original"] is False


def test_the_retrain_protocol_compares_a_head_retrained_on_each_randomised_backbone():
    explainer = trained_tiny_ptame()
    images = varied_images()
    seen = []

    def retrain(randomised):
        """A head trained afresh (here: re-initialised) on the randomised backbone."""
        seen.append(randomised.backbone)
        torch.manual_seed(len(seen))
        fresh = PTAMEModule(randomised.backbone, randomised.model.auxiliary, PTAMELoss(), input_size=(32, 32))
        return fresh.explainer()

    fixed = model_parameter_randomisation(explainer, images, seed=1)
    retrained = model_parameter_randomisation(explainer, images, seed=1, protocol="retrain", retrain=retrain)
    assert len(seen) == 2 and all(backbone is not explainer.backbone for backbone in seen)
    assert retrained.protocol == "retrain" and len(retrained.retrain_seconds) == 2
    assert fixed.protocol == "fixed_head" and fixed.retrain_seconds == []
    # the kept head gives the original maps for the original class; another head does not
    assert fixed.ssim["original"] == [1.0, 1.0]
    assert max(retrained.ssim["original"]) < 0.99
    assert retrained.prediction_agreement == fixed.prediction_agreement

    # an explainer without a trained head is compared as under fixed_head, and never retrained
    sobel = SobelEdgeExplainer(make_backbone())
    result = model_parameter_randomisation(sobel, images, protocol="retrain", retrain=retrain)
    assert len(seen) == 2 and result.ssim["randomised"] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert result.passes == {"original": False, "randomised": False}
    with pytest.raises(ValueError, match="needs a function that retrains the head of 'ptame'"):
        model_parameter_randomisation(explainer, images, protocol="retrain")
    with pytest.raises(ValueError, match="protocol must be one of"):
        model_parameter_randomisation(explainer, images, protocol="refit")


def test_maps_that_go_blank_score_the_ssim_of_an_all_zero_map_and_a_mean_of_zero():
    """SSIM calls a blank map "similar" to sparse maps: the result says how similar (blank_map_ssim)
    and how bright the maps are, so a blank explanation is told from a kept one."""
    explainer = trained_tiny_ptame()
    images = varied_images()

    class Blank(SobelEdgeExplainer):
        def explain(self, images, targets):
            return torch.zeros(images.shape[0], *images.shape[-2:])

    def retrain(randomised):
        blank = Blank(randomised.backbone)
        blank.low_resolution_maps = lambda images, targets: torch.zeros(images.shape[0], 16, 16)
        return blank

    result = model_parameter_randomisation(explainer, images, seed=1, protocol="retrain", retrain=retrain)
    reference = explanation_maps(explainer, images, explainer.backbone(images).argmax(1))
    assert result.blank_map_ssim == pytest.approx(float(map_ssim(torch.zeros_like(reference), reference).mean()))
    assert result.reference_map_mean == pytest.approx(float(reference.mean()))
    for mode in ("original", "randomised"):
        assert result.ssim[mode] == pytest.approx([result.blank_map_ssim] * 2, abs=1e-6)
        assert result.map_mean[mode] == [0.0, 0.0]
    assert "an all-zero map scores SSIM" in format_mprt({"ptame": result})
