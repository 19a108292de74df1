"""The evaluation pipeline behind ``evaluate.py``: build the explainers named in the config,
run every metric on the same test images (1 or N processes), write the result tables."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from ptame.evaluation import ExplainerEvaluation, evaluate_costs, markdown_table, write_results
from ptame.analysis.contributions import contribution_figures, format_layer_contributions
from ptame.analysis.latex import write_latex_table
from ptame.analysis.pipeline import run_analyses
from ptame.explainers.base import Explainer
from ptame.training import configure_torch

log = logging.getLogger(__name__)

# the repository's conf/ (editable installs); evaluate.py passes its own folder explicitly
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def available_explainers(conf_dir: Path = CONF_DIR) -> list[str]:
    """Names of the explainer configs in ``conf/explainer/``."""
    return sorted(path.stem for path in (conf_dir / "explainer").glob("*.yaml"))


def build_explainer(
    name: str, cfg: DictConfig, backbone: Any, conf_dir: Path = CONF_DIR,
    _parents: tuple[str, ...] = (),
) -> Explainer:
    """Instantiate ``conf/explainer/<name>.yaml`` (interpolations resolved against ``cfg``, then
    ``cfg.explainer_options.<name>`` applied) for ``backbone``.

    A config with ``members: [names]`` (an ensemble) gets those explainers, each built by this
    function with its own options, as ``members={name: explainer}``; a config that reaches
    itself through its members is refused."""
    path = conf_dir / "explainer" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown explainer {name!r}; available: {available_explainers(conf_dir)}")
    if name in _parents:
        raise ValueError(f"explainer {name!r} lists itself among its members: "
                         f"{' -> '.join([*_parents, name])}")
    if name == "ptame" and not cfg.get("ckpt_path"):
        raise ValueError("explainer 'ptame' needs ckpt_path=<run>/checkpoints/last.ckpt")
    node = OmegaConf.merge(OmegaConf.load(path), (cfg.get("explainer_options") or {}).get(name) or {})
    member_names = node.pop("members", None)
    root = OmegaConf.create({**OmegaConf.to_container(cfg, resolve=False), "explainer": node})
    kwargs: dict[str, Any] = {}
    if member_names is not None:
        if (not OmegaConf.is_list(member_names) or not member_names
                or len(set(map(str, member_names))) != len(member_names)):
            raise ValueError(f"explainer {name!r}: members must be a non-empty list of distinct "
                             f"explainer config names, got {member_names!r}")
        kwargs["members"] = {
            str(member): build_explainer(str(member), cfg, backbone, conf_dir, (*_parents, name))
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
    return DataLoader(dataset, batch_size=loader.batch_size, num_workers=loader.num_workers, shuffle=False)


def run_evaluation(
    cfg: DictConfig, run_dir: str | Path, conf_dir: str | Path = CONF_DIR
) -> dict[str, dict[str, float]]:
    """Evaluate ``cfg.explainers`` on the test subset; write results.{json,csv,md,tex} and
    road_curves.png into ``run_dir``, plus the analyses switched on in ``cfg.analysis``
    (methods_grid.png, mprt.json/png). Returns ``{method: {metric: value}}`` (rank 0).

    ``conf_dir`` is the config folder holding ``explainer/<name>.yaml``."""
    run_dir = Path(run_dir)
    configure_torch(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate(cfg.data)
    backbone = instantiate(cfg.backbone)
    names = list(cfg.explainers)
    if not names:
        raise ValueError("explainers is empty: name at least one config of conf/explainer/")
    explainers = {name: build_explainer(name, cfg, backbone, Path(conf_dir)) for name in names}
    loader = test_loader(datamodule, cfg.get("max_images"))
    module = ExplainerEvaluation(
        explainers, backbone, OmegaConf.to_container(cfg.metrics, resolve=True),
        has_masks=bool(getattr(datamodule, "has_masks", False)),
    )
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=False, callbacks=[], inference_mode=False,
        enable_checkpointing=False, default_root_dir=str(run_dir),
    )
    trainer.test(module, dataloaders=loader, verbose=False)
    if not trainer.is_global_zero:
        return module.results
    results = {name: dict(figures) for name, figures in module.results.items()}
    if int(cfg.get("cost_images", 0)) > 0:
        images = next(iter(loader))["image"][: int(cfg.cost_images)].to(module.device)
        for name, cost in evaluate_costs(explainers, images).items():
            results[name].update(cost)
    contributions = contribution_figures(explainers)  # Table 2's layer contributions
    for name, shares in contributions.items():
        results[name].update(shares)
    paths = write_results(run_dir, results, module.curves)
    paths["tex"] = write_latex_table(run_dir / "results.tex", results)
    print(f"\nResults on {len(loader.dataset)} test images:\n{markdown_table(results)}")
    if contributions:
        print(format_layer_contributions(contributions))
    analysis = OmegaConf.to_container(cfg.analysis, resolve=True) if "analysis" in cfg else None
    paths.update(run_analyses(
        analysis, run_dir, explainers, loader, module.device,
        lambda name: build_explainer(name, cfg, backbone, Path(conf_dir)),
        getattr(datamodule, "class_names", None),
    ))
    log.info("results written to %s", ", ".join(str(p) for p in paths.values()))
    return results
