"""Execution of one trial: the task function that the Hydra launcher runs for every job.

A trial is the training pipeline of ``train.py`` with the trial's overrides, followed by the
validation ROAD evaluation of the faithfulness callback; its objectives are read from the run's
``metrics.json``. ``trial_process``:

- ``subprocess``: ``python train.py <overrides> hydra.run.dir=<trial dir>``, its output in
  ``<trial dir>/trial.log``; a crash, a NaN loss or a hang (``timeout``) fails that trial only.
  On Linux the child is killed when its parent dies (``PR_SET_PDEATHSIG``), so killing the
  sweep leaves no orphaned trial writing into a directory that a resumed sweep re-uses.
- ``inprocess``: :func:`ptame.pipelines.train.run_training` inside the job's process (a joblib
  worker, a SLURM job, or the sweep process itself); any exception fails the trial.

The job appends ``running`` and then ``completed`` / ``failed`` to the journal itself, so a
finished trial is recorded as soon as it ends, whatever happens to the other trials of its batch
or to the sweep process. A failed trial gets the configured worst objective values.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ptame.sweep.journal import Journal, make_record

log = logging.getLogger(__name__)

TRIAL_PROCESSES = ("subprocess", "inprocess")


class TrialFailed(RuntimeError):
    """A trial that ran but produced no usable objectives (the message says why)."""


@dataclass(frozen=True)
class MetricSpec:
    """An objective: ``key`` in the trial's metrics.json, its direction, and the value recorded
    for a failed trial."""

    name: str
    key: str
    direction: str
    worst: float

    def __post_init__(self) -> None:
        if self.direction not in ("minimize", "maximize"):
            raise ValueError(
                f"metric {self.name}: direction must be minimize or maximize, got {self.direction!r}"
            )
        if not math.isfinite(self.worst):
            raise ValueError(
                f"metric {self.name}: worst must be a finite number, got {self.worst!r}"
            )

    @property
    def sign(self) -> float:
        """+1 for maximised metrics, -1 for minimised ones (orientation for maximisation)."""
        return 1.0 if self.direction == "maximize" else -1.0


@dataclass(frozen=True)
class TrialSpec:
    """What one job runs: trial id, hyperparameters (derived included), the train.py overrides
    (without the run directory) and where the point came from (sobol, botorch)."""

    trial: int
    params: Mapping[str, Any]
    overrides: Sequence[str]
    source: str

    @property
    def dirname(self) -> str:
        return trial_dirname(self.trial)


def trial_dirname(trial: int) -> str:
    """Run directory name of a trial inside ``<sweep dir>/trials``."""
    return f"trial_{int(trial):03d}"


def extract_objectives(metrics: Mapping[str, Any], specs: Sequence[MetricSpec]) -> dict[str, float]:
    """``{name: value}`` of every objective in a run's metrics.

    Raises:
        TrialFailed: when a key is missing (faithfulness callback off?) or not finite.
    """
    objectives = {}
    for spec in specs:
        if spec.key not in metrics:
            raise TrialFailed(
                f"{spec.key} is missing from metrics.json (keys: {sorted(metrics)[:12]}...): the trial must run "
                f"the faithfulness callback (callbacks=faithfulness) and log it"
            )
        value = metrics[spec.key]
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TrialFailed(f"{spec.key} = {value!r} is not a finite number")
        objectives[spec.name] = float(value)
    return objectives


def last_error_line(log_path: Path, limit: int = 400) -> str:
    """The most telling line at the end of a trial's log: the last ``SomethingError: ...`` /
    ``Exception`` line, else the last non-empty line."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return "(no log)"
    pattern = re.compile(r"^\s*[\w.]*(Error|Exception|Interrupt)\b.*")
    for line in reversed(lines):
        if pattern.match(line):
            return line.strip()[:limit]
    for line in reversed(lines):
        if line.strip():
            return line.strip()[:limit]
    return "(empty log)"


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the process that started it dies (Linux)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (and is no zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


_WATCHDOGS: set[int] = set()


def watch_sweep(sweep_pid: int | None, sweep_host: str | None, poll_seconds: float = 1.0) -> None:
    """In a job process on the sweep's machine (a joblib worker, a submitit local job): exit
    at once when the sweep process dies, so that a killed sweep leaves no worker and no trial
    behind (a trial subprocess dies with its parent through PR_SET_PDEATHSIG) writing into a
    directory that the resumed sweep re-uses. Its journal line stays ``running``, so the
    resumed sweep runs the trial again. One watchdog thread per process."""
    import threading

    if (
        sweep_pid is None
        or sweep_pid == os.getpid()
        or sweep_host != os.uname().nodename
        or sweep_pid in _WATCHDOGS
    ):
        return
    _WATCHDOGS.add(sweep_pid)

    def watch() -> None:
        while process_alive(sweep_pid):
            time.sleep(poll_seconds)
        os._exit(3)

    threading.Thread(target=watch, name="ptame-sweep-watchdog", daemon=True).start()


@contextlib.contextmanager
def device_slot(
    devices: Sequence[str] | None, lock_dir: Path, poll_seconds: float = 0.5
) -> Iterator[str | None]:
    """Hold one of ``devices`` (CUDA ids) exclusively while the block runs (lock files in
    ``lock_dir``, shared by every job process on this machine); None when no devices."""
    if not devices:
        yield None
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for device in devices:
            lock = FileLock(str(lock_dir / f"device-{device}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                yield str(device)
            finally:
                lock.release()
            return
        time.sleep(poll_seconds)


@dataclass
class TrialTask:
    """The task function of the launched jobs: runs the trial whose run directory Hydra created
    for the job (``hydra.sweep.dir/hydra.sweep.subdir`` = ``<sweep>/trials/trial_NNN``).

    Args:
        journal_path: the sweep's journal.
        trials: the batch's trials by run directory name.
        metrics: the objectives.
        n_trials: the sweep's size (for progress lines).
        trial_process: ``subprocess`` or ``inprocess``.
        train_script: absolute path of train.py (subprocess).
        cwd: working directory of the trial subprocesses (the sweep's).
        timeout: seconds before a subprocess trial is killed (None: no limit).
        devices: CUDA device ids handed out one per subprocess trial (None: inherit).
        lock_dir: where the device lock files live.
    """

    journal_path: str
    trials: dict[str, TrialSpec]
    metrics: list[MetricSpec]
    n_trials: int
    trial_process: str = "subprocess"
    train_script: str = "train.py"
    cwd: str = "."
    timeout: float | None = None
    devices: list[str] | None = None
    lock_dir: str = ".locks"
    python: str = field(default_factory=lambda: sys.executable)
    sweep_pid: int | None = None
    sweep_host: str | None = None

    def __post_init__(self) -> None:
        if self.trial_process not in TRIAL_PROCESSES:
            raise ValueError(
                f"sweep.trial_process must be one of {TRIAL_PROCESSES}, got {self.trial_process!r}"
            )

    def __call__(self, cfg: Any) -> dict[str, Any]:
        from hydra.core.hydra_config import HydraConfig

        watch_sweep(self.sweep_pid, self.sweep_host)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        if run_dir.name not in self.trials:
            raise KeyError(
                f"job directory {run_dir} is not a trial of this batch ({sorted(self.trials)})"
            )
        return self.run(self.trials[run_dir.name], run_dir, cfg)

    def run(self, spec: TrialSpec, run_dir: Path, cfg: Any = None) -> dict[str, Any]:
        """Run one trial and journal it (running, then completed or failed); returns the last
        journal record."""
        journal = Journal(self.journal_path)
        run_dir.mkdir(parents=True, exist_ok=True)
        journal.append(
            make_record(
                spec.trial,
                "running",
                spec.params,
                run_dir=str(run_dir),
                source=spec.source,
                host=os.uname().nodename,
                pid=os.getpid(),
            )
        )
        log.info(
            "trial %d [%d/%d] started (%s): %s",
            spec.trial,
            spec.trial + 1,
            self.n_trials,
            spec.source,
            _short(spec.params),
        )
        start = time.monotonic()
        try:
            if self.trial_process == "subprocess":
                metrics = self._run_subprocess(spec, run_dir)
            else:
                metrics = self._run_inprocess(cfg, run_dir)
            objectives = extract_objectives(metrics, self.metrics)
            status, error = "completed", None
        except Exception as exc:  # a failed trial must not stop the sweep
            objectives = {m.name: m.worst for m in self.metrics}
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        record = make_record(
            spec.trial,
            status,
            spec.params,
            objectives,
            run_dir=str(run_dir),
            seconds=time.monotonic() - start,
            source=spec.source,
            **({"error": error} if error else {}),
        )
        journal.append(record)
        figures = ", ".join(f"{k} {v:.4f}" for k, v in objectives.items())
        if status == "completed":
            log.info(
                "trial %d [%d/%d] completed in %.0f s: %s",
                spec.trial,
                spec.trial + 1,
                self.n_trials,
                record["seconds"],
                figures,
            )
        else:
            log.warning(
                "trial %d [%d/%d] failed after %.0f s (recorded as %s): %s",
                spec.trial,
                spec.trial + 1,
                self.n_trials,
                record["seconds"],
                figures,
                error,
            )
        return record

    def _run_subprocess(self, spec: TrialSpec, run_dir: Path) -> dict[str, Any]:
        command = [self.python, self.train_script, *spec.overrides, f"hydra.run.dir={run_dir}"]
        log_path = run_dir / "trial.log"
        (run_dir / "metrics.json").unlink(missing_ok=True)
        with (
            device_slot(self.devices, Path(self.lock_dir)) as device,
            open(log_path, "w") as output,
        ):
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
            if device is not None:
                env["CUDA_VISIBLE_DEVICES"] = device
            output.write(
                f"# {' '.join(command)}\n# CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '(inherited)')}\n"
            )
            output.flush()
            process = subprocess.Popen(
                command,
                cwd=self.cwd,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            try:
                code = process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise TrialFailed(f"timed out after {self.timeout} s (log: {log_path})") from None
            except BaseException:
                process.kill()
                process.wait()
                raise
        if code != 0:
            raise TrialFailed(
                f"train.py exited with status {code}: {last_error_line(log_path)} (log: {log_path})"
            )
        metrics_path = run_dir / "metrics.json"
        if not metrics_path.is_file():
            raise TrialFailed(f"train.py wrote no metrics.json into {run_dir}")
        return json.loads(metrics_path.read_text())

    def _run_inprocess(self, cfg: Any, run_dir: Path) -> dict[str, Any]:
        from omegaconf import open_dict

        from ptame.pipelines.train import run_training

        if cfg is None:
            raise TrialFailed("inprocess trials need the job's composed config")
        with open_dict(cfg):
            cfg.pop("sweep", None)  # the sweep's own settings are no training setting
        return run_training(cfg, run_dir)


def _short(params: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )
