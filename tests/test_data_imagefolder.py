"""Tests of ptame.data.imagefolder on small ImageFolders of real JPEG / PNG files."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ptame.data.imagefolder import (
    ImageFolderDataModule,
    ImageNetDataModule,
    ImageReadError,
    ImageSampleDataset,
    eval_transform,
    find_classes,
    load_rgb_image,
    read_image_list,
    scan_image_folder,
    seeded_disjoint_split,
    to_unit_float,
    train_transform,
)

# Class folders deliberately not created in sorted order; labels must follow sorted order.
CLASSES = ["n02", "n00", "n01"]
SORTED = sorted(CLASSES)
COLOURS = {"n00": (220, 30, 40), "n01": (30, 200, 60), "n02": (40, 50, 210)}
SIZES = [(300, 260), (280, 400), (256, 256), (500, 300)]
N_TRAIN, N_VAL = 8, 10
JPEG_TOL = 0.04  # tolerance on [0, 1] values after JPEG compression and resampling


def save_solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


def save_noise(path: Path, size: tuple[int, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def make_root(root: Path, flat_val: bool = False) -> dict[str, int]:
    """Write train/<class>/ and val/ (class subfolders or flat); return {val file name: label}."""
    for c in CLASSES:
        for i in range(N_TRAIN):
            save_solid(root / "train" / c / f"{c}_{i}.JPEG", COLOURS[c], SIZES[i % len(SIZES)])
    Image.new("L", (300, 260), 128).save(root / "train" / "n00" / "grey.JPEG")
    Image.new("RGBA", (280, 300), (10, 20, 30, 100)).save(root / "train" / "n01" / "rgba.png")
    Image.new("CMYK", (260, 300), (0, 255, 255, 0)).save(root / "train" / "n02" / "cmyk.JPEG")
    labels: dict[str, int] = {}
    k = 1
    for c in CLASSES:
        for i in range(N_VAL):
            folder = root / "val" if flat_val else root / "val" / c
            save_solid(folder / val_name(k), COLOURS[c], SIZES[i % len(SIZES)])
            labels[val_name(k)] = SORTED.index(c)
            k += 1
    return labels


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("imagefolder")
    labels = make_root(base / "folders")
    shutil.copytree(base / "folders" / "train", base / "flat" / "train")
    (base / "flat" / "val").mkdir()
    for c in CLASSES:
        for f in (base / "folders" / "val" / c).iterdir():
            shutil.copy(f, base / "flat" / "val" / f.name)
    return {"base": base, "root": base / "folders", "flat": base / "flat", "labels": labels}


def write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def dm(root: Path, **kwargs) -> ImageFolderDataModule:
    defaults = dict(val_size=6, test_size=9, batch_size=4, eval_batch_size=5, num_workers=0,
                    pin_memory=False)  # fmt: skip
    return ImageFolderDataModule(root, **{**defaults, **kwargs})


# ---- loading and transforms ----


def test_eval_transform_shape_range_and_colour(tmp_path: Path) -> None:
    colour = (200, 30, 90)
    save_solid(tmp_path / "solid.JPEG", colour, (300, 260))
    out = eval_transform()(load_rgb_image(tmp_path / "solid.JPEG"))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert type(out) is torch.Tensor
    assert out.min() >= 0.0 and out.max() <= 1.0
    expected = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255
    assert (out - expected).abs().max() < JPEG_TOL


def test_eval_transform_resizes_shorter_side_then_centre_crops(tmp_path: Path) -> None:
    # Left half black, right half white, 400x200: Resize(64) -> 128x64, CenterCrop(48) keeps
    # columns 40..87, i.e. 24 black then 24 white columns.
    img = np.zeros((200, 400, 3), dtype=np.uint8)
    img[:, 200:] = 255
    Image.fromarray(img).save(tmp_path / "halves.png")
    out = eval_transform(resize_size=64, crop_size=48)(load_rgb_image(tmp_path / "halves.png"))
    assert out.shape == (3, 48, 48)
    assert torch.allclose(out[:, :, :20], torch.zeros(3, 48, 20), atol=1e-6)
    assert torch.allclose(out[:, :, 28:], torch.ones(3, 48, 20), atol=1e-6)


def test_transform_rejects_crop_larger_than_resize() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        eval_transform(resize_size=200, crop_size=224)
    with pytest.raises(ValueError, match="crop_size"):
        train_transform(resize_size=200, crop_size=224)


def test_train_transform_is_random_but_keeps_shape(tmp_path: Path) -> None:
    save_noise(tmp_path / "noise.JPEG", (320, 280))
    image = load_rgb_image(tmp_path / "noise.JPEG")
    transform = train_transform()
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    second = transform(image)
    torch.manual_seed(0)
    again = transform(image)
    for out in (first, second):
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


@pytest.mark.parametrize(
    ("mode", "colour", "suffix"),
    [("L", 128, ".JPEG"), ("RGBA", (10, 20, 30, 100), ".png"), ("CMYK", (0, 0, 0, 0), ".JPEG"),
     ("P", 3, ".png")],
)  # fmt: skip
def test_load_rgb_converts_modes(tmp_path: Path, mode: str, colour, suffix: str) -> None:
    path = tmp_path / f"img{suffix}"
    Image.new(mode, (40, 30), colour).save(path)
    image = load_rgb_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    out = eval_transform(32, 16)(image)
    assert out.shape == (3, 16, 16)


def test_jpeg_draft_decodes_smaller_but_similar(tmp_path: Path) -> None:
    save_solid(tmp_path / "big.JPEG", (90, 160, 30), (1200, 1000))
    drafted = load_rgb_image(tmp_path / "big.JPEG", draft_size=256)
    assert drafted.size == (600, 500)  # scale 1/2 keeps both sides >= 256
    full = eval_transform()(load_rgb_image(tmp_path / "big.JPEG"))
    assert (eval_transform()(drafted) - full).abs().max() < JPEG_TOL


@pytest.mark.parametrize("kind", ["garbage", "truncated", "missing"])
def test_corrupt_image_error_names_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "n00" / "bad.JPEG"
    path.parent.mkdir()
    if kind == "garbage":
        path.write_bytes(b"this is not a jpeg" * 50)
    elif kind == "truncated":
        buffer = io.BytesIO()
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buffer, "JPEG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    dataset = ImageSampleDataset([(str(path), 0)], eval_transform())
    with pytest.raises(ImageReadError, match=re.escape(str(path))) as info:
        dataset[0]
    assert isinstance(info.value, OSError) and info.value.__cause__ is not None


# ---- folders and datasets ----


def test_labels_follow_sorted_folder_order(data: dict) -> None:
    root = data["root"]
    assert find_classes(root / "train") == SORTED
    samples = scan_image_folder(root / "train")
    assert len(samples) == 3 * N_TRAIN + 3
    for path, label in samples:
        assert Path(path).is_absolute()
        assert Path(path).parent.name == SORTED[label]
    assert [label for _, label in samples] == sorted(label for _, label in samples)


def test_scan_rejects_unknown_and_empty_class_folders(tmp_path: Path) -> None:
    save_solid(tmp_path / "a" / "x.JPEG", (1, 2, 3), (20, 20))
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="contain no image files.*'b'"):
        scan_image_folder(tmp_path)
    with pytest.raises(ValueError, match="not known classes"):
        scan_image_folder(tmp_path, {"a": 0})


def test_dataset_item_dict(data: dict) -> None:
    samples = scan_image_folder(data["root"] / "val")
    dataset = ImageSampleDataset(samples, eval_transform())
    assert len(dataset) == 3 * N_VAL
    item = dataset[13]
    assert set(item) == {"image", "label", "index", "path"}
    assert item["image"].shape == (3, 224, 224) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert item["index"].dtype == torch.int64 and item["index"].item() == 13
    assert item["path"] == samples[13][0] and item["label"].item() == samples[13][1]
    colour = torch.tensor(COLOURS[SORTED[samples[13][1]]], dtype=torch.float32) / 255
    assert (item["image"].mean(dim=(1, 2)) - colour).abs().max() < JPEG_TOL
    assert dataset.samples == samples
    with pytest.raises(IndexError):
        dataset[len(dataset)]


# ---- seeded split ----


def test_seeded_split_disjoint_sized_reproducible() -> None:
    val, test = seeded_disjoint_split(100, [20, 30], seed=0)
    assert len(val) == 20 and len(test) == 30 and not set(val) & set(test)
    assert seeded_disjoint_split(100, [20, 30], seed=0) == [val, test]
    assert seeded_disjoint_split(100, [20, 30], seed=1) != [val, test]
    with pytest.raises(ValueError, match="exceed"):
        seeded_disjoint_split(40, [20, 30], seed=0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), a=st.integers(0, 150), b=st.integers(0, 150), seed=st.integers(0, 99))
def test_seeded_split_property(n: int, a: int, b: int, seed: int) -> None:
    if a + b > n:
        with pytest.raises(ValueError):
            seeded_disjoint_split(n, [a, b], seed)
        return
    first, second = seeded_disjoint_split(n, [a, b], seed)
    assert (len(first), len(second)) == (a, b)
    assert not set(first) & set(second)
    assert all(0 <= i < n for i in first + second) and first == sorted(first)


# ---- list files ----


@pytest.mark.parametrize("variant", ["flat", "root"])
def test_list_file_selects_listed_files(data: dict, variant: str, tmp_path: Path) -> None:
    val_dir = data[variant] / "val"
    picks = [val_name(3), val_name(17), val_name(25), val_name(1)]
    lines = [f"{name} {data['labels'][name]}" for name in picks]
    lines.insert(2, "")  # blank lines are ignored
    list_file = write_list(tmp_path / "Validation_2000.txt", lines + ["   "])
    samples = read_image_list(list_file, val_dir, num_classes=3)
    assert [Path(p).name for p, _ in samples] == picks
    assert [label for _, label in samples] == [data["labels"][n] for n in picks]
    assert all(Path(p).is_file() and Path(p).is_absolute() for p, _ in samples)


def test_list_file_relative_paths(data: dict, tmp_path: Path) -> None:
    name = val_name(12)  # second class in creation order: n00
    lines = [f"n00/{name} 0", f"val/n00/{val_name(13)} 0"]
    samples = read_image_list(write_list(tmp_path / "l.txt", lines), data["root"] / "val",
                              fallback_dir=data["root"])  # fmt: skip
    assert [Path(p).name for p, _ in samples] == [name, val_name(13)]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("ILSVRC2012_val_00000002.JPEG", "expected '<filename> <integer label>'"),
        ("ILSVRC2012_val_00000002.JPEG seven", "not an integer"),
        ("ILSVRC2012_val_00000002.JPEG 1 2", "expected '<filename> <integer label>'"),
        ("ILSVRC2012_val_00000002.JPEG 3", r"outside \[0, 3\)"),
        ("ILSVRC2012_val_00000002.JPEG -1", "outside"),
        ("ILSVRC2012_val_99999999.JPEG 0", "not found"),
        ("ILSVRC2012_val_00000001.JPEG 2", "repeats line 1"),
    ],
)
def test_list_file_errors_name_file_and_line(data: dict, tmp_path: Path, bad_line: str,
                                             message: str) -> None:  # fmt: skip
    lines = [f"{val_name(1)} 2", "", bad_line]
    list_file = write_list(tmp_path / "Evaluation_2000.txt", lines)
    with pytest.raises(ValueError, match=message) as info:
        read_image_list(list_file, data["flat"] / "val", num_classes=3)
    assert "Evaluation_2000.txt" in str(info.value) and "line 3" in str(info.value)


def test_list_label_contradicting_class_folder(data: dict, tmp_path: Path) -> None:
    list_file = write_list(tmp_path / "l.txt", [f"{val_name(1)} 0"])  # val 1 is in n02 (label 2)
    class_to_idx = {c: i for i, c in enumerate(SORTED)}
    with pytest.raises(ValueError, match="line 1.*contradicts"):
        read_image_list(list_file, data["root"] / "val", class_to_idx=class_to_idx)


def test_missing_or_empty_list_file(data: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_image_list(tmp_path / "nope.txt", data["flat"] / "val")
    with pytest.raises(ValueError, match="no entries"):
        read_image_list(write_list(tmp_path / "empty.txt", ["", " "]), data["flat"] / "val")


# ---- datamodule ----


def test_datamodule_seeded_split_and_batches(data: dict) -> None:
    module = dm(data["root"])
    assert module.num_classes == 3 and module.class_names == SORTED and not module.has_masks
    module.setup("fit")
    module.setup("test")
    val, test = module.val_dataset.samples, module.test_dataset.samples
    assert len(val) == 6 and len(test) == 9 and not {p for p, _ in val} & {p for p, _ in test}
    assert len(module.train_dataset) == 3 * N_TRAIN + 3

    batch = next(iter(module.train_dataloader()))
    assert set(batch) == {"image", "label", "index", "path"}
    assert batch["image"].shape == (4, 3, 224, 224) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.int64
    assert batch["index"].shape == (4,) and len(batch["path"]) == 4
    assert len(module.train_dataloader()) == (3 * N_TRAIN + 3) // 4  # drop_last

    batches = list(module.val_dataloader())
    assert [b["image"].shape[0] for b in batches] == [5, 1]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(6))
    for b in batches:  # the image content agrees with its label
        for image, label in zip(b["image"], b["label"]):
            colour = torch.tensor(COLOURS[SORTED[label]], dtype=torch.float32) / 255
            assert (image.mean(dim=(1, 2)) - colour).abs().max() < JPEG_TOL
    assert [p for b in module.test_dataloader() for p in b["path"]] == [p for p, _ in test]


@pytest.mark.parametrize("train", [True, False])
def test_8_bit_crops_become_the_float_pipelines_values_exactly(tmp_path: Path, train: bool) -> None:
    save_noise(tmp_path / "noise.JPEG", (333, 250), seed=3)
    image = load_rgb_image(tmp_path / "noise.JPEG")
    make = train_transform if train else eval_transform
    torch.manual_seed(0)
    expected = make(64, 56)(image)
    torch.manual_seed(0)
    pixels = make(64, 56, torch.uint8)(image)
    assert pixels.dtype == torch.uint8 and expected.dtype == torch.float32
    assert torch.equal(to_unit_float(pixels), expected)  # bit for bit
    assert torch.equal(to_unit_float(pixels), pixels.float() * (1 / 255))  # the 8-bit value / 255
    assert to_unit_float(expected) is expected


def test_uint8_transfer_gives_the_float_batches_after_the_transfer_hook(data: dict) -> None:
    from ptame.data.gpu_decoding import decode_on_device

    floats, bytes_ = dm(data["root"]), dm(data["root"], transfer_dtype="uint8")
    for module in (floats, bytes_):
        module.setup("test")
    for reference, batch in zip(floats.val_dataloader(), bytes_.val_dataloader()):
        assert batch["image"].dtype == torch.uint8
        converted = bytes_.on_after_batch_transfer(batch, 0)
        assert converted["image"].dtype == torch.float32 and torch.equal(converted["image"], reference["image"])
        assert torch.equal(decode_on_device(batch, "cpu")["image"], reference["image"])
        assert converted["label"].tolist() == reference["label"].tolist()
    assert floats.on_after_batch_transfer(reference, 0)["image"] is reference["image"]
    with pytest.raises(ValueError, match="transfer_dtype must be one of"):
        dm(data["root"], transfer_dtype="float16")


def test_datamodule_split_reproducible_and_seed_dependent(data: dict) -> None:
    def subsets(seed: int) -> tuple[list, list]:
        module = dm(data["root"], split_seed=seed)
        return module.eval_samples()

    assert subsets(0) == subsets(0)
    assert subsets(0) != subsets(1)


def test_datamodule_lists_on_flat_val(data: dict, tmp_path: Path) -> None:
    labels = data["labels"]
    val_names, test_names = [val_name(i) for i in (2, 11, 29)], [val_name(i) for i in (5, 20)]
    val_list = write_list(tmp_path / "Validation_2000.txt", [f"{n} {labels[n]}" for n in val_names])
    test_list = write_list(tmp_path / "Evaluation_2000.txt",
                           [f"{n} {labels[n]}" for n in test_names])  # fmt: skip
    module = dm(data["flat"], val_list=val_list, test_list=test_list)
    module.setup("test")
    assert [Path(p).name for p, _ in module.val_dataset.samples] == val_names
    assert [Path(p).name for p, _ in module.test_dataset.samples] == test_names
    assert module.test_dataset.labels.tolist() == [labels[n] for n in test_names]
    batch = next(iter(module.test_dataloader()))
    assert batch["label"].tolist() == [labels[n] for n in test_names]


def test_datamodule_one_list_and_seeded_rest(data: dict, tmp_path: Path) -> None:
    names = [val_name(i) for i in range(1, 25)]  # 24 of 30 listed -> 6 left for the test split
    val_list = write_list(tmp_path / "v.txt", [f"{n} {data['labels'][n]}" for n in names])
    module = dm(data["root"], val_list=val_list, test_size=6)
    val, test = module.eval_samples()
    assert sorted(Path(p).name for p, _ in test) == [val_name(i) for i in range(25, 31)]
    with pytest.raises(ValueError, match=r"test_size \(7\) = 7 exceeds the 6 available"):
        dm(data["root"], val_list=val_list, test_size=7).eval_samples()


def test_datamodule_flat_val_with_label_file(data: dict, tmp_path: Path) -> None:
    label_file = write_list(tmp_path / "all.txt", [f"{n} {y}" for n, y in data["labels"].items()])
    module = dm(data["flat"], val_label_file=label_file)
    val, test = module.eval_samples()
    assert len(val) == 6 and len(test) == 9
    assert all(data["labels"][Path(p).name] == y for p, y in val + test)
    with pytest.raises(ValueError, match="flat"):
        dm(data["flat"]).eval_samples()


def test_datamodule_overlapping_lists_rejected(data: dict, tmp_path: Path) -> None:
    a = write_list(tmp_path / "a.txt", [f"{val_name(1)} 2", f"{val_name(2)} 2"])
    b = write_list(tmp_path / "b.txt", [f"{val_name(2)} 2"])
    with pytest.raises(ValueError, match="share 1 images"):
        dm(data["flat"], val_list=a, test_list=b).eval_samples()


def test_datamodule_errors(data: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data root .*nowhere"):
        dm(tmp_path / "nowhere").setup()
    with pytest.raises(FileNotFoundError, match="train folder .*trn"):
        dm(data["root"], train_dir="trn", num_classes=3).setup("fit")
    with pytest.raises(ValueError, match="expected 5 classes but found 3"):
        dm(data["root"], num_classes=5).setup()
    too_many = r"val_size \(20\) \+ test_size \(11\) = 31 exceeds the 30"
    with pytest.raises(ValueError, match=too_many):
        dm(data["root"], val_size=20, test_size=11).setup("test")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class subfolders"):
        dm(tmp_path / "empty").setup()
    shutil.copytree(data["root"] / "train", tmp_path / "noval" / "train")
    (tmp_path / "noval" / "val").mkdir()
    with pytest.raises(ValueError, match="empty"):
        dm(tmp_path / "noval").setup("test")
    with pytest.raises(ValueError, match="fewer than batch_size"):
        module = dm(data["root"], batch_size=64)
        module.setup("fit")
        module.train_dataloader()
    with pytest.raises(ValueError, match="layout"):
        dm(data["root"], layout="lmdb")


def test_imagenet_datamodule_checks_1000_classes(data: dict) -> None:
    with pytest.raises(ValueError, match="expected 1000 classes but found 3"):
        ImageNetDataModule(data["root"], num_workers=0).setup()


def test_train_fraction_subset(data: dict) -> None:
    full = dm(data["root"]).train_samples()
    half = dm(data["root"], train_fraction=0.5).train_samples()
    assert len(half) == round(0.5 * len(full)) and set(half) <= set(full)
    assert half == dm(data["root"], train_fraction=0.5).train_samples()


def test_class_index_file_gives_imagenet_style_labels(data: dict, tmp_path: Path) -> None:
    lines = ["m99 other", "n01 one", "n00 zero, nil", "m98", "n02 two"]
    index_file = write_list(tmp_path / "synsets.txt", lines)
    module = dm(data["root"], class_index_file=index_file, num_classes=5)
    assert module.num_classes == 5
    module.setup("test")
    expected = {"n00": 2, "n01": 1, "n02": 4}
    for path, label in module.val_dataset.samples + module.test_dataset.samples:
        assert label == expected[Path(path).parent.name]


def test_torchvision_layout(data: dict, tmp_path: Path) -> None:
    root = tmp_path / "tv"
    shutil.copytree(data["root"], root)
    meta = ({c: (f"name of {c}",) for c in SORTED}, [])
    torch.save(meta, root / "meta.bin")
    module = dm(root, layout="torchvision", num_classes=3)
    module.setup()
    assert module.class_names == SORTED
    assert len(module.train_dataset) == 3 * N_TRAIN + 3
    assert len(module.val_dataset) == 6 and len(module.test_dataset) == 9
    moved = [[(p.replace(str(data["root"]), str(root)), y) for p, y in subset]
             for subset in dm(data["root"]).eval_samples()]  # fmt: skip
    assert list(module.eval_samples()) == moved  # same split as the imagefolder layout


def test_worker_loading_and_persistent_flag(data: dict) -> None:
    assert dm(data["root"], num_workers=0, persistent_workers=True).persistent_workers is False
    module = dm(data["root"], num_workers=1, persistent_workers=False)
    module.setup("validate")
    batch = next(iter(module.val_dataloader()))
    assert batch["image"].shape == (5, 3, 224, 224)
