"""Acceptance checks of issue 16 at full size (slow): class-specific localisation on two-object
images with the default recipe, and MPRT's retrain protocol on a trained checkpoint (fresh
cache: the classifiers are trained too, minutes)."""

from __future__ import annotations

import json

import pytest

from .helpers.entry_points import failure_output, run_entry_point

pytestmark = pytest.mark.slow


def run_script(script: str, run_dir, cache_dir, *overrides, timeout=1800):
    result = run_entry_point(script, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *overrides,
                             timeout=timeout)
    assert result.returncode == 0, failure_output(result)
    return result


def test_default_recipe_on_two_object_images_explains_each_class_on_its_own_object(tmp_path, cache_dir):
    """Seed 0 (README: seeds 0-2 measured 0.860-0.915 on the object, 0.000-0.004 on the other)."""
    run_script("train.py", tmp_path, cache_dir, "data=generated_pairs", "final_evaluation.overlay_images=0")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["backbone/top2_both_objects"] >= 0.9
    assert metrics["ptame/class_pointing_game"] >= 0.85
    assert metrics["ptame/class_pointing_game_other"] <= 0.15
    # the random map scores the share of the image near an object, on either object: near chance
    assert metrics["random/class_pointing_game"] == metrics["random/class_pointing_game_other"] < 0.15
    assert metrics["ptame/class_energy_pointing_game"] > 5 * metrics["ptame/class_energy_pointing_game_other"]


@pytest.fixture(scope="module")
def retrain_mprt(tmp_path_factory, cache_dir):
    """mprt.json of the retrain protocol on a checkpoint of one epoch (125 steps per retraining)."""
    train_dir, evaluate_dir = tmp_path_factory.mktemp("train"), tmp_path_factory.mktemp("evaluate")
    run_script("train.py", train_dir, cache_dir, "trainer.max_epochs=1", "final_evaluation.overlay_images=0",
               "final_evaluation.max_images=64")
    run_script("evaluate.py", evaluate_dir, cache_dir, f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}",
               "trainer.max_epochs=1", "explainers=[ptame]", "max_images=64", "cost_images=0", "metrics.road=null",
               "metrics.insertion_deletion=null", "metrics.adic=null", "analysis.mprt=true",
               "analysis.mprt_options.protocol=retrain", "analysis.mprt_options.explainers=[ptame,sobel]",
               "analysis.mprt_options.images=64")
    return json.loads((evaluate_dir / "mprt.json").read_text())


def test_retrained_heads_explain_a_randomised_backbone_with_blank_maps(retrain_mprt):
    ptame, sobel = retrain_mprt["ptame"], retrain_mprt["sobel"]
    assert ptame["protocol"] == "retrain" and len(ptame["retrain_seconds"]) == 6
    # nothing to keep for a model random from layer1 on: the maps go blank, and score what an
    # all-zero map scores (after the stem alone they are not blank yet: README)
    assert max(ptame["map_mean"]["randomised"][1:]) < 0.25 * ptame["reference_map_mean"]
    assert ptame["ssim"]["randomised"][1:] == pytest.approx([ptame["blank_map_ssim"]] * 5, abs=0.05)
    assert sobel["passes"] == {"original": False, "randomised": False}  # the control still fails


@pytest.mark.xfail(strict=True, reason=(
    "the retrained head gives blank maps for a randomised backbone, and an all-zero map scores SSIM "
    "0.54 against P-TAME's sparse maps (92 % of pixels below 0.1; seed 0, README), above the 0.5 threshold"))
def test_issue_claim_retrained_ptame_ssim_below_half_after_the_first_block(retrain_mprt):
    assert retrain_mprt["ptame"]["ssim"]["randomised"][0] < 0.5
