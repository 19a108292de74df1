"""Tests of the small generated-shapes classifiers (ptame.generated_models)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import ptame.data.generated_classifiers as gm
from ptame.data.generated import GeneratedShapesSpec, load_or_generate
from ptame.data.generated_classifiers import (
    apply_masking_augmentation,
    channel_statistics,
    generated_auxiliary,
    generated_backbone,
    model_cache_path,
    random_smooth_masks,
)
from ptame.networks.architectures import AUXILIARY_LAYERS
from ptame.networks.small import small_resnet, small_vgg
from ptame.networks import AuxiliaryFeatureExtractor, Backbone, weights_fingerprint

TINY = dict(image_size=32, num_classes=8, num_train=256, num_val=16, num_test=64, seed=2)
FAST = dict(epochs=1, batch_size=64, min_accuracy_above_chance=None)  # plumbing: near-chance models


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def backbone(cache_dir) -> Backbone:
    return generated_backbone(TINY, cache_dir, **FAST)


@pytest.fixture(scope="module")
def auxiliary(cache_dir) -> AuxiliaryFeatureExtractor:
    return generated_auxiliary(GeneratedShapesSpec(**TINY), cache_dir, **FAST)


def _no_training(*args, **kwargs):  # pragma: no cover - must not be called
    raise AssertionError("trained although the model is cached")


# ------------------------------------------------------------------------------------------
# Architectures
# ------------------------------------------------------------------------------------------


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", [64, 32, 48])
def test_architectures_output_logits(size):
    for factory in (small_vgg, small_resnet):
        model = factory(5).eval()
        with torch.no_grad():
            logits = model(torch.randn(3, 3, size, size))
        assert logits.shape == (3, 5) and bool(torch.isfinite(logits).all())


def test_architecture_sizes():
    assert 0.1e6 < _parameters(small_vgg(8)) < 0.2e6
    assert 0.25e6 < _parameters(small_resnet(8)) < 0.35e6
    assert any(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in small_vgg(8).stem)
    from torchvision.models.resnet import BasicBlock

    resnet = small_resnet(8)
    blocks = [m for m in resnet.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 4  # one per stage
    assert [b.conv2.out_channels for b in blocks] == [16, 32, 64, 128]


@pytest.mark.parametrize("factory", [small_vgg, small_resnet])
def test_feature_layers_have_strides_4_8_16(factory):
    from torchvision.models.feature_extraction import create_feature_extractor

    model = factory(8).eval()
    extractor = create_feature_extractor(model, {layer: layer for layer in tuple(AUXILIARY_LAYERS["small_resnet"])})
    with torch.no_grad():
        features = extractor(torch.rand(2, 3, 64, 64))
    assert [tuple(features[k].shape[-2:]) for k in tuple(AUXILIARY_LAYERS["small_resnet"])] == [(16, 16), (8, 8),
                                                                          (4, 4)]


# ------------------------------------------------------------------------------------------
# Augmentation and statistics
# ------------------------------------------------------------------------------------------


def test_random_smooth_masks_are_smooth_and_varied():
    masks = random_smooth_masks(64, 64, torch.Generator().manual_seed(0))
    assert masks.shape == (64, 1, 64, 64)
    assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
    kept = masks.mean(dim=(1, 2, 3))
    assert 0.05 < float(kept.min()) and float(kept.max()) < 0.95
    assert 0.3 < float(kept.mean()) < 0.7
    # mostly near 0 or 1 (sharpened), and smooth (small differences between neighbours)
    assert float(((masks < 0.1) | (masks > 0.9)).float().mean()) > 0.45
    assert float((masks[..., 1:] - masks[..., :-1]).abs().max()) < 0.5
    again = random_smooth_masks(64, 64, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


def test_masking_augmentation_probability():
    images = torch.rand(200, 3, 32, 32) * 0.5 + 0.5
    same = apply_masking_augmentation(images, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, images)
    out = apply_masking_augmentation(images, 0.3, torch.Generator().manual_seed(0))
    changed = (out != images).flatten(1).any(dim=1).float().mean()
    assert 0.15 < float(changed) < 0.45
    assert bool((out <= images).all())  # masks only darken (multiply by [0, 1])
    every = apply_masking_augmentation(images, 1.0, torch.Generator().manual_seed(0))
    assert bool((every != images).flatten(1).any(dim=1).all())


def test_channel_statistics():
    images = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    images[:5, 0] = 255
    images[:, 1] = 51
    mean, std = channel_statistics(images, chunk=3)
    assert mean == pytest.approx([0.5, 0.2, 0.0], abs=1e-6)
    assert std[0] == pytest.approx(0.5, abs=1e-6) and std[1] < 1e-5


# ------------------------------------------------------------------------------------------
# Backbone
# ------------------------------------------------------------------------------------------


def test_backbone_is_a_frozen_wrapper(backbone, cache_dir):
    assert isinstance(backbone, Backbone)
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not any(m.training for m in backbone.modules())
    images = torch.rand(4, 3, 32, 32)
    logits = backbone(images)
    assert logits.shape == (4, 8) and bool(torch.isfinite(logits).all())
    assert torch.equal(backbone(images), logits)  # eval mode: batch-independent and stable
    assert torch.allclose(backbone(images[:1]), logits[:1], atol=1e-5)


def test_backbone_identity_config_and_metadata(backbone, cache_dir):
    metadata = backbone.training_metadata
    key = metadata["key"]
    assert backbone.name == f"generated:small_vgg:{key}"
    config = backbone.config
    assert config["_target_"] == "ptame.data.generated_classifiers.generated_backbone"
    assert config["dataset"] == GeneratedShapesSpec(**TINY).to_dict()
    assert config["cache_dir"] == cache_dir and config["seed"] == TINY["seed"]
    assert config["masking_augmentation"] == 0.3 and config["epochs"] == 1
    assert all(isinstance(v, (str, int, float, dict, type(None))) for v in config.values())
    assert model_cache_path(cache_dir, "small_vgg", key).is_file()
    assert 0.0 <= metadata["test_accuracy"] <= 1.0
    assert len(metadata["mean"]) == 3 and all(0.05 < s < 0.5 for s in metadata["std"])
    assert torch.allclose(backbone.normalize.mean.flatten(), torch.tensor(metadata["mean"]))
    splits = load_or_generate(GeneratedShapesSpec(**TINY), cache_dir)
    mean, std = channel_statistics(splits.train.images)
    assert metadata["mean"] == mean and metadata["std"] == std


def test_second_call_loads_identical_weights_from_cache(backbone, cache_dir, monkeypatch):
    monkeypatch.setattr(gm, "train_classifier", _no_training)
    monkeypatch.setattr(gm, "load_or_generate", _no_training)
    start = time.perf_counter()
    again = generated_backbone(GeneratedShapesSpec(**TINY), cache_dir, **FAST)
    assert time.perf_counter() - start < 1.0
    assert again.identity() == backbone.identity()
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(again(images), backbone(images))


def test_config_rebuilds_the_same_backbone(backbone, monkeypatch):
    from hydra.utils import instantiate

    monkeypatch.setattr(gm, "train_classifier", _no_training)
    rebuilt = instantiate(backbone.config)
    assert isinstance(rebuilt, Backbone) and rebuilt.identity() == backbone.identity()


def test_dictconfig_dataset_is_accepted(backbone, cache_dir, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setattr(gm, "train_classifier", _no_training)
    again = generated_backbone(OmegaConf.create(TINY), cache_dir, **FAST, seed=TINY["seed"])
    assert again.identity() == backbone.identity()


def test_training_is_seeded(backbone, tmp_path):
    fresh = generated_backbone(TINY, str(tmp_path), **FAST)  # retrained in an empty cache
    assert weights_fingerprint(fresh.model) == weights_fingerprint(backbone.model)
    other = generated_backbone(TINY, str(tmp_path), **FAST, seed=TINY["seed"] + 1)
    assert other.name != backbone.name
    assert weights_fingerprint(other.model) != weights_fingerprint(backbone.model)


def test_training_does_not_touch_the_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generated_backbone({**TINY, "num_train": 64}, str(tmp_path), epochs=1, batch_size=64,
                       min_accuracy_above_chance=None)
    assert torch.equal(torch.rand(3), expected)


def test_cache_key_covers_training_parameters(backbone, cache_dir):
    base = gm._training_params("small_vgg", 1, 1e-2, 64, 5e-4, 0.3, 2)
    spec = GeneratedShapesSpec(**TINY)
    assert gm.model_cache_key(spec, base) == backbone.training_metadata["key"]
    keys = {gm.model_cache_key(spec, {**base, name: value}) for name, value in
            dict(epochs=2, lr=1e-3, batch_size=32, weight_decay=0.0, masking_augmentation=0.0,
                 seed=3, architecture="small_resnet").items()}
    keys.add(gm.model_cache_key(GeneratedShapesSpec(**{**TINY, "seed": 9}), base))
    assert len(keys) == 8 and gm.model_cache_key(spec, base) not in keys


@pytest.mark.parametrize("corruption", [b"garbage", None])
def test_corrupt_model_cache_is_retrained(backbone, tmp_path, corruption):
    path = model_cache_path(tmp_path, "small_vgg", backbone.training_metadata["key"])
    path.parent.mkdir(parents=True)
    if corruption is None:  # a valid torch file holding something else
        torch.save({"state_dict": {}, "metadata": {"key": "other"}}, path)
    else:
        path.write_bytes(corruption)
    with pytest.warns(RuntimeWarning, match="retraining"):
        rebuilt = generated_backbone(TINY, str(tmp_path), **FAST)
    assert rebuilt.identity() == backbone.identity()
    loaded = torch.load(path, weights_only=True)
    assert loaded["metadata"]["key"] == backbone.training_metadata["key"]


@pytest.mark.parametrize(
    "bad",
    [dict(architecture="resnet18"), dict(epochs=0), dict(lr=0.0), dict(batch_size=0),
     dict(masking_augmentation=1.5), dict(weight_decay=-1.0), dict(epochs=1.5)],
)
def test_bad_training_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        generated_backbone(TINY, str(tmp_path), **{**FAST, **bad})


def test_batch_larger_than_train_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        generated_backbone({**TINY, "num_train": 32}, str(tmp_path), epochs=1, batch_size=64)


def test_small_classifier_learns_two_classes(tmp_path):
    """Circles vs squares, large objects at 32 px: well above chance in a few seconds."""
    spec = dict(image_size=32, num_classes=2, num_train=2048, num_val=0, num_test=200, seed=1,
                min_radius=0.2, max_radius=0.3)
    net = generated_backbone(spec, str(tmp_path), epochs=5, batch_size=64, lr=3e-3)
    assert net.training_metadata["test_accuracy"] >= 0.8
    assert net.training_metadata["train_loss"] < 0.5


# ------------------------------------------------------------------------------------------
# Auxiliary
# ------------------------------------------------------------------------------------------


def test_auxiliary_returns_three_levels(auxiliary):
    assert isinstance(auxiliary, AuxiliaryFeatureExtractor)
    assert auxiliary.layers == list(tuple(AUXILIARY_LAYERS["small_resnet"]))
    for size in (32, 64):
        features = auxiliary(torch.rand(2, 3, size, size))
        assert [tuple(f.shape) for f in features] == [
            (2, 32, size // 4, size // 4), (2, 64, size // 8, size // 8),
            (2, 128, size // 16, size // 16)]


def test_auxiliary_is_frozen_and_cached(auxiliary, cache_dir, monkeypatch):
    assert not any(p.requires_grad for p in auxiliary.parameters())
    auxiliary.train(True)
    assert not any(m.training for m in auxiliary.modules())
    key = auxiliary.training_metadata["key"]
    assert auxiliary.name == f"generated:small_resnet:{key}"
    assert auxiliary.config["_target_"] == "ptame.data.generated_classifiers.generated_auxiliary"
    assert auxiliary.config["layers"] == list(tuple(AUXILIARY_LAYERS["small_resnet"]))
    assert auxiliary.config["masking_augmentation"] == 0.0
    monkeypatch.setattr(gm, "train_classifier", _no_training)
    start = time.perf_counter()
    again = generated_auxiliary(TINY, cache_dir, **FAST)
    assert time.perf_counter() - start < 1.0
    assert again.identity() == auxiliary.identity()
    images = torch.rand(2, 3, 32, 32)
    for a, b in zip(again(images), auxiliary(images)):
        assert torch.equal(a, b)


def test_auxiliary_custom_layers_and_vgg(cache_dir):
    vgg = generated_auxiliary(TINY, cache_dir, architecture="small_vgg",
                              layers=["layer1", "layer4"], **FAST)
    features = vgg(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in features] == [(32, 32, 32), (128, 4, 4)]
    with pytest.raises(ValueError):
        generated_auxiliary(TINY, cache_dir, layers=["no_such_layer"], **FAST)


# ------------------------------------------------------------------------------------------
# Full-size training (minutes)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_classifiers_reach_high_accuracy(tmp_path):
    torch.set_num_threads(2)
    spec = GeneratedShapesSpec()
    backbone = generated_backbone(spec, str(tmp_path))
    auxiliary = generated_auxiliary(spec, str(tmp_path))
    assert backbone.training_metadata["test_accuracy"] >= 0.97
    assert auxiliary.training_metadata["test_accuracy"] >= 0.97
    splits = load_or_generate(spec, str(tmp_path))
    images = splits.test.images[:500].float() / 255
    masked = images * splits.test.masks[:500, None]
    with torch.no_grad():
        accuracy = (backbone(masked).argmax(1) == splits.test.labels[:500]).float().mean()
    assert float(accuracy) >= 0.9  # robust to masking thanks to the masking augmentation


def test_a_classifier_trained_to_near_chance_fails_loudly_naming_its_recipe(tmp_path):
    from ptame.data.generated_classifiers import UntrainedClassifierError

    with pytest.raises(UntrainedClassifierError, match=r"small_vgg trained on the generated shapes reaches "
                                                       r"\d+\.\d% test accuracy, within 10% of chance "
                                                       r"\(12\.5% for 8 classes\): its recipe \(epochs=1, "
                                                       r"lr=0\.01, batch_size=64.*Raise backbone\.epochs"):
        generated_backbone(TINY, str(tmp_path), epochs=1, batch_size=64, lr=1e-2)
    assert not list((tmp_path / "models").glob("*.pt"))  # not cached: the next run trains again


def test_two_object_images_train_both_classes_and_count_as_correct_only_with_both_on_top():
    from ptame.data.generated import SplitData
    from ptame.data.generated_classifiers import chance_accuracy, correct_predictions, training_targets

    objects = torch.tensor([[2, 0], [1, 3]])
    split = SplitData(images=torch.zeros(2, 3, 8, 8, dtype=torch.uint8), labels=objects[:, 0],
                      masks=torch.zeros(2, 8, 8, dtype=torch.bool), object_labels=objects,
                      object_masks=torch.zeros(2, 2, 8, 8, dtype=torch.bool))
    index = torch.tensor([0, 1])
    assert training_targets(split, index, 4).tolist() == [[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5]]
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0],   # top 2 = {0, 1}: object 2 missed
                           [0.0, 5.0, 1.0, 4.0]])  # top 2 = {1, 3}: both objects
    assert correct_predictions(logits, split, index).tolist() == [False, True]
    single = SplitData(images=split.images, labels=torch.tensor([0, 2]), masks=split.masks)
    assert correct_predictions(logits, single, index).tolist() == [True, False]
    assert training_targets(single, index, 4).tolist() == [0, 2]
    assert chance_accuracy(GeneratedShapesSpec(objects_per_image=2)) == pytest.approx(1 / 28)
    assert chance_accuracy(GeneratedShapesSpec()) == pytest.approx(1 / 8)


def test_a_classifier_trained_on_pairs_scores_both_objects(tmp_path):
    spec = dict(image_size=48, num_classes=3, num_train=1536, num_val=0, num_test=96, seed=2,
                objects_per_image=2, min_radius=0.15, max_radius=0.2)
    backbone = generated_backbone(spec, str(tmp_path), epochs=6, batch_size=64, lr=1e-2, masking_augmentation=0.0,
                                  min_accuracy_above_chance=None)
    accuracy = backbone.training_metadata["test_accuracy"]  # both classes in the top 2
    assert accuracy > 1 / 3 + 0.3, accuracy  # chance: 1 / (3 choose 2)
