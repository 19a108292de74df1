"""The training pipeline behind ``train.py``: build everything from a config, fit, report.

Usable without Hydra's command line: ``run_training(cfg, run_dir)`` takes any composed
``DictConfig`` of the layout in ``conf/train.yaml``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from ptame.checkpoint import read_checkpoint
from ptame.data.generated_classifiers import objects_are_top_classes
from ptame.data.gpu_decoding import decode_on_device
from ptame.evaluation.figures import overlay_grid
from ptame.evaluation.suite import build_metrics, evaluate_explainers
from ptame.evaluation.tables import format_localisation_table
from ptame.explainers.baselines import CentreGaussianExplainer, RandomExplainer
from ptame.explainers.cam import CAMExplainer
from ptame.io import write_json_atomic
from ptame.metrics.localisation import check_pointing_tolerance
from ptame.module import PTAMEModule
from ptame.pipelines.common import (
    back_on_device,
    build_loggers,
    build_networks,
    build_ptame_module,
    configure_torch,
)

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig) -> tuple[PTAMEModule, Any]:
    """Instantiate data, frozen networks, loss and the LightningModule from ``cfg``."""
    datamodule = instantiate(cfg.data)
    backbone, auxiliary = build_networks(cfg)
    return build_ptame_module(cfg, backbone, auxiliary), datamodule


def continue_csv_history(loggers: list[Logger], global_step: int) -> None:
    """Keep the CSV history of an interrupted run that is resumed into the same directory: the
    rows it logged before the checkpoint (step < ``global_step``); later ones are logged again by
    the resumed run. Lightning's CSV writer would otherwise start the file afresh."""
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        rows: list[dict[str, str]] = []
        if path.is_file():
            with open(path, newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if row.get("step", "") != ""
                        and int(float(row["step"])) < global_step]
        writer = logger.experiment  # removes the old file
        if rows:
            writer.metrics = rows
            writer.save()
            log.info("kept %d rows of %s from before the checkpoint (step < %d)", len(rows), path, global_step)


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


def _final_explainers(cfg: DictConfig, module: PTAMEModule, class_specific: bool = False) -> dict[str, Any]:
    """P-TAME and the two reference maps of the final evaluation and the overlay grid, plus
    Grad-CAM (the class-specific reference) when ``class_specific`` (data with several objects
    per test image)."""
    explainers = {
        "ptame": module.explainer(),
        "random": RandomExplainer(module.ptame.backbone, seed=int(cfg.seed)),
        "centre_gaussian": CentreGaussianExplainer(module.ptame.backbone),
    }
    if class_specific:
        explainers["gradcam"] = CAMExplainer(module.ptame.backbone, method="gradcam").to(module.device)
    return explainers


def check_training_length(cfg: DictConfig) -> None:
    """Refuse a trainer set to train nothing (``max_epochs=0`` or ``max_steps=0``): the run would
    end with the metrics of an untrained head and no checkpoint."""
    trainer = cfg.get("trainer") or {}
    for key in ("max_epochs", "max_steps"):
        value = trainer.get(key)
        if value is not None and int(value) == 0:
            raise ValueError(f"trainer.{key}=0 trains nothing (the run would report an untrained "
                             f"head and write no checkpoint): give trainer.{key} >= 1"
                             + (" or -1 (no step limit)" if key == "max_steps" else ""))


def run_final_evaluation(cfg: DictConfig, module: PTAMEModule, datamodule: Any) -> dict[str, float]:
    """After training: localisation against ground-truth masks (when the data has them) for
    P-TAME, a random map and a centre Gaussian, printed as a table; ``{}`` without masks. On data
    with several objects per test image (``data=generated_pairs``) also Grad-CAM, the
    class-specific localisation of each (``<method>/class_pointing_game[_other]``,
    ``<method>/class_energy_pointing_game[_other]``) and the backbone's check on those images
    (``backbone/top2_both_objects``)."""
    settings = cfg.get("final_evaluation") or {}
    device = module.device
    module.eval()
    datamodule.setup("test")
    if not getattr(datamodule, "has_masks", False):
        return {}
    class_specific = bool(getattr(datamodule, "has_object_masks", False))
    explainers = _final_explainers(cfg, module, class_specific)
    tolerance = float(settings.get("pointing_tolerance") or 0.0)
    localisation = {"localisation": True, "pointing_tolerance": tolerance}
    # one process sees every image here (e.g. rank 0 after DDP training): never sync
    suites = {
        name: {key: metric.to(device) for key, metric in build_metrics(
            module.ptame.backbone, localisation, has_masks=True, has_object_masks=class_specific,
            sync_on_compute=False).items()}
        for name in explainers
    }
    figures = evaluate_explainers(explainers, suites, datamodule.test_dataloader(), device,
                                  settings.get("max_images"), description="localisation",
                                  skipped=getattr(datamodule, "skipped_images", None))
    results = {f"{name}/{key}": value for name, values in figures.items() for key, value in values.items()}
    results["pointing_tolerance_px"] = tolerance
    table = format_localisation_table(results, explainers, tolerance)
    print(f"\nLocalisation on held-out images (explaining the backbone's prediction):\n{table}\n")
    if class_specific:
        results["backbone/top2_both_objects"] = both_objects_in_top2(
            module.ptame.backbone, datamodule.test_dataloader(), device, settings.get("max_images"))
        print(f"backbone: both objects' classes are its top 2 on {results['backbone/top2_both_objects']:.1%} "
              "of the two-object test images\n")
    return results


@torch.no_grad()
def both_objects_in_top2(backbone: Any, loader: Any, device: torch.device, max_images: int | None = None) -> float:
    """Share of two-object images (batches with ``object_labels`` (B, 2)) whose two classes are
    the backbone's two highest logits: it sees both objects, so explaining either class is
    meaningful."""
    hits, seen = 0, 0
    for batch in loader:
        batch = decode_on_device(batch, device)
        take = batch["image"].shape[0] if max_images is None else min(batch["image"].shape[0], int(max_images) - seen)
        logits = backbone(batch["image"][:take].to(device))
        hits += int(objects_are_top_classes(logits, batch["object_labels"][:take]).sum())
        seen += take
        if max_images is not None and seen >= int(max_images):
            break
    return hits / max(seen, 1)


def class_title(names: Sequence[str] | None, label: int) -> str:
    """A figure's title for class ``label``: its name when ``names`` has one, else the index (a
    folder dataset may name fewer classes than the backbone predicts, e.g. Imagenette's 10
    against ImageNet's 1000)."""
    if names is not None and 0 <= label < len(names):
        return str(names[label])
    return f"class {label}"


def write_overlays(cfg: DictConfig, module: PTAMEModule, datamodule: Any, run_dir: Path,
                   loggers: list[Logger]) -> Path | None:
    """The overlay grid PNG of ``final_evaluation.overlay_images`` test images (P-TAME, random,
    centre Gaussian) at ``run_dir/overlays.png``; None when switched off."""
    count = int((cfg.get("final_evaluation") or {}).get("overlay_images", 8))
    if count <= 0:
        return None
    device = module.device
    module.eval()
    datamodule.setup("test")
    explainers = _final_explainers(cfg, module)
    batch = decode_on_device(next(iter(datamodule.test_dataloader())), device)
    images = batch["image"][:count].to(device)
    with torch.no_grad():
        predictions = module.ptame.backbone(images).argmax(dim=1)
        maps = {name: explainer(images, predictions) for name, explainer in explainers.items()}
    names = getattr(datamodule, "class_names", None)
    titles = [class_title(names, int(p)) for p in predictions]
    masks = batch["mask"][:count] if "mask" in batch else None  # ground truth where the data has it
    path = overlay_grid(images, maps, run_dir / "overlays.png", row_titles=titles, masks=masks)
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key="overlays", images=[str(path)])
    log.info("overlay grid written to %s", path)
    return path


def _guarded(step: str, failures: list[str], function: Callable[[], Any]) -> Any:
    """Run one post-training step; on failure log it (naming the step) and carry on, so that
    one step's failure does not lose what the others compute."""
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - every failure is reported, none loses the run
        failures.append(f"{step}: {type(error).__name__}: {error}")
        log.error("after training, the %s failed (the checkpoints and the other outputs are kept): "
                  "%s: %s", step, type(error).__name__, error, exc_info=log.isEnabledFor(logging.DEBUG))
        return None


def run_training(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train P-TAME as configured, then evaluate and write ``metrics.json`` into ``run_dir``.

    Returns:
        the flat metrics dict that was written (on rank 0; other ranks return the losses).
    """
    run_dir = Path(run_dir)
    check_final_evaluation_settings(cfg)
    check_training_length(cfg)
    configure_torch(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    resume_from = cfg.get("resume_from")
    # read safely first: a clear error before any work, and no pickled code is run
    resumed_step = int(read_checkpoint(resume_from)["global_step"]) if resume_from is not None else None
    module, datamodule = build_module(cfg)
    module.trained_with = {"experiment": str(cfg.get("run_name") or "unnamed"), "seed": int(cfg.seed)}
    if hasattr(datamodule, "use_bad_image_policy"):  # image files: training skips unreadable ones
        datamodule.use_bad_image_policy("skip", run_dir / "skipped_images.txt")
    loggers = build_loggers(cfg, run_dir)
    if resumed_step is not None:
        continue_csv_history(loggers, resumed_step)
    callbacks = build_callbacks(cfg, run_dir)
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(run_dir)
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    metrics = final_losses(trainer)
    if not trainer.is_global_zero:
        return metrics
    back_on_device(trainer, module)  # Lightning's teardown left it on the CPU
    # independent steps: metrics.json is written whatever happens to the figures, and the other way
    failures: list[str] = []
    metrics.update(_guarded("final evaluation", failures, lambda: run_final_evaluation(cfg, module, datamodule)) or {})
    metrics["explanation_resolution"] = float(module.ptame.resolution)
    write_json_atomic(run_dir / "metrics.json", metrics)
    final = {f"final/{key}": value for key, value in metrics.items() if "/" in key and not key.startswith(("train/", "val/"))}
    for logger in loggers:  # the final localisation figures reach the loggers too
        if final:
            logger.log_metrics(final, step=trainer.global_step)
            logger.save()
    log.info("metrics written to %s", run_dir / "metrics.json")
    _guarded("overlay figure", failures, lambda: write_overlays(cfg, module, datamodule, run_dir, loggers))
    if failures:
        (run_dir / "post_training_errors.txt").write_text("\n".join(failures) + "\n")
        log.error("%d post-training step(s) failed; see %s", len(failures), run_dir / "post_training_errors.txt")
    return metrics
