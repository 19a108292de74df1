"""T-TAME mode: P-TAME with feature maps from the backbone itself (auxiliary=from_backbone)."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from hydra.utils import instantiate

from ptame.checkpoint import CheckpointMismatchError
from ptame.pipelines.evaluate import build_explainer
from ptame.explainers import PTAMEExplainer, load_explainer, load_ttame_explainer
from ptame.networks.architectures import ttame_layers
from ptame.networks.backbone_features import backbone_auxiliary
from ptame.networks.small import small_vgg
from ptame.module import PTAMEModule
from ptame.losses import PTAMELoss
from ptame.networks import Backbone

from .helpers.networks import make_auxiliary, make_backbone
from .helpers.configs import compose_config
from .helpers.entry_points import failure_output, run_entry_point
from .test_module import fit

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def tiny_vgg_backbone(seed: int = 0, num_classes: int = 4,
                      architecture: str = "small_vgg") -> Backbone:
    """An untrained generated-style small_vgg with a rebuild recipe (a Hydra target)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = small_vgg(num_classes)
    config = {"_target_": f"{__name__}.tiny_vgg_backbone", "seed": seed,
              "num_classes": num_classes, "architecture": architecture}
    return Backbone(network, MEAN, STD, name=f"tiny-small-vgg:{seed}", config=config)


def test_auxiliary_features_are_the_backbones_own_layers():
    backbone = tiny_vgg_backbone()
    auxiliary = backbone_auxiliary(backbone)
    assert auxiliary.layers == ["layer2", "layer3", "layer4"]  # the small_vgg preset
    assert auxiliary.name == "backbone-features:tiny-small-vgg:0"
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    captured = {}
    hooks = [
        getattr(backbone.model, name).register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name in auxiliary.layers
    ]
    with torch.no_grad():
        backbone(images)  # normalised inside with the backbone's statistics
        features = auxiliary(images)
    for hook in hooks:
        hook.remove()
    assert [tuple(f.shape) for f in features] == [(2, 64, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    for name, feature in zip(auxiliary.layers, features):
        assert torch.equal(feature, captured[name])
    # the same parameters, not a copy
    shared = auxiliary.model.get_submodule("layer2.1").weight
    assert shared.data_ptr() == backbone.model.layer2[1].weight.data_ptr()
    rebuilt = instantiate(auxiliary.config)  # the recipe stored in checkpoints
    assert rebuilt.identity() == auxiliary.identity()


@pytest.mark.parametrize(("arch", "layers"), [
    ("resnet50", ["layer2", "layer3", "layer4"]),
    ("vgg16", ["features.16", "features.23", "features.30"]),
])
def test_imagenet_presets_follow_ttame(arch, layers):
    with torch.device("meta"):  # the architecture only: no memory, no compute
        network = torchvision.models.get_model(arch, weights=None)
    backbone = Backbone(network, MEAN, STD, name=arch, config={"arch": arch})
    assert ttame_layers(backbone) == layers
    assert backbone_auxiliary(backbone).layers == layers


def test_unnameable_or_unknown_layers_fail_clearly():
    plain = Backbone(lambda x: x.mean(dim=(2, 3)), MEAN, STD, name="callable")
    with pytest.raises(TypeError, match="plain callable"):
        backbone_auxiliary(plain)
    flat = Backbone(torch.nn.Flatten(), MEAN, STD, name="flat")
    with pytest.raises(TypeError, match="'flat' \\(Flatten\\) has no sub-layers"):
        backbone_auxiliary(flat)
    with pytest.raises(ValueError, match=r"no layer\(s\) \['layer9'\]"):
        backbone_auxiliary(tiny_vgg_backbone(), ["layer2", "layer9"])
    with pytest.raises(ValueError, match="no feature-layer preset"):
        backbone_auxiliary(make_backbone())  # TinyClassifier: give layers explicitly
    assert backbone_auxiliary(make_backbone(), ["features.2"]).layers == ["features.2"]


@pytest.fixture(scope="module")
def ttame_checkpoint(tmp_path_factory):
    """A few training steps of T-TAME on random images; (checkpoint path, maps, images)."""
    tmp_path = tmp_path_factory.mktemp("ttame")
    backbone = tiny_vgg_backbone()
    module = PTAMEModule(backbone, backbone_auxiliary(backbone),
                         PTAMELoss(ce_weight=1.0, area_weight=1.0, variation_weight=0.1,
                                   class_subset="random", subset_size=2),
                         lr=1e-2, input_size=(20, 20))
    trainer = fit(module, tmp_path)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    images = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(4))
    module.eval()
    with torch.no_grad():
        maps = module.explainer()(images)
    return path, maps, images


def test_checkpoint_round_trip_gives_identical_maps(ttame_checkpoint):
    path, maps, images = ttame_checkpoint
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert all(k.startswith("ptame.attention.") for k in checkpoint["state_dict"])
    assert checkpoint["ptame"]["auxiliary"]["layers"] == ["layer2", "layer3", "layer4"]
    explainer = load_ttame_explainer(path, tiny_vgg_backbone())  # fresh backbone, same weights
    assert isinstance(explainer, PTAMEExplainer) and explainer.name == "ttame"
    assert explainer.resolution == 5 * 5  # layer2 of small_vgg at 20 px
    assert torch.equal(explainer(images), maps)
    assert not torch.equal(maps[0], maps[1])
    # the generic loader rebuilds the auxiliary from the recipe stored in the checkpoint
    assert torch.equal(load_explainer(path, tiny_vgg_backbone())(images), maps)


def test_checkpoint_refuses_other_weights_and_non_ttame_runs(ttame_checkpoint, tmp_path):
    path, _, _ = ttame_checkpoint
    with pytest.raises(CheckpointMismatchError, match="tiny-small-vgg:1"):
        load_ttame_explainer(path, tiny_vgg_backbone(seed=1))
    with pytest.raises(ValueError, match="needs a T-TAME checkpoint: ttame_ckpt_path"):
        load_ttame_explainer(None, tiny_vgg_backbone())
    module = PTAMEModule(make_backbone(), make_auxiliary(), PTAMELoss(), input_size=(20, 20))
    trainer = fit(module, tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "ptame.ckpt")
    with pytest.raises(ValueError, match="not trained in T-TAME mode"):
        load_ttame_explainer(tmp_path / "ptame.ckpt", make_backbone())


def test_evaluate_builds_ttame_from_its_config(ttame_checkpoint, tmp_path, configs):
    path, maps, images = ttame_checkpoint
    cfg = configs("evaluate", ["experiment=smoke", f"paths.cache_dir={tmp_path}",
                               f"ttame_ckpt_path={path}"])
    explainer = build_explainer("ttame", cfg, tiny_vgg_backbone())
    assert explainer.name == "ttame" and explainer.map_normalisation == cfg.model.map_normalisation
    assert torch.equal(explainer(images), maps)
    cfg = configs("evaluate", ["experiment=smoke", f"paths.cache_dir={tmp_path}"])
    with pytest.raises(ValueError, match="needs a T-TAME checkpoint"):
        build_explainer("ttame", cfg, tiny_vgg_backbone())


def test_table2_ttame_preset_is_the_resnet50_run_with_the_backbones_features():
    ttame = compose_config("train", ["experiment=table2_ttame_resnet50", "backbone.weights=null"])
    release = compose_config("train", ["experiment=table2_resnet50"])
    for key in ("loss", "model", "data", "trainer", "callbacks"):
        assert ttame[key] == release[key], key
    assert ttame.backbone.arch == "resnet50"
    assert ttame.auxiliary._target_ == "ptame.networks.backbone_auxiliary"
    assert list(ttame.auxiliary.layers) == ["layer2", "layer3", "layer4"]
    torch.manual_seed(0)
    backbone = instantiate(ttame.backbone)
    # the backbone instance itself (random init here: a second instance would differ)
    auxiliary = instantiate(ttame.auxiliary, backbone=backbone)
    module = instantiate(ttame.model, backbone=backbone, auxiliary=auxiliary,
                         loss=instantiate(ttame.loss))
    assert module.ptame.resolution == 28 * 28  # Table 2: R = 784
    assert module.ptame.feature_channels == [512, 1024, 2048]
    assert auxiliary.name == f"backbone-features:{backbone.name}"
    shared = auxiliary.model.get_submodule("layer4.2.conv3").weight
    assert shared is backbone.model.layer4[2].conv3.weight


@pytest.mark.slow
def test_smoke_training_in_ttame_mode(tmp_path):
    """train.py smoke with auxiliary=from_backbone (trains the generated backbone when cold)."""
    cache = os.environ.get("PTAME_CACHE_DIR", str(tmp_path / "cache"))
    # `~auxiliary.epochs`: the smoke preset sets the generated auxiliary's training epochs
    result = run_entry_point("train.py", "experiment=smoke", "auxiliary=from_backbone",
                             "~auxiliary.epochs", f"paths.cache_dir={cache}",
                             f"hydra.run.dir={tmp_path / 'run'}", timeout=900)
    assert result.returncode == 0, failure_output(result)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    auxiliary = checkpoint["ptame"]["auxiliary"]
    assert auxiliary["name"].startswith("backbone-features:generated:small_vgg")
    assert auxiliary["layers"] == ["layer2", "layer3", "layer4"]
    assert checkpoint["ptame"]["map_size"] == [16, 16]  # layer2 of small_vgg at 64 px
