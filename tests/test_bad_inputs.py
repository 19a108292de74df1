"""A corpus of bad inputs (checkpoints for now) through the API and the real entry points: each
gets a clear error naming the file, what it is and what was expected, and nothing in it runs."""

from __future__ import annotations

import os

import pytest
import torch

from ptame.checkpoint import read_checkpoint
from ptame.io import UnsafeCheckpointError

from .helpers.configs import compose_config

TINY_TRAINING = [
    "experiment=smoke", "run_name=test", "data.num_train=128", "data.num_val=32", "data.num_test=32",
    "data.batch_size=32", "data.eval_batch_size=16", "backbone.epochs=1", "auxiliary.epochs=1",
    "final_evaluation.max_images=8", "final_evaluation.overlay_images=0", "trainer.max_epochs=1",
]


class _RunsCode:
    """Pickles to a call of os.system that creates a marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_bad_checkpoints(folder, good=None) -> dict[str, tuple]:
    """{kind: (path, expected message pattern)}; ``good`` (a real checkpoint) gives a truncated copy."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = {}
    (folder / "empty.ckpt").write_bytes(b"")
    corpus["empty"] = (folder / "empty.ckpt", "the file is empty \\(0 bytes\\)")
    (folder / "notes.ckpt").write_text("epoch=3 loss=0.2\n")
    corpus["text"] = (folder / "notes.ckpt", "it is a text file \\(it starts with b'epoch=3")
    data = (good.read_bytes() if good is not None else _saved_bytes(folder))
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    corpus["truncated"] = (folder / "truncated.ckpt", "the file is truncated or corrupt")
    torch.save({"state_dict": {}, "payload": _RunsCode(folder / "marker")}, folder / "unsafe.ckpt")
    corpus["unsafe"] = (folder / "unsafe.ckpt", "refusing checkpoint .* pickled objects")
    return corpus


def _saved_bytes(folder) -> bytes:
    torch.save({"weights": torch.ones(1000)}, folder / "whole.ckpt")
    return (folder / "whole.ckpt").read_bytes()


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "unsafe"])
def test_bad_checkpoints_are_refused_clearly_and_run_nothing(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a user's environment may say so
    path, message = write_bad_checkpoints(tmp_path)[kind]
    with pytest.raises(ValueError, match=message) as error:
        read_checkpoint(path)
    assert str(path) in str(error.value)
    assert "will likely succeed" not in str(error.value)  # never the advice to load unsafely
    assert isinstance(error.value, UnsafeCheckpointError) == (kind == "unsafe")
    assert not (tmp_path / "marker").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from ptame.pipelines.train import run_training

    cache, run_dir = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("run")
    run_training(compose_config("train", [*TINY_TRAINING, f"paths.cache_dir={cache}", "trainer.max_epochs=2",
                                          "callbacks.checkpoint.save_top_k=-1",
                                          "+callbacks.checkpoint.every_n_epochs=1"]), run_dir)
    (first_epoch,) = (run_dir / "checkpoints").glob("epoch=0-*.ckpt")
    return cache, first_epoch


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "unsafe"])
def test_resume_from_a_bad_checkpoint_is_refused_before_training(tmp_path, monkeypatch, trained, kind):
    from ptame.pipelines.train import run_training

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cache, good = trained
    path, message = write_bad_checkpoints(tmp_path / "bad", good)[kind]
    cfg = compose_config("train", [*TINY_TRAINING, f"paths.cache_dir={cache}", f"resume_from='{path}'"])
    with pytest.raises(ValueError, match=message):
        run_training(cfg, tmp_path / "resumed")
    assert not (tmp_path / "bad" / "marker").exists()
    assert not (tmp_path / "resumed" / "checkpoints").exists()


def test_resume_from_a_good_checkpoint_loads_weights_only_and_trains_on(tmp_path, monkeypatch, trained):
    from ptame.pipelines.train import run_training

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cache, good = trained
    cfg = compose_config("train", [*TINY_TRAINING, f"paths.cache_dir={cache}", f"resume_from='{good}'",
                                   "trainer.max_epochs=2"])  # the interrupted run's own length
    run_training(cfg, tmp_path / "resumed")
    resumed = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    uninterrupted = read_checkpoint(good.parent / "last.ckpt")
    assert resumed["global_step"] == uninterrupted["global_step"]
    assert resumed["global_step"] == 2 * read_checkpoint(good)["global_step"]


# ---- the library API: images, maps, targets and batches -------------------------------------


def _api_objects():
    from ptame.explainers import CentreGaussianExplainer
    from ptame.metrics import ROAD, AverageDropIncrease, InsertionDeletion

    from .helpers.networks import make_backbone

    backbone = make_backbone()
    metrics = {
        "AverageDropIncrease": AverageDropIncrease(backbone, thresholds=[100, 50]),
        "ROAD": ROAD(backbone, percentages=[50]),
        "InsertionDeletion": InsertionDeletion(backbone, steps=4),
    }
    return backbone, CentreGaussianExplainer(backbone), metrics


BAD_IMAGES = {
    "nan": (lambda x: x.masked_fill(x > 0.9, float("nan")), "NaN or infinite"),
    "infinite": (lambda x: x.masked_fill(x > 0.9, float("inf")), "NaN or infinite"),
    "0-255": (lambda x: x * 255, "divide them by 255"),
    "[-1, 1]": (lambda x: x * 2 - 1, r"pass \(images \+ 1\) / 2"),
    "normalised": (lambda x: (x - 0.45) / 0.05, "look normalised"),
}


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_images_that_are_not_finite_values_in_0_1_are_refused_by_explainers_and_metrics(kind):
    _, explainer, metrics = _api_objects()
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    spoil, message = BAD_IMAGES[kind]
    with pytest.raises(ValueError, match=f"explainer 'centre_gaussian': .*{message}"):
        explainer(spoil(images))
    maps = explainer(images)
    for who, metric in metrics.items():
        with pytest.raises(ValueError, match=f"{who}: .*{message}"):
            metric.update(spoil(images), maps, torch.arange(2))


def test_soft_ad_ic_maps_outside_0_1_are_refused():
    from ptame.metrics import AverageDropIncrease

    from .helpers.networks import make_backbone

    metric = AverageDropIncrease(make_backbone(), thresholds=[100], soft=True)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]; got values in \[0, 100\]: normalise"):
        metric.update(torch.rand(2, 3, 8, 8), torch.linspace(0, 100, 128).view(2, 8, 8), torch.arange(2))


@pytest.mark.parametrize("targets, error, message", [
    (torch.tensor([-1, 0]), ValueError, r"target class -1 is not a class of the backbone \(valid: \[0, 4\]"),
    (torch.tensor([0, 5]), ValueError, r"target class 5 is not a class of the backbone \(valid: \[0, 4\]"),
    (torch.tensor([1.0, 2.0]), TypeError, "targets must be integer class ids, got dtype torch.float32"),
    (torch.tensor([True, False]), TypeError, "targets must be integer class ids, got dtype torch.bool"),
    (torch.tensor([1, 2, 3]), ValueError, "got 3 targets for 2 images"),
])
def test_targets_that_are_not_class_ids_of_the_backbone_are_refused(targets, error, message):
    _, explainer, _ = _api_objects()
    with pytest.raises(error, match=message):
        explainer(torch.rand(2, 3, 16, 16), targets)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_half_and_double_images_just_work(dtype):
    from ptame.explainers.cam import CAMExplainer
    from ptame.metrics import AverageDropIncrease

    from .helpers.networks import make_backbone

    backbone = make_backbone()
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16)
    explainer = CAMExplainer(backbone, "gradcam", target_layer="features")
    expected = explainer(images)
    assert torch.allclose(explainer(images.to(dtype)), expected, atol=2e-3)
    reference, other = AverageDropIncrease(backbone, thresholds=[50]), AverageDropIncrease(backbone, thresholds=[50])
    reference.update(images, expected, torch.arange(3))
    other.update(images.to(dtype), expected.to(dtype), torch.arange(3))
    assert other.compute()["AD@50"] == pytest.approx(float(reference.compute()["AD@50"]), abs=0.5)


def test_an_empty_batch_leaves_every_metric_unchanged():
    _, explainer, metrics = _api_objects()
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    maps = explainer(images)
    for who, metric in metrics.items():
        metric.update(images, maps, torch.arange(2))
        before = metric.compute()
        metric.update(images[:0], maps[:0], torch.arange(0))
        after = metric.compute()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), who
