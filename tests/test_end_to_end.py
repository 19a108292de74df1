"""train.py end to end through Hydra on the tiny `smoke` experiment, single process and DDP."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
import torch

from ptame.evaluation.tables import method_results
from ptame.explainers import load_explainer
from ptame.data.generated_classifiers import generated_backbone

from .helpers.entry_points import failure_output, run_entry_point

SMOKE_KEYS = [
    "ptame/pointing_game", "ptame/energy_pointing_game", "random/pointing_game",
    "random/energy_pointing_game", "centre_gaussian/pointing_game",
    "centre_gaussian/energy_pointing_game",
]


def run_train(run_dir, cache_dir, *overrides, timeout=300) -> subprocess.CompletedProcess:
    return run_entry_point("train.py", "experiment=smoke", f"paths.cache_dir={cache_dir}",
                           f"hydra.run.dir={run_dir}", *overrides, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("smoke-run")
    result = run_train(run_dir, cache_dir)
    assert result.returncode == 0, failure_output(result)
    return run_dir, result


def test_smoke_run_writes_metrics_checkpoint_logs_and_overlays(smoke_run):
    run_dir, result = smoke_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in SMOKE_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
    # the pointing game with TorchRay's tolerance scaled to 64 px, and the strict one next to it
    assert metrics["pointing_tolerance_px"] == 2.0
    for method in ("ptame", "random", "centre_gaussian"):
        assert metrics[f"{method}/pointing_game_strict"] <= metrics[f"{method}/pointing_game"]
    assert "pointing game (< 2 px)" in result.stdout and "pointing (strict)" in result.stdout
    assert metrics["explanation_resolution"] == 16 * 16
    assert "Localisation on held-out images" in result.stdout
    assert (run_dir / "overlays.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"train/loss", "train/ce", "train/area", "train/variation", "val/loss"} <= logged
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(key.startswith("ptame.attention.") for key in checkpoint["state_dict"])


def test_the_smoke_preset_trains_accurate_classifiers_and_a_localising_explainer(smoke_run):
    """The installation check must show something real: classifiers >= 90 % accurate (measured
    97.7 % / 95.3 %) and P-TAME's maps clearly above the random map's."""
    import re

    run_dir, result = smoke_run
    accuracies = [float(a) for a in re.findall(r"test accuracy (\d\.\d+)", result.stdout + result.stderr)]
    assert len(accuracies) == 2 and min(accuracies) >= 0.9, accuracies
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["ptame/pointing_game"] >= 0.6 and metrics["random/pointing_game"] <= 0.2
    assert metrics["ptame/energy_pointing_game"] >= 2 * metrics["random/energy_pointing_game"]


def test_smoke_checkpoint_explains_with_the_inference_api(smoke_run, cache_dir):
    run_dir, _ = smoke_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    backbone = generated_backbone(**{k: v for k, v in checkpoint["ptame"]["backbone"]["config"].items() if k != "_target_"})
    explainer = load_explainer(run_dir / "checkpoints" / "last.ckpt", backbone)  # auxiliary from its recipe
    images = torch.rand(3, 3, 64, 64)
    maps = explainer(images)
    assert maps.shape == (3, 64, 64) and 0 <= maps.min() and maps.max() <= 1
    targets = torch.tensor([0, 1, 2])
    assert not torch.equal(explainer(images, targets), explainer(images, targets.flip(0)))


def test_ddp_with_two_cpu_processes_ends_with_identical_attention_weights(tmp_path, cache_dir, smoke_run):
    result = run_train(tmp_path, cache_dir, "trainer=ddp_cpu", "+trainer.max_steps=4", "final_evaluation.overlay_images=0")
    assert result.returncode == 0, failure_output(result)
    consistency = json.loads((tmp_path / "ddp_consistency.json").read_text())
    assert consistency["world_size"] == 2
    assert consistency["identical"] is True
    assert len(set(consistency["digests"])) == 1
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_bad_config_value_fails_with_a_clear_message(tmp_path, cache_dir, smoke_run):
    result = run_train(tmp_path, cache_dir, "loss.ce_weight=-1")
    assert result.returncode != 0
    assert "loss.ce_weight must be a non-negative number, got -1" in result.stderr


def test_bad_pointing_tolerance_is_refused_before_training(tmp_path, cache_dir):
    result = run_train(tmp_path, cache_dir, "final_evaluation.pointing_tolerance=-1")
    assert result.returncode != 0
    assert "final_evaluation.pointing_tolerance: pointing-game tolerance must be a finite" in result.stderr
    assert not (tmp_path / "checkpoints").exists()  # refused before any training


def run_evaluate(run_dir, cache_dir, checkpoint, *overrides, timeout=400) -> subprocess.CompletedProcess:
    return run_entry_point(
        "evaluate.py", "experiment=smoke", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}",
        f"ckpt_path={checkpoint}", "max_images=15", "metrics.insertion_deletion.steps=8",
        "data.eval_batch_size=4", *overrides, timeout=timeout)


RESULT_KEYS = [
    "AD@100", "AD@50", "AD@15", "IC@100", "IC@50", "IC@15", "ROAD_MoRF_AUC", "ROAD_LeRF_AUC",
    "pointing_game", "energy_pointing_game", "pointing_game_strict", "insertion_AUC",
    "deletion_AUC", "forward_passes", "resolution", "gflops", "ms_per_image",
]


@pytest.fixture(scope="module")
def evaluation_run(tmp_path_factory, cache_dir, smoke_run):
    run_dir = tmp_path_factory.mktemp("evaluate-run")
    result = run_evaluate(run_dir, cache_dir, smoke_run[0] / "checkpoints" / "last.ckpt")
    assert result.returncode == 0, failure_output(result)
    return run_dir, result


def test_evaluate_writes_every_result_file(evaluation_run):
    run_dir, result = evaluation_run
    saved = json.loads((run_dir / "results.json").read_text())
    results = method_results(saved)
    assert set(results) == {"ptame", "random", "centre_gaussian"}
    provenance = saved["provenance"]
    assert provenance["images"] == 15 and provenance["seed"] == 0 and provenance["checkpoint"].endswith("last.ckpt")
    assert provenance["metrics"]["road"]["auc"] == "normalised" and provenance["metrics"]["road"]["imputer"] == "noisy_linear"
    assert provenance["backbone"]["fingerprint"] and provenance["ptame_version"] and "git_commit" in provenance
    for method, figures in results.items():
        for key in RESULT_KEYS:
            assert key in figures, (method, key)
        for key in ("AD@100", "AD@50", "AD@15", "IC@100", "IC@50", "IC@15"):
            assert 0 <= figures[key] <= 100
        for key in ("ROAD_MoRF_AUC", "ROAD_LeRF_AUC", "insertion_AUC", "deletion_AUC"):
            assert 0 <= figures[key] <= 1
        assert figures["forward_passes"] == 1.0
    assert results["ptame"]["resolution"] == 256 and results["random"]["resolution"] == 64 * 64
    with open(run_dir / "results.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert float(rows["ptame"]["AD@100"]) == pytest.approx(results["ptame"]["AD@100"])
    markdown = (run_dir / "results.md").read_text()
    assert markdown.startswith("| method |") and "| ptame |" in markdown
    assert (run_dir / "road_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "Results on 15 test images" in result.stdout


def test_evaluate_gives_the_same_numbers_under_ddp(tmp_path, cache_dir, smoke_run, evaluation_run):
    single = method_results(json.loads((evaluation_run[0] / "results.json").read_text()))
    result = run_evaluate(tmp_path, cache_dir, smoke_run[0] / "checkpoints" / "last.ckpt", "trainer=ddp_cpu")
    assert result.returncode == 0, failure_output(result)
    distributed = method_results(json.loads((tmp_path / "results.json").read_text()))
    for method, figures in single.items():
        for key, value in figures.items():
            if key == "ms_per_image":
                continue
            # Equal up to float rounding: conv results depend slightly on the batch composition,
            # and the imputation solver stops within its tolerance (5e-4 per pixel), which moves
            # softmax confidences (not the accuracies) in the 5th digit.
            tolerance = 1e-4 if "confidence" in key else 1e-6
            assert distributed[method][key] == pytest.approx(value, rel=1e-5, abs=tolerance), (method, key)


def test_explain_py_explains_image_files_with_the_stored_recipes(smoke_run, cache_dir, tmp_path):
    """explain.py on a 16-bit PNG and a CMYK JPEG: overlays, raw maps at the explained image's
    resolution and predictions with the generated shapes' names."""
    import numpy as np
    from PIL import Image

    from ptame.data.generated import CLASS_NAMES

    run_dir, _ = smoke_run
    Image.fromarray(np.linspace(0, 65535, 80 * 100).reshape(80, 100).astype(np.uint16)).save(tmp_path / "depth.png")
    square = np.zeros((90, 120, 3), np.uint8)
    square[20:70, 30:90] = (200, 40, 40)
    Image.fromarray(square).convert("CMYK").save(tmp_path / "square.jpg")
    out = tmp_path / "explained"
    result = run_entry_point("explain.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                             f"images=[{tmp_path / 'depth.png'},{tmp_path / 'square.jpg'}]",
                             "explainers=[ptame,gradcam,random]", "top_k=2", f"hydra.run.dir={out}")
    assert result.returncode == 0, failure_output(result)
    predictions = json.loads((out / "predictions.json").read_text())
    assert list(predictions) == ["depth", "square"]
    for stem, entry in predictions.items():
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert [p["class"] for p in entry["explained"]] == [p["class"] for p in entry["predictions"][:2]]
        assert all(p["name"] == CLASS_NAMES[p["class"]] for p in entry["predictions"])
        probabilities = [p["probability"] for p in entry["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-5
        for method in ("ptame", "gradcam", "random"):
            maps = np.load(out / f"{stem}_{method}.npy")
            assert maps.shape == (2, 64, 64) and maps.dtype == np.float32  # the checkpoint's 64 px
            assert 0.0 <= maps.min() and maps.max() <= 1.0 and maps.std() > 0
    assert predictions["square"]["predictions"][0]["name"] == "square"  # a clean red square


def test_explain_py_names_missing_images_and_mismatched_targets(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    checkpoint = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    missing = run_entry_point("explain.py", checkpoint, f"images=[{tmp_path / 'nowhere.jpg'}]",
                              f"hydra.run.dir={tmp_path / 'a'}")
    assert missing.returncode != 0 and "not found" in failure_output(missing) and "nowhere.jpg" in failure_output(missing)
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "green.png")
    mismatched = run_entry_point("explain.py", checkpoint, f"images=[{tmp_path / 'green.png'}]", "targets=[1,2]",
                                 f"hydra.run.dir={tmp_path / 'b'}")
    assert mismatched.returncode != 0
    assert "targets has 2 class ids for 1 images: give one per image" in failure_output(mismatched)


@pytest.mark.parametrize("outputs", ["selected", "all"])
def test_export_py_writes_an_onnx_file_that_onnxruntime_runs_like_pytorch(smoke_run, cache_dir, tmp_path, outputs):
    import numpy as np
    import onnxruntime

    run_dir, _ = smoke_run
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    path = tmp_path / f"ptame_{outputs}.onnx"
    result = run_entry_point("export.py", f"ckpt_path={checkpoint}", "format=onnx", f"outputs={outputs}",
                             f"output={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, failure_output(result)
    assert "max |difference| from PyTorch" in failure_output(result)
    explainer = load_explainer(checkpoint)
    torch.manual_seed(1)
    images, classes = torch.rand(5, 3, 64, 64), torch.tensor([0, 3, 7, 2, 5])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"images": images.numpy()} if outputs == "all" else {"images": images.numpy(), "classes": classes.numpy()}
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        if outputs == "all":
            expected = explainer.model.class_maps(images).numpy()  # (B, C, h, w)
        else:
            expected = explainer(images, classes).numpy()  # what the library's explainer returns
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4


def test_export_py_writes_torchscript_that_runs_like_pytorch(smoke_run, cache_dir, tmp_path):
    run_dir, _ = smoke_run
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    result = run_entry_point("export.py", f"ckpt_path={checkpoint}", "format=torchscript",
                             f"output={tmp_path / 'ptame.pt'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, failure_output(result)
    module = torch.jit.load(str(tmp_path / "ptame.pt"))
    images, classes = torch.rand(4, 3, 64, 64), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        assert torch.allclose(module(images, classes), load_explainer(checkpoint)(images, classes), atol=1e-5)


def test_a_checkpoint_given_the_wrong_backbone_names_the_experiment_it_was_trained_with(smoke_run):
    from ptame.checkpoint import CheckpointMismatchError

    from .helpers.networks import make_backbone

    run_dir, _ = smoke_run
    with pytest.raises(CheckpointMismatchError, match=r"trained with experiment=smoke, seed=0; build the networks"):
        load_explainer(run_dir / "checkpoints" / "last.ckpt", make_backbone(num_classes=8))
