"""GPU decoding of ImageFolder JPEGs: the same crops as the CPU pipeline for the same seed and
file, fallbacks for files nvJPEG cannot decode to RGB, batches in the loader's order. Run on the
CPU here (torchvision's decoder stands in for nvJPEG); the GPU figures are in the benchmark."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ptame.data.gpu_decoding import (
    DecodeAheadLoader,
    EncodedImageDataset,
    collate_encoded,
    decode_ahead,
    decode_on_device,
)
from ptame.data.imagefolder import (
    ImageFolderDataModule,
    ImageSampleDataset,
    eval_transform,
    plan_crop,
    resolve_decode,
    train_transform,
)


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth, textured 8-bit RGB image: gradients (any wrong crop offset shows) plus noise."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 / width, y * 255 / height, 128 + 60 * np.sin(x / 17 + y / 23)], -1)
    noise = np.random.default_rng(seed).normal(0, 8, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("jpegs")
    paths = {}
    for index, (height, width) in enumerate([(375, 500), (500, 333), (256, 256), (600, 400)]):
        path = folder / f"colour{index}.JPEG"
        Image.fromarray(photo(height, width, index)).save(path, quality=90)
        paths[f"colour{index}"] = str(path)
    base = Image.fromarray(photo(300, 400, 9))
    for name, image, kind in [("cmyk", base.convert("CMYK"), "JPEG"), ("grey", base.convert("L"), "JPEG"),
                              ("png", base, "PNG")]:
        path = folder / f"{name}.JPEG"  # ImageNet has such files under .JPEG names
        image.save(path, format=kind)
        paths[name] = str(path)
    return paths


@pytest.mark.parametrize("train", [True, False])
def test_both_decoding_paths_give_the_same_crops_for_the_same_seed(files, train):
    samples = [(path, 0) for path in files.values()]
    transform = train_transform() if train else eval_transform()
    cpu, encoded = ImageSampleDataset(samples, transform), EncodedImageDataset(samples, transform)
    for index, name in enumerate(files):
        torch.manual_seed(index)
        expected = cpu[index]["image"]
        torch.manual_seed(index)
        item = encoded[index]
        assert ("encoded" in item) == name.startswith("colour"), name
        image = decode_on_device(collate_encoded([item]), "cpu")["image"][0]
        difference = (image - expected).abs() * 255
        # measured: at most 1 level of 255 (torchvision's and PIL's resize round differently),
        # 0.003 on average; a crop one pixel off gives tens of levels on these gradients
        assert difference.max() <= 1.001 and difference.mean() < 0.01, (name, difference.max())


def test_a_batch_keeps_the_loaders_order_with_fallbacks_in_between(files):
    samples = [(path, label) for label, path in enumerate(files.values())]
    dataset = EncodedImageDataset(samples, eval_transform(64, 48))
    items = [dataset[i] for i in range(len(samples))]
    batch = collate_encoded(items)
    assert batch["order"].tolist() == [True] * 4 + [False] * 3 and len(batch["encoded"]) == 4
    decoded = decode_on_device(batch, "cpu")
    assert decoded["image"].shape == (7, 3, 48, 48) and "encoded" not in decoded
    assert decoded["label"].tolist() == list(range(7))
    reference = ImageSampleDataset(samples, eval_transform(64, 48))
    for index in range(7):
        assert (decoded["image"][index] - reference[index]["image"]).abs().max() * 255 <= 1.001


def test_a_gpu_decoding_datamodule_batches_encoded_files(tmp_path, files):
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for index in range(3):
                Image.fromarray(photo(80, 100, index)).save(folder / f"{index}.JPEG")
    module = ImageFolderDataModule(tmp_path, val_size=2, test_size=2, resize_size=64, crop_size=56,
                                   batch_size=4, eval_batch_size=2, num_workers=0, pin_memory=False,
                                   decode="gpu")
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert len(batch["encoded"]) == 4 and batch["plans"].shape == (4, 6)
    images = decode_on_device(batch, "cpu")["image"]
    assert images.shape == (4, 3, 56, 56) and 0 <= images.min() and images.max() <= 1


def test_the_evaluation_loop_gives_the_cpu_pipelines_figures_on_encoded_batches(tmp_path):
    """evaluate_explainers over a decode="gpu" loader (decoded by the loop) against the same
    images through the CPU pipeline: AD/IC within what 1/255 pixel differences move."""
    from ptame.evaluation.suite import build_metrics, evaluate_explainers
    from ptame.explainers.baselines import CentreGaussianExplainer

    from .helpers.networks import make_backbone

    for label in ("a", "b"):
        for split in ("train", "val"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for index in range(4):
                Image.fromarray(photo(90, 120, index + 10 * (label == "b"))).save(folder / f"{index}.JPEG")
    backbone = make_backbone()
    settings = {"adic": {"thresholds": [100, 50]}, "localisation": False}
    figures = {}
    for decode in ("cpu", "gpu"):
        module = ImageFolderDataModule(tmp_path, val_size=2, test_size=6, resize_size=64, crop_size=56,
                                       eval_batch_size=4, num_workers=0, pin_memory=False, decode=decode)
        module.setup("test")
        suites = {"centre": build_metrics(backbone, settings, has_masks=False)}
        explainers = {"centre": CentreGaussianExplainer(backbone)}
        figures[decode] = evaluate_explainers(explainers, suites, module.test_dataloader(), "cpu")["centre"]
    assert figures["cpu"].keys() == figures["gpu"].keys()
    for key, value in figures["cpu"].items():
        assert figures["gpu"][key] == pytest.approx(value, abs=0.01), key


def encoded_batches(files, batch_size: int, broken: int | None = None) -> list[dict]:
    """The files (in the fixture's order, fallbacks included) as collate_encoded batches; with
    ``broken``, that batch's first file's bytes are cut short so that decoding it fails."""
    samples = [(path, label) for label, path in enumerate(files.values())]
    dataset = EncodedImageDataset(samples, eval_transform(64, 48))
    batches = [collate_encoded([dataset[i] for i in range(start, min(start + batch_size, len(samples)))])
               for start in range(0, len(samples), batch_size)]
    if broken is not None:
        batches[broken]["encoded"][0] = batches[broken]["encoded"][0][:100].clone()
    return batches


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_decoding_ahead_yields_the_batches_decoding_one_by_one_gives(files, depth):
    expected = [decode_on_device(batch, "cpu") for batch in encoded_batches(files, 2)]
    decoded = list(decode_ahead(iter(encoded_batches(files, 2)), "cpu", depth))
    assert len(decoded) == len(expected) == 4
    for ours, reference in zip(decoded, expected):
        assert torch.equal(ours["image"], reference["image"])
        assert ours["label"].tolist() == reference["label"].tolist() and ours["path"] == reference["path"]


def test_decoding_ahead_raises_a_broken_file_at_its_batch_after_the_earlier_ones(files):
    batches = decode_ahead(iter(encoded_batches(files, 2, broken=1)), "cpu", depth=2)
    first = next(batches)
    assert first["label"].tolist() == [0, 1]
    with pytest.raises(RuntimeError):
        next(batches)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        next(decode_ahead(iter([]), "cpu", depth=0))


def test_a_decode_ahead_loader_is_a_dataloader_of_decoded_batches(files):
    samples = [(path, label) for label, path in enumerate(files.values())]
    dataset = EncodedImageDataset(samples, eval_transform(64, 48))
    loader = DecodeAheadLoader(dataset, batch_size=3, collate_fn=collate_encoded, decode_device="cpu")
    plain = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_encoded)
    ours = list(loader)
    assert len(loader) == 3 and [b["label"].tolist() for b in ours] == [[0, 1, 2], [3, 4, 5], [6]]
    for batch, reference in zip(ours, plain):
        assert torch.equal(batch["image"], decode_on_device(reference, "cpu")["image"])
        assert decode_on_device(batch, "cpu") is batch  # already decoded: the hooks pass it on


def test_crop_plans_follow_resize_and_crop_rules():
    plan = plan_crop(375, 500, 256, 224, train=False)
    assert (plan.resized_height, plan.resized_width, plan.top, plan.left, plan.flip) == (256, 341, 16, 58, False)
    torch.manual_seed(0)
    plans = [plan_crop(500, 333, 256, 224, train=True) for _ in range(200)]
    assert {p.resized_height for p in plans} == {384} and {p.resized_width for p in plans} == {256}
    assert max(p.top for p in plans) <= 384 - 224 and max(p.left for p in plans) <= 256 - 224
    assert 60 < sum(p.flip for p in plans) < 140


def test_decode_setting_is_checked():
    assert resolve_decode("cpu") == "cpu" and resolve_decode("gpu") == "gpu"
    assert resolve_decode("auto") == ("gpu" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="data.decode must be one of"):
        resolve_decode("nvjpeg")
    with pytest.raises(ValueError, match="jpeg_draft applies to CPU decoding only"):
        ImageFolderDataModule("/nowhere", decode="gpu", jpeg_draft=True)


@pytest.mark.gpu
def test_nvjpeg_crops_match_the_cpu_pipeline_within_decoder_differences(files):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    samples = [(path, 0) for path in files.values()]
    cpu, encoded = ImageSampleDataset(samples, train_transform()), EncodedImageDataset(samples, train_transform())
    for index in range(len(samples)):
        torch.manual_seed(index)
        expected = cpu[index]["image"]
        torch.manual_seed(index)
        image = decode_on_device(collate_encoded([encoded[index]]), "cuda")["image"][0].cpu()
        difference = (image - expected).abs() * 255
        assert difference.mean() < 2.0 and difference.max() < 40, (index, difference.max())


@pytest.mark.gpu
def test_decoding_ahead_on_a_side_stream_gives_the_serial_decoders_images(files):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    expected = [decode_on_device(batch, "cuda")["image"].cpu() for batch in encoded_batches(files, 2)]
    consumed = []
    for batch in decode_ahead(iter(encoded_batches(files, 2)), "cuda", depth=2):
        consumed.append((batch["image"] * 2).cpu() / 2)  # work on the consumer's stream
    for ours, reference in zip(consumed, expected):
        assert torch.equal(ours, reference)
