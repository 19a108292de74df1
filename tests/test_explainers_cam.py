"""Grad-CAM, Grad-CAM++, Score-CAM and Ablation-CAM (pytorch-grad-cam behind the Explainer
interface): values, localisation, forward-pass counts, presets, errors, config building."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from ptame.pipelines.evaluate import build_explainer
from ptame.explainers import CAMExplainer, OptiCAMExplainer, RISEExplainer
from ptame.networks.architectures import default_cam_layer
from ptame.networks.backbone_features import tokens_to_grid
from ptame.networks.small import small_resnet, small_vgg
from ptame.metrics.cost import measure_cost
from ptame.networks import Backbone

from .helpers.networks import make_backbone
from .helpers.constructed import (
    BLUE,
    RED,
    peak_in,
    region_mask,
    two_colour_backbone,
    two_colour_image,
)

METHODS = ["gradcam", "gradcampp", "scorecam", "ablationcam"]


def evidence_map(channel: int) -> torch.Tensor:
    """The constructed model's evidence map of ``channel`` (8 x 8 indicator) upsampled
    bilinearly (half-pixel centres, as OpenCV's INTER_LINEAR) to 32 x 32."""
    grid = torch.zeros(8, 8)
    region = RED if channel == 0 else BLUE
    grid[region[0].start // 4 : region[0].stop // 4, region[1].start // 4 : region[1].stop // 4] = 1
    upsampled = F.interpolate(grid[None, None], size=(32, 32), mode="bilinear", align_corners=False)
    return upsampled[0, 0]


@pytest.mark.parametrize("method", METHODS)
def test_maps_are_in_unit_range_with_the_images_shape_device_and_dtype(method):
    backbone = make_backbone()
    images = torch.rand(3, 3, 12, 16, generator=torch.Generator().manual_seed(0))
    explainer = CAMExplainer(backbone, method, target_layer="features", batch_size=4)
    with torch.no_grad():  # metric code calls explainers like this
        maps = explainer(images)
    assert maps.shape == (3, 12, 16) and maps.dtype == torch.float32
    assert maps.device == images.device and torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    assert torch.allclose(maps.flatten(1).amax(dim=1), torch.ones(3))  # min-max per image
    assert explainer.resolution == 12 * 16  # `features` keeps the input resolution


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "ablationcam"])
def test_exact_map_on_the_constructed_model(method):
    # class 0 gets positive weight on the red-evidence channel and none (or negative weight,
    # removed by the ReLU) on the blue one: the CAM is channel 0's map, upsampled and normalised
    explainer = CAMExplainer(two_colour_backbone(), method, target_layer="features")
    maps = explainer(two_colour_image(2), torch.tensor([0, 0]))
    expected = evidence_map(0)
    assert torch.allclose(maps, expected.expand(2, -1, -1), atol=1e-5)
    maps = explainer(two_colour_image(1), torch.tensor([1]))
    assert torch.allclose(maps[0], evidence_map(1), atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_each_class_peaks_in_its_own_evidence_region(method):
    explainer = CAMExplainer(two_colour_backbone(), method, target_layer="features")
    images = two_colour_image(2)
    maps = explainer(images, torch.tensor([0, 1]))
    red, blue = region_mask(RED), region_mask(BLUE)
    assert peak_in(maps[0], RED) and peak_in(maps[1], BLUE)
    # (means over the squares include their bilinearly blurred borders)
    assert maps[0][red].mean() > 0.7 and maps[0][blue].mean() < 0.3
    assert maps[1][blue].mean() > 0.7 and maps[1][red].mean() < 0.3


def test_score_cam_weights_follow_the_masked_scores():
    # Score-CAM: softmax over channels of the class-0 logit of the image masked by each channel;
    # red kept -> 5 + 10 * 9/64, blue kept -> 5 - 10 * 4/64 (up to the library's mask edges),
    # so blue's relative weight is about exp(-2.03) = 0.13
    explainer = CAMExplainer(two_colour_backbone(), "scorecam", target_layer="features")
    maps = explainer(two_colour_image(1), torch.tensor([0]))
    assert maps[0, 10, 10] == pytest.approx(1.0)
    assert 0.05 < float(maps[0, 24, 24]) < 0.25
    assert maps[0, 0, 31] == 0  # grey background: no evidence in either channel


@pytest.mark.parametrize("method", METHODS)
def test_default_targets_are_the_predictions(method):
    backbone = make_backbone()
    images = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    explainer = CAMExplainer(backbone, method, target_layer="features")
    predictions = backbone(images).argmax(1)
    assert torch.allclose(explainer(images), explainer(images, predictions), atol=1e-6)
    other = (predictions + 1) % 5
    assert not torch.allclose(explainer(images), explainer(images, other), atol=1e-3)


@pytest.mark.parametrize(("method", "passes"), [
    ("gradcam", 1), ("gradcampp", 1), ("scorecam", 1 + 8), ("ablationcam", 2 + 8),
])
def test_forward_passes_are_counted_through_the_backbone(method, passes):
    # TinyClassifier's `features` has K = 8 channels
    explainer = CAMExplainer(make_backbone(), method, target_layer="features", batch_size=3)
    cost = measure_cost(explainer, torch.rand(2, 3, 8, 8))
    assert cost.forward_passes == passes
    assert cost.resolution == 64


def test_hooks_are_released_and_ablation_restores_the_layer():
    backbone = make_backbone()
    layer = backbone.model.features
    for method in METHODS:
        CAMExplainer(backbone, method, target_layer="features")(torch.rand(1, 3, 8, 8))
        assert backbone.model.features is layer
        assert not layer._forward_hooks and not layer._forward_pre_hooks
    assert not any(p.requires_grad for p in backbone.parameters())


def test_ablation_puts_the_layer_back_after_a_failure(monkeypatch):
    from pytorch_grad_cam.ablation_layer import AblationLayer

    def fail(*args, **kwargs):
        raise RuntimeError("ablation failed")

    monkeypatch.setattr(AblationLayer, "set_next_batch", fail)  # fails while swapped in
    backbone = make_backbone()
    layer = backbone.model.features
    with pytest.raises(RuntimeError, match="ablation failed"):
        CAMExplainer(backbone, "ablationcam", target_layer="features")(torch.rand(1, 3, 8, 8))
    assert backbone.model.features is layer and not layer._forward_hooks


def test_gradient_methods_work_under_inference_mode():
    explainer = CAMExplainer(two_colour_backbone(), "gradcam", target_layer="features")
    with torch.inference_mode():
        maps = explainer(two_colour_image(1), torch.tensor([0]))
    assert torch.allclose(maps[0], evidence_map(0), atol=1e-5)


def tiny_vit(num_classes: int = 3) -> Backbone:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=num_classes,
    )
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    return Backbone(model, (0.5,) * 3, (0.25,) * 3, name="tiny-vit")


@pytest.mark.parametrize("method", METHODS)
def test_vit_token_layer_gives_patch_grid_maps(method):
    backbone = tiny_vit()
    explainer = CAMExplainer(backbone, method, batch_size=8)
    assert explainer.target_layer == "encoder.layers.encoder_layer_1.ln_1"  # type fallback
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    seen = []
    handle = backbone.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].shape[0]))
    maps = explainer(images)
    handle.remove()
    assert maps.shape == (2, 32, 32) and maps.min() >= 0
    assert torch.equal(maps.flatten(1).amax(dim=1), torch.ones(2))  # informative, normalised
    assert explainer.resolution == 16  # 4 x 4 patches, class token dropped
    # K = 16 channels (hidden_dim)
    per_image = {"gradcam": 1, "gradcampp": 1, "scorecam": 17, "ablationcam": 18}[method]
    assert sum(seen) == 2 * per_image


def test_tokens_to_grid_drops_the_class_token():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # class token + 2 x 2
    grid = tokens_to_grid(tokens)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[1, 2], tokens[1, 1:, 2].view(2, 2))
    maps = torch.rand(2, 3, 4, 4)
    assert tokens_to_grid(maps) is maps
    assert tokens_to_grid(torch.zeros(1, 4, 3)).shape == (1, 3, 2, 2)  # no class token
    with pytest.raises(ValueError, match="square grid"):
        tokens_to_grid(torch.zeros(1, 7, 3))


def meta_backbone(arch: str, config: bool = True) -> Backbone:
    """A torchvision architecture without weights on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = torchvision.models.get_model(arch, weights=None)
    recipe = {"arch": arch} if config else None
    return Backbone(model, (0.5,) * 3, (0.25,) * 3, name=arch, config=recipe)


@pytest.mark.parametrize(("arch", "layer"), [
    ("vgg16", "features.30"),
    ("resnet50", "layer4"),
    ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1"),
])
def test_imagenet_presets_name_existing_layers(arch, layer):
    for with_config in (True, False):  # by recipe, then by network type
        backbone = meta_backbone(arch, with_config)
        assert default_cam_layer(backbone) == layer
        assert CAMExplainer(backbone, "gradcam").target_layer == layer


@pytest.mark.parametrize("architecture", ["small_vgg", "small_resnet"])
def test_generated_presets_take_the_last_stage(architecture):
    network = {"small_vgg": small_vgg, "small_resnet": small_resnet}[architecture](8)
    backbone = Backbone(network, (0.5,) * 3, (0.25,) * 3, name=architecture,
                        config={"architecture": architecture})
    explainer = CAMExplainer(backbone, "gradcam")
    assert explainer.target_layer == "layer4"
    explainer(torch.rand(1, 3, 64, 64))
    assert explainer.resolution == 4 * 4


def test_bad_configurations_fail_clearly():
    backbone = make_backbone()
    with pytest.raises(ValueError, match=r"no layer 'features\.7'.*features\.0"):
        CAMExplainer(backbone, "gradcam", target_layer="features.7")
    with pytest.raises(ValueError, match="unknown CAM method 'gradcam2'"):
        CAMExplainer(backbone, "gradcam2")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        CAMExplainer(backbone, "scorecam", target_layer="features", batch_size=0)
    with pytest.raises(ValueError, match="no target-layer preset"):
        CAMExplainer(backbone, "gradcam")  # TinyClassifier: no preset, no layer4
    plain = Backbone(lambda x: x.mean(dim=(2, 3)), (0.5,) * 3, (0.25,) * 3, name="callable")
    with pytest.raises(TypeError, match="plain callable"):
        CAMExplainer(plain, "gradcam", target_layer="features")


@pytest.mark.parametrize("architecture", ["small_vgg", "small_resnet"])
def test_evaluate_builds_every_baseline_for_the_generated_backbones(tmp_path, architecture, configs):
    cfg = configs("evaluate", [
        "experiment=smoke", f"paths.cache_dir={tmp_path}", "+explainer_options.rise.num_masks=6",
        "+explainer_options.opticam.iterations=2", "+explainer_options.scorecam.batch_size=200",
    ])
    torch.manual_seed(0)
    network = {"small_vgg": small_vgg, "small_resnet": small_resnet}[architecture](8)
    # an untrained network with the generated recipe's architecture key (no training here)
    backbone = Backbone(network, (0.5,) * 3, (0.25,) * 3, name=f"generated:{architecture}",
                        config={"architecture": architecture})
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # small: fast
    expected = {"gradcam": CAMExplainer, "gradcampp": CAMExplainer, "scorecam": CAMExplainer,
                "ablationcam": CAMExplainer, "rise": RISEExplainer, "opticam": OptiCAMExplainer}
    for name, cls in expected.items():
        explainer = build_explainer(name, cfg, backbone)
        assert isinstance(explainer, cls) and explainer.name == name
        maps = explainer(images)
        assert maps.shape == (1, 32, 32) and 0 <= maps.min() and maps.max() <= 1, name
    assert build_explainer("rise", cfg, backbone).num_masks == 6
    assert build_explainer("rise", cfg, backbone).seed == cfg.seed
    assert build_explainer("scorecam", cfg, backbone).batch_size == 200
    assert build_explainer("opticam", cfg, backbone).resolution is None  # not run yet


def test_import_ptame_does_not_load_the_baseline_libraries() -> None:
    """The baselines load on first access: `import ptame` stays free of pytorch-grad-cam and
    Lightning, and the lazy names resolve to the real classes (as Hydra's _target_ needs)."""
    import subprocess
    import sys

    code = (
        "import sys, ptame\n"
        "assert 'pytorch_grad_cam' not in sys.modules, 'pytorch_grad_cam imported eagerly'\n"
        "assert 'lightning' not in sys.modules, 'lightning imported eagerly'\n"
        "from hydra._internal.utils import _locate\n"
        "from ptame.explainers.cam import CAMExplainer\n"
        "assert _locate('ptame.explainers.CAMExplainer') is CAMExplainer\n"
        "import ptame.explainers as e\n"
        "try:\n"
        "    e.NoSuchExplainer\n"
        "except AttributeError as error:\n"
        "    assert 'NoSuchExplainer' in str(error)\n"
        "else:\n"
        "    raise AssertionError('unknown name resolved')\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_every_public_explainer_name_resolves() -> None:
    import ptame.explainers as explainers

    lazy = set(explainers._LAZY_EXPLAINERS)
    assert lazy <= set(explainers.__all__)
    for name in explainers.__all__:
        assert getattr(explainers, name).__name__ == name
