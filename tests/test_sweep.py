"""The BoTorch sweep (sweep.py, ptame.sweep): spaces, constraints on proposals, journal replay,
failed trials, report, and whole sweeps (incl. kill and resume) with a stand-in trainer.

The stand-in trainer (written to a temporary file) computes metrics.json from the overrides it
receives in milliseconds, so these tests exercise the real sweep process, Hydra launcher,
journal and BoTorch loop without training; tests/test_sweep_e2e.py runs real training.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from ptame.sweep.driver import changed_settings, expand_resume, merge_overrides, oriented_values
from ptame.sweep.journal import Journal, make_record
from ptame.sweep.optimiser import propose, repair, sobol_points
from ptame.sweep.report import pareto_mask, summarise, write_report
from ptame.sweep.runner import (
    MetricSpec,
    TrialFailed,
    TrialSpec,
    TrialTask,
    extract_objectives,
    last_error_line,
    process_alive,
)
from ptame.sweep.space import (
    FEASIBILITY_TOLERANCE,
    SearchSpace,
    SpaceError,
    format_override_value,
    parse_constraints,
)

from .helpers.entry_points import CONF_DIR, REPO_ROOT, run_entry_point

METRICS = [
    MetricSpec("MoRF", "val/ROAD_MoRF_AUC", "minimize", 0.36),
    MetricSpec("LeRF", "val/ROAD_LeRF_AUC", "maximize", 0.60),
]

FAKE_TRAIN = '''
"""Stand-in for train.py: metrics.json from the loss overrides, at once."""
import json, os, sys, time
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
run_dir = Path(args["hydra.run.dir"])
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "fake.pid").write_text(str(os.getpid()))
ce, area = float(args["loss.ce_weight"]), float(args["loss.area_weight"])
power = float(args.get("loss.area_power", 1.0))
time.sleep(float(os.environ.get("FAKE_TRAIN_SLEEP", "0")))
if ce > float(os.environ.get("FAKE_TRAIN_FAIL_ABOVE", "inf")):
    print("FloatingPointError: P-TAME loss is not finite at step 1 (terms {'loss': nan})", file=sys.stderr)
    sys.exit(1)
metrics = {"val/ROAD_MoRF_AUC": 0.2 + (ce - 0.3) ** 2 + 0.01 * power, "val/ROAD_LeRF_AUC": 0.8 - (area - 0.5) ** 2}
(run_dir / "metrics.json").write_text(json.dumps({**metrics, "argv": sys.argv[1:]}))
'''


def fake_metrics(params: dict) -> dict:
    """What the stand-in trainer reports for paper-space parameters."""
    return {
        "MoRF": 0.2 + (params["lambda1"] - 0.3) ** 2 + 0.01 * params["lambda_area"],
        "LeRF": 0.8 - (params["lambda2"] - 0.5) ** 2,
    }


def load_space(name: str) -> SearchSpace:
    return SearchSpace.from_config(
        yaml.safe_load((CONF_DIR / "sweep" / f"{name}.yaml").read_text())["space"]
    )


@pytest.fixture(scope="module")
def paper() -> SearchSpace:
    return load_space("paper")


@pytest.fixture(scope="module")
def release() -> SearchSpace:
    return load_space("release")


# ---------------------------------------------------------------------------------------------
# Spaces


def test_paper_and_release_spaces_map_to_the_loss_and_model_keys(paper, release):
    assert paper.names == ["lambda1", "lambda2", "lambda_area"] and paper.cat_dims == [2]
    assert paper.targets() == {
        "lambda1": "loss.ce_weight",
        "lambda2": "loss.area_weight",
        "lambda_area": "loss.area_power",
        "lambda3": "loss.variation_weight",
    }
    params = paper.complete({"lambda1": 0.25, "lambda2": 0.5, "lambda_area": 2.0})
    assert params["lambda3"] == pytest.approx(0.25)
    assert paper.trial_overrides(params) == [
        "loss=paper",
        "loss.ce_weight=0.25",
        "loss.area_weight=0.5",
        "loss.area_power=2.0",
        "loss.variation_weight=0.25",
    ]
    assert release.names == ["lr", "weight_decay", "ce", "area", "border_penalty", "area_power"]
    assert release.cat_dims == [0, 4, 5]
    assert [c.text for c in release.constraints] == ["0.85 <= ce + area", "ce + area <= 1"]
    assert release.targets()["smoothness"] == "loss.variation_weight" and release.overrides == [
        "loss=reference"
    ]
    # every target is a key of the training config
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train")
    from omegaconf import OmegaConf

    for space in (paper, release):
        for target in space.targets().values():
            assert OmegaConf.select(cfg, target) is not None, target


def test_encoding_round_trips_float_log_int_and_choice():
    space = SearchSpace.from_config(
        {
            "parameters": {
                "a": {"type": "float", "low": -1.0, "high": 3.0, "target": "x.a"},
                "wd": {"type": "float", "low": 1e-7, "high": 1.0, "log": True},
                "n": {"type": "int", "low": 2, "high": 6},
                "k": {"type": "int", "low": 1, "high": 1000, "log": True},
                "c": {"type": "choice", "values": ["sgd", "adam", 3]},
            }
        }
    )
    assert space.bounds() == [(0.0, 1.0)] * 4 + [(0.0, 2.0)]
    point = {"a": 0.5, "wd": 1e-4, "n": 5, "k": 37, "c": "adam"}
    encoded = space.encode(point)
    assert (
        encoded[0] == pytest.approx(0.375)
        and encoded[1] == pytest.approx(3 / 7)
        and encoded[4] == 1.0
    )
    decoded = space.decode(encoded)
    assert decoded["a"] == pytest.approx(0.5) and decoded["wd"] == pytest.approx(1e-4)
    assert decoded["n"] == 5 and decoded["k"] == 37 and decoded["c"] == "adam"
    # every integer gets an equal share of [0, 1]: u = 0 -> low, u = 1 -> high
    assert space.decode([0, 0, 0.0, 0, 0])["n"] == 2 and space.decode([0, 0, 1.0, 1, 2])["n"] == 6
    counts = {v: 0 for v in range(2, 7)}
    for i in range(1000):
        counts[space.parameters[2].decode((i + 0.5) / 1000)] += 1
    assert set(counts.values()) == {200}
    with pytest.raises(SpaceError, match="not one of"):
        space.encode({**point, "c": "rmsprop"})
    with pytest.raises(SpaceError, match="outside"):
        space.encode({**point, "a": 3.5})


@pytest.mark.parametrize(
    ("text", "coefficients", "upper"),
    [
        ("a + b <= 1", {"a": 1.0, "b": 1.0}, 1.0),
        ("0.85 <= a + b", {"a": -1.0, "b": -1.0}, -0.85),
        ("2 * a - b / 2 >= 0.1", {"a": -2.0, "b": 0.5}, -0.1),
        ("a <= 1 - b", {"a": 1.0, "b": 1.0}, 1.0),
    ],
)
def test_linear_constraints_parse_to_coefficients_and_bound(text, coefficients, upper):
    (constraint,) = parse_constraints(text)
    assert dict(constraint.coefficients) == pytest.approx(
        coefficients
    ) and constraint.upper == pytest.approx(upper)


def test_chained_and_invalid_constraints():
    low, high = parse_constraints("0.85 <= a + b <= 1")
    assert low.slack({"a": 0.5, "b": 0.3}) == pytest.approx(-0.05) and high.slack(
        {"a": 0.5, "b": 0.3}
    ) == pytest.approx(0.2)
    with pytest.raises(SpaceError, match="not a linear expression"):
        parse_constraints("a * b <= 1")
    with pytest.raises(SpaceError, match="<= or >="):
        parse_constraints("a + b")
    base = {
        "parameters": {
            "a": {"type": "float", "low": 0, "high": 1},
            "w": {"type": "float", "low": 1e-3, "high": 1, "log": True},
        }
    }
    with pytest.raises(SpaceError, match="log scale"):
        SearchSpace.from_config({**base, "constraints": ["a + w <= 1"]})
    with pytest.raises(SpaceError, match="unknown parameter 'z'"):
        SearchSpace.from_config({**base, "constraints": ["a + z <= 1"]})
    with pytest.raises(SpaceError, match="unknown names"):
        SearchSpace.from_config({**base, "derived": {"d": {"expression": "1 - q"}}})


def test_encoded_constraints_agree_with_the_constraints_in_parameter_units():
    space = SearchSpace.from_config(
        {
            "parameters": {
                "a": {"type": "float", "low": 0.2, "high": 2.0},
                "b": {"type": "float", "low": -1.0, "high": 1.0},
                "c": {"type": "choice", "values": [1, 2]},
            },
            "constraints": ["0.5 <= a + 2 * b", "a - b <= 1.5"],
        }
    )
    import torch

    generator = torch.Generator().manual_seed(0)
    agree = 0
    for unit in torch.rand(2000, 3, generator=generator, dtype=torch.float64).tolist():
        coordinates = space.from_unit(unit)
        raw_ok = space.is_feasible(space.decode(coordinates))
        encoded_ok = all(
            sum(c * coordinates[i] for i, c in zip(idx, co)) >= rhs
            for idx, co, rhs in space.encoded_constraints()
        )
        agree += raw_ok == encoded_ok
    assert agree == 2000


def test_override_values_are_exact_hydra_literals():
    assert format_override_value(0.1 + 0.2) == "0.30000000000000004"
    assert format_override_value(1e-05) == "1e-05" and format_override_value(True) == "true"
    assert (
        format_override_value(None) == "null"
        and format_override_value("noisy_linear") == "noisy_linear"
    )
    assert format_override_value("a b") == "'a b'"


# ---------------------------------------------------------------------------------------------
# Proposals


def test_sobol_points_are_feasible_valid_and_reproducible(paper, release):
    for space, count in ((paper, 64), (release, 64)):
        points = sobol_points(space, count, seed=3)
        assert points == sobol_points(space, count, seed=3)
        assert points != sobol_points(space, count, seed=4)
        for point in points:
            assert space.violations(point) == []
            for parameter in space.parameters:
                if parameter.is_choice:
                    assert point[parameter.name] in parameter.values
    band = [p["ce"] + p["area"] for p in sobol_points(release, 64, seed=0)]
    assert min(band) >= 0.85 and max(band) <= 1.0
    # the points spread: both halves of lambda1's feasible range and every lambda_area value occur
    first = sobol_points(paper, 16, seed=0)
    assert {p["lambda_area"] for p in first} == {0.5, 1.0, 2.0}
    assert min(p["lambda1"] for p in first) < 0.25 and max(p["lambda1"] for p in first) > 0.6


def _assert_valid_proposals(space, proposals, q):
    assert len(proposals) == q
    for params in proposals:
        assert space.violations(params) == [], params
        complete = space.complete(params)
        for parameter in space.parameters:
            if parameter.is_choice:
                assert params[parameter.name] in parameter.values
            else:
                assert parameter.low <= params[parameter.name] <= parameter.high
        for derived in space.derived:
            assert complete[derived.name] >= 0.0


def test_botorch_proposals_respect_constraints_and_choices(paper):
    observed = sobol_points(paper, 6, seed=0)
    values = [[fake_metrics(p)["LeRF"] - fake_metrics(p)["MoRF"]] for p in observed]
    proposals = propose(paper, observed, values, q=2, seed=1, num_restarts=2, raw_samples=32)
    _assert_valid_proposals(paper, proposals, 2)
    assert proposals[0] != proposals[1]
    assert all(p not in observed for p in proposals)
    # pareto: two objectives oriented for maximisation (-MoRF, LeRF)
    values = [[-fake_metrics(p)["MoRF"], fake_metrics(p)["LeRF"]] for p in observed]
    _assert_valid_proposals(
        paper, propose(paper, observed, values, q=1, seed=2, num_restarts=2, raw_samples=32), 1
    )


def test_release_space_proposals_through_the_alternating_mixed_optimiser(release):
    observed = sobol_points(release, 6, seed=0)
    values = [[p["ce"] - p["area"] + (p["lr"] == 1e-4)] for p in observed]
    # max_enumerated=1 < 27 choice combinations: optimize_acqf_mixed_alternating
    proposals = propose(
        release, observed, values, q=1, seed=0, num_restarts=2, raw_samples=32, max_enumerated=1
    )
    _assert_valid_proposals(release, proposals, 1)
    band = proposals[0]["ce"] + proposals[0]["area"]
    assert 0.85 - 1e-9 <= band <= 1 + 1e-9


def test_repair_moves_a_slightly_infeasible_point_inside(paper):
    centre = [0.3, 0.3, 1.0]
    params = repair(paper, [0.6, 0.4 + 1e-7, 2.0], centre)
    assert params["lambda1"] + params["lambda2"] <= 1.0 and paper.is_feasible(params)
    assert params["lambda1"] == pytest.approx(0.6, abs=1e-5) and params["lambda_area"] == 2.0
    assert repair(paper, [0.2, 0.3, 0.0], centre) == paper.decode([0.2, 0.3, 0.0])


# ---------------------------------------------------------------------------------------------
# Journal


def test_journal_lines_are_default_json_and_replay_to_the_last_state(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    params = {"lambda1": 0.25, "lambda2": 0.5, "lambda_area": 1.0, "lambda3": 0.25}
    journal.append(
        make_record(0, "proposed", params, run_dir="r0", overrides=["loss.ce_weight=0.25"])
    )
    journal.append(make_record(0, "running", params, run_dir="r0"))
    journal.append(make_record(1, "proposed", params, run_dir="r1"))
    journal.append(
        make_record(
            0, "completed", params, {"MoRF": 0.2, "LeRF": 0.7}, run_dir="r0", seconds=12.3456
        )
    )
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    assert len(lines) == 4
    for line in lines:
        record = json.loads(line)
        assert line == json.dumps(record)  # Python's default separators
        assert list(record)[:6] == ["trial", "status", "params", "objectives", "run_dir", "seconds"]
    state = journal.latest()
    assert list(state) == [0, 1]
    assert state[0]["status"] == "completed" and state[0]["objectives"] == {
        "MoRF": 0.2,
        "LeRF": 0.7,
    }
    assert state[0]["seconds"] == 12.346 and state[0]["overrides"] == ["loss.ce_weight=0.25"]
    assert state[1]["status"] == "proposed" and state[1]["objectives"] is None


def test_journal_survives_a_line_cut_short_by_a_crash(tmp_path, caplog):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append(make_record(0, "completed", {"a": 1.0}, {"MoRF": 0.3, "LeRF": 0.7}, "r0", 1.0))
    with open(journal.path, "a") as handle:
        handle.write('{"trial": 1, "status": "runn')  # the writer died here
    journal.append(
        make_record(1, "failed", {"a": 2.0}, {"MoRF": 0.36, "LeRF": 0.6}, "r1", 2.0, error="x")
    )
    state = journal.latest()
    assert [r["status"] for r in state.values()] == ["completed", "failed"]
    assert "damaged" in caplog.text
    assert journal.path.read_text().splitlines()[2].startswith('{"trial": 1, "status": "failed"')
    for _ in range(10):  # a resume reads the journal many times: one warning is enough
        Journal(journal.path).latest()
    assert caplog.text.count("line 2 is damaged") == 1


def test_journal_refuses_non_finite_objectives_and_unknown_statuses(tmp_path):
    with pytest.raises(ValueError, match="finite"):
        make_record(0, "completed", {}, {"MoRF": math.nan})
    with pytest.raises(ValueError, match="status"):
        make_record(0, "done", {})


# ---------------------------------------------------------------------------------------------
# Trials


def test_objectives_are_read_from_metrics_and_missing_ones_are_explained():
    assert extract_objectives(
        {"val/ROAD_MoRF_AUC": 0.25, "val/ROAD_LeRF_AUC": 0.75, "x": 1}, METRICS
    ) == {"MoRF": 0.25, "LeRF": 0.75}
    with pytest.raises(TrialFailed, match="callbacks=faithfulness"):
        extract_objectives({"val/loss": 1.0}, METRICS)
    with pytest.raises(TrialFailed, match="not a finite number"):
        extract_objectives({"val/ROAD_MoRF_AUC": math.nan, "val/ROAD_LeRF_AUC": 0.5}, METRICS)


def test_last_error_line_finds_the_exception(tmp_path):
    log = tmp_path / "trial.log"
    log.write_text(
        "Epoch 0: 10%\nTraceback (most recent call last):\n  File x\nFloatingPointError: P-TAME loss is not finite at step 3\n\nSet the environment variable HYDRA_FULL_ERROR=1\n"
    )
    assert last_error_line(log) == "FloatingPointError: P-TAME loss is not finite at step 3"


def _task(tmp_path, script, **kwargs) -> TrialTask:
    return TrialTask(
        journal_path=str(tmp_path / "journal.jsonl"),
        trials={},
        metrics=METRICS,
        n_trials=3,
        train_script=str(script),
        cwd=str(tmp_path),
        lock_dir=str(tmp_path / ".locks"),
        **kwargs,
    )


def test_trial_task_records_completed_failed_and_timed_out_trials(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    task = _task(tmp_path, script)
    params = {"lambda1": 0.25, "lambda2": 0.5, "lambda_area": 1.0, "lambda3": 0.25}
    overrides = ["loss.ce_weight=0.25", "loss.area_weight=0.5", "loss.area_power=1.0"]
    done = task.run(TrialSpec(0, params, overrides, "sobol"), tmp_path / "t0")
    assert done["status"] == "completed" and done["objectives"] == pytest.approx(
        fake_metrics(params)
    )
    assert (
        json.loads((tmp_path / "t0" / "metrics.json").read_text())["argv"][-1]
        == f"hydra.run.dir={tmp_path / 't0'}"
    )
    monkeypatch.setenv("FAKE_TRAIN_FAIL_ABOVE", "0.2")
    failed = task.run(TrialSpec(1, params, overrides, "sobol"), tmp_path / "t1")
    assert failed["status"] == "failed" and failed["objectives"] == {"MoRF": 0.36, "LeRF": 0.60}
    assert "exited with status 1" in failed["error"] and "loss is not finite" in failed["error"]
    monkeypatch.delenv("FAKE_TRAIN_FAIL_ABOVE")
    monkeypatch.setenv("FAKE_TRAIN_SLEEP", "30")
    slow = _task(tmp_path, script, timeout=2.0).run(
        TrialSpec(2, params, overrides, "sobol"), tmp_path / "t2"
    )
    assert (
        slow["status"] == "failed"
        and "timed out after 2.0 s" in slow["error"]
        and slow["seconds"] < 25
    )
    statuses = [(r["trial"], r["status"]) for r in Journal(tmp_path / "journal.jsonl").records()]
    assert statuses == [
        (0, "running"),
        (0, "completed"),
        (1, "running"),
        (1, "failed"),
        (2, "running"),
        (2, "failed"),
    ]


# ---------------------------------------------------------------------------------------------
# Command line, resume settings, report


def test_merge_overrides_keeps_the_last_value_per_key():
    merged = merge_overrides(
        ["experiment=smoke", "loss=reference", "model.lr=1"],
        ["loss=paper", "+x.y=2"],
        ["model.lr=2"],
    )
    assert merged == ["experiment=smoke", "loss=paper", "+x.y=2", "model.lr=2"]


def test_resume_expands_to_the_stored_command_and_refuses_changed_settings(tmp_path):
    (tmp_path / "sweep.json").write_text(
        json.dumps(
            {
                "command": {
                    "task": ["experiment=smoke", "sweep.n_trials=6"],
                    "hydra": ["hydra.run.dir=/old/place", "hydra/launcher=sweep_local"],
                }
            }
        )
    )
    argv = expand_resume(["sweep.py", f"resume={tmp_path}", "sweep.n_trials=8"])
    assert argv == [
        "sweep.py",
        "hydra/launcher=sweep_local",
        "experiment=smoke",
        "sweep.n_trials=8",
        f"hydra.run.dir={tmp_path.resolve()}",
    ]
    assert expand_resume(["sweep.py", "experiment=smoke"]) == ["sweep.py", "experiment=smoke"]
    with pytest.raises(ValueError, match="not a sweep directory"):
        expand_resume(["sweep.py", f"resume={tmp_path / 'nothing'}"])
    stored = {
        "space": {"parameters": {"a": {}}},
        "mode": "scalar",
        "objective": "LeRF - MoRF",
        "metrics": {},
        "seed": 0,
        "trial_overrides": ["x=1"],
    }
    assert changed_settings(stored, {**stored, "n_trials": 30}) == []
    assert changed_settings(stored, {**stored, "seed": 1, "trial_overrides": ["x=2"]}) == [
        "seed",
        "trial_overrides",
    ]


def _synthetic_sweep(directory: Path, mode: str) -> list[dict]:
    space = load_space("paper")
    settings = {
        "space": yaml.safe_load((CONF_DIR / "sweep" / "paper.yaml").read_text())["space"],
        "mode": mode,
        "objective": "LeRF - MoRF",
        "metrics": {
            m.name: {"key": m.key, "direction": m.direction, "worst": m.worst} for m in METRICS
        },
        "n_trials": 5,
        "n_initial": 3,
        "conf_dir": str(CONF_DIR),
        "experiment_dir": str(directory / "extra" / "experiment"),
        "experiment_name": "sweep_unit",
        "trial_overrides": ["experiment=smoke", "loss=paper"],
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sweep.json").write_text(json.dumps(settings))
    journal = Journal(directory / "journal.jsonl")
    objectives = [
        {"MoRF": 0.30, "LeRF": 0.70},
        {"MoRF": 0.20, "LeRF": 0.65},
        None,
        {"MoRF": 0.25, "LeRF": 0.72},
        {"MoRF": 0.35, "LeRF": 0.80},
    ]
    records = []
    for trial, (point, values) in enumerate(zip(sobol_points(space, 5, seed=0), objectives)):
        params = space.complete(point)
        overrides = ["experiment=smoke"] + space.trial_overrides(params)
        journal.append(
            make_record(
                trial, "proposed", params, run_dir=f"r{trial}", source="sobol", overrides=overrides
            )
        )
        if values is None:
            journal.append(
                make_record(
                    trial,
                    "failed",
                    params,
                    {"MoRF": 0.36, "LeRF": 0.6},
                    f"r{trial}",
                    3.0,
                    error="FloatingPointError: nan",
                )
            )
        else:
            journal.append(make_record(trial, "completed", params, values, f"r{trial}", 5.0))
        records.append(params)
    return records


def test_pareto_mask_and_best_trial_selection(tmp_path):
    assert pareto_mask([[1, 1], [2, 0], [0, 0], [1, 1]]) == [True, True, False, True]
    _synthetic_sweep(tmp_path / "scalar", "scalar")
    settings = json.loads((tmp_path / "scalar" / "sweep.json").read_text())
    records = list(Journal(tmp_path / "scalar" / "journal.jsonl").latest().values())
    summary = summarise(settings, records)
    # LeRF - MoRF: 0.40, 0.45, (failed: 0.24), 0.47, 0.45 -> trial 3; front (min MoRF, max LeRF): 1, 3, 4
    assert summary["best"]["trial"] == 3 and summary["front"] == [1, 3, 4]
    assert oriented_values(records[1], "pareto", "LeRF - MoRF", METRICS) == [-0.20, 0.65]
    assert oriented_values(records[2], "scalar", "LeRF - MoRF", METRICS) == [pytest.approx(0.24)]


def test_report_files_and_best_experiment_config(tmp_path):
    params = _synthetic_sweep(tmp_path / "sweep", "pareto")
    summary = write_report(tmp_path / "sweep")
    directory = tmp_path / "sweep"
    for name in (
        "trials.csv",
        "report.md",
        "objective_vs_trial.png",
        "pareto_front.png",
        "best.yaml",
    ):
        assert (directory / name).is_file(), name
    assert (directory / "pareto_front.png").read_bytes()[:4] == b"\x89PNG"
    with open(directory / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == [
        "completed",
        "completed",
        "failed",
        "completed",
        "completed",
    ]
    assert float(rows[2]["MoRF"]) == 0.36 and float(rows[0]["lambda1"]) == pytest.approx(
        params[0]["lambda1"]
    )
    assert [r["pareto"] for r in rows] == ["False", "True", "False", "True", "True"]
    report = (directory / "report.md").read_text()
    assert (
        "Trial 3: LeRF - MoRF = 0.47" in report
        and "Pareto-optimal completed trials: 1, 3, 4" in report
    )
    assert "trial 2: FloatingPointError: nan" in report
    assert summary["best"]["trial"] == 3
    experiment = directory / "extra" / "experiment" / "sweep_unit.yaml"
    assert experiment.read_text() == (directory / "best.yaml").read_text()
    assert experiment.read_text().startswith("# @package _global_\n")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[f"hydra.searchpath=[file://{directory / 'extra'}]", "experiment=sweep_unit"],
        )
    assert (
        cfg.loss.ce_weight == params[3]["lambda1"] and cfg.loss.area_weight == params[3]["lambda2"]
    )
    assert (
        cfg.loss.variation_weight == params[3]["lambda3"]
        and cfg.loss.area_power == params[3]["lambda_area"]
    )
    assert cfg.loss.variation_normalisation == "mean"  # loss=paper
    assert cfg.data.num_train == 2048  # the smoke experiment the trial ran on


# ---------------------------------------------------------------------------------------------
# Whole sweeps through sweep.py with the stand-in trainer


def run_sweep(
    *arguments: str, env: dict | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    return run_entry_point("sweep.py", *arguments, timeout=timeout, env=env)


def sweep_arguments(directory: Path, script: Path, *extra: str) -> list[str]:
    return [
        "experiment=smoke",
        f"hydra.run.dir={directory}",
        f"sweep.train_script={script}",
        f"sweep.experiment_dir={directory.parent / 'extra' / 'experiment'}",
        "sweep.optimiser.num_restarts=2",
        "sweep.optimiser.raw_samples=32",
        *extra,
    ]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def killed_and_resumed_sweep(tmp_path_factory):
    """6 trials (3 Sobol + 3 BoTorch), 2 at a time, with the stand-in trainer diverging for
    lambda1 > 0.6; the sweep is killed (SIGKILL) while the BoTorch batch of trials 3 and 4
    trains, then resumed with ``sweep.py resume=<dir>``."""
    root = tmp_path_factory.mktemp("sweep-fake")
    script = root / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    directory = root / "sweep"
    arguments = sweep_arguments(
        directory, script, "sweep.n_trials=6", "sweep.n_initial=3", "sweep.parallel=2"
    )
    process = subprocess.Popen(
        [sys.executable, "sweep.py", *arguments],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "FAKE_TRAIN_SLEEP": "2", "FAKE_TRAIN_FAIL_ABOVE": "0.6"},
    )
    journal = Journal(directory / "journal.jsonl")
    pid_files = [directory / "trials" / f"trial_{t:03d}" / "fake.pid" for t in (3, 4)]
    try:
        _wait_for(
            lambda: (
                all(journal.latest().get(t, {}).get("status") == "running" for t in (3, 4))
                and all(p.is_file() for p in pid_files)
            ),
            600,
            "trials 3 and 4 to run",
        )
        before = journal.latest()
        killed = {
            "workers": {before[t]["pid"] for t in (3, 4)},
            "trials": {int(p.read_text()) for p in pid_files},
            "state": before,
            "records": journal.records(),
            "trial_1_metrics": (directory / "trials" / "trial_001" / "metrics.json").read_text(),
        }
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    # the workers and their trial processes die with the sweep: no orphan keeps writing
    _wait_for(
        lambda: not any(process_alive(pid) for pid in killed["workers"] | killed["trials"]),
        60,
        "orphaned workers and trials to die",
    )
    # resumed one trial at a time (a setting that may change; the trials' definition may not)
    result = run_sweep(f"resume={directory}", "sweep.parallel=1", env={"FAKE_TRAIN_FAIL_ABOVE": "0.6"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, directory, killed, result


def test_sweep_runs_sobol_then_botorch_batches_and_survives_a_failing_trial(
    killed_and_resumed_sweep,
):
    root, directory, _, result = killed_and_resumed_sweep
    records = [json.loads(line) for line in (directory / "journal.jsonl").read_text().splitlines()]
    state = Journal(directory / "journal.jsonl").latest()
    assert sorted(state) == list(range(6))
    for trial, record in state.items():
        assert [r["status"] for r in records if r["trial"] == trial][-1] in ("completed", "failed")
        params = record["params"]
        assert params["lambda1"] + params["lambda2"] <= 1 + FEASIBILITY_TOLERANCE and params["lambda_area"] in (
            0.5,
            1.0,
            2.0,
        )
        assert params["lambda3"] == pytest.approx(
            1 - params["lambda1"] - params["lambda2"], abs=1e-12
        )
        assert params["lambda3"] >= 0 and record["run_dir"] == str(
            directory / "trials" / f"trial_{trial:03d}"
        )
        if params["lambda1"] > 0.6:  # the stand-in diverges there
            assert record["status"] == "failed" and record["objectives"] == {
                "MoRF": 0.36,
                "LeRF": 0.6,
            }
            assert "loss is not finite" in record["error"]
        else:
            assert record["status"] == "completed" and record["objectives"] == pytest.approx(
                fake_metrics(params)
            )
            argv = json.loads((Path(record["run_dir"]) / "metrics.json").read_text())["argv"]
            assert (
                f"loss.variation_weight={params['lambda3']!r}" in argv
                and "callbacks=faithfulness" in argv
            )
            assert "trainer.max_epochs=1" in argv and "loss=paper" in argv
        assert record["seconds"] is not None
    assert [state[t]["source"] for t in range(6)] == ["sobol"] * 3 + ["botorch"] * 3
    assert (
        state[0]["status"] == "failed"
    )  # the first Sobol point has lambda1 = 0.64: the sweep went on
    # sweep.parallel=2: trials 3 and 4 were proposed together (q = 2), before either ran
    proposed = [
        i for i, r in enumerate(records) if r["status"] == "proposed" and r["trial"] in (3, 4)
    ][:2]
    running = [
        i for i, r in enumerate(records) if r["status"] == "running" and r["trial"] in (3, 4)
    ][:2]
    assert max(proposed) < min(running)
    assert "progress: 6/6 trials finished" in result.stdout + result.stderr


def test_killed_sweep_resumes_without_rerunning_finished_trials(killed_and_resumed_sweep):
    _, directory, killed, result = killed_and_resumed_sweep
    assert [killed["state"][t]["status"] for t in range(5)] == [
        "failed",
        "completed",
        "completed",
        "running",
        "running",
    ]
    assert len(killed["workers"]) == 2  # two joblib worker processes ran the batch
    records = Journal(directory / "journal.jsonl").records()
    # finished trials were not run again; the batch that was training was proposed again with
    # the same parameters, then run
    for trial in (0, 1, 2):
        assert [r["status"] for r in records if r["trial"] == trial] == [
            r["status"] for r in killed["records"] if r["trial"] == trial
        ]
    assert (directory / "trials" / "trial_001" / "metrics.json").read_text() == killed[
        "trial_1_metrics"
    ]
    for trial in (3, 4):
        statuses = [r["status"] for r in records if r["trial"] == trial]
        assert statuses[:4] == ["proposed", "running", "proposed", "running"] and len(statuses) == 5
        assert [
            r.get("resumed") for r in records if r["trial"] == trial and r["status"] == "proposed"
        ] == [None, True]
        assert (
            len({json.dumps(r["params"], sort_keys=True) for r in records if r["trial"] == trial})
            == 1
        )
    assert [r["status"] for r in records if r["trial"] == 5] == ["proposed", "running", "completed"]
    assert "resuming: 3 finished, 2 unfinished to re-run" in result.stdout + result.stderr
    # the resumed sweep ran the stored command (6 trials) with the new setting
    command = json.loads((directory / "sweep.json").read_text())["command"]["task"]
    assert "sweep.n_trials=6" in command and "sweep.parallel=1" in command and "sweep.parallel=2" not in command
    assert "1 at a time" in result.stdout + result.stderr


def test_sweep_report_is_written_and_names_the_best_trial(killed_and_resumed_sweep):
    root, directory, _, result = killed_and_resumed_sweep
    state = Journal(directory / "journal.jsonl").latest()
    with open(directory / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["trial"]) for r in rows] == list(range(6))
    assert [r["status"] for r in rows] == [state[t]["status"] for t in range(6)]
    completed = {t: r for t, r in state.items() if r["status"] == "completed"}
    best = max(
        completed,
        key=lambda t: completed[t]["objectives"]["LeRF"] - completed[t]["objectives"]["MoRF"],
    )
    assert f"Trial {best}: LeRF - MoRF" in (directory / "report.md").read_text()
    assert (directory / "objective_vs_trial.png").read_bytes()[:4] == b"\x89PNG"
    name = json.loads((directory / "sweep.json").read_text())["experiment_name"]
    assert name == f"sweep_{root.name}_sweep"
    assert (directory / "best.yaml").read_text() == (
        root / "extra" / "experiment" / f"{name}.yaml"
    ).read_text()
    assert f"best trial {best}:" in result.stdout + result.stderr
