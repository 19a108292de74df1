"""The training pipeline behind ``train.py``: build everything from a config, fit, report.

Usable without Hydra's command line: ``run_training(cfg, run_dir)`` takes any composed
``DictConfig`` of the layout in ``conf/train.yaml``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from ptame.data.gpu_decoding import decode_on_device
from ptame.evaluation.figures import overlay_grid
from ptame.evaluation.suite import build_metrics, evaluate_explainers
from ptame.evaluation.tables import format_localisation_table
from ptame.explainers.baselines import CentreGaussianExplainer, RandomExplainer
from ptame.io import write_json_atomic
from ptame.metrics.localisation import check_pointing_tolerance
from ptame.module import PTAMEModule
from ptame.pipelines.common import back_on_device, build_networks, configure_torch

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig) -> tuple[PTAMEModule, Any]:
    """Instantiate data, frozen networks, loss and the LightningModule from ``cfg``."""
    datamodule = instantiate(cfg.data)
    backbone, auxiliary = build_networks(cfg)
    loss = instantiate(cfg.loss)
    module = instantiate(cfg.model, backbone=backbone, auxiliary=auxiliary, loss=loss)
    return module, datamodule


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """One logger per entry of ``cfg.logger``, each writing under ``run_dir``."""
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None:
            continue
        loggers.append(instantiate(logger_cfg, save_dir=str(run_dir)))
        log.info("logger %s -> %s", name, run_dir)
    return loggers


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    """Callbacks of ``cfg.callbacks``; the checkpoint callback writes to ``run_dir/checkpoints``."""
    callbacks = []
    for name, callback_cfg in (cfg.get("callbacks") or {}).items():
        if callback_cfg is None:
            continue
        if name == "checkpoint":
            callbacks.append(instantiate(callback_cfg, dirpath=str(run_dir / "checkpoints")))
        else:
            callbacks.append(instantiate(callback_cfg))
    return callbacks


def final_losses(trainer: L.Trainer) -> dict[str, float]:
    """The last logged loss terms (``train/*``, ``val/*``) as floats."""
    return {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith(("train/", "val/")) and value.numel() == 1
    }


def check_final_evaluation_settings(cfg: DictConfig) -> None:
    """Refuse a bad ``final_evaluation.pointing_tolerance`` before training, not after it."""
    tolerance = (cfg.get("final_evaluation") or {}).get("pointing_tolerance") or 0.0
    try:
        check_pointing_tolerance(tolerance)
    except ValueError as error:
        raise ValueError(f"final_evaluation.pointing_tolerance: {error}") from None


def run_final_evaluation(
    cfg: DictConfig, module: PTAMEModule, datamodule: Any, run_dir: Path, loggers: list[Logger]
) -> dict[str, float]:
    """After training: localisation against ground-truth masks (when the data has them) for
    P-TAME, a random map and a centre Gaussian, printed as a table, and an overlay grid PNG."""
    settings = cfg.get("final_evaluation") or {}
    device = module.device
    module.eval()
    explainers = {
        "ptame": module.explainer(),
        "random": RandomExplainer(module.ptame.backbone, seed=int(cfg.seed)),
        "centre_gaussian": CentreGaussianExplainer(module.ptame.backbone),
    }
    datamodule.setup("test")
    results: dict[str, float] = {}
    if getattr(datamodule, "has_masks", False):
        tolerance = float(settings.get("pointing_tolerance") or 0.0)
        localisation = {"localisation": True, "pointing_tolerance": tolerance}
        # one process sees every image here (e.g. rank 0 after DDP training): never sync
        suites = {
            name: {key: metric.to(device) for key, metric in build_metrics(
                module.ptame.backbone, localisation, has_masks=True, sync_on_compute=False).items()}
            for name in explainers
        }
        figures = evaluate_explainers(explainers, suites, datamodule.test_dataloader(), device,
                                      settings.get("max_images"), description="localisation")
        results = {f"{name}/{key}": value for name, values in figures.items()
                   for key, value in values.items()}
        results["pointing_tolerance_px"] = tolerance
        table = format_localisation_table(results, explainers, tolerance)
        print(f"\nLocalisation on held-out images (explaining the backbone's prediction):\n{table}\n")
    count = int(settings.get("overlay_images", 8))
    if count > 0:
        batch = decode_on_device(next(iter(datamodule.test_dataloader())), device)
        images = batch["image"][:count].to(device)
        with torch.no_grad():
            predictions = module.ptame.backbone(images).argmax(dim=1)
            maps = {name: explainer(images, predictions) for name, explainer in explainers.items()}
        names = getattr(datamodule, "class_names", None)
        titles = [str(names[p]) if names is not None else str(int(p)) for p in predictions]
        path = overlay_grid(images, maps, run_dir / "overlays.png", row_titles=titles)
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="overlays", images=[str(path)])
        log.info("overlay grid written to %s", path)
    return results


def run_training(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train P-TAME as configured, then evaluate and write ``metrics.json`` into ``run_dir``.

    Returns:
        the flat metrics dict that was written (on rank 0; other ranks return the losses).
    """
    run_dir = Path(run_dir)
    check_final_evaluation_settings(cfg)
    configure_torch(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    module, datamodule = build_module(cfg)
    loggers = build_loggers(cfg, run_dir)
    callbacks = build_callbacks(cfg, run_dir)
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(run_dir)
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("resume_from"))
    metrics = final_losses(trainer)
    if not trainer.is_global_zero:
        return metrics
    back_on_device(trainer, module)  # Lightning's teardown left it on the CPU
    metrics.update(run_final_evaluation(cfg, module, datamodule, run_dir, loggers))
    metrics["explanation_resolution"] = float(module.ptame.resolution)
    write_json_atomic(run_dir / "metrics.json", metrics)
    log.info("metrics written to %s", run_dir / "metrics.json")
    return metrics
