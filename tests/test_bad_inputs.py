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
