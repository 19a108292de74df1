"""A run interrupted at any step and resumed with ``resume_from`` ends exactly where the
uninterrupted run ends: every tensor of the final checkpoint, the metrics and the CSV history.

One variant interrupts in-process (an exception at a step), the other SIGKILLs ``train.py``;
both mid-epoch and at an epoch boundary."""

from __future__ import annotations

import csv
import json
import signal

import pytest
import torch

from ptame.checkpoint import read_checkpoint

from .helpers.configs import compose_config
from .helpers.entry_points import run_entry_point

RUN = [
    "experiment=smoke", "run_name=test", "data.num_train=128", "data.num_val=32", "data.num_test=32",
    "data.batch_size=32", "data.eval_batch_size=16", "backbone.epochs=1", "auxiliary.epochs=1",
    "backbone.min_accuracy_above_chance=null", "auxiliary.min_accuracy_above_chance=null",  # plumbing only
    "final_evaluation.max_images=8", "final_evaluation.overlay_images=0", "trainer.max_epochs=2",
    "callbacks.checkpoint.every_n_train_steps=1", "trainer.log_every_n_steps=1",
]  # 4 steps per epoch, a checkpoint and a logged row after every step


def tensors(value, prefix=""):
    """{path: tensor} of every tensor in a nested checkpoint structure."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    found = {}
    if isinstance(value, dict):
        for key, item in value.items():
            found.update(tensors(item, f"{prefix}/{key}"))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found.update(tensors(item, f"{prefix}/{index}"))
    return found


def assert_same_end(reference_dir, resumed_dir):
    reference = read_checkpoint(reference_dir / "checkpoints" / "last.ckpt")
    resumed = read_checkpoint(resumed_dir / "checkpoints" / "last.ckpt")
    assert (resumed["epoch"], resumed["global_step"]) == (reference["epoch"], reference["global_step"])
    expected, got = tensors(reference), tensors(resumed)
    expected.pop("/ptame_rng_states/python", None)
    assert expected.keys() <= got.keys()
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, different
    metrics = [{k: v for k, v in json.loads((d / "metrics.json").read_text()).items() if not timing(k)}
               for d in (reference_dir, resumed_dir)]
    assert metrics[1] == metrics[0]
    rows = [logged_rows(d / "csv" / "metrics.csv") for d in (reference_dir, resumed_dir)]
    assert len(rows[0]) >= 8 and rows[1] == rows[0]  # the history before the interruption is kept, nothing twice


def timing(key: str) -> bool:
    """Figures measured in seconds, which no two runs share."""
    return "images_per_second" in key


def logged_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if not timing(k)} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from ptame.pipelines.train import run_training

    cache, run_dir = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("uninterrupted")
    run_training(compose_config("train", [*RUN, f"paths.cache_dir={cache}"]), run_dir)
    return cache, run_dir


@pytest.mark.parametrize("step", [3, 5, 8])  # resumes mid-epoch; at an epoch boundary; before the end
def test_a_run_interrupted_and_resumed_ends_exactly_like_the_uninterrupted_one(tmp_path, uninterrupted, step):
    from ptame.pipelines.train import run_training

    from .helpers.kill import Interrupted

    cache, reference = uninterrupted
    run_dir = tmp_path / "run"
    common = [*RUN, f"paths.cache_dir={cache}"]
    with pytest.raises(Interrupted):
        run_training(compose_config("train", [*common, "+callbacks.kill._target_=tests.helpers.kill.KillAtStep",
                                              f"+callbacks.kill.step={step}", "+callbacks.kill.mode=raise"]), run_dir)
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == step - 1
    run_training(compose_config("train", [*common, f"resume_from='{run_dir / 'checkpoints' / 'last.ckpt'}'"]), run_dir)
    assert_same_end(reference, run_dir)


@pytest.mark.parametrize("step", [2, 5])  # mid-epoch; at the epoch boundary (10 s each)
def test_train_py_killed_and_resumed_ends_exactly_like_the_uninterrupted_run(tmp_path, uninterrupted, step):
    cache, reference = uninterrupted
    common = [*RUN, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}"]
    killed = run_entry_point("train.py", *common, "+callbacks.kill._target_=tests.helpers.kill.KillAtStep",
                             f"+callbacks.kill.step={step}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed = run_entry_point("train.py", *common, f"resume_from='{checkpoint}'")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_end(reference, tmp_path / "run")
