"""ImageNet (ILSVRC2012) and generic ImageFolder data: datasets, transforms, a LightningDataModule.

Conventions shared by the whole project:

* images are float32 RGB tensors of shape (3, H, W) with values in [0, 1]; the data pipeline does
  NOT normalise (every network wrapper normalises inside);
* a dataset item is a dict ``{"image": (3, H, W) float32 in [0, 1], "label": int64 scalar tensor,
  "index": int64 scalar tensor (position of the item in its split), "path": str}``; Lightning's
  default collate turns a batch of items into ``{"image": (B, 3, H, W), "label": (B,),
  "index": (B,), "path": list[str]}``.

Supported layouts of the data root:

* ``layout="imagefolder"``: ``root/<train_dir>/<class>/*.JPEG`` and either
  ``root/<val_dir>/<class>/*.JPEG`` (class subfolders) or ``root/<val_dir>/*.JPEG`` (the flat
  folder of the original ILSVRC2012 validation tarball, labelled by list files);
* ``layout="torchvision"``: whatever :class:`torchvision.datasets.ImageNet` accepts (``meta.bin``
  or the devkit archive in ``root``, ``root/train`` and ``root/val`` with class subfolders).

Validation and test subsets are drawn from the validation folder, either from list files in the
TAME lists' format (``Validation_2000.txt`` / ``Evaluation_2000.txt``, one ``<filename> <label>``
per line) or, without list files, as a seeded disjoint split (see :func:`seeded_disjoint_split`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ptame.data.bad_images import SkippedImages, SkippingCollate, check_policy, skipped_item
from ptame.data.resumable import EpochOrderSampler, ResumableLoader, resume_sampler, training_position

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
)  # fmt: skip
IMAGENET_NUM_CLASSES = 1000
LAYOUTS = ("imagefolder", "torchvision")
DECODE_MODES = ("cpu", "gpu", "auto")

Sample = tuple[str, int]
"""One labelled image: (absolute file path, integer class label)."""


class ImageReadError(OSError):
    """An image file could not be opened or decoded; the message names the file."""


# --------------------------------------------------------------------------------------------
# Image loading and transforms
# --------------------------------------------------------------------------------------------


#: PIL modes of 16-bit greyscale images (PNG, TIFF), which ``convert("RGB")`` would clip to 255
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _eight_bit_grey(img: Image.Image) -> Image.Image | None:
    """An 8-bit ("L") copy of a high-dynamic-range greyscale image with its real range: 16-bit
    values / 257 (0..65535 -> 0..255, rounded), 32-bit integers up to 255 as they are and above
    as 16-bit, float ("F") images in [0, 1] x 255 else clipped to [0, 255]; None for other modes."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        values = np.asarray(img).astype(np.float64)
        if img.mode == "I" and values.max(initial=0) <= 255:
            scaled = values
        else:
            scaled = values / 257.0
    elif img.mode == "F":
        values = np.asarray(img).astype(np.float64)
        scaled = values * 255.0 if values.max(initial=0) <= 1.0 else values
    else:
        return None
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), mode="L")


def load_rgb_image(
    path: str | os.PathLike[str], draft_size: int | None = None, exif_orientation: bool = False
) -> Image.Image:
    """Open an image file and return it decoded as an 8-bit RGB PIL image.

    Greyscale, CMYK, palette and RGBA images are converted to RGB (alpha is dropped, as in
    torchvision's default loader); 16-bit (and 32-bit or float) greyscale images keep their
    dynamic range (:func:`_eight_bit_grey`; PIL's own conversion clips them to white). With
    ``draft_size`` a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both
    sides >= ``draft_size`` pixels, a large speed-up before ``Resize(draft_size)`` at the cost of
    slightly different pixel values. With ``exif_orientation`` the EXIF orientation tag is
    applied (user photos: figures, explanations); the datasets keep ImageNet's standard decoding,
    which ignores it.

    Raises:
        ImageReadError: the file is missing, truncated or not a decodable image; the message
            names ``path`` and the underlying error is chained.
    """
    try:
        with Image.open(path) as img:
            if draft_size is not None:
                img.draft("RGB", (draft_size, draft_size))
            if exif_orientation:
                img = ImageOps.exif_transpose(img)
            grey = _eight_bit_grey(img)
            if grey is not None:
                return grey.convert("RGB")
            if img.mode == "P" and "transparency" in img.info:
                return img.convert("RGBA").convert("RGB")
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image file {os.fspath(path)!r}: {err}") from err


def _check_sizes(resize_size: int, crop_size: int) -> None:
    if resize_size <= 0 or crop_size <= 0:
        raise ValueError(
            f"resize_size and crop_size must be positive, got {resize_size}, {crop_size}"
        )
    if crop_size > resize_size:
        raise ValueError(f"crop_size ({crop_size}) must not exceed resize_size ({resize_size})")


def resized_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """(height, width) after ``Resize(shorter)``: the shorter side becomes ``shorter`` and the
    longer one ``int(shorter * longer / shorter_side)`` (torchvision's rule)."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


@dataclass(frozen=True)
class CropPlan:
    """Where one image's crop comes from: resize the decoded image to (resized_height,
    resized_width), take the ``size`` x ``size`` square at (top, left), mirror it if ``flip``.

    Drawn once per image (:func:`plan_crop`) and applied by either decoding path (PIL on the
    CPU: :func:`crop_pil`; a decoded tensor on any device: :func:`crop_tensor`), so both give the
    same crop of the same file for the same random state.
    """

    resized_height: int
    resized_width: int
    top: int
    left: int
    size: int
    flip: bool

    def as_tensor(self) -> Tensor:
        """(6,) int64: resized height, resized width, top, left, size, flip."""
        return torch.tensor([self.resized_height, self.resized_width, self.top, self.left,
                             self.size, int(self.flip)], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, values: Tensor) -> CropPlan:
        """The plan of :meth:`as_tensor`."""
        height, width, top, left, size, flip = (int(v) for v in values.tolist())
        return cls(height, width, top, left, size, bool(flip))


def plan_crop(height: int, width: int, resize_size: int, crop_size: int, train: bool,
              generator: torch.Generator | None = None) -> CropPlan:
    """The crop of an image of ``height`` x ``width`` pixels.

    Training (Resize + RandomCrop + RandomHorizontalFlip): top and left uniform over the valid
    positions, then a flip with probability 1/2, drawn from ``generator`` (None: torch's global
    RNG) in that order (the draws torchvision's RandomCrop and RandomHorizontalFlip make).
    Evaluation (Resize + CenterCrop): the centred crop, ``round((resized - crop) / 2)``, no flip.
    """
    resized_height, resized_width = resized_size(height, width, resize_size)
    if not train:
        top = int(round((resized_height - crop_size) / 2.0))
        left = int(round((resized_width - crop_size) / 2.0))
        return CropPlan(resized_height, resized_width, top, left, crop_size, False)
    top = int(torch.randint(0, resized_height - crop_size + 1, size=(), generator=generator)) if resized_height > crop_size else 0
    left = int(torch.randint(0, resized_width - crop_size + 1, size=(), generator=generator)) if resized_width > crop_size else 0
    flip = bool(torch.rand(1, generator=generator) < 0.5)
    return CropPlan(resized_height, resized_width, top, left, crop_size, flip)


def to_unit_float(images: Tensor) -> Tensor:
    """8-bit images (any shape, any device) as float32 in [0, 1], exactly as the CPU pipeline
    converts them (torchvision's ``to_dtype(..., scale=True)``: ``x * (1 / 255)``); float tensors
    are returned as they are."""
    if images.dtype != torch.uint8:
        return images
    return v2.functional.to_dtype(images, torch.float32, scale=True)


def crop_pil(image: Image.Image, plan: CropPlan, dtype: torch.dtype = torch.float32) -> Tensor:
    """The planned crop of an RGB PIL image: (3, size, size), float32 in [0, 1] (PIL's
    antialiased bilinear resize, 8-bit, then / 255: torchvision's PIL pipeline) or, with
    ``dtype=torch.uint8``, the 8-bit values before that last step (:func:`to_unit_float` turns
    them into the same floats)."""
    resized = v2.functional.resize(image, [plan.resized_height, plan.resized_width], antialias=True)
    cropped = v2.functional.crop(resized, plan.top, plan.left, plan.size, plan.size)
    if plan.flip:
        cropped = v2.functional.horizontal_flip(cropped)
    pixels = v2.functional.to_image(cropped).as_subclass(Tensor)
    return pixels if dtype == torch.uint8 else to_unit_float(pixels)


def crop_tensor(image: Tensor, plan: CropPlan) -> Tensor:
    """The planned crop of a decoded uint8 image (3, H, W) on any device: float32 (3, size, size)
    in [0, 1] (torchvision's antialiased bilinear resize of uint8 tensors, rounded to 8 bits,
    then :func:`to_unit_float`)."""
    resized = v2.functional.resize(image, [plan.resized_height, plan.resized_width], antialias=True)
    cropped = resized[:, plan.top : plan.top + plan.size, plan.left : plan.left + plan.size]
    if plan.flip:
        cropped = cropped.flip(-1)
    return to_unit_float(cropped)


TRANSFER_DTYPES = {"float32": torch.float32, "uint8": torch.uint8}


class PlannedCrop:
    """The training or evaluation transform: RGB PIL image -> (3, crop, crop), float32 in [0, 1]
    or, with ``dtype=torch.uint8``, its 8-bit values (:func:`plan_crop`, then :func:`crop_pil`);
    randomness from torch's global RNG."""

    def __init__(self, resize_size: int, crop_size: int, train: bool, dtype: torch.dtype = torch.float32) -> None:
        _check_sizes(resize_size, crop_size)
        if dtype not in TRANSFER_DTYPES.values():
            raise ValueError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
        self.resize_size, self.crop_size, self.train, self.dtype = resize_size, crop_size, train, dtype

    def plan(self, height: int, width: int, generator: torch.Generator | None = None) -> CropPlan:
        """Draw the crop of an image of ``height`` x ``width`` pixels (see :func:`plan_crop`)."""
        return plan_crop(height, width, self.resize_size, self.crop_size, self.train, generator)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        return crop_pil(image, self.plan(image.height, image.width, generator), self.dtype)


def train_transform(resize_size: int = 256, crop_size: int = 224, dtype: torch.dtype = torch.float32) -> PlannedCrop:
    """Training transform: Resize(shorter side) -> RandomCrop -> RandomHorizontalFlip -> [0, 1].

    Takes an RGB PIL image of any size; returns a float32 tensor (3, crop_size, crop_size) with
    values in [0, 1] (uint8 / 255, no normalisation), or its uint8 values with
    ``dtype=torch.uint8``. Randomness comes from torch's global RNG.
    """
    return PlannedCrop(resize_size, crop_size, train=True, dtype=dtype)


def eval_transform(resize_size: int = 256, crop_size: int = 224, dtype: torch.dtype = torch.float32) -> PlannedCrop:
    """Evaluation transform: Resize(shorter side) -> CenterCrop -> [0, 1]; deterministic.

    Takes an RGB PIL image of any size; returns a float32 tensor (3, crop_size, crop_size) with
    values in [0, 1] (uint8 / 255, no normalisation), or its uint8 values with
    ``dtype=torch.uint8``.
    """
    return PlannedCrop(resize_size, crop_size, train=False, dtype=dtype)


def resolve_decode(mode: str) -> str:
    """``"cpu"`` or ``"gpu"`` for a ``decode`` setting; ``"auto"`` is the GPU when CUDA is
    available."""
    if mode not in DECODE_MODES:
        raise ValueError(f"data.decode must be one of {DECODE_MODES}, got {mode!r}")
    if mode == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return mode


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class _PathTable:
    """Paths packed in one uint8 buffer: no per-item Python objects, so forked DataLoader workers
    do not copy the table page by page through reference counting (1.28M ImageNet paths)."""

    def __init__(self, paths: Sequence[str]) -> None:
        encoded = [p.encode("utf-8") for p in paths]
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._buffer[self._offsets[i] : self._offsets[i + 1]].tobytes().decode("utf-8")


class ImageSampleDataset(Dataset[dict[str, Any]]):
    """Map-style dataset over a list of (path, label) samples.

    Item ``i`` is ``{"image": transform(RGB PIL image), "label": int64 scalar tensor,
    "index": int64 scalar tensor equal to i, "path": str}``; with the transforms of this module
    the image is float32 (3, crop_size, crop_size) in [0, 1].

    Args:
        samples: (image path, class label) pairs; the order defines the indices.
        transform: maps an RGB PIL image to a (3, H, W) float tensor in [0, 1].
        draft_size: passed to :func:`load_rgb_image` (JPEG draft decoding), or None.
        bad_images: ``"error"`` (an unreadable file raises :class:`ImageReadError`) or
            ``"skip"`` (its item is :func:`~ptame.data.bad_images.skipped_item`, left out of
            the batch by :class:`~ptame.data.bad_images.SkippingCollate`).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], Tensor],
        draft_size: int | None = None,
        bad_images: str = "error",
    ) -> None:
        self._paths = _PathTable([os.fspath(p) for p, _ in samples])
        self._labels = np.asarray([int(label) for _, label in samples], dtype=np.int64)
        self.transform = transform
        self.draft_size = draft_size
        self.bad_images = check_policy(bad_images)
        self.augment_seed = 0  #: seeds the crops of (index, epoch) keys

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def labels(self) -> np.ndarray:
        """Class labels of all items, int64 array of shape (N,)."""
        return self._labels

    @property
    def samples(self) -> list[Sample]:
        """All items as (path, label) pairs, in index order."""
        return [(self._paths[i], int(self._labels[i])) for i in range(len(self))]

    def path(self, index: int) -> str:
        """File path of item ``index``."""
        return self._paths[self._check_index(index)]

    def _check_index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        return int(index)

    def _resolve_key(self, key: int | tuple[int, int]) -> tuple[int, torch.Generator | None]:
        """(index, augmentation generator) of an item key: ``index`` (torch's global RNG) or
        ``(index, epoch)`` from :class:`~ptame.data.resumable.EpochOrderSampler` (a generator
        seeded by (``augment_seed``, epoch, index): the same crop in any worker, resumed or not)."""
        if isinstance(key, tuple):
            index, epoch = key
            index = self._check_index(index)
            seed = (int(self.augment_seed) * 1_000_003 + int(epoch)) * 2_147_483_647 + index
            return index, torch.Generator().manual_seed(seed % (2**63 - 1))
        return self._check_index(key), None

    def _transform(self, image: Image.Image, generator: torch.Generator | None) -> Tensor:
        if generator is not None and isinstance(self.transform, PlannedCrop):
            return self.transform(image, generator)
        return self.transform(image)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, generator = self._resolve_key(key)
        path = self._paths[index]
        try:
            image = self._transform(load_rgb_image(path, self.draft_size), generator)
        except ImageReadError as error:
            if self.bad_images == "error":
                raise
            return skipped_item(path, error, index)
        return {
            "image": image,
            "label": torch.tensor(int(self._labels[index]), dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
            "path": path,
        }


# --------------------------------------------------------------------------------------------
# Folder scanning
# --------------------------------------------------------------------------------------------


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _require_dir(directory: str | os.PathLike[str], what: str) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{what} {os.fspath(directory)!r} does not exist or is not a folder"
        )
    return directory


def _subfolders(directory: Path) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _walk_images(directory: Path) -> Iterator[str]:
    """Absolute paths of the image files under ``directory`` (recursive), in sorted order."""
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if _is_image_file(name):
                yield os.path.abspath(os.path.join(dirpath, name))


def find_classes(directory: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the class subfolders of ``directory`` (hidden folders ignored).

    For ImageNet these are the 1000 wnids, whose sorted order defines the class indices 0..999.

    Raises:
        FileNotFoundError: ``directory`` is missing. ValueError: it has no subfolder.
    """
    directory = _require_dir(directory, "image folder")
    classes = _subfolders(directory)
    if not classes:
        raise ValueError(f"image folder {os.fspath(directory)!r} has no class subfolders")
    return classes


def is_flat_folder(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` holds image files and no subfolders (flat ILSVRC2012 val layout).

    Raises:
        FileNotFoundError: missing folder. ValueError: the folder is empty, or mixes image files
            with class subfolders.
    """
    directory = _require_dir(directory, "image folder")
    has_dirs = bool(_subfolders(directory))
    with os.scandir(directory) as entries:
        has_images = any(e.is_file() and _is_image_file(e.name) for e in entries)
    if has_dirs and has_images:
        raise ValueError(
            f"image folder {os.fspath(directory)!r} mixes image files with subfolders; "
            "expected either class subfolders or a flat folder of images"
        )
    if not has_dirs and not has_images:
        raise ValueError(
            f"image folder {os.fspath(directory)!r} is empty (no images, no subfolders)"
        )
    return not has_dirs


def scan_image_folder(
    directory: str | os.PathLike[str], class_to_idx: Mapping[str, int] | None = None
) -> list[Sample]:
    """List the images of a class-subfolder tree ``directory/<class>/**/<image>``.

    Args:
        directory: the split folder (e.g. ``root/train``).
        class_to_idx: label of each class folder name; default: sorted folder order
            (:func:`find_classes`). Every subfolder must be a key; keys without a folder are fine.

    Returns:
        (absolute path, label) pairs sorted by class folder then file path.

    Raises:
        FileNotFoundError: missing folder. ValueError: no class subfolders, a subfolder not in
            ``class_to_idx``, or a class subfolder without images.
    """
    classes = find_classes(directory)
    if class_to_idx is None:
        class_to_idx = {name: i for i, name in enumerate(classes)}
    unknown = [c for c in classes if c not in class_to_idx]
    if unknown:
        raise ValueError(
            f"image folder {os.fspath(directory)!r} has {len(unknown)} class folders that are not "
            f"known classes, e.g. {unknown[:5]}"
        )
    samples: list[Sample] = []
    empty: list[str] = []
    for name in classes:
        found = [(p, class_to_idx[name]) for p in _walk_images(Path(directory) / name)]
        empty.extend([] if found else [name])
        samples.extend(found)
    if empty:
        raise ValueError(
            f"image folder {os.fspath(directory)!r}: {len(empty)} class folders contain no image "
            f"files ({', '.join(IMG_EXTENSIONS)}), e.g. {empty[:5]}"
        )
    return samples


def read_class_index(path: str | os.PathLike[str]) -> list[str]:
    """Read a class-index file: one class per non-blank line, the first token is the class name.

    Accepts e.g. ``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca``) or a plain list of
    wnids; line order (blank lines skipped) defines the labels 0..K-1. Used to give an ImageNet
    subset such as Imagenette the ImageNet labels of its wnid folders.

    Raises:
        FileNotFoundError: missing file. ValueError: empty file or a repeated class name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class index file {os.fspath(path)!r} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    names = [line.split()[0] for line in lines if line.strip()]
    if not names:
        raise ValueError(f"class index file {os.fspath(path)!r} lists no classes")
    if len(set(names)) != len(names):
        raise ValueError(f"class index file {os.fspath(path)!r} repeats a class name")
    return names


# --------------------------------------------------------------------------------------------
# List files (TAME format) and seeded splits
# --------------------------------------------------------------------------------------------


class _NameResolver:
    """Resolve list-file names to existing files: as given (absolute), relative to ``image_dir``,
    relative to ``fallback_dir``, or, for bare names, by file name anywhere under ``image_dir``."""

    def __init__(self, image_dir: Path, fallback_dir: Path | None) -> None:
        self.image_dir = image_dir
        self.fallback_dir = fallback_dir
        self._by_name: dict[str, list[str]] | None = None

    def _index(self) -> dict[str, list[str]]:
        if self._by_name is None:
            self._by_name = {}
            if self.image_dir.is_dir():
                for path in _walk_images(self.image_dir):
                    self._by_name.setdefault(os.path.basename(path), []).append(path)
        return self._by_name

    def __call__(self, name: str) -> list[str]:
        """All matching existing files (absolute paths); empty when none, >1 when ambiguous."""
        bases = [Path()] if os.path.isabs(name) else [self.image_dir, self.fallback_dir]
        for base in bases:
            if base is not None and (base / name).is_file():
                return [os.path.abspath(base / name)]
        if len(Path(name).parts) == 1:
            return self._index().get(name, [])
        return []


def _parse_list_line(line: str, where: str, num_classes: int | None) -> tuple[str, int]:
    tokens = line.split()
    if len(tokens) != 2:
        raise ValueError(f"{where}: expected '<filename> <integer label>', got {line.strip()!r}")
    try:
        label = int(tokens[1])
    except ValueError:
        raise ValueError(f"{where}: label {tokens[1]!r} is not an integer") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"{where}: label {label} is outside {bound}")
    return tokens[0], label


def _folder_label(path: str, image_dir: Path, class_to_idx: Mapping[str, int] | None) -> int | None:
    """Label implied by the class subfolder holding ``path`` (``image_dir/<class>/...``), if any."""
    if class_to_idx is None:
        return None
    try:
        rel = Path(path).relative_to(os.path.abspath(image_dir))
    except ValueError:
        return None
    return class_to_idx.get(rel.parts[0]) if len(rel.parts) > 1 else None


def read_image_list(
    list_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    class_to_idx: Mapping[str, int] | None = None,
    fallback_dir: str | os.PathLike[str] | None = None,
) -> list[Sample]:
    """Read a TAME-format image list (``Validation_2000.txt`` / ``Evaluation_2000.txt``).

    Format: one image per line, ``<filename> <integer label>`` separated by whitespace, e.g.
    ``ILSVRC2012_val_00000001.JPEG 65``; blank lines and lines starting with ``#`` are ignored.
    Labels are class indices (ImageNet: 0..999 in sorted-wnid order). A filename is resolved
    as an absolute path, else relative to ``image_dir``, else relative to ``fallback_dir``; a bare
    file name not directly in ``image_dir`` is looked up in its class subfolders.

    Args:
        list_file: the list file.
        image_dir: the validation folder, flat or with class subfolders.
        num_classes: when given, labels must lie in [0, num_classes).
        class_to_idx: when given, a file inside ``image_dir/<class>/`` must carry the label
            ``class_to_idx[<class>]`` (catches lists written for another class order).
        fallback_dir: second base folder for relative names (e.g. the data root).

    Returns:
        (absolute path, label) pairs in file order.

    Raises:
        FileNotFoundError: ``list_file`` is missing. ValueError (naming the list file and line
            number): malformed line, non-integer or out-of-range label, missing or ambiguous
            image file, label contradicting the class folder, duplicate entry; also an empty list.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"image list file {os.fspath(list_file)!r} does not exist")
    image_dir = Path(image_dir)
    resolve = _NameResolver(image_dir, Path(fallback_dir) if fallback_dir is not None else None)
    samples: list[Sample] = []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"image list {os.fspath(list_file)!r}, line {line_no}"
        name, label = _parse_list_line(line, where, num_classes)
        path = _resolve_one(resolve, name, where, image_dir)
        expected = _folder_label(path, image_dir, class_to_idx)
        if expected is not None and expected != label:
            raise ValueError(f"{where}: label {label} contradicts the class folder of {path!r} "
                             f"(label {expected})")  # fmt: skip
        if path in first_line:
            raise ValueError(f"{where}: {name!r} repeats line {first_line[path]}")
        first_line[path] = line_no
        samples.append((path, label))
    if not samples:
        raise ValueError(f"image list {os.fspath(list_file)!r} contains no entries")
    return samples


def _resolve_one(resolve: _NameResolver, name: str, where: str, image_dir: Path) -> str:
    matches = resolve(name)
    if not matches:
        raise ValueError(f"{where}: image file {name!r} not found under {os.fspath(image_dir)!r}")
    if len(matches) > 1:
        raise ValueError(f"{where}: file name {name!r} is ambiguous, matches {matches[:3]}")
    return matches[0]


def seeded_disjoint_split(n: int, sizes: Sequence[int], seed: int) -> list[list[int]]:
    """Draw disjoint random subsets of ``range(n)`` with the given sizes.

    One permutation of ``range(n)`` from ``numpy.random.default_rng(seed)`` is cut into
    consecutive chunks of ``sizes``; each chunk is returned sorted. Same (n, sizes, seed) => same
    subsets; the subsets never overlap.

    Raises:
        ValueError: a negative size, or ``sum(sizes) > n``.
    """
    if any(s < 0 for s in sizes):
        raise ValueError(f"subset sizes must be non-negative, got {list(sizes)}")
    if sum(sizes) > n:
        raise ValueError(f"subset sizes {list(sizes)} (total {sum(sizes)}) exceed the {n} items")
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *sizes])
    return [sorted(perm[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------------------------------
# LightningDataModule
# --------------------------------------------------------------------------------------------


class ImageFolderDataModule(L.LightningDataModule):
    """Train / validation / test loaders for ImageNet-style image folders.

    Train: every image of ``root/<train_dir>`` (optionally a seeded ``train_fraction``), with
    Resize(resize_size) -> RandomCrop(crop_size) -> RandomHorizontalFlip. Validation and test:
    disjoint subsets of ``root/<val_dir>`` with Resize(resize_size) -> CenterCrop(crop_size),
    taken from ``val_list`` / ``test_list`` (TAME format, see :func:`read_image_list`; a list
    defines its subset completely and ``val_size`` / ``test_size`` are then unused for it) or,
    for a subset without a list, drawn by :func:`seeded_disjoint_split` with ``split_seed`` from
    the validation images not named in any list. Batches are dicts ``{"image": (B, 3, crop_size,
    crop_size) float32 in [0, 1], "label": (B,) int64, "index": (B,) int64, "path": list[str]}``.

    Classes are the sorted subfolders of the train folder (else of a class-subfolder val folder),
    or the lines of ``class_index_file``. A flat val folder (ILSVRC2012 tarball layout) needs
    list files, and ``val_label_file`` (same format, labelling the whole folder) for a seeded split.

    Imagenette (an ImageFolder with ``train/`` and ``val/``; its val set has 3925 images, so
    lower the subset sizes)::

        ImageFolderDataModule(root="imagenette2-320", val_size=1000, test_size=2000,
                              class_index_file="LOC_synset_mapping.txt")  # ImageNet labels

    Without ``class_index_file`` Imagenette's labels are 0..9 (sorted wnids), which do not
    match the outputs of an ImageNet classifier.

    Args:
        root: data root. train_dir, val_dir: split folders under ``root`` (imagefolder layout).
        layout: "imagefolder" or "torchvision" (:class:`torchvision.datasets.ImageNet`, needs
            ``meta.bin`` or the devkit in ``root``; uses ``root/train`` and ``root/val``).
        val_list, test_list: TAME-format list files, or None for a seeded split.
        val_label_file: list file labelling every image of a flat val folder.
        val_size, test_size: sizes of the seeded subsets. split_seed: seed of the split and of
            the train subset.
        resize_size: shorter side after resizing (px). crop_size: output side (px).
        batch_size: train batch size (drop_last=True). eval_batch_size: val/test batch size.
        num_workers, pin_memory, persistent_workers: DataLoader settings (persistent workers
            only when num_workers > 0).
        train_fraction: fraction of train images used, in (0, 1] (quick runs).
        num_classes: expected number of classes, checked when given.
        class_index_file: file of class names (see :func:`read_class_index`) defining labels.
        jpeg_draft: decode JPEGs at a reduced DCT scale before resizing (faster, pixel values
            differ slightly from the standard pipeline).
        decode: ``"cpu"`` (PIL in the DataLoader workers), ``"gpu"`` (nvJPEG: the workers only
            read the files; :mod:`ptame.data.gpu_decoding`) or ``"auto"`` (the GPU when CUDA is
            available). Same crops either way.
        decode_ahead: with ``decode="gpu"`` and a trainer attached, batches decoded ahead of
            the step in a background thread (:class:`~ptame.data.gpu_decoding.DecodeAheadLoader`;
            on CUDA on a side stream, so that decoding overlaps training); 0: each batch is
            decoded in the batch-transfer hook, after the previous step.
        transfer_dtype: ``"float32"`` (the loaders yield [0, 1] images) or ``"uint8"``: the
            workers send the 8-bit crops (4x less data through shared memory, pinned memory and
            the host-to-device copy) and the batch-transfer hooks (or
            :func:`~ptame.data.gpu_decoding.decode_on_device`) turn them into the same float32
            [0, 1] values on the device (:func:`to_unit_float`).
        bad_images: ``"error"``, ``"skip"`` (:mod:`ptame.data.bad_images`) or None: the entry
            point's default (train.py: skip, evaluate.py: error; the datamodule alone: error).
        max_bad_share: with ``skip``, the run fails once more than this share of the training
            set (of the evaluated set without one) is unreadable.
        shuffle_seed: seed of the training order and crops (:mod:`ptame.data.resumable`);
            None: the process's torch seed at construction (``seed_everything(seed)``).
    """

    has_masks: bool = False

    def __init__(
        self,
        root: str | os.PathLike[str],
        train_dir: str = "train",
        val_dir: str = "val",
        layout: str = "imagefolder",
        val_list: str | os.PathLike[str] | None = None,
        test_list: str | os.PathLike[str] | None = None,
        val_label_file: str | os.PathLike[str] | None = None,
        val_size: int = 2000,
        test_size: int = 2000,
        split_seed: int = 0,
        resize_size: int = 256,
        crop_size: int = 224,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        train_fraction: float = 1.0,
        num_classes: int | None = None,
        class_index_file: str | os.PathLike[str] | None = None,
        jpeg_draft: bool = False,
        decode: str = "cpu",
        decode_ahead: int = 2,
        transfer_dtype: str = "float32",
        bad_images: str | None = None,
        max_bad_share: float = 0.01,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        _check_arguments(layout, val_size, test_size, batch_size, eval_batch_size, num_workers,
                         train_fraction, num_classes, class_index_file)  # fmt: skip
        _check_sizes(resize_size, crop_size)
        self.root = Path(root)
        self.train_path = self.root / ("train" if layout == "torchvision" else train_dir)
        self.val_path = self.root / ("val" if layout == "torchvision" else val_dir)
        self.layout = layout
        self.val_list, self.test_list, self.val_label_file = val_list, test_list, val_label_file
        self.val_size, self.test_size, self.split_seed = val_size, test_size, split_seed
        self.resize_size, self.crop_size = resize_size, crop_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.train_fraction = train_fraction
        self.expected_num_classes = num_classes
        self.class_index_file = class_index_file
        self.jpeg_draft = jpeg_draft
        self.decode = resolve_decode(decode)
        if int(decode_ahead) < 0:
            raise ValueError(f"decode_ahead must be >= 0 (batches decoded ahead; 0: off), got {decode_ahead}")
        self.decode_ahead = int(decode_ahead)
        if transfer_dtype not in TRANSFER_DTYPES:
            raise ValueError(f"transfer_dtype must be one of {sorted(TRANSFER_DTYPES)}, got {transfer_dtype!r}")
        self.transfer_dtype = TRANSFER_DTYPES[transfer_dtype]
        self.bad_images = check_policy(bad_images) if bad_images is not None else None
        self.skipped_images = SkippedImages(max_share=max_bad_share)
        # None: the process's seed (seed_everything(cfg.seed) precedes the datamodule)
        self.shuffle_seed = int(shuffle_seed) if shuffle_seed is not None else torch.initial_seed() % (2**31)
        if self.decode == "gpu" and jpeg_draft:
            raise ValueError("jpeg_draft applies to CPU decoding only; use decode=cpu with it")
        self._class_names: list[str] | None = None
        self._torchvision: dict[str, Any] = {}
        self.resume_position: dict[str, int] | None = None  # from a checkpoint (load_state_dict)
        self.train_dataset: ImageSampleDataset | None = None
        self.val_dataset: ImageSampleDataset | None = None
        self.test_dataset: ImageSampleDataset | None = None

    # ---- classes -------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (ImageNet: wnids); discovered from disk on first use."""
        if self._class_names is None:
            self._class_names = self._discover_classes()
            self._check_num_classes(self._class_names)
        return self._class_names

    @property
    def num_classes(self) -> int:
        """Number of classes K; labels lie in [0, K)."""
        return len(self.class_names)

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Label of each class name."""
        return {name: i for i, name in enumerate(self.class_names)}

    def _discover_classes(self) -> list[str]:
        if self.class_index_file is not None:
            return read_class_index(self.class_index_file)
        no_folders = not (self.train_path.is_dir() or self.val_path.is_dir())
        if self.layout == "torchvision" and no_folders:
            return list(self._torchvision_dataset("val").wnids)  # may extract the archives
        _require_dir(self.root, "data root")
        if self.train_path.is_dir():
            return find_classes(self.train_path)
        if self.val_path.is_dir() and not is_flat_folder(self.val_path):
            return find_classes(self.val_path)
        if self.expected_num_classes is not None:
            return [str(i) for i in range(self.expected_num_classes)]
        raise ValueError(
            f"cannot determine the classes: train folder {os.fspath(self.train_path)!r} is missing "
            f"and val folder {os.fspath(self.val_path)!r} has no class subfolders; pass "
            "num_classes or class_index_file"
        )

    def _check_num_classes(self, names: list[str]) -> None:
        expected = self.expected_num_classes
        if expected is not None and len(names) != expected:
            raise ValueError(
                f"expected {expected} classes but found {len(names)} under "
                f"{os.fspath(self.root)!r} (first ones: {names[:5]})"
            )

    # ---- samples ---------------------------------------------------------------------------

    def _torchvision_dataset(self, split: str) -> Any:
        if split not in self._torchvision:
            from torchvision.datasets import ImageNet

            _require_dir(self.root, "data root")
            self._torchvision[split] = ImageNet(os.fspath(self.root), split=split)
        return self._torchvision[split]

    def _folder_samples(self, directory: Path, what: str) -> list[Sample]:
        if self.layout == "torchvision":
            split = "train" if directory == self.train_path else "val"
            samples = self._torchvision_dataset(split).samples
            return [(os.path.abspath(p), int(y)) for p, y in samples]
        _require_dir(self.root, "data root")
        _require_dir(directory, what)
        return scan_image_folder(directory, self.class_to_idx)

    def train_samples(self) -> list[Sample]:
        """(path, label) pairs of the training split, after ``train_fraction`` subsampling."""
        samples = self._folder_samples(self.train_path, "train folder")
        if self.train_fraction < 1.0:
            keep = max(1, round(self.train_fraction * len(samples)))
            chosen = seeded_disjoint_split(len(samples), [keep], self.split_seed)[0]
            samples = [samples[i] for i in chosen]
        return samples

    def _val_is_flat(self) -> bool:
        if self.layout == "torchvision":
            return False
        _require_dir(self.root, "data root")
        return is_flat_folder(_require_dir(self.val_path, "val folder"))

    def validation_pool(self) -> list[Sample]:
        """(path, label) pairs of the whole validation folder, the source of seeded subsets."""
        if not self._val_is_flat():
            return self._folder_samples(self.val_path, "val folder")
        if self.val_label_file is None:
            raise ValueError(
                f"val folder {os.fspath(self.val_path)!r} is flat (no class subfolders): pass "
                "val_list and test_list, or val_label_file to label it for a seeded split"
            )
        return self._read_list(self.val_label_file)

    def _read_list(self, list_file: str | os.PathLike[str]) -> list[Sample]:
        flat = self._val_is_flat()
        return read_image_list(
            list_file,
            self.val_path,
            num_classes=self.num_classes,
            class_to_idx=None if flat else self.class_to_idx,
            fallback_dir=self.root,
        )

    def eval_samples(self) -> tuple[list[Sample], list[Sample]]:
        """(validation subset, test subset) as (path, label) lists; disjoint.

        Raises:
            ValueError: the two lists overlap, or the seeded subsets do not fit in the
                validation images left after removing listed ones.
        """
        subsets: dict[str, list[Sample]] = {}
        for name, list_file in (("val", self.val_list), ("test", self.test_list)):
            if list_file is not None:
                subsets[name] = self._read_list(list_file)
        _check_disjoint(subsets, self.val_list, self.test_list)
        missing = [name for name in ("val", "test") if name not in subsets]
        if missing:
            subsets.update(self._seeded_subsets(missing, subsets))
        return subsets["val"], subsets["test"]

    def _seeded_subsets(
        self, names: list[str], listed: dict[str, list[Sample]]
    ) -> dict[str, list[Sample]]:
        excluded = {path for samples in listed.values() for path, _ in samples}
        pool = [s for s in self.validation_pool() if s[0] not in excluded]
        sizes = [self.val_size if name == "val" else self.test_size for name in names]
        if sum(sizes) > len(pool):
            raise ValueError(
                f"{' + '.join(f'{n}_size ({s})' for n, s in zip(names, sizes))} = {sum(sizes)} "
                f"exceeds the {len(pool)} available images of val folder "
                f"{os.fspath(self.val_path)!r}"
                + (f" (after excluding {len(excluded)} listed images)" if excluded else "")
            )
        parts = seeded_disjoint_split(len(pool), sizes, self.split_seed)
        return {name: [pool[i] for i in part] for name, part in zip(names, parts)}

    # ---- Lightning hooks -----------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a stage needs ("fit": train + val, "validate": val, "test": test,
        None: all); datasets already built are kept."""
        _ = self.class_names
        if stage in (None, "fit") and self.train_dataset is None:
            transform = train_transform(self.resize_size, self.crop_size, self.transfer_dtype)
            self.train_dataset = self._dataset(self.train_samples(), transform)
        if stage in (None, "fit", "validate", "test") and self.val_dataset is None:
            val, test = self.eval_samples()
            transform = eval_transform(self.resize_size, self.crop_size, self.transfer_dtype)
            self.val_dataset = self._dataset(val, transform)
            self.test_dataset = self._dataset(test, transform)

    def use_bad_image_policy(self, default: str, file: str | os.PathLike[str] | None = None) -> str:
        """Set ``bad_images`` to the entry point's ``default`` where the config left it None, and
        the file that lists skipped images (``<run dir>/skipped_images.txt``); call before the
        datasets are built (setup). Returns the policy in force."""
        if self.train_dataset is not None or self.val_dataset is not None:
            raise RuntimeError("use_bad_image_policy must be called before setup()")
        if self.bad_images is None:
            self.bad_images = check_policy(default)
        self.skipped_images.file = Path(file) if file is not None else None
        return self.bad_images

    def _dataset(self, samples: list[Sample], transform: PlannedCrop) -> ImageSampleDataset:
        policy = self.bad_images or "error"
        if self.decode == "gpu":
            from ptame.data.gpu_decoding import EncodedImageDataset

            return EncodedImageDataset(samples, transform, bad_images=policy)
        return ImageSampleDataset(samples, transform, self.resize_size if self.jpeg_draft else None, policy)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the files skipped by ``bad_images=skip``; with GPU decoding, decode and crop
        the batch on the trainer's device."""
        batch = self.skipped_images.record(batch)
        if self.decode == "gpu" and self.trainer is not None:
            from ptame.data.gpu_decoding import decode_on_device

            return decode_on_device(batch, self.trainer.strategy.root_device)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """8-bit batches (``transfer_dtype="uint8"``) become float32 [0, 1] on the device."""
        if isinstance(batch, dict) and isinstance(batch.get("image"), Tensor) and batch["image"].dtype == torch.uint8:
            batch = {**batch, "image": to_unit_float(batch["image"])}
        return batch

    def _loader(self, dataset: ImageSampleDataset | None, stage: str, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"call setup({stage!r}) before requesting this dataloader")
        batch_size = self.batch_size if train else self.eval_batch_size
        settings: dict[str, Any] = dict(
            batch_size=batch_size,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )
        if train:  # shuffled by (seed, epoch), crops by (seed, epoch, index): resumable exactly
            dataset.augment_seed = self.shuffle_seed
            sampler = EpochOrderSampler(len(dataset), self.shuffle_seed, keyed=True)
            resume_sampler(sampler, self, batch_size)
            settings["sampler"] = sampler
        skipping = dataset.bad_images == "skip"
        if skipping and (train or self.skipped_images.total is None):
            self.skipped_images.total = len(dataset)  # the share counts against the training set
        if self.decode != "gpu":
            collate = SkippingCollate(self.crop_size, self.transfer_dtype) if skipping else None
            return ResumableLoader(dataset, collate_fn=collate, **settings)
        from ptame.data.gpu_decoding import DecodeAheadLoader, collate_encoded

        collate = SkippingCollate(self.crop_size, self.transfer_dtype, collate_encoded) if skipping else collate_encoded
        if self.trainer is not None and self.decode_ahead > 0:  # decode the next batches during this step
            return DecodeAheadLoader(dataset, collate_fn=collate, decode_device=self.trainer.strategy.root_device,
                                     decode_depth=self.decode_ahead, **settings)
        return ResumableLoader(dataset, collate_fn=collate, **settings)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: where training stands in its data (:func:`training_position`)."""
        position = training_position(self.trainer)
        return {"train_position": position} if position is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restored before the training loader is built: a resumed run continues the data order."""
        self.resume_position = state.get("train_position")

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of ``batch_size``; the last incomplete batch is dropped."""
        if self.train_dataset is not None and len(self.train_dataset) < self.batch_size:
            raise ValueError(
                f"the train split has {len(self.train_dataset)} images, fewer than batch_size "
                f"({self.batch_size}); with drop_last=True no batch would be produced"
            )
        return self._loader(self.train_dataset, "fit", train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation-subset batches of ``eval_batch_size`` in fixed order."""
        return self._loader(self.val_dataset, "validate", train=False)

    def test_dataloader(self) -> DataLoader:
        """Test-subset batches of ``eval_batch_size`` in fixed order."""
        return self._loader(self.test_dataset, "test", train=False)


def _check_disjoint(
    subsets: dict[str, list[Sample]], val_list: Any, test_list: Any
) -> None:
    if len(subsets) < 2:
        return
    shared = {p for p, _ in subsets["val"]} & {p for p, _ in subsets["test"]}
    if shared:
        raise ValueError(
            f"val_list {os.fspath(val_list)!r} and test_list {os.fspath(test_list)!r} share "
            f"{len(shared)} images, e.g. {sorted(shared)[:3]}; the subsets must be disjoint"
        )


def _check_arguments(
    layout: str,
    val_size: int,
    test_size: int,
    batch_size: int,
    eval_batch_size: int,
    num_workers: int,
    train_fraction: float,
    num_classes: int | None,
    class_index_file: Any,
) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "torchvision" and class_index_file is not None:
        raise ValueError("class_index_file is not supported with layout='torchvision'")
    if val_size < 0 or test_size < 0:
        raise ValueError(f"val_size and test_size must be >= 0, got {val_size}, {test_size}")
    if batch_size <= 0 or eval_batch_size <= 0:
        raise ValueError(f"batch sizes must be positive, got {batch_size}, {eval_batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    if num_classes is not None and num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")


class ImageNetDataModule(ImageFolderDataModule):
    """:class:`ImageFolderDataModule` for ILSVRC2012 with the paper's defaults.

    Same arguments; ``num_classes`` defaults to 1000 and is checked against the wnid folders (or
    the torchvision meta data). Typical use with the TAME lists and a flat val folder::

        ImageNetDataModule(root="/data/ILSVRC2012", val_list="Validation_2000.txt",
                           test_list="Evaluation_2000.txt")
    """

    def __init__(self, root: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("num_classes", IMAGENET_NUM_CLASSES)
        super().__init__(root, *args, **kwargs)
