"""The evaluation pipeline behind ``evaluate.py``: build the explainers named in the config,
run every metric on the same test images (1 or N processes), write the result tables, then the
optional analyses (``analysis``: the images x methods figure and the MPRT sanity check)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ptame.checkpoint import read_checkpoint
from ptame.data.bad_images import SkippedImages
from ptame.data.gpu_decoding import decode_on_device
from ptame.evaluation.contributions import contribution_figures, format_layer_contributions
from ptame.evaluation.figures import explanation_grid, plot_road_curves
from ptame.evaluation.mprt import Retrainer, format_mprt, plot_mprt, run_mprt
from ptame.evaluation.suite import ExplainerEvaluation, evaluate_costs
from ptame.evaluation.tables import markdown_table, write_tables
from ptame.explainers.base import Explainer
from ptame.explainers.ptame import load_explainer
from ptame.io import write_json_atomic
from ptame.pipelines.common import (
    back_on_device,
    build_loggers,
    build_ptame_module,
    configure_torch,
    group_option,
    group_options,
    log_results,
    quiet_lightning_info,
)

log = logging.getLogger(__name__)


def git_commit() -> str | None:
    """The commit of the ptame source tree in use (``+dirty`` with uncommitted changes), or None
    outside a git checkout (an installed wheel)."""
    import subprocess

    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def provenance(cfg: DictConfig, backbone: Any, images: int, device: torch.device) -> dict[str, Any]:
    """What a table's numbers depend on, for results.json: the images, the metric settings (AUC
    convention, imputer, percentages, pixel rules, precision), seed, checkpoints, backbone,
    software versions and git commit."""
    import datetime

    import ptame

    return {
        "images": int(images),
        "metrics": OmegaConf.to_container(cfg.metrics, resolve=True),
        "seed": int(cfg.seed),
        "checkpoint": str(Path(cfg.ckpt_path).resolve()) if cfg.get("ckpt_path") else None,
        "ttame_checkpoint": str(Path(cfg.ttame_ckpt_path).resolve()) if cfg.get("ttame_ckpt_path") else None,
        "backbone": backbone.identity() if hasattr(backbone, "identity") else str(backbone),
        "explainers": list(cfg.explainers),
        "device": str(device),
        "ptame_version": ptame.__version__,
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def compared_checkpoints(cfg: DictConfig, backbone: Any) -> dict[str, Explainer]:
    """``cfg.compare_checkpoints`` (label -> checkpoint, or a list of checkpoints labelled by
    their run folders) as P-TAME explainers ``ptame@<label>`` of ``backbone``, each with the
    auxiliary its recipe stores: one table row per checkpoint (e.g. Table 2's auxiliaries)."""
    entries = cfg.get("compare_checkpoints") or {}
    if OmegaConf.is_list(entries) or isinstance(entries, list):
        paths = [str(path) for path in entries]
        labels = [Path(path).parent.parent.name or Path(path).stem for path in paths]
        if len(set(labels)) != len(labels):
            raise ValueError(f"compare_checkpoints: the run folders {labels} repeat; give a mapping "
                             "{label: checkpoint} instead")
        entries = dict(zip(labels, paths, strict=True))
    explainers = {}
    for label, path in dict(entries).items():
        explainer = load_explainer(str(path), backbone, map_normalisation=cfg.model.map_normalisation)
        explainer.name = f"ptame@{label}"
        explainers[explainer.name] = explainer.eval()
    return explainers


def skipped_files(trainer: L.Trainer, skipped: SkippedImages) -> list[str]:
    """Every process's skipped files (``bad_images=skip``), sorted, on every process."""
    entries = list(skipped.entries.values())
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[list[str]] = [[] for _ in range(trainer.world_size)]
        torch.distributed.all_gather_object(gathered, entries)
        entries = [entry for part in gathered for entry in part]
    return sorted(set(entries))


def build_explainer(
    name: str, cfg: DictConfig, backbone: Any, _parents: tuple[str, ...] = ()
) -> Explainer:
    """Instantiate the config group option ``explainer/<name>`` (interpolations resolved against
    ``cfg``, then ``cfg.explainer_options.<name>`` applied) for ``backbone``.

    A config with ``members: [names]`` (an ensemble) gets those explainers, each built by this
    function with its own options, as ``members={name: explainer}``; a config that reaches
    itself through its members is refused. Configs are read through Hydra's search path
    (:func:`ptame.pipelines.common.group_option`)."""
    if name in _parents:
        raise ValueError(f"explainer {name!r} lists itself among its members: "
                         f"{' -> '.join([*_parents, name])}")
    if name not in group_options("explainer"):
        raise ValueError(f"unknown explainer {name!r}; available: {group_options('explainer')}")
    if name == "ptame" and not cfg.get("ckpt_path"):
        raise ValueError("explainer 'ptame' needs ckpt_path=<run>/checkpoints/last.ckpt")
    node = OmegaConf.merge(group_option("explainer", name),
                           (cfg.get("explainer_options") or {}).get(name) or {})
    member_names = node.pop("members", None)
    root = OmegaConf.create({**OmegaConf.to_container(cfg, resolve=False), "explainer": node})
    kwargs: dict[str, Any] = {}
    if member_names is not None:
        if (not OmegaConf.is_list(member_names) or not member_names
                or len(set(map(str, member_names))) != len(member_names)):
            raise ValueError(f"explainer {name!r}: members must be a non-empty list of distinct "
                             f"explainer config names, got {member_names!r}")
        kwargs["members"] = {
            str(member): build_explainer(str(member), cfg, backbone, (*_parents, name))
            for member in member_names
        }
    explainer = instantiate(root.explainer, backbone=backbone, _partial_=True)(**kwargs)
    explainer.name = name
    return explainer.eval()


def test_loader(datamodule: Any, max_images: int | None) -> DataLoader:
    """The datamodule's test images (the first ``max_images``), with its batch size."""
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    dataset = loader.dataset
    if max_images is not None:
        dataset = Subset(dataset, range(min(int(max_images), len(dataset))))
    return DataLoader(dataset, batch_size=loader.batch_size, num_workers=loader.num_workers,
                      shuffle=False, collate_fn=loader.collate_fn)


def run_evaluation(cfg: DictConfig, run_dir: str | Path) -> dict[str, dict[str, float]]:
    """Evaluate ``cfg.explainers`` on the test subset; write results.{json,csv,md,tex} and
    road_curves.png into ``run_dir``, plus the analyses switched on in ``cfg.analysis``
    (methods_grid.png, mprt.json/png). Returns ``{method: {metric: value}}`` (rank 0).

    Explainer configs are read through Hydra's search path: call it from ``evaluate.py`` or
    inside ``hydra.initialize_config_dir``."""
    run_dir = Path(run_dir)
    configure_torch(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate(cfg.data)
    if hasattr(datamodule, "use_bad_image_policy"):  # image files: evaluation stops at an unreadable one
        datamodule.use_bad_image_policy("error", run_dir / "skipped_images.txt")
    backbone = instantiate(cfg.backbone)
    names = list(cfg.explainers)
    if not names:
        raise ValueError("explainers is empty: name at least one config of conf/explainer/")
    explainers = {name: build_explainer(name, cfg, backbone) for name in names}
    explainers.update(compared_checkpoints(cfg, backbone))
    loader = test_loader(datamodule, cfg.get("max_images"))
    module = ExplainerEvaluation(
        explainers, backbone, OmegaConf.to_container(cfg.metrics, resolve=True),
        has_masks=bool(getattr(datamodule, "has_masks", False)),
        skipped_images=getattr(datamodule, "skipped_images", None),
        has_object_masks=bool(getattr(datamodule, "has_object_masks", False)),
    )
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=False, callbacks=[], inference_mode=False, enable_progress_bar=False,
        enable_checkpointing=False, default_root_dir=str(run_dir),
    )
    trainer.test(module, dataloaders=loader, verbose=False)
    skipped = skipped_files(trainer, module.skipped_images)
    if not trainer.is_global_zero:
        return module.results
    device = back_on_device(trainer, module)  # Lightning's teardown left it on the CPU
    results = {name: dict(figures) for name, figures in module.results.items()}
    if skipped:  # a table must never silently cover fewer images
        for figures in results.values():
            figures["images_skipped"] = float(len(skipped))
    cost_images = cfg.get("cost_images", None)
    if cost_images is None or int(cost_images) > 0:  # null: one evaluation batch
        images = decode_on_device(next(iter(loader)), device)["image"]
        images = images[: int(cost_images)] if cost_images is not None else images
        for name, cost in evaluate_costs(explainers, images.to(device), precision=module.precision).items():
            results[name].update(cost)
    contributions = contribution_figures(explainers)  # Table 2's layer contributions
    for name, shares in contributions.items():
        results[name].update(shares)
    extra: dict[str, Any] = {"provenance": provenance(cfg, backbone, len(loader.dataset), device)}
    if skipped:
        extra["skipped_images"] = skipped
    paths = write_tables(run_dir, results, extra)
    if any(module.curves.get(method) for method in module.curves):
        paths["png"] = plot_road_curves(module.curves, run_dir / "road_curves.png")
    print(f"\nResults on {len(loader.dataset)} test images:\n{markdown_table(results)}")
    if contributions:
        print(format_layer_contributions(contributions))
    analysis = OmegaConf.to_container(cfg.analysis, resolve=True) if "analysis" in cfg else None
    retrainers = None
    if analysis and analysis.get("mprt") and (analysis.get("mprt_options") or {}).get("protocol") == "retrain":
        retrainers = {"ptame": head_retrainer(cfg, device)}
    paths.update(run_analyses(
        analysis, run_dir, explainers, loader, device,
        lambda name: build_explainer(name, cfg, backbone),
        getattr(datamodule, "class_names", None), retrainers,
    ))
    log.info("results written to %s", ", ".join(str(p) for p in paths.values()))
    loggers = build_loggers(cfg, run_dir)  # the configured loggers receive the table and the pictures
    if loggers:
        pictures = {Path(p).stem: p for p in paths.values() if str(p).endswith(".png")}
        log_results(loggers, results, pictures)
    return results


# the module settings a retrained head must share with the checkpoint's (its recipe)
RECIPE_HYPERPARAMETERS = ("lr", "weight_decay", "amsgrad", "betas", "scheduler", "pct_start", "input_size",
                          "activation", "upsampling", "map_normalisation", "seed")


def head_retrainer(cfg: DictConfig, device: torch.device | str) -> Retrainer:
    """MPRT's ``retrain`` protocol for the checkpoint ``cfg.ckpt_path``: a function that trains a
    fresh P-TAME head on a randomised explainer's backbone (its auxiliary kept) with the recipe of
    ``cfg`` (``model``, ``loss``, ``data``: the experiment the checkpoint was trained with) for
    the checkpoint's number of optimiser steps, seeded with ``cfg.seed``, on one ``device``.

    Raises:
        ValueError: ``cfg`` is not the checkpoint's recipe (another experiment, or module
            settings that differ from the stored ones), so the retrained head would not be
            comparable.
    """
    checkpoint = read_checkpoint(cfg.ckpt_path)
    steps = int(checkpoint.get("global_step") or 0)
    if steps < 1:
        raise ValueError(f"{cfg.ckpt_path} records no training steps: MPRT's retrain protocol needs the budget "
                         "of a trained checkpoint")
    stored = checkpoint.get("hyper_parameters") or {}
    wanted = OmegaConf.to_container(cfg.model, resolve=True)
    differing = [f"{key}: checkpoint {stored[key]!r}, config {wanted.get(key)!r}" for key in RECIPE_HYPERPARAMETERS
                 if key in stored and key in wanted and _plain(stored[key]) != _plain(wanted[key])]
    trained_with = (checkpoint.get("ptame") or {}).get("trained_with") or {}
    experiment = trained_with.get("experiment")
    if experiment is not None and experiment != cfg.get("run_name"):
        differing.insert(0, f"run_name (the experiment unless overridden): checkpoint {experiment!r}, "
                            f"config {cfg.get('run_name')!r}")
    if differing:
        raise ValueError("MPRT protocol 'retrain' retrains with the config's recipe, which is not the one "
                         f"{cfg.ckpt_path} was trained with ({'; '.join(differing)}): run evaluate.py with the "
                         "checkpoint's experiment and overrides")
    device = torch.device(device)

    def retrain(randomised: Explainer) -> Explainer:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        module = build_ptame_module(cfg, randomised.backbone, randomised.model.auxiliary)
        with quiet_lightning_info():  # its device lines, once per block
            trainer = L.Trainer(
                accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=steps, max_epochs=-1,
                precision=cfg.trainer.get("precision", "32-true"), logger=False, callbacks=[],
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, limit_val_batches=0,
                default_root_dir=str(Path(cfg.paths.output_dir) / "mprt_retrain"),
            )
            trainer.fit(module, datamodule=instantiate(cfg.data))
        explainer = module.explainer()
        explainer.name = getattr(randomised, "name", "ptame")
        return explainer.to(device).eval()

    return retrain


def _plain(value: Any) -> Any:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value


def first_images(batches: Iterable[Mapping[str, Tensor]], count: int) -> Tensor:
    """The first ``count`` images (N, 3, H, W) of a dataloader (fewer if it has fewer)."""
    pieces, seen = [], 0
    for batch in batches:
        pieces.append(decode_on_device(batch, "cpu")["image"][: count - seen].cpu())
        seen += pieces[-1].shape[0]
        if seen >= count:
            break
    if not pieces:
        raise ValueError("the test set is empty")
    return torch.cat(pieces)


def run_analyses(
    settings: Mapping[str, Any] | None,
    run_dir: str | Path,
    explainers: Mapping[str, Explainer],
    batches: Iterable[Mapping[str, Tensor]],
    device: torch.device | str,
    build: Callable[[str], Explainer],
    class_names: Any = None,
    retrainers: Mapping[str, Retrainer] | None = None,
) -> dict[str, Path]:
    """Write the analyses switched on in ``settings`` (the ``analysis`` config) into ``run_dir``.

    Args:
        settings: ``figure_images`` (N > 0: methods_grid.png of the first N test images),
            ``figure_upsampling``, ``mprt`` (bool) and ``mprt_options``.
        explainers: the evaluated explainers (name -> explainer).
        batches: the test dataloader.
        device: where images go.
        build: builds an explainer by config name (MPRT explainers not evaluated).
        class_names: the dataset's class names (row titles), or None.
        retrainers: name -> head retraining of MPRT's ``retrain`` protocol
            (:func:`head_retrainer`).

    Returns:
        name -> written path.
    """
    settings = settings or {}
    run_dir = Path(run_dir)
    paths: dict[str, Path] = {}
    figure_count = int(settings.get("figure_images") or 0)
    options = settings.get("mprt_options") or {}
    mprt_count = int(options.get("images", 32)) if settings.get("mprt") else 0
    if max(figure_count, mprt_count) <= 0:
        return paths
    images = first_images(batches, max(figure_count, mprt_count)).to(device)
    if figure_count > 0:
        paths["methods_grid"] = explanation_grid(
            explainers, images[:figure_count], run_dir / "methods_grid.png", class_names,
            str(settings.get("figure_upsampling", "bilinear")),
        )
    if mprt_count > 0:
        names = list(options.get("explainers") or ["ptame"])
        chosen = {name: explainers[name] if name in explainers else build(name).to(device)
                  for name in names}
        results = run_mprt(chosen, images[:mprt_count], options, retrainers)
        summary = {"settings": {key: value for key, value in options.items() if key != "explainers"},
                   **{name: result.as_dict() for name, result in results.items()}}
        paths["mprt_json"] = write_json_atomic(run_dir / "mprt.json", summary)
        paths["mprt_png"] = plot_mprt(results, run_dir / "mprt.png")
        print(f"\nModel parameter randomisation test:\n{format_mprt(results)}")
    log.info("analyses written: %s", ", ".join(str(p) for p in paths.values()))
    return paths
