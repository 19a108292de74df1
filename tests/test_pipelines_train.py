"""Pipeline pieces of ptame.pipelines.train without launching train.py."""

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from ptame.pipelines.common import build_loggers
from ptame.pipelines.train import build_callbacks

from .helpers.configs import compose_config


def compose_train(overrides):
    return compose_config("train", overrides)


def test_wandb_logger_is_offline_by_default_and_writes_locally(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_train(["logger=wandb", "run_name=test"])
    loggers = build_loggers(cfg, tmp_path)
    assert isinstance(loggers[0], CSVLogger) and isinstance(loggers[1], WandbLogger)
    assert "anonymous" not in loggers[1]._wandb_init  # W&B would warn that it has no effect
    wandb_logger = loggers[1]
    wandb_logger.log_metrics({"train/loss": 1.5}, step=0)
    png = tmp_path / "grid.png"
    from ptame.evaluation.figures import overlay_grid

    overlay_grid(torch.rand(2, 3, 8, 8), {"ptame": torch.rand(2, 8, 8)}, png)
    wandb_logger.log_image(key="overlays", images=[str(png)])
    wandb_logger.experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_checkpoint_callback_writes_into_the_run_directory(tmp_path):
    cfg = compose_train([])
    callbacks = build_callbacks(cfg, tmp_path)
    checkpoint = next(c for c in callbacks if type(c).__name__ == "ModelCheckpoint")
    assert checkpoint.dirpath == str(tmp_path / "checkpoints") and checkpoint.save_last


def test_overlay_titles_name_classes_the_dataset_has_and_number_the_others():
    from ptame.pipelines.train import class_title

    names = ["tench", "goldfish"]
    assert [class_title(names, c) for c in (0, 1, 2, 999)] == ["tench", "goldfish", "class 2", "class 999"]
    assert class_title(None, 7) == "class 7"


def test_a_failing_figure_loses_neither_the_metrics_nor_the_checkpoint(tmp_path, monkeypatch):
    """Each post-training step is independent: the overlay grid failing (as an IndexError on
    class names once did) still leaves metrics.json with the final evaluation, the checkpoint,
    and a file naming the failed step."""
    import json

    from ptame.pipelines import train

    def broken_overlay_grid(*args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(train, "overlay_grid", broken_overlay_grid)
    cfg = compose_train([
        "experiment=smoke", "run_name=test", "data.num_train=128", "data.num_val=32", "data.num_test=32",
        "data.batch_size=32", "data.eval_batch_size=16", "backbone.epochs=1", "auxiliary.epochs=1",
        "backbone.min_accuracy_above_chance=null", "auxiliary.min_accuracy_above_chance=null",
        f"paths.cache_dir={tmp_path / 'cache'}", "final_evaluation.max_images=8",
        "final_evaluation.overlay_images=2",
    ])
    metrics = train.run_training(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == metrics and "ptame/pointing_game" in saved
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / "overlays.png").exists()
    errors = (tmp_path / "run" / "post_training_errors.txt").read_text()
    assert errors == "overlay figure: IndexError: list index out of range\n"


def test_a_trainer_set_to_train_nothing_is_refused_before_anything_runs(tmp_path):
    import pytest

    from ptame.pipelines.train import run_training

    for override, fix in (("trainer.max_epochs=0", "trainer.max_epochs >= 1"),
                          ("+trainer.max_steps=0", "trainer.max_steps >= 1 or -1")):
        with pytest.raises(ValueError, match=fix.replace("+", r"\+")):
            run_training(compose_train(["experiment=smoke", override]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_expected_messages_of_a_normal_run_are_silenced_and_others_are_not(caplog):
    import logging
    import warnings

    from ptame.pipelines.common import quiet_expected_messages

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_expected_messages()
        warnings.warn("Found 75 module(s) in eval mode at the start of training. This may lead to ...")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...")
        warnings.warn("something the user must see")
    assert [str(w.message) for w in caught] == ["something the user must see"]
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: For seamless cloud logging ...")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
    assert "Tip" not in caplog.text and "GPU available" in caplog.text


def test_train_logs_its_final_localisation_figures(tmp_path):
    import csv

    from ptame.pipelines.train import run_training

    cfg = compose_train([
        "experiment=smoke", "run_name=test", "data.num_train=128", "data.num_val=32", "data.num_test=32",
        "data.batch_size=32", "data.eval_batch_size=16", "backbone.epochs=1", "auxiliary.epochs=1",
        "backbone.min_accuracy_above_chance=null", "auxiliary.min_accuracy_above_chance=null",
        f"paths.cache_dir={tmp_path / 'cache'}", "final_evaluation.max_images=8", "final_evaluation.overlay_images=0",
    ])
    metrics = run_training(cfg, tmp_path / "run")
    with open(tmp_path / "run" / "csv" / "metrics.csv", newline="") as handle:
        logged = {key: value for row in csv.DictReader(handle) for key, value in row.items() if value}
    assert float(logged["final/ptame/pointing_game"]) == pytest.approx(metrics["ptame/pointing_game"])
