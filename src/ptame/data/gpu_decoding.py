"""Decoding ImageFolder JPEGs on the GPU (nvJPEG through torchvision), with the crops of the CPU
pipeline.

With ``decode="gpu"`` the DataLoader workers only read each file and its header: they draw the
image's crop (:func:`~ptame.data.imagefolder.plan_crop`, the same draws as the CPU pipeline) and
pass the encoded bytes on. :func:`decode_on_device` then decodes a whole batch in one call
(``torchvision.io.decode_jpeg(..., device="cuda")``: the hardware JPEG decoder of A100 / H100 /
H200 GPUs for baseline JPEGs, nvJPEG's CUDA decoder for the others) and applies each crop on the
GPU (:func:`~ptame.data.imagefolder.crop_tensor`). Files that nvJPEG cannot turn into the
expected RGB image (greyscale, CMYK or palette JPEGs, PNGs under a ``.JPEG`` name: ImageNet has
a few dozen) are decoded and cropped by PIL in the worker, as in the CPU pipeline.

On a CUDA device the training and evaluation loaders are :class:`DecodeAheadLoader`\ s: a
background thread decodes the next batches on a side CUDA stream while the current step runs
(torchvision's decoder releases the GIL), so decoding overlaps training instead of adding to it.

The two paths give the same crop of the same file for the same seed; the pixel values differ by
the decoders (libjpeg-turbo and nvJPEG round the IDCT and the chroma upsampling differently) and
the resizers (PIL's and torchvision's antialiased bilinear filters): torchvision's CPU decoder
and resize against PIL's, at most 1 8-bit level (tests); nvJPEG against PIL is printed by
``benchmarks/input_pipeline.py`` (one H200, synthetic 500x375 JPEGs: 0.55 levels on average, at
most 52 at a few pixels) and bounded by the GPU test.

Measured end to end on one H200 with 16 CPU cores, CPU decoding in 14 workers was faster than
this path (README, training speed): the decoding and the per-image crops run in the training
process, whose Python thread also launches the step. It pays off where few CPU cores feed each
GPU.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image

from ptame.data.bad_images import skipped_item
from ptame.data.resumable import ResumableLoader
from ptame.data.imagefolder import (
    CropPlan,
    ImageReadError,
    ImageSampleDataset,
    PlannedCrop,
    crop_tensor,
    load_rgb_image,
    to_unit_float,
)

def gpu_decodable(header: Image.Image) -> bool:
    """Whether nvJPEG decodes this file to the RGB image PIL gives: a colour (YCbCr) JPEG."""
    return header.format == "JPEG" and header.mode == "RGB"


class EncodedImageDataset(ImageSampleDataset):
    """:class:`~ptame.data.imagefolder.ImageSampleDataset` whose items carry the encoded file.

    Item ``i`` is ``{"encoded": uint8 (file bytes), "plan": (6,) int64 crop plan, "label",
    "index", "path"}``, or, for files nvJPEG cannot decode to RGB, ``{"image": float32
    (3, crop, crop) in [0, 1], "label", "index", "path"}`` decoded by PIL. Batch them with
    :func:`collate_encoded` and decode with :func:`decode_on_device`.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: PlannedCrop, bad_images: str = "error") -> None:
        if not isinstance(transform, PlannedCrop):
            raise TypeError("EncodedImageDataset needs a PlannedCrop transform (train_transform / eval_transform)")
        super().__init__(samples, transform, bad_images=bad_images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, generator = self._resolve_key(key)
        path = self._paths[index]
        item: dict[str, Any] = {
            "label": torch.tensor(int(self._labels[index]), dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
            "path": path,
        }
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                decodable, height, width = gpu_decodable(header), header.height, header.width
            if decodable and data:
                item["encoded"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                item["plan"] = self.transform.plan(height, width, generator).as_tensor()
            else:
                item["image"] = self._transform(load_rgb_image(path), generator)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, ImageReadError) as err:
            if self.bad_images == "skip":
                return skipped_item(path, err, index)
            if isinstance(err, ImageReadError):
                raise
            raise ImageReadError(f"cannot read image file {os.fspath(path)!r}: {err}") from err
        return item


def collate_encoded(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A batch of :class:`EncodedImageDataset` items: ``encoded`` (list of the P files to decode),
    ``plans`` (P, 6), ``decoded`` (list of the B - P images PIL decoded), ``order`` (B,) bool:
    True where the next encoded file goes, False where the next decoded image goes; ``label``,
    ``index`` (B,) and ``path`` (list)."""
    encoded = [item for item in items if "encoded" in item]
    return {
        "encoded": [item["encoded"] for item in encoded],
        "plans": torch.stack([item["plan"] for item in encoded]) if encoded else torch.zeros((0, 6), dtype=torch.int64),
        "decoded": [item["image"] for item in items if "encoded" not in item],
        "order": torch.tensor(["encoded" in item for item in items], dtype=torch.bool),
        "label": torch.stack([item["label"] for item in items]),
        "index": torch.stack([item["index"] for item in items]),
        "path": [item["path"] for item in items],
    }


def decode_on_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Decode and crop a :func:`collate_encoded` batch on ``device``: the batch with ``image``
    (B, 3, crop, crop) float32 in [0, 1] on ``device`` in place of the encoded files.

    On CUDA all files are decoded by one ``torchvision.io.decode_jpeg`` call; elsewhere one by
    one (torchvision's libjpeg-turbo). No host synchronisation: the images are stacked in batch
    order from the per-item crops. Batches that already hold ``image`` are returned as they are,
    8-bit ones (``transfer_dtype="uint8"``) as float32 [0, 1] on ``device``.
    """
    device = torch.device(device)
    if "image" in batch:
        if batch["image"].dtype != torch.uint8:
            return batch
        return {**batch, "image": to_unit_float(batch["image"].to(device, non_blocking=True))}
    batch = dict(batch)
    encoded, plans = batch.pop("encoded"), batch.pop("plans")
    decoded, order = iter(batch.pop("decoded")), batch.pop("order").tolist()
    from torchvision.io import ImageReadMode, decode_jpeg

    if not encoded:
        pixels = []
    elif device.type == "cuda":
        pixels = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    else:
        pixels = [decode_jpeg(data, mode=ImageReadMode.RGB) for data in encoded]
    crops = iter([crop_tensor(image, CropPlan.from_tensor(plan)) for image, plan in zip(pixels, plans)])
    images = [next(crops) if from_file else to_unit_float(next(decoded).to(device, non_blocking=True))
              for from_file in order]
    batch["image"] = torch.stack(images)
    return batch


def _decode_on_side_stream(
    batch: dict[str, Any], device: torch.device, stream: torch.cuda.Stream | None
) -> tuple[dict[str, Any], torch.cuda.Event | None]:
    """Decode ``batch`` on ``stream`` (CUDA) and return it with an event marking the end of its
    decoding (None off CUDA)."""
    if stream is None:
        return decode_on_device(batch, device), None
    with torch.cuda.stream(stream):
        decoded = decode_on_device(batch, device)
        done = torch.cuda.Event()
        done.record(stream)
    return decoded, done


def _hand_over(result: tuple[dict[str, Any], torch.cuda.Event | None], device: torch.device) -> dict[str, Any]:
    """Make the consumer's current stream wait for a batch decoded on the side stream; the image
    memory is kept until the consumer's work on it is done (``record_stream``)."""
    batch, done = result
    if done is not None:
        current = torch.cuda.current_stream(device)
        current.wait_event(done)
        batch["image"].record_stream(current)
    return batch


def decode_ahead(
    batches: Iterable[dict[str, Any]], device: torch.device | str, depth: int = 2
) -> Iterator[dict[str, Any]]:
    """Yield the :func:`collate_encoded` ``batches`` decoded on ``device``, in order, decoding up
    to ``depth`` batches ahead in one background thread (on CUDA: on its own stream, handed over
    to the consumer's stream without a host synchronisation). Errors of a batch (an unreadable
    file) are raised when that batch is reached. Same tensors as :func:`decode_on_device` batch by
    batch."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptame-decode") as pool:
        try:
            for batch in batches:
                pending.append(pool.submit(_decode_on_side_stream, batch, device, stream))
                if len(pending) > depth:
                    yield _hand_over(pending.popleft().result(), device)
            while pending:
                yield _hand_over(pending.popleft().result(), device)
        finally:
            for future in pending:
                future.cancel()


class DecodeAheadLoader(ResumableLoader):
    """A DataLoader of :class:`EncodedImageDataset` batches (``collate_fn=collate_encoded``) that
    yields them decoded on ``decode_device``, decoding ``decode_depth`` batches ahead in a
    background thread (:func:`decode_ahead`). Every other argument is DataLoader's; the batches are
    those of :func:`decode_on_device` applied to the plain loader's, in the same order."""

    def __init__(self, *args: Any, decode_device: torch.device | str, decode_depth: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decode_device = torch.device(decode_device)
        self.decode_depth = int(decode_depth)

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        return decode_ahead(super().__iter__(), self.decode_device, self.decode_depth)
