"""sweep.py with real training on the generated dataset: a 6-trial sweep (3 Sobol + 3 BoTorch)
on a tiny smoke configuration, its journal and report read back; a diverging trial (NaN loss)
recorded with the worst values; and (slow) a sweep killed in the middle of a training run and
resumed."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ptame.sweep.journal import Journal
from ptame.sweep.space import FEASIBILITY_TOLERANCE
from ptame.sweep.runner import MetricSpec, TrialSpec, TrialTask, process_alive

from .helpers.entry_points import CONF_DIR, REPO_ROOT, run_entry_point

# the smoke experiment made tinier still: 256 training images (8 steps), ROAD at 3 percentages
# on 16 validation images, small generated classifiers trained for one epoch
TINY = [
    "experiment=smoke",
    "data.num_train=256",
    "data.num_val=32",
    "data.num_test=32",
    "data.batch_size=32",
    "data.eval_batch_size=32",
    "backbone.epochs=1",
    "auxiliary.epochs=1",
    "backbone.min_accuracy_above_chance=null",  # plumbing only: near-chance classifiers
    "auxiliary.min_accuracy_above_chance=null",
    "callbacks=faithfulness",
    "callbacks.faithfulness.max_images=16",
    "callbacks.faithfulness.batch_size=16",
    "metrics.road.percentages=[20,50,80]",
    "metrics.adic.thresholds=[100]",
    "final_evaluation.max_images=16",
    "final_evaluation.overlay_images=0",
]


def run_sweep(*arguments: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return run_entry_point("sweep.py", *arguments, timeout=timeout)


@pytest.fixture(scope="module")
def acceptance_sweep(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("sweep-e2e")
    directory = root / "sweep"
    result = run_sweep(
        *TINY,
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={directory}",
        "sweep.n_trials=6",
        "sweep.n_initial=3",
        "sweep.trial_process=inprocess",
        "sweep.optimiser.num_restarts=4",
        "sweep.optimiser.raw_samples=64",
        f"sweep.experiment_dir={root / 'extra' / 'experiment'}",
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root, directory, result


def test_six_trial_sweep_journal_holds_real_trials(acceptance_sweep):
    _, directory, _ = acceptance_sweep
    lines = (directory / "journal.jsonl").read_text().splitlines()
    assert all(line == json.dumps(json.loads(line)) for line in lines)
    state = Journal(directory / "journal.jsonl").latest()
    assert sorted(state) == list(range(6))
    assert [state[t]["source"] for t in range(6)] == ["sobol"] * 3 + ["botorch"] * 3
    for trial, record in state.items():
        assert record["status"] == "completed", record.get("error")
        params = record["params"]
        assert params["lambda1"] + params["lambda2"] <= 1 + FEASIBILITY_TOLERANCE and params["lambda_area"] in (
            0.5,
            1.0,
            2.0,
        )
        assert params["lambda3"] >= 0 and record["seconds"] > 0
        run_dir = directory / "trials" / f"trial_{trial:03d}"
        assert record["run_dir"] == str(run_dir)
        # the objectives are the trial run's validation ROAD figures
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert record["objectives"] == {
            "MoRF": metrics["val/ROAD_MoRF_AUC"],
            "LeRF": metrics["val/ROAD_LeRF_AUC"],
        }
        assert 0 <= metrics["val/ROAD_MoRF_AUC"] <= 1 and 0 <= metrics["val/ROAD_LeRF_AUC"] <= 1
        assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (
            run_dir / "csv" / "metrics.csv"
        ).is_file()
        # the trial trained with its parameters (the paper's loss, one epoch)
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        assert (
            config.loss.ce_weight == params["lambda1"]
            and config.loss.area_weight == params["lambda2"]
        )
        assert (
            config.loss.variation_weight == params["lambda3"]
            and config.loss.area_power == params["lambda_area"]
        )
        assert config.loss.variation_normalisation == "mean" and config.trainer.max_epochs == 1
    # different parameters, different maps: not every trial scores the same
    assert len({json.dumps(r["objectives"]) for r in state.values()}) > 1


def test_six_trial_sweep_report_and_best_experiment(acceptance_sweep):
    root, directory, result = acceptance_sweep
    state = Journal(directory / "journal.jsonl").latest()
    with open(directory / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["trial"]) for r in rows] == list(range(6))
    for row in rows:
        objectives = state[int(row["trial"])]["objectives"]
        assert float(row["MoRF"]) == pytest.approx(objectives["MoRF"]) and float(
            row["LeRF"]
        ) == pytest.approx(objectives["LeRF"])
        assert float(row["objective"]) == pytest.approx(objectives["LeRF"] - objectives["MoRF"])
    scores = {t: r["objectives"]["LeRF"] - r["objectives"]["MoRF"] for t, r in state.items()}
    best = max(scores, key=scores.get)
    assert (
        f"Trial {best}: LeRF - MoRF = {scores[best]:.6g}" in (directory / "report.md").read_text()
    )
    assert (directory / "objective_vs_trial.png").read_bytes()[:4] == b"\x89PNG"
    output = result.stdout + result.stderr
    assert "progress: 6/6 trials finished (0 failed)" in output and f"best trial {best}:" in output
    assert "trial 5 [6/6] completed" in output
    name = json.loads((directory / "sweep.json").read_text())["experiment_name"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[f"hydra.searchpath=[file://{root / 'extra'}]", f"experiment={name}"],
        )
    params = state[best]["params"]
    assert cfg.loss.ce_weight == params["lambda1"] and cfg.loss.area_power == params["lambda_area"]
    assert cfg.data.num_train == 256 and "faithfulness" in cfg.callbacks


def test_a_diverging_trial_is_failed_with_the_worst_values(tmp_path, cache_dir):
    metrics = [
        MetricSpec("MoRF", "val/ROAD_MoRF_AUC", "minimize", 0.36),
        MetricSpec("LeRF", "val/ROAD_LeRF_AUC", "maximize", 0.6),
    ]
    task = TrialTask(
        journal_path=str(tmp_path / "journal.jsonl"),
        trials={},
        metrics=metrics,
        n_trials=1,
        train_script=str(REPO_ROOT / "train.py"),
        cwd=str(REPO_ROOT),
        lock_dir=str(tmp_path / ".locks"),
    )
    overrides = [
        *TINY,
        f"paths.cache_dir={cache_dir}",
        "model.lr=1e30",
    ]  # NaN weights after one step
    record = task.run(TrialSpec(0, {"lr": 1e30}, overrides, "sobol"), tmp_path / "trial_000")
    assert record["status"] == "failed" and record["objectives"] == {"MoRF": 0.36, "LeRF": 0.6}
    assert "FloatingPointError: P-TAME loss is not finite" in record["error"]
    assert [r["status"] for r in Journal(tmp_path / "journal.jsonl").records()] == [
        "running",
        "failed",
    ]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")
def test_sweep_killed_during_training_resumes(tmp_path, cache_dir):
    directory = tmp_path / "sweep"
    arguments = [
        *TINY,
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={directory}",
        "sweep.n_trials=2",
        "sweep.n_initial=2",
        f"sweep.experiment_dir={tmp_path / 'extra' / 'experiment'}",
    ]
    process = subprocess.Popen(
        [sys.executable, "sweep.py", *arguments],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    journal = Journal(directory / "journal.jsonl")
    log = directory / "trials" / "trial_001" / "trial.log"
    try:
        deadline = time.monotonic() + 900
        while not (
            journal.latest().get(1, {}).get("status") == "running"
            and log.is_file()
            and "Epoch 0" in log.read_text()
        ):
            assert time.monotonic() < deadline, "trial 1 never started training"
            time.sleep(0.2)
        # -ww: without it ps may cut each line at 80 columns, before "train.py" in a checkout
        # whose path is long (e.g. a fresh clone under /tmp)
        table = subprocess.run(
            ["ps", "-ww", "-eo", "ppid,pid,args"], capture_output=True, text=True
        ).stdout.splitlines()[1:]
        trainer_pids = [
            int(row.split()[1])
            for row in table
            if int(row.split()[0]) == process.pid and "train.py" in row
        ]
        assert len(trainer_pids) == 1
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    deadline = time.monotonic() + 60
    while any(process_alive(pid) for pid in trainer_pids):
        assert time.monotonic() < deadline, "the trial's train.py outlived the sweep"
        time.sleep(0.2)
    assert not (directory / "trials" / "trial_001" / "metrics.json").exists()
    result = run_sweep(f"resume={directory}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = journal.records()
    assert [r["status"] for r in records if r["trial"] == 0] == ["proposed", "running", "completed"]
    assert [r["status"] for r in records if r["trial"] == 1] == [
        "proposed",
        "running",
        "proposed",
        "running",
        "completed",
    ]
    metrics = json.loads((directory / "trials" / "trial_001" / "metrics.json").read_text())
    assert journal.latest()[1]["objectives"]["MoRF"] == metrics["val/ROAD_MoRF_AUC"]
