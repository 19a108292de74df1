"""Pipeline pieces of ptame.pipelines.train without launching train.py."""

import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from ptame.pipelines.train import build_callbacks, build_loggers

from .helpers.configs import compose_config


def compose_train(overrides):
    return compose_config("train", overrides)


def test_wandb_logger_is_offline_by_default_and_writes_locally(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_train(["logger=wandb", "run_name=test"])
    loggers = build_loggers(cfg, tmp_path)
    assert [type(logger) for logger in loggers] == [CSVLogger, WandbLogger]
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
