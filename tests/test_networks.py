import pytest
import torch
import torchvision

from ptame.networks import (
    Backbone,
    Normalize,
    torchvision_auxiliary,
    torchvision_backbone,
    weights_fingerprint,
)
from ptame.networks.architectures import AUXILIARY_LAYERS

from .helpers.networks import TinyClassifier, make_auxiliary, make_backbone


def test_backbone_normalises_inside_and_returns_logits():
    torch.manual_seed(0)
    model = TinyClassifier(3).eval()
    backbone = Backbone(model, (0.2, 0.4, 0.6), (0.5, 0.25, 0.125), name="x")
    images = torch.rand(2, 3, 8, 8)
    mean = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    assert torch.allclose(backbone(images), model((images - mean) / std), atol=1e-6)


def test_frozen_networks_ignore_train_mode():
    backbone, auxiliary = make_backbone(), make_auxiliary()
    for network in (backbone, auxiliary):
        network.train()
        assert not network.training
        assert all(not m.training for m in network.modules())
        assert all(not p.requires_grad for p in network.parameters())


def test_callable_backbone_is_accepted():
    backbone = Backbone(lambda x: x.mean(dim=(2, 3)), (0, 0, 0), (1, 1, 1), name="mean-colour")
    images = torch.rand(2, 3, 4, 4)
    assert torch.allclose(backbone(images), images.mean(dim=(2, 3)))


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.rand(3, 8, 8), r"shape \(B, 3, H, W\)"),
        (torch.rand(2, 1, 8, 8), r"shape \(B, 3, H, W\)"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "float images"),
    ],
)
def test_bad_images_are_refused(images, message):
    with pytest.raises(ValueError, match=message):
        make_backbone()(images)


def test_normalize_rejects_bad_statistics():
    with pytest.raises(ValueError, match="std must be positive"):
        Normalize((0, 0, 0), (1, 0, 1))


def test_fingerprint_identifies_weights():
    assert weights_fingerprint(make_backbone(seed=0).model) == weights_fingerprint(make_backbone(seed=0).model)
    assert weights_fingerprint(make_backbone(seed=0).model) != weights_fingerprint(make_backbone(seed=1).model)


@pytest.mark.parametrize(
    "arch, size, channels, sizes",
    [
        ("resnet18", 64, [64, 128, 256, 512], [16, 8, 4, 2]),
        ("resnet50", 64, [512, 1024, 2048], [8, 4, 2]),
        ("mobilenet_v3_small", 224, [96, 96, 96, 576], [7, 7, 7, 7]),
        ("mnasnet0_5", 224, [160, 1280, 1280, 1280], [7, 7, 7, 7]),
    ],
)
def test_auxiliary_presets_give_the_papers_feature_maps(arch, size, channels, sizes):
    auxiliary = torchvision_auxiliary(arch)
    assert auxiliary.layers == AUXILIARY_LAYERS[arch]
    features = auxiliary(torch.rand(1, 3, size, size))
    assert [f.shape[1] for f in features] == channels
    assert [f.shape[-1] for f in features] == sizes


def test_torchvision_backbone_loads_a_local_checkpoint_file(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=4).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "w.pth")
    backbone = torchvision_backbone("resnet18", checkpoint_path=str(tmp_path / "w.pth"), num_classes=4)
    images = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(backbone(images), reference((images - mean) / std), atol=1e-5)
    assert backbone.name == "torchvision:resnet18:file:w.pth"
    assert backbone.config["checkpoint_path"] == str(tmp_path / "w.pth")


def test_checkpoint_for_another_architecture_is_refused_naming_the_file(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="r18.pth.*resnet50"):
        torchvision_backbone("resnet50", checkpoint_path=str(tmp_path / "r18.pth"))


def test_unknown_model_and_layer_are_refused():
    with pytest.raises(ValueError, match="unknown torchvision classification model 'resnet7'"):
        torchvision_backbone("resnet7")
    with pytest.raises(ValueError, match=r"no layer\(s\) \['layer9'\]"):
        torchvision_auxiliary("resnet18", layers=["layer2", "layer9"])
    with pytest.raises(ValueError, match="no layer preset"):
        torchvision_auxiliary("alexnet")
