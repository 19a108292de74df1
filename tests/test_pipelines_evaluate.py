"""run_evaluation with the analyses switched on, in-process, on a very small generated dataset
(the classifiers train for one epoch on 128 images: only the plumbing is checked here; the
acceptance checks on the real default-experiment classifiers are in test_analysis_generated)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ptame.evaluation.tables import method_results
from ptame.pipelines.evaluate import run_evaluation
from ptame.pipelines.train import run_training

from .helpers.configs import compose_config, hydra_search_path

TINY_DATA = [
    "experiment=smoke", "run_name=test", "data.num_train=128", "data.num_val=32", "data.num_test=32",
    "data.batch_size=32", "data.eval_batch_size=16", "backbone.epochs=1", "auxiliary.epochs=1",
    "backbone.min_accuracy_above_chance=null", "auxiliary.min_accuracy_above_chance=null",  # plumbing only
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(cache dir, training run dir) of a tiny training run."""
    cache = tmp_path_factory.mktemp("cache")
    train_dir = tmp_path_factory.mktemp("train")
    run_training(compose_config("train", [*TINY_DATA, f"paths.cache_dir={cache}", "final_evaluation.overlay_images=0",
                                          "final_evaluation.max_images=8"]), train_dir)
    return cache, train_dir


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, trained):
    cache, train_dir = trained
    common = [*TINY_DATA, f"paths.cache_dir={cache}"]
    run_dir = tmp_path_factory.mktemp("evaluate")
    cfg = compose_config("evaluate", [
        *common, f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}",
        "explainers=[ptame,gradcam,rise,random]", "+explainer_options.rise.num_masks=8",
        "max_images=8", "cost_images=2", "metrics.road.percentages=[50]",
        "metrics.insertion_deletion.steps=4", "analysis.mprt=true",
        "analysis.mprt_options.explainers=[ptame,sobel]", "analysis.mprt_options.images=4",
        "analysis.figure_images=2",
    ])
    with hydra_search_path():  # explainer configs are read through Hydra's search path
        results = run_evaluation(cfg, run_dir)
    return run_dir, results


def test_results_carry_layer_contributions_and_measured_costs(evaluated, capsys):
    run_dir, results = evaluated
    saved = method_results(json.loads((run_dir / "results.json").read_text()))
    shares = {k: v for k, v in saved["ptame"].items() if k.startswith("layer_contribution/")}
    assert list(shares) == ["layer_contribution/layer2", "layer_contribution/layer3",
                            "layer_contribution/layer4"]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert not any(k.startswith("layer_contribution/") for k in saved["rise"])
    # measured by the counting hook: 8 masks + the prediction pass, one pass for the others
    assert saved["rise"]["forward_passes"] == 9.0
    assert saved["ptame"]["forward_passes"] == saved["gradcam"]["forward_passes"] == 1.0
    assert all(saved[m]["ms_per_image"] > 0 for m in saved)


def test_latex_table_lists_every_method(evaluated):
    run_dir, results = evaluated
    tex = (run_dir / "results.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\textbf{" in tex
    for method in results:
        assert f"\n{method} & " in tex
    assert "Layer & ptame" in tex


def test_mprt_and_methods_grid_are_written(evaluated):
    run_dir, _ = evaluated
    mprt = json.loads((run_dir / "mprt.json").read_text())
    assert mprt["settings"]["order"] == "bottom_up" and mprt["settings"]["images"] == 4
    blocks = ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert mprt["ptame"]["blocks"] == mprt["sobel"]["blocks"] == blocks
    assert mprt["ptame"]["ssim"]["original"] == [1.0] * 6
    assert mprt["sobel"]["ssim"]["randomised"] == pytest.approx([1.0] * 6)
    assert mprt["sobel"]["passes"] == {"original": False, "randomised": False}
    assert (run_dir / "mprt.png").read_bytes()[:4] == b"\x89PNG"
    with Image.open(run_dir / "methods_grid.png") as grid:
        assert grid.size == (round(1.9 * 5 * 100), round(1.9 * 2 * 100))


def test_what_runs_after_lightning_goes_back_to_the_trainers_device():
    """Lightning leaves a module on the CPU after fit/test; the final evaluation, the cost figures
    and the analyses run where the trainer ran (a GPU), not there."""
    from types import SimpleNamespace

    import torch

    from ptame.pipelines.common import back_on_device

    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))
    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert back_on_device(trainer, module) == torch.device("meta")
    assert module[0].weight.device.type == "meta"


def test_the_configured_logger_receives_the_evaluation_table(evaluated):
    import csv

    run_dir, results = evaluated
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    logged = {key: float(value) for row in rows for key, value in row.items() if value and key != "step"}
    assert logged["ptame/AD@100"] == pytest.approx(results["ptame"]["AD@100"], rel=1e-6)
    assert logged["random/ROAD_MoRF_AUC"] == pytest.approx(results["random"]["ROAD_MoRF_AUC"], rel=1e-6)


def test_results_go_to_weights_and_biases_as_a_table_and_pictures(tmp_path, monkeypatch):
    import torch
    from lightning.pytorch.loggers import WandbLogger

    from ptame.evaluation.figures import overlay_grid
    from ptame.pipelines.common import log_results

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="ptame-test", save_dir=str(tmp_path), offline=True)
    picture = overlay_grid(torch.rand(1, 3, 8, 8), {"ptame": torch.rand(1, 8, 8)}, tmp_path / "grid.png")
    log_results([logger], {"ptame": {"AD@15": 4.8, "AD@15_se": 0.2}, "random": {"AD@15": 40.0}}, {"grid": picture})
    logger.experiment.finish()
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    assert any(run.rglob("*.wandb"))
    assert any("results" in path.name for path in run.rglob("*.table.json"))


def test_several_checkpoints_give_one_row_each(tmp_path_factory, trained):
    """compare_checkpoints: one P-TAME row per checkpoint in one table (the same checkpoint
    under two labels gives the same figures as the ptame row)."""
    cache, train_dir = trained
    checkpoint = train_dir / "checkpoints" / "last.ckpt"
    out = tmp_path_factory.mktemp("compare")
    cfg = compose_config("evaluate", [
        *TINY_DATA, f"paths.cache_dir={cache}", f"ckpt_path={checkpoint}", "explainers=[ptame,random]",
        f"compare_checkpoints={{first:'{checkpoint}',second:'{checkpoint}'}}", "max_images=8", "cost_images=0",
        "metrics.road.percentages=[50]", "metrics.insertion_deletion.steps=4",
    ])
    with hydra_search_path():
        compared = run_evaluation(cfg, out)
    assert list(compared) == ["ptame", "random", "ptame@first", "ptame@second"]
    for key in ("AD@100", "ROAD_MoRF_AUC", "insertion_AUC"):
        assert compared["ptame@first"][key] == compared["ptame@second"][key] == pytest.approx(compared["ptame"][key])
    assert "| ptame@first |" in (out / "results.md").read_text()


def test_the_evaluation_logs_each_batch_with_its_time_per_method_and_metric_and_an_eta(caplog):
    import logging

    import lightning as L
    import torch

    from ptame.evaluation.suite import ExplainerEvaluation
    from ptame.explainers import CentreGaussianExplainer, RandomExplainer

    from .helpers.networks import make_backbone

    backbone = make_backbone()
    explainers = {"centre": CentreGaussianExplainer(backbone), "random": RandomExplainer(backbone)}
    evaluation = ExplainerEvaluation(explainers, backbone, {"adic": {"thresholds": [50]}, "localisation": False},
                                     has_masks=False)
    data = [{"image": torch.rand(3, 16, 16), "index": torch.tensor(i)} for i in range(6)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.INFO, logger="ptame.evaluation.suite"):
        trainer.test(evaluation, dataloaders=loader, verbose=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluation batch")]
    assert [line.split(" in ")[0] for line in lines] == [f"evaluation batch {i}/3" for i in (1, 2, 3)]
    assert "centre " in lines[0] and "centre/adic " in lines[0] and "random/adic " in lines[0]
    assert "ETA" in lines[0] and lines[-1].endswith("ETA 0 s")
