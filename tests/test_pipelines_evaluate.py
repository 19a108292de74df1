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


def test_the_progress_bar_advances_once_per_explainer_and_metric_of_every_batch(monkeypatch):
    import lightning as L
    import torch

    from ptame.evaluation import suite as suite_module
    from ptame.evaluation.suite import ExplainerEvaluation
    from ptame.explainers import CentreGaussianExplainer, RandomExplainer

    from .helpers.networks import make_backbone

    bars = []

    class RecordingProgress(suite_module.EvaluationProgress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.shown: list[str] = []
            bars.append(self)

        def step(self, key):
            self.shown.append(key)
            return super().step(key)

    monkeypatch.setattr(suite_module, "EvaluationProgress", RecordingProgress)
    backbone = make_backbone()
    explainers = {"centre": CentreGaussianExplainer(backbone), "random": RandomExplainer(backbone)}
    settings = {"adic": {"thresholds": [50]}, "insertion_deletion": {"steps": 2}, "localisation": False}
    evaluation = ExplainerEvaluation(explainers, backbone, settings, has_masks=False)
    data = [{"image": torch.rand(3, 16, 16), "index": torch.tensor(i)} for i in range(6)]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.test(evaluation, dataloaders=torch.utils.data.DataLoader(data, batch_size=2), verbose=False)
    (bar,) = bars
    per_batch = ["centre", "centre/adic", "centre/insertion_deletion",
                 "random", "random/adic", "random/insertion_deletion"]
    assert bar.bar.total == 3 * 6 and bar.bar.n == 3 * 6  # 3 batches x (2 explainers + 4 metrics)
    assert bar.shown == per_batch * 3

    # the loop outside Lightning (train.py, the callback) counts the same steps and honours max_images
    suites = {name: suite_module.build_metrics(backbone, settings, has_masks=False) for name in explainers}
    suite_module.evaluate_explainers(explainers, suites, torch.utils.data.DataLoader(data, batch_size=2),
                                     "cpu", max_images=3)
    assert bars[1].bar.total == 2 * 6 and bars[1].shown == per_batch * 2


def test_mprt_retrain_protocol_retrains_the_head_with_the_checkpoints_recipe_and_budget(trained, tmp_path, caplog):
    import logging

    cache, train_dir = trained
    checkpoint = train_dir / "checkpoints" / "last.ckpt"
    common = [*TINY_DATA, f"paths.cache_dir={cache}", f"paths.output_dir={tmp_path}", f"ckpt_path={checkpoint}",
              "explainers=[ptame]", "max_images=4", "cost_images=0", "metrics.road=null",
              "metrics.insertion_deletion=null", "metrics.adic=null", "analysis.mprt=true",
              "analysis.mprt_options.protocol=retrain", "analysis.mprt_options.explainers=[ptame,sobel]",
              "analysis.mprt_options.images=4", "analysis.mprt_options.blocks=[stem,fc]"]
    steps = __import__("torch").load(checkpoint, weights_only=True)["global_step"]
    cfg, mismatched = compose_config("evaluate", common), compose_config("evaluate", [*common, "model.lr=0.1"])
    with hydra_search_path(), caplog.at_level(logging.INFO, logger="ptame.evaluation.mprt"):
        run_evaluation(cfg, tmp_path / "run")
    mprt = json.loads((tmp_path / "run" / "mprt.json").read_text())
    assert mprt["settings"]["protocol"] == "retrain" and mprt["ptame"]["protocol"] == "retrain"
    assert len(mprt["ptame"]["retrain_seconds"]) == 2 and mprt["sobel"]["retrain_seconds"] == []
    assert sum("retrained on the backbone randomised up to" in r.getMessage() for r in caplog.records) == 2
    assert mprt["sobel"]["ssim"]["randomised"] == pytest.approx([1.0, 1.0])

    # the same recipe, seed and budget: retrained on the original backbone, the head is the
    # checkpoint's own, so under this protocol only the backbone's randomisation moves the maps
    import torch

    from ptame.evaluation.mprt import cumulative_randomisations
    from ptame.explainers.ptame import load_explainer
    from ptame.pipelines.evaluate import head_retrainer

    original = load_explainer(checkpoint, cache_dir=cache)
    retrain = head_retrainer(cfg, "cpu")
    reference = {k: v.clone() for k, v in original.model.attention.state_dict().items()}
    reproduced = retrain(original).model.attention.state_dict()
    assert steps >= 1 and all(torch.allclose(reproduced[k].float(), v.float(), atol=1e-5) for k, v in reference.items())
    _, randomised = next(cumulative_randomisations(original, blocks=["fc"], seed=0))
    other = retrain(randomised).model.attention.state_dict()
    assert max(float((other[k].float() - v.float()).abs().max()) for k, v in reference.items()) > 1e-3

    with hydra_search_path(), pytest.raises(ValueError, match=r"lr: checkpoint 0\.005, config 0\.1"):
        run_evaluation(mismatched, tmp_path / "mismatch")


def test_two_object_images_get_class_specific_localisation_in_train_and_evaluate(tmp_path, capsys):
    """data=generated_pairs through the real entry points: metrics.json and results.json carry
    <method>/class_pointing_game[_other] and the energies for P-TAME, Grad-CAM and the random map."""
    from ptame.metrics.localisation import CLASS_SPECIFIC_KEYS

    common = [*TINY_DATA, "data=generated_pairs", f"paths.cache_dir={tmp_path / 'cache'}"]
    metrics = run_training(compose_config("train", [*common, "final_evaluation.overlay_images=0"]), tmp_path / "train")
    printed = capsys.readouterr().out
    assert "Class-specific, each object's class explained (< 2 px)" in printed
    assert "both objects' classes are its top 2" in printed
    for method in ("ptame", "random", "centre_gaussian", "gradcam"):
        values = [metrics[f"{method}/{key}"] for key in CLASS_SPECIFIC_KEYS]
        assert all(0.0 <= value <= 1.0 for value in values)
    # maps that ignore the class score the same on the explained object and on the other
    assert metrics["random/class_pointing_game"] == metrics["random/class_pointing_game_other"]
    assert metrics["centre_gaussian/class_energy_pointing_game"] == pytest.approx(
        metrics["centre_gaussian/class_energy_pointing_game_other"], abs=0.15)
    assert 0.0 <= metrics["backbone/top2_both_objects"] <= 1.0

    cfg = compose_config("evaluate", [
        *common, f"ckpt_path={tmp_path / 'train' / 'checkpoints' / 'last.ckpt'}", "explainers=[ptame,gradcam,random]",
        "max_images=8", "cost_images=0", "metrics.road=null", "metrics.insertion_deletion=null", "metrics.adic=null"])
    with hydra_search_path():
        results = run_evaluation(cfg, tmp_path / "evaluate")
    saved = method_results(json.loads((tmp_path / "evaluate" / "results.json").read_text()))
    for method in ("ptame", "gradcam", "random"):
        for key in CLASS_SPECIFIC_KEYS:
            assert saved[method][key] == pytest.approx(results[method][key])
            assert f"{key}_se" in saved[method]
    assert "class_pointing_game_other" in (tmp_path / "evaluate" / "results.md").read_text()
