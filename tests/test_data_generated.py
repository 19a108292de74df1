"""Tests of the procedurally generated shapes dataset (ptame.data.generated)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ptame.data.generated import (
    CLASS_NAMES,
    GENERATOR_VERSION,
    GeneratedShapesDataModule,
    GeneratedShapesDataset,
    GeneratedShapesSpec,
    cache_path,
    generate,
    generate_split,
    load_or_generate,
)

TINY = dict(image_size=32, num_classes=8, num_train=160, num_val=48, num_test=48, seed=3)


@pytest.fixture(scope="module")
def tiny_spec() -> GeneratedShapesSpec:
    return GeneratedShapesSpec(**TINY)


@pytest.fixture(scope="module")
def tiny_splits(tiny_spec):
    return generate(tiny_spec)


@pytest.fixture(scope="module")
def medium_train():
    """400 images at 64 px (the default size), train split only."""
    spec = GeneratedShapesSpec(num_train=400, num_val=0, num_test=0, seed=11)
    return spec, generate_split(spec, "train")


# ------------------------------------------------------------------------------------------
# Spec
# ------------------------------------------------------------------------------------------


def test_spec_defaults_and_class_names():
    spec = GeneratedShapesSpec()
    assert (spec.image_size, spec.num_classes, spec.num_train, spec.num_val, spec.num_test) == (
        64, 8, 8000, 1000, 1000)
    assert spec.rotation_degrees == 10.0
    assert CLASS_NAMES == ("circle", "square", "triangle", "plus", "ring", "star", "diamond",
                           "crescent")


def test_spec_to_dict_round_trip_and_primitives():
    spec = GeneratedShapesSpec(seed=5, image_size=48)
    data = spec.to_dict()
    assert all(isinstance(v, (int, float, str, bool)) for v in data.values())
    assert GeneratedShapesSpec(**data) == spec
    assert GeneratedShapesSpec.from_config(data) == spec
    assert GeneratedShapesSpec.from_config(spec) is spec


def test_cache_key_is_stable_and_depends_on_every_field():
    spec = GeneratedShapesSpec()
    assert spec.cache_key() == GeneratedShapesSpec().cache_key()
    assert len(spec.cache_key()) == 12 and int(spec.cache_key(), 16) >= 0
    changes = dict(image_size=48, num_classes=4, num_train=10, num_val=10, num_test=10, seed=1,
                   rotation_degrees=5.0, min_radius=0.1, max_radius=0.2, min_contrast=0.3,
                   num_lines=1, num_blobs=1, noise_std=0.01, objects_per_image=2)
    assert set(changes) == {f.name for f in dataclasses.fields(spec)}, "test must cover every spec field"
    keys = {dataclasses.replace(spec, **{name: value}).cache_key()
            for name, value in changes.items()}
    assert len(keys) == len(changes) and spec.cache_key() not in keys


def test_cache_key_depends_on_generator_version(monkeypatch):
    import ptame.data.generated as generated

    before = GeneratedShapesSpec().cache_key()
    monkeypatch.setattr(generated, "GENERATOR_VERSION", GENERATOR_VERSION + 1)
    assert GeneratedShapesSpec().cache_key() != before


@pytest.mark.parametrize(
    "bad",
    [dict(image_size=16), dict(image_size=31), dict(num_classes=1), dict(num_classes=9),
     dict(num_train=-1), dict(num_val=-5), dict(num_test=-1), dict(rotation_degrees=-1.0),
     dict(min_radius=0.3, max_radius=0.2), dict(max_radius=0.6), dict(image_size=64.0),
     dict(noise_std=-0.1), dict(num_lines=-1)],
)
def test_spec_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        GeneratedShapesSpec(**bad)


def test_from_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown"):
        GeneratedShapesSpec.from_config({"image_size": 64, "colour": "red"})


# ------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------


def test_split_shapes_and_dtypes(tiny_spec, tiny_splits):
    s = tiny_spec.image_size
    for name in ("train", "val", "test"):
        data = tiny_splits[name]
        n = tiny_spec.split_size(name)
        assert data.images.shape == (n, 3, s, s) and data.images.dtype == torch.uint8
        assert data.labels.shape == (n,) and data.labels.dtype == torch.int64
        assert data.masks.shape == (n, s, s) and data.masks.dtype == torch.bool
        assert int(data.labels.min()) >= 0 and int(data.labels.max()) < tiny_spec.num_classes


def test_generation_is_deterministic(tiny_spec, tiny_splits):
    again = generate(GeneratedShapesSpec(**TINY))
    for name in ("train", "val", "test"):
        assert torch.equal(again[name].images, tiny_splits[name].images)
        assert torch.equal(again[name].labels, tiny_splits[name].labels)
        assert torch.equal(again[name].masks, tiny_splits[name].masks)


def test_different_seeds_and_splits_give_different_images(tiny_splits):
    other = generate_split(GeneratedShapesSpec(**{**TINY, "seed": 4}), "train")
    train = tiny_splits.train
    assert (other.images.float() - train.images.float()).abs().mean() > 20
    assert not torch.equal(other.masks, train.masks)
    # val and test are independent draws, not copies of train's first images
    n = tiny_splits.val.images.shape[0]
    assert (tiny_splits.val.images[:n].float() - train.images[:n].float()).abs().mean() > 20
    assert (tiny_splits.val.images.float() - tiny_splits.test.images.float()).abs().mean() > 20


def test_labels_are_balanced(medium_train, tiny_splits):
    spec, train = medium_train
    counts = torch.bincount(train.labels, minlength=8)
    assert counts.tolist() == [50] * 8
    tiny_counts = torch.bincount(tiny_splits.val.labels, minlength=8)
    assert tiny_counts.tolist() == [6] * 8
    # shuffled, not sorted or periodic
    assert not torch.equal(train.labels, torch.arange(400) % 8)


def test_num_classes_restricts_labels():
    data = generate_split(GeneratedShapesSpec(**{**TINY, "num_classes": 3}), "train")
    assert sorted(torch.unique(data.labels).tolist()) == [0, 1, 2]
    assert torch.bincount(data.labels).max() - torch.bincount(data.labels).min() <= 1


def test_masks_have_plausible_area_and_stay_inside(medium_train):
    spec, train = medium_train
    area = train.masks.float().mean(dim=(1, 2))
    assert bool((area > 0).all())
    # radius 12-24 % of the side: the area of a unit-radius shape is about 1.3 to 3.1 r^2
    assert 0.004 < float(area.min()) and float(area.max()) < 0.25
    assert 0.04 < float(area.mean()) < 0.11
    # fully inside the image: nothing on the one-pixel border
    border = train.masks.clone()
    border[:, 1:-1, 1:-1] = False
    assert not bool(border.any())


def test_mask_holds_exactly_the_object_pixels(medium_train):
    """Object pixels share one colour (up to the bounded pixel noise); the pixels just outside
    the mask mostly do not, and the object contrasts with the background around it."""
    spec, train = medium_train
    images = train.images.float() / 255.0  # (N, 3, H, W)
    masks = train.masks
    tolerance = 2 * spec.noise_std * math.sqrt(3) + 2 / 255  # uniform noise is bounded
    ring = F.max_pool2d(masks[:, None].float(), 3, stride=1, padding=1)[:, 0].bool() & ~masks
    close_outside, contrast = [], []
    for image, mask, around in zip(images, masks, ring):
        inside = image[:, mask]  # (3, n_object)
        colour = inside.median(dim=1).values
        assert float((inside - colour[:, None]).abs().max()) <= tolerance
        outside = image[:, around]
        close = ((outside - colour[:, None]).abs() <= tolerance).all(dim=0)
        close_outside.append(close.float().mean())
        contrast.append((outside.mean(dim=1) - colour).norm())
    assert float(torch.stack(close_outside).mean()) < 0.05
    contrast_t = torch.stack(contrast)
    assert float((contrast_t > 0.2).float().mean()) > 0.95


def test_shape_classes_differ_geometrically(medium_train):
    """Rings have a hole (background at the centre of the mask's bounding box); circles do not."""
    spec, train = medium_train
    for label, name in ((0, "circle"), (4, "ring")):
        masks = train.masks[train.labels == label]
        centre_inside = []
        for mask in masks:
            ys, xs = torch.nonzero(mask, as_tuple=True)
            cy, cx = int(ys.float().mean().round()), int(xs.float().mean().round())
            centre_inside.append(bool(mask[cy, cx]))
        fraction = sum(centre_inside) / len(centre_inside)
        assert fraction == (1.0 if name == "circle" else 0.0), name


def test_images_use_the_full_range_and_have_clutter(medium_train):
    spec, train = medium_train
    images = train.images.float() / 255
    background = images.masked_fill(train.masks[:, None], float("nan"))
    per_image_std = torch.stack([b[~torch.isnan(b)].std() for b in background])
    assert float(per_image_std.min()) > 0.03  # not flat backgrounds
    assert int(train.images.min()) < 20 and int(train.images.max()) > 235


# ------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------


def test_load_or_generate_caches_and_round_trips(tmp_path, tiny_spec, tiny_splits):
    first = load_or_generate(tiny_spec, tmp_path)
    path = tmp_path / "generated" / f"shapes-{tiny_spec.cache_key()}.pt"
    assert path.is_file() and cache_path(tiny_spec, tmp_path) == path
    leftovers = [p for p in path.parent.iterdir() if p != path and p.suffix != ".lock"]
    assert not leftovers, "no temporary files left"
    second = load_or_generate(tiny_spec, str(tmp_path))
    for name in ("train", "val", "test"):
        assert torch.equal(first[name].images, tiny_splits[name].images)
        assert torch.equal(second[name].images, first[name].images)
        assert torch.equal(second[name].labels, first[name].labels)
        assert torch.equal(second[name].masks, first[name].masks)


def test_load_or_generate_uses_the_cache(tmp_path, tiny_spec, monkeypatch):
    load_or_generate(tiny_spec, tmp_path)
    import ptame.data.generated as generated

    def fail(spec):  # pragma: no cover - must not be called
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(generated, "generate", fail)
    assert len(load_or_generate(tiny_spec, tmp_path).train) == tiny_spec.num_train


@pytest.mark.parametrize("corruption", [b"not a torch file", b""])
def test_corrupt_cache_is_regenerated_with_a_warning(tmp_path, tiny_spec, tiny_splits,
                                                     corruption):
    path = cache_path(tiny_spec, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(corruption)
    with pytest.warns(RuntimeWarning, match="regenerating"):
        splits = load_or_generate(tiny_spec, tmp_path)
    assert torch.equal(splits.train.images, tiny_splits.train.images)
    reloaded = load_or_generate(tiny_spec, tmp_path)  # the file was rewritten
    assert torch.equal(reloaded.test.masks, tiny_splits.test.masks)


def test_cache_holding_another_payload_is_regenerated(tmp_path, tiny_spec, tiny_splits):
    path = cache_path(tiny_spec, tmp_path)
    path.parent.mkdir(parents=True)
    torch.save({"spec": {"image_size": 1}}, path)
    with pytest.warns(RuntimeWarning):
        splits = load_or_generate(tiny_spec, tmp_path)
    assert torch.equal(splits.val.labels, tiny_splits.val.labels)


# ------------------------------------------------------------------------------------------
# Dataset and data module
# ------------------------------------------------------------------------------------------


def test_dataset_items(tiny_splits):
    dataset = GeneratedShapesDataset(tiny_splits.train)
    assert len(dataset) == TINY["num_train"]
    item = dataset[7]
    assert set(item) == {"image", "label", "mask", "index"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert torch.allclose(item["image"] * 255, tiny_splits.train.images[7].float())
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert int(item["label"]) == int(tiny_splits.train.labels[7])
    assert item["mask"].dtype == torch.bool and torch.equal(item["mask"],
                                                           tiny_splits.train.masks[7])
    assert item["index"].dtype == torch.int64 and int(item["index"]) == 7
    assert int(dataset[-1]["index"]) == len(dataset) - 1
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def _datamodule(tmp_path: Path, **overrides) -> GeneratedShapesDataModule:
    args = dict(TINY, batch_size=32, eval_batch_size=20)
    args.update(overrides)
    return GeneratedShapesDataModule(cache_dir=str(tmp_path), **args)


def test_datamodule_attributes_and_batches(tmp_path, tiny_spec):
    dm = _datamodule(tmp_path, rotation_degrees=10.0)
    assert dm.spec == tiny_spec
    assert dm.num_classes == 8 and dm.class_names == CLASS_NAMES and dm.image_size == 32
    assert dm.has_masks is True
    dm.prepare_data()
    dm.setup("fit")
    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == TINY["num_train"] // 32  # drop_last
    batch = train_batches[0]
    assert batch["image"].shape == (32, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == torch.int64
    assert batch["mask"].shape == (32, 32, 32) and batch["mask"].dtype == torch.bool
    assert batch["index"].shape == (32,)
    seen = torch.cat([b["index"] for b in train_batches])
    assert len(torch.unique(seen)) == len(seen) and not torch.equal(seen, torch.arange(len(seen)))
    val = list(dm.val_dataloader())
    assert [len(b["label"]) for b in val] == [20, 20, 8]
    assert torch.equal(torch.cat([b["index"] for b in val]), torch.arange(48))
    test = next(iter(dm.test_dataloader()))
    assert torch.equal(test["mask"], dm.splits.test.masks[:20])


def test_datamodule_train_order_is_seeded(tmp_path):
    first = _datamodule(tmp_path)
    second = _datamodule(tmp_path)
    order1 = torch.cat([b["index"] for b in first.train_dataloader()])
    order2 = torch.cat([b["index"] for b in second.train_dataloader()])
    assert torch.equal(order1, order2)
    third = _datamodule(tmp_path, num_classes=4)
    assert third.class_names == CLASS_NAMES[:4]
    assert int(torch.cat([b["label"] for b in third.val_dataloader()]).max()) == 3


@pytest.mark.parametrize(
    "bad",
    [dict(image_size=16), dict(num_classes=9), dict(num_classes=1), dict(num_train=-1),
     dict(batch_size=0), dict(eval_batch_size=0), dict(num_workers=-1),
     dict(batch_size=1000), dict(colour="red")],
)
def test_datamodule_rejects_bad_config(tmp_path, bad):
    with pytest.raises(ValueError):
        _datamodule(tmp_path, **bad)


def test_concurrent_builders_generate_the_cache_once(tmp_path, monkeypatch):
    """Two processes (here threads) asking for the same dataset at once: one generates, the
    other waits for the lock and loads the cached file."""
    import threading
    import time

    from ptame.data import generated as module

    calls = []
    real_generate = module.generate

    def slow_generate(spec):
        calls.append(spec)
        time.sleep(0.5)
        return real_generate(spec)

    monkeypatch.setattr(module, "generate", slow_generate)
    spec = module.GeneratedShapesSpec(image_size=32, num_classes=2, num_train=8, num_val=4, num_test=4, seed=5)
    results = []
    threads = [threading.Thread(target=lambda: results.append(module.load_or_generate(spec, tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert torch.equal(results[0]["train"].images, results[1]["train"].images)


# ------------------------------------------------------------------------------------------
# Two-object test images (data=generated_pairs)
# ------------------------------------------------------------------------------------------


# the cache key of the default spec before objects_per_image existed (GENERATOR_VERSION 2): datasets,
# classifiers and checkpoints of one-object runs keep their keys
ONE_OBJECT_DEFAULT_KEY = "4a748577810b"


def test_one_object_specs_keep_their_cache_keys():
    spec = GeneratedShapesSpec()
    assert spec.cache_key() == ONE_OBJECT_DEFAULT_KEY
    assert "objects_per_image" not in spec.to_dict()
    pairs = GeneratedShapesSpec(objects_per_image=2)
    assert pairs.to_dict()["objects_per_image"] == 2 and pairs.cache_key() != spec.cache_key()
    assert dataclasses.replace(pairs, objects_per_image=1) == spec
    with pytest.raises(ValueError, match="objects_per_image must be one of"):
        GeneratedShapesSpec(objects_per_image=3)


@pytest.fixture(scope="module")
def pair_splits():
    spec = GeneratedShapesSpec(num_train=64, num_val=16, num_test=200, seed=4, objects_per_image=2)
    return spec, generate(spec)


def test_pairs_hold_two_disjoint_objects_of_different_classes(pair_splits):
    spec, splits = pair_splits
    test = splits.test
    assert test.object_labels.shape == (200, 2) and test.object_masks.shape == (200, 2, 64, 64)
    assert (test.object_labels[:, 0] != test.object_labels[:, 1]).all()
    assert torch.equal(test.labels, test.object_labels[:, 0])
    assert torch.equal(test.masks, test.object_masks.any(dim=1))
    assert not (test.object_masks[:, 0] & test.object_masks[:, 1]).any()
    areas = test.object_masks.sum(dim=(2, 3))
    assert areas.min() >= 40  # each object is really there (radius >= 0.12 x 64 px)
    # the objects do not touch: no pixel of one is next to a pixel of the other
    grown = F.max_pool2d(test.object_masks[:, 0, None].float(), 3, stride=1, padding=1)[:, 0] > 0
    assert not (grown & test.object_masks[:, 1]).any()
    # each object is painted in one colour: its pixels vary only by the pixel noise
    images = test.images.float() / 255
    for image, masks in zip(images[:20], test.object_masks[:20], strict=True):
        for mask in masks:
            assert image[:, mask].std(dim=1).max() < 0.05  # noise_std 0.03
    first_classes = torch.bincount(test.object_labels[:, 0], minlength=8)
    assert first_classes.max() - first_classes.min() <= 1  # balanced like the one-object split


def test_every_split_of_a_pair_dataset_holds_pairs(pair_splits):
    spec, splits = pair_splits
    for split in ("train", "val", "test"):
        data = splits[split]
        assert data.object_labels.shape == (spec.split_size(split), 2)
        assert (data.object_labels[:, 0] != data.object_labels[:, 1]).all()
        assert torch.equal(data.masks, data.object_masks.any(dim=1))
    assert not torch.equal(splits.train.images[:8], generate_split(dataclasses.replace(spec, objects_per_image=1),
                                                                   "train").images[:8])


def test_pair_items_carry_their_objects_and_round_trip_the_cache(tmp_path, pair_splits):
    spec, splits = pair_splits
    loaded = load_or_generate(spec, tmp_path)
    assert torch.equal(loaded.test.object_masks, splits.test.object_masks)
    assert torch.equal(loaded.test.object_labels, splits.test.object_labels)
    item = GeneratedShapesDataset(loaded.test)[7]
    assert item["object_labels"].tolist() == splits.test.object_labels[7].tolist()
    assert torch.equal(item["object_masks"], splits.test.object_masks[7])
    assert GeneratedShapesDataset(loaded.train)[0]["object_masks"].shape == (2, 64, 64)
    one_object = GeneratedShapesSpec(num_train=16, num_val=0, num_test=0)
    assert "object_labels" not in GeneratedShapesDataset(generate_split(one_object, "train"))[0]
    module = GeneratedShapesDataModule(str(tmp_path), num_train=64, num_val=16, num_test=200, seed=4,
                                       batch_size=16, objects_per_image=2)
    assert module.has_object_masks
    batch = next(iter(module.test_dataloader()))
    assert batch["object_masks"].shape == (200, 2, 64, 64)
    assert not GeneratedShapesDataModule(str(tmp_path), num_train=64, batch_size=16).has_object_masks


def test_pairs_that_cannot_fit_are_refused_with_the_fix():
    spec = GeneratedShapesSpec(num_train=0, num_val=0, num_test=4, min_radius=0.4, max_radius=0.4,
                               objects_per_image=2)
    with pytest.raises(ValueError, match="could not place two objects apart in 64 px images with max_radius=0.4"):
        generate_split(spec, "test")
    small = generate_split(GeneratedShapesSpec(image_size=32, num_train=0, num_val=0, num_test=50,
                                               objects_per_image=2), "test")
    assert not (small.object_masks[:, 0] & small.object_masks[:, 1]).any()
