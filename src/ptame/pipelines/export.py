"""The export command behind ``export.py``: a checkpoint's explainer as ONNX or TorchScript
(:mod:`ptame.export`), checked against PyTorch after writing."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ptame.explainers.ptame import load_explainer
from ptame.export import ExportedExplainer, export_explainer
from ptame.pipelines.common import quiet_expected_messages

log = logging.getLogger(__name__)

SUFFIXES = {"onnx": "onnx", "torchscript": "pt"}


def verify_export(path: Path, reference: ExportedExplainer, format: str, batch: int = 3) -> float:
    """Max |difference| between the exported file and ``reference`` on ``batch`` random images
    (a batch size other than the export's, so the dynamic batch is checked too)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, *reference.image_size, generator=generator)
    classes = torch.arange(batch) % reference.attention.num_classes
    inputs = (images,) if reference.outputs == "all" else (images, classes)
    with torch.no_grad():
        expected = reference(*inputs).numpy()
        if format == "torchscript":
            with warnings.catch_warnings():  # torch's notice that its TorchScript loader is deprecated
                warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
                got = torch.jit.load(str(path))(*inputs).numpy()
        else:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feeds = {"images": images.numpy()}
            if reference.outputs == "selected":
                feeds["classes"] = classes.numpy()
            got = session.run(None, feeds)[0]
    if got.shape != expected.shape:
        raise RuntimeError(f"the exported {format} file returns {got.shape}, PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())


def run_export(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Export ``cfg.ckpt_path``'s explainer; returns the written file."""
    quiet_expected_messages()
    run_dir = Path(run_dir)
    explainer = load_explainer(cfg.ckpt_path, map_normalisation=cfg.model.map_normalisation,
                               cache_dir=cfg.get("cache_dir"))
    format, outputs = str(cfg.format), str(cfg.outputs)
    path = Path(cfg.output) if cfg.get("output") else run_dir / f"ptame_{outputs}.{SUFFIXES.get(format, format)}"
    export_explainer(explainer, path, format, outputs, int(cfg.opset))
    message = f"wrote {path} ({format}, outputs={outputs}, input (B, 3, {explainer.model.input_size[0]}, " \
              f"{explainer.model.input_size[1]}) float RGB in [0, 1])"
    if cfg.get("verify", True):
        difference = verify_export(path, ExportedExplainer(explainer, outputs), format)
        if difference > 1e-4:
            raise RuntimeError(f"the exported file differs from PyTorch by {difference:.2e} (> 1e-4)")
        message += f"; max |difference| from PyTorch on random images: {difference:.1e}"
    log.info(message)
    return path
