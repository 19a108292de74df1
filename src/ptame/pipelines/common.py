"""What the pipelines behind ``train.py``, ``evaluate.py`` and the sweep share: torch settings,
the frozen networks built from a config, and config-group options read through Hydra's own
search path (so configs are found wherever the application's ``conf/`` lives)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ptame.networks.frozen import AuxiliaryFeatureExtractor, Backbone


#: messages of a normal run that do not concern the user (matched at the message's start)
EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen networks, by design
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning, not ptame's to fix
)


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip")


def quiet_expected_messages() -> None:
    """Silence the warnings of :data:`EXPECTED_WARNINGS` and Lightning's logger advert; every
    other warning still shows."""
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_an_advert not in rank_zero.filters:
        rank_zero.addFilter(_not_an_advert)


def check_accelerator(cfg: DictConfig) -> None:
    """Refuse a GPU preset (``trainer.accelerator=gpu``, e.g. the ImageNet experiments) on a
    machine without CUDA, saying how to run it on the CPU."""
    accelerator = str((cfg.get("trainer") or {}).get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError("this preset expects a GPU (trainer.accelerator=gpu) and none is available "
                           "here; add trainer=cpu to run it on the CPU")


def configure_torch(cfg: DictConfig) -> None:
    """Threads and float32 matmul precision from the config (``threads: null`` keeps torch's);
    the expected messages of a normal run silenced (:func:`quiet_expected_messages`); a GPU
    preset refused without a GPU (:func:`check_accelerator`)."""
    check_accelerator(cfg)
    quiet_expected_messages()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))


def back_on_device(trainer: Any, module: torch.nn.Module) -> torch.device:
    """Move ``module`` back to the device ``trainer`` ran it on and return that device.

    Lightning moves a module to the CPU when ``fit`` or ``test`` ends (its strategy's teardown);
    what runs after it (the final evaluation, the cost figures, the analyses) belongs on the
    trainer's device, not on the CPU."""
    device = trainer.strategy.root_device
    module.to(device)
    return device


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    """One logger per entry of ``cfg.logger``, each writing under ``run_dir``."""
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None:
            continue
        loggers.append(instantiate(logger_cfg, save_dir=str(run_dir)))
        logging.getLogger(__name__).info("logger %s -> %s", name, run_dir)
    return loggers


def quiet_wandb_logger(**kwargs: Any) -> Any:
    """Lightning's ``WandbLogger`` without the ``anonymous=None`` it passes to ``wandb.init``
    (which makes W&B warn "The anonymous setting has no effect" on every run)."""
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(**kwargs)
    if logger._wandb_init.get("anonymous", "unset") is None:
        del logger._wandb_init["anonymous"]
    return logger


def log_results(loggers: list[Any], results: dict[str, dict[str, float]], figures: dict[str, Any],
                step: int = 0) -> None:
    """Send an evaluation's figures (``<method>/<metric>``) to every logger, and its tables and
    pictures (``figures``: name -> PNG path) to the ones that take them (W&B)."""
    from lightning.pytorch.loggers import WandbLogger

    flat = {f"{method}/{metric}": float(value) for method, values in results.items()
            for metric, value in values.items() if isinstance(value, (int, float))}
    for logger in loggers:
        logger.log_metrics(flat, step=step)
        if isinstance(logger, WandbLogger):
            columns = sorted({metric for values in results.values() for metric in values})
            logger.log_table(key="results", columns=["method", *columns],
                             data=[[method, *[values.get(c) for c in columns]] for method, values in results.items()])
            for name, path in figures.items():
                logger.log_image(key=name, images=[str(path)])
        logger.save()


def build_networks(cfg: DictConfig) -> tuple[Backbone, AuxiliaryFeatureExtractor]:
    """The frozen backbone and auxiliary of ``cfg.backbone`` / ``cfg.auxiliary``; in T-TAME mode
    (``auxiliary=from_backbone``, a config with a ``backbone`` key) the auxiliary reads the
    features of this very backbone instance."""
    backbone = instantiate(cfg.backbone)
    if "backbone" in cfg.auxiliary:
        auxiliary = instantiate(cfg.auxiliary, backbone=backbone)
    else:
        auxiliary = instantiate(cfg.auxiliary)
    return backbone, auxiliary


def build_ptame_module(cfg: DictConfig, backbone: Backbone, auxiliary: AuxiliaryFeatureExtractor) -> Any:
    """A fresh :class:`~ptame.module.PTAMEModule` (untrained head) for ``backbone`` and
    ``auxiliary`` with the recipe of ``cfg.model`` and ``cfg.loss``."""
    return instantiate(cfg.model, backbone=backbone, auxiliary=auxiliary, loss=instantiate(cfg.loss))


@contextlib.contextmanager
def quiet_lightning_info() -> Iterator[None]:
    """Lightning's INFO lines (devices, stopping reason) off inside the block; warnings stay."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _initialised_hydra() -> Any:
    from hydra.core.global_hydra import GlobalHydra

    hydra = GlobalHydra.instance()
    if not hydra.is_initialized():
        raise RuntimeError(
            "config groups are read through Hydra's search path: run through an entry point "
            "(evaluate.py) or inside hydra.initialize_config_dir(...)"
        )
    return hydra


def group_options(group: str) -> list[str]:
    """The options of a config group (``conf/<group>/*.yaml``, files starting with ``_`` are
    bases of other options), sorted."""
    options = _initialised_hydra().config_loader().get_group_options(group)
    return sorted(option for option in options if not option.startswith("_"))


def group_option(group: str, name: str) -> DictConfig:
    """The content of ``conf/<group>/<name>.yaml`` (its own defaults applied, interpolations
    unresolved, not in struct mode), read through the running Hydra application's config search
    path."""
    from hydra import compose

    options = group_options(group)
    if name not in options:
        raise ValueError(f"unknown {group} {name!r}; available: {options}")
    node = compose(config_name=f"{group}/{name}")[group]
    return OmegaConf.create(OmegaConf.to_container(node, resolve=False))
