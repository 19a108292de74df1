"""Acceptance checks of the analyses on the generated dataset with the default experiment's real
classifiers (small VGG backbone, small ResNet auxiliary; trained into a fresh cache, minutes):
the comparison table end to end through evaluate.py, the sanity check and the checkpoint grid."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from PIL import Image

from ptame.evaluation.tables import method_results
from ptame.evaluation.mprt import cumulative_randomisations, model_parameter_randomisation
from ptame.explainers import SobelEdgeExplainer
from ptame.data.generated import GeneratedShapesSpec, load_or_generate
from ptame.explainers import CAMExplainer, load_explainer
from ptame.data.generated_classifiers import generated_backbone

from .helpers.entry_points import failure_output, run_entry_point

pytestmark = pytest.mark.slow

METHODS = ["ptame", "gradcam", "gradcampp", "scorecam", "ablationcam", "rise", "opticam", "random",
           "centre_gaussian"]


def run_script(script: str, run_dir, cache_dir, *overrides, timeout=1800) -> subprocess.CompletedProcess:
    result = run_entry_point(script, "experiment=default", f"paths.cache_dir={cache_dir}",
                             f"hydra.run.dir={run_dir}", *overrides, timeout=timeout)
    assert result.returncode == 0, failure_output(result)
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cache_dir):
    """P-TAME trained for one epoch (125 steps) of the default experiment."""
    run_dir = tmp_path_factory.mktemp("default-run")
    run_script("train.py", run_dir, cache_dir, "trainer.max_epochs=1",
               "final_evaluation.overlay_images=0", "final_evaluation.max_images=64")
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, cache_dir, checkpoint):
    run_dir = tmp_path_factory.mktemp("evaluate")
    result = run_script(
        "evaluate.py", run_dir, cache_dir, f"ckpt_path={checkpoint}", f"explainers=[{','.join(METHODS)}]",
        "+explainer_options.rise.num_masks=200", "+explainer_options.opticam.iterations=10",
        "max_images=32", "metrics.insertion_deletion.steps=8", "analysis.mprt=true",
        "analysis.mprt_options.explainers=[ptame,gradcam,sobel]", "analysis.figure_images=4",
    )
    return run_dir, result


def test_comparison_table_ranks_the_random_map_last_on_localisation(evaluation):
    run_dir, result = evaluation
    results = method_results(json.loads((run_dir / "results.json").read_text()))
    assert sorted(results) == sorted(METHODS)
    for metric in ("pointing_game", "energy_pointing_game"):
        others = {m: results[m][metric] for m in METHODS if m != "random"}
        assert results["random"][metric] < min(others.values()), (metric, results["random"][metric], others)
    tex = (run_dir / "results.tex").read_text()
    assert all(f"\n{method.replace('_', chr(92) + '_')} & " in tex for method in METHODS)
    assert "Results on 32 test images" in result.stdout and "Layer contributions" in result.stdout


def test_forward_passes_are_measured(evaluation):
    results = method_results(json.loads((evaluation[0] / "results.json").read_text()))
    channels = 128  # small_vgg layer4, the CAM target layer
    expected = {"ptame": 1, "gradcam": 1, "gradcampp": 1, "scorecam": 1 + channels,
                "ablationcam": 2 + channels, "rise": 200 + 1, "opticam": 1 + 10, "random": 1}
    assert {m: results[m]["forward_passes"] for m in expected} == expected
    assert results["ptame"]["resolution"] == 16 * 16 and results["gradcam"]["resolution"] == 4 * 4
    assert results["ptame"]["ms_per_image"] < results["rise"]["ms_per_image"]


def test_sanity_check_in_evaluate(evaluation):
    mprt = json.loads((evaluation[0] / "mprt.json").read_text())
    assert mprt["sobel"]["passes"] == {"original": False, "randomised": False}
    # Grad-CAM reads the backbone: dissimilar maps once two blocks are random (after the stem
    # alone its SSIM is 0.43-0.50 for seeds 0-2 on 128 images, too close to 0.5 to assert)
    assert mprt["gradcam"]["ssim"]["original"][1] < 0.5
    assert mprt["ptame"]["ssim"]["original"] == [1.0] * 6  # the head never reads the backbone
    with Image.open(evaluation[0] / "methods_grid.png") as grid:
        assert grid.size == (round(1.9 * 10 * 100), round(1.9 * 4 * 100))


@pytest.fixture(scope="module")
def mprt_setup(cache_dir, checkpoint):
    saved = torch.load(checkpoint, weights_only=True)["ptame"]["backbone"]["config"]
    backbone = generated_backbone(**{k: v for k, v in saved.items() if k != "_target_"})
    explainer = load_explainer(checkpoint, backbone)
    spec = GeneratedShapesSpec.from_config(saved["dataset"])
    images = load_or_generate(spec, cache_dir)["test"].images[:64].float() / 255
    return explainer, images


def test_ptame_maps_change_only_where_the_randomised_backbone_predicts_another_class(mprt_setup):
    explainer, images = mprt_setup
    result = model_parameter_randomisation(explainer, images)
    assert result.ssim["original"] == [1.0] * 6
    originals = explainer.backbone(images).argmax(1)
    kept, changed = [], []
    for step, (_, randomised) in enumerate(cumulative_randomisations(explainer)):
        predictions = randomised.backbone(images).argmax(1)
        for index, value in enumerate(result.ssim_per_image["randomised"][step]):
            (kept if predictions[index] == originals[index] else changed).append(value)
    assert min(kept) == pytest.approx(1.0) and sum(changed) / len(changed) < 0.9
    sobel = model_parameter_randomisation(SobelEdgeExplainer(explainer.backbone), images)
    assert not any(sobel.passes.values())
    gradcam = model_parameter_randomisation(CAMExplainer(explainer.backbone, "gradcam"), images,
                                            targets=["original"])
    assert min(gradcam.ssim["original"][1:]) < 0.5


@pytest.mark.xfail(strict=True, reason=(
    "P-TAME reads the backbone only to find c*: with the class fixed its maps never change (SSIM 1); "
    "with each randomised model's own class, 38-50% of the predictions survive a random stem and, "
    "on one-object images, the maps of the other classes also sit on the object (SSIM 0.65 between "
    "the maps of c* and of another class, seed 0), so the mean stays above 0.5 (0.71-0.77)"))
def test_issue_claim_ptame_ssim_below_half_after_the_first_block(mprt_setup):
    explainer, images = mprt_setup
    result = model_parameter_randomisation(explainer, images)
    assert any(result.passes.values()), result.ssim


def test_checkpoint_grid_command_on_two_auxiliaries(tmp_path, cache_dir, checkpoint):
    coarse_dir = tmp_path / "coarse"
    run_script("train.py", coarse_dir, cache_dir, "auxiliary.layers=[layer3,layer4]", "+trainer.max_steps=5",
               "final_evaluation.overlay_images=0", "final_evaluation.max_images=16")
    output = tmp_path / "figure7.png"
    result = run_entry_point(
        "figures.py", str(checkpoint), str(coarse_dir / "checkpoints" / "last.ckpt"),
        "--labels", "layer2-4", "layer3-4", "--generated", "3", "--upsampling", "nearest",
        "--cache-dir", str(cache_dir), "--output", str(output), timeout=600)
    assert result.returncode == 0, failure_output(result)
    with Image.open(output) as grid:
        assert grid.size == (round(1.9 * 3 * 100), round(1.9 * 3 * 100))
