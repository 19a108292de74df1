"""Images per second of the ImageNet training input pipeline, per decoding path and worker count.

Writes its own synthetic ImageFolder of ImageNet-size JPEGs (``benchmarks/synthetic_imagefolder.py``)
and times the training loader (Resize 256, RandomCrop 224, flip, batches of ``--batch-size``):
``cpu`` (PIL decoding in the workers) and ``gpu`` (the workers read the files, nvJPEG decodes
each batch on the GPU: :mod:`ptame.data.gpu_decoding`), ``--batches`` batches after a warm-up.
Also prints how far the GPU crops are from the CPU crops of the same files and seeds.

    .venv/bin/python benchmarks/input_pipeline.py --root /tmp/imagenet --workers 4 8 14
"""

from __future__ import annotations

import argparse
import time

import torch

from ptame.data.gpu_decoding import EncodedImageDataset, collate_encoded, decode_on_device
from ptame.data.imagefolder import ImageFolderDataModule, ImageSampleDataset, train_transform
from synthetic_imagefolder import make_imagefolder


def loader_rate(root: str, decode: str, workers: int, batch_size: int, batches: int,
                device: torch.device) -> float:
    """Images per second over ``batches`` batches (after 3 warm-up batches), decoded on ``device``."""
    module = ImageFolderDataModule(root, val_size=1, test_size=1, batch_size=batch_size,
                                   num_workers=workers, pin_memory=device.type == "cuda",
                                   persistent_workers=False, decode=decode)
    module.setup("fit")
    loader = module.train_dataloader()
    if len(loader) < batches + 3:
        raise SystemExit(f"the folder gives {len(loader)} training batches of {batch_size}; the benchmark "
                         f"needs --batches + 3 = {batches + 3}: raise --per-class or lower --batches")
    iterator = iter(loader)
    start, images = None, 0
    for step in range(batches + 3):
        batch = decode_on_device(next(iterator), device)
        batch["image"] = batch["image"].to(device, non_blocking=True)
        if step == 2:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        elif step > 2:
            images += batch["image"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)


def crop_differences(root: str, device: torch.device, count: int = 64) -> tuple[float, float]:
    """(mean, max) |GPU crop - CPU crop| in 8-bit levels over ``count`` training files."""
    module = ImageFolderDataModule(root, val_size=1, test_size=1, num_workers=0, decode="cpu")
    samples = module.train_samples()[:count]
    cpu = ImageSampleDataset(samples, train_transform())
    encoded = EncodedImageDataset(samples, train_transform())
    means, peak = [], 0.0
    for index in range(len(samples)):
        torch.manual_seed(index)
        expected = cpu[index]["image"]
        torch.manual_seed(index)
        image = decode_on_device(collate_encoded([encoded[index]]), device)["image"][0].cpu()
        difference = (image - expected).abs() * 255
        means.append(float(difference.mean()))
        peak = max(peak, float(difference.max()))
    return sum(means) / len(means), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/ptame-synthetic-imagenet")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=13)
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 14])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--paths", nargs="+", default=None, help="default: cpu and, with CUDA, gpu")
    args = parser.parse_args()
    start = time.perf_counter()
    make_imagefolder(args.root, args.classes, args.per_class, 4)
    print(f"synthetic ImageFolder ready in {time.perf_counter() - start:.0f} s "
          f"({args.classes} classes x {args.per_class} train images, 500x375 JPEG)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = args.paths or (["cpu", "gpu"] if device.type == "cuda" else ["cpu"])
    print(f"{'decode':>6} {'workers':>8} {'images/s':>9}  (batch {args.batch_size}, {args.batches} batches)")
    for path in paths:
        for workers in args.workers:
            rate = loader_rate(args.root, path, workers, args.batch_size, args.batches, device)
            print(f"{path:>6} {workers:>8} {rate:>9.0f}", flush=True)
    if "gpu" in paths:
        mean, peak = crop_differences(args.root, device)
        print(f"GPU vs CPU crops of the same files and seeds: mean {mean:.2f}, max {peak:.0f} "
              "8-bit levels (decoder and resize rounding)")


if __name__ == "__main__":
    main()
