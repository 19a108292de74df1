"""The explain command behind ``explain.py``: explain image files with a trained checkpoint.

The backbone and the auxiliary are rebuilt from the recipes stored in the checkpoint. For each
image the run directory receives ``<stem>.png`` (one row per explained class, one overlay per
method), ``<stem>_<method>.npy`` (the raw maps in [0, 1] at the explained image's resolution:
(H, W) for one class, (k, H, W) for k) and, for all images, ``predictions.json`` (the backbone's
top-5 classes with names and probabilities, and the classes explained).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from ptame.checkpoint import current_recipe, read_checkpoint
from ptame.evaluation.figures import overlay_grid
from ptame.explainers.base import Explainer
from ptame.explainers.ptame import load_explainer
from ptame.io import write_json_atomic
from ptame.pipelines.common import quiet_expected_messages
from ptame.pipelines.evaluate import build_explainer
from ptame.pipelines.figures import class_names_of, load_images, shared_backbone

log = logging.getLogger(__name__)


def file_stems(files: Sequence[str]) -> list[str]:
    """Output names of the image files: their stems, ``-2``, ``-3``... where stems repeat."""
    seen: dict[str, int] = {}
    stems = []
    for file in files:
        stem = Path(file).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def class_label(names: Sequence[str] | None, index: int) -> str:
    """A class's human-readable name (ImageNet names, the generated shapes), else its index."""
    if names is not None and 0 <= index < len(names):
        return str(names[index])
    return f"class {index}"


def explained_classes(probabilities: Tensor, targets: Any, top_k: int) -> Tensor:
    """(N, k) classes to explain: the given ``targets`` (one per image, k = 1) or the ``top_k``
    predicted ones."""
    count, classes = probabilities.shape
    if targets is not None:
        wanted = torch.as_tensor(list(targets), dtype=torch.int64)
        if wanted.numel() != count:
            raise ValueError(f"targets has {wanted.numel()} class ids for {count} images: give one per image")
        if ((wanted < 0) | (wanted >= classes)).any():
            raise ValueError(f"targets must be class ids in [0, {classes - 1}], got {wanted.tolist()}")
        return wanted.view(-1, 1).to(probabilities.device)
    if not 1 <= int(top_k) <= classes:
        raise ValueError(f"top_k must be in [1, {classes}], got {top_k}")
    return probabilities.topk(int(top_k), dim=1).indices


def build_explainers(cfg: DictConfig, checkpoint: str, device: torch.device) -> dict[str, Explainer]:
    """The configured explainers, all explaining the checkpoint's rebuilt backbone."""
    cache_dir = cfg.get("cache_dir")
    backbone = shared_backbone(checkpoint, {}, cache_dir)
    names = list(cfg.explainers)
    if not names:
        raise ValueError("explainers is empty: name at least one config of conf/explainer/")
    explainers: dict[str, Explainer] = {}
    for name in names:
        if name == "ptame":  # the checkpoint itself, its auxiliary rebuilt from the stored recipe
            explainers[name] = load_explainer(checkpoint, backbone, map_normalisation=cfg.model.map_normalisation,
                                              device=device, cache_dir=cache_dir)
        else:
            explainers[name] = build_explainer(name, cfg, backbone).to(device)
    return explainers


def run_explain(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Explain ``cfg.images`` with ``cfg.explainers`` and write the outputs into ``run_dir``
    (see the module's docstring). Returns the content of ``predictions.json``."""
    quiet_expected_messages()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = [str(file) for file in cfg.images]
    missing = [file for file in files if not Path(file).is_file()]
    if not files or missing:
        raise FileNotFoundError(f"images: {'no file given' if not files else f'not found: {missing}'}; "
                                "give images=[a.jpg,b.png]")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available here; use device=cpu")
    checkpoint = str(cfg.ckpt_path)
    saved = read_checkpoint(checkpoint)["ptame"]
    explainers = build_explainers(cfg, checkpoint, device)
    backbone = next(iter(explainers.values())).backbone
    size = int(cfg.image_size or saved["input_size"][0])
    images = load_images(files, size).to(device)
    names = class_names_of(current_recipe(backbone.config or {}, cfg.get("cache_dir")))
    with torch.no_grad():
        probabilities = backbone(images).float().softmax(dim=1)
    explained = explained_classes(probabilities, cfg.get("targets"), int(cfg.top_k))
    maps = {name: torch.stack([explainer(images, explained[:, rank]).detach().float().cpu()
                               for rank in range(explained.shape[1])], dim=1)  # (N, k, H, W)
            for name, explainer in explainers.items()}
    return write_outputs(run_dir, files, images.cpu(), probabilities.cpu(), explained.cpu(), maps, names)


def write_outputs(run_dir: Path, files: Sequence[str], images: Tensor, probabilities: Tensor,
                  explained: Tensor, maps: dict[str, Tensor], names: Sequence[str] | None) -> dict[str, Any]:
    """Per image ``<stem>.png`` and ``<stem>_<method>.npy``; ``predictions.json`` for all."""
    predictions: dict[str, Any] = {}
    for index, (file, stem) in enumerate(zip(files, file_stems(files), strict=True)):
        def described(label: int) -> dict[str, Any]:
            return {"class": label, "name": class_label(names, label),
                    "probability": round(float(probabilities[index, label]), 6)}

        top = probabilities[index].topk(min(5, probabilities.shape[1])).indices.tolist()
        classes = explained[index].tolist()
        titles = [f"{'predicted' if label == top[0] else 'class'}: {class_label(names, label)} "
                  f"(p = {float(probabilities[index, label]):.2f})" for label in classes]
        rows = images[index].unsqueeze(0).expand(len(classes), -1, -1, -1)
        overlay_grid(rows, {name: method_maps[index] for name, method_maps in maps.items()},
                     run_dir / f"{stem}.png", row_titles=titles)
        for name, method_maps in maps.items():
            values = method_maps[index].numpy().astype(np.float32)
            np.save(run_dir / f"{stem}_{name}.npy", values[0] if len(classes) == 1 else values)
        predictions[stem] = {"file": str(Path(file).resolve()), "predictions": [described(c) for c in top],
                             "explained": [described(c) for c in classes]}
    write_json_atomic(run_dir / "predictions.json", predictions)
    log.info("explained %d image(s) with %s into %s", len(files), ", ".join(maps), run_dir)
    for stem, entry in predictions.items():
        best = entry["predictions"][0]
        print(f"{stem}: predicted {best['name']} (p = {best['probability']:.2f}); wrote {stem}.png and "
              f"{', '.join(f'{stem}_{name}.npy' for name in maps)}")
    return predictions


