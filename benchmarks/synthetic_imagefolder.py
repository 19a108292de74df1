"""A synthetic ImageNet-layout folder of JPEGs, to exercise and benchmark the ImageNet path offline.

``root/train/<class>/<n>.JPEG`` and ``root/val/<class>/<n>.JPEG`` for ``--classes`` wnid-like
class folders (n00000000, ...), each image a smooth random colour field with noise and a few
shapes, encoded at ImageNet's typical size (500 x 375, quality 90, 4:2:0 chroma: about 100 KB).
Written in parallel by ``--workers`` processes; an existing folder with the same settings is
kept (``root/.synthetic.json`` records them).

    .venv/bin/python benchmarks/synthetic_imagefolder.py /tmp/imagenet --train 20 --val 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_image(seed: int, height: int, width: int) -> Image.Image:
    """An RGB image of ``height`` x ``width``: a smooth colour field (low-frequency noise upsampled),
    pixel noise and a random bright rectangle, so JPEG sizes resemble photographs'."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC),
                       dtype=np.float32)
    field += rng.normal(0, 12, size=field.shape)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    field[top : top + height // 3, left : left + width // 3] = rng.uniform(0, 255, size=3)
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))


def _write(job: tuple[str, int, int, int]) -> None:
    path, seed, height, width = job
    synthetic_image(seed, height, width).save(path, quality=90)


def make_imagefolder(root: str | Path, classes: int = 1000, train_per_class: int = 13,
                     val_per_class: int = 4, height: int = 375, width: int = 500,
                     workers: int | None = None) -> Path:
    """Write (or keep) the synthetic folder; returns ``root``."""
    root = Path(root)
    settings = {"classes": classes, "train": train_per_class, "val": val_per_class,
                "height": height, "width": width, "version": 1}
    record = root / ".synthetic.json"
    if record.is_file() and json.loads(record.read_text()) == settings:
        return root
    jobs = []
    for offset, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for label in range(classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                seed = (offset * classes + label) * 1000 + index
                jobs.append((str(folder / f"{split}_{label}_{index}.JPEG"), seed, height, width))
    with multiprocessing.Pool(workers) as pool:
        pool.map(_write, jobs, chunksize=64)
    record.write_text(json.dumps(settings))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--train", type=int, default=13, help="training images per class")
    parser.add_argument("--val", type=int, default=4, help="validation images per class")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    root = make_imagefolder(args.root, args.classes, args.train, args.val, workers=args.workers)
    print(f"synthetic ImageFolder in {root}: {args.classes} classes, {args.train} train and "
          f"{args.val} val images per class")


if __name__ == "__main__":
    main()
