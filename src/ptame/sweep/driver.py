"""The sweep loop behind ``sweep.py``: propose, launch through Hydra's launcher, journal, report.

Trials are launched the way Hydra's own sweepers do it: the sweep composes a MULTIRUN "master"
config from its own command line (``hydra/launcher=...`` and its settings included), builds the
configured launcher plugin (``Plugins.instantiate_launcher``) with :class:`TrialTask` as the
task function, and calls ``launcher.launch(job_overrides, initial_job_idx)`` for every batch of
``sweep.parallel`` trials. Each job's config is composed by the launcher from those overrides,
its directory is ``<sweep dir>/trials/trial_NNN``. Default launcher: ``sweep_local``
(hydra-joblib-launcher: local worker processes); ``sweep_slurm`` (hydra-submitit-launcher)
sends every trial to SLURM with one GPU.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ptame.sweep.journal import FINISHED, Journal, make_record
from ptame.sweep.runner import TRIAL_PROCESSES, MetricSpec, TrialSpec, TrialTask
from ptame.sweep.space import SearchSpace, SpaceError, evaluate_expression, expression_names

log = logging.getLogger(__name__)

SETTINGS_FILE = "sweep.json"
JOURNAL_FILE = "journal.jsonl"
MODES = ("scalar", "pareto")
# settings that must not change when a sweep is resumed (they define what the trials mean)
FROZEN_SETTINGS = ("space", "mode", "objective", "metrics", "seed", "trial_overrides")


class SweepError(ValueError):
    """A sweep that cannot start or continue (the message says why)."""


# ---------------------------------------------------------------------------------------------
# Settings


def parse_metrics(config: Mapping[str, Any]) -> list[MetricSpec]:
    """``{name: {key, direction, worst}}`` -> metric specs."""
    specs = []
    for name, spec in dict(config or {}).items():
        spec = dict(spec or {})
        missing = [k for k in ("key", "direction", "worst") if k not in spec]
        if missing:
            raise SweepError(f"sweep.metrics.{name} needs {missing}")
        specs.append(
            MetricSpec(str(name), str(spec["key"]), str(spec["direction"]), float(spec["worst"]))
        )
    if not specs:
        raise SweepError("sweep.metrics is empty: name at least one objective")
    return specs


def _parse_override(override: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([override])[0]


def override_key(override: str) -> str:
    """The key an override sets, package included (``+a.b=1`` -> ``a.b``, ``loss=paper`` ->
    ``loss``, ``db@backup=x`` -> ``db@backup``)."""
    return _parse_override(override).get_key_element().lstrip("~+")


def merge_overrides(*lists: Sequence[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces an earlier one
    (as Hydra would apply them), so each trial's recorded override list names every key once."""
    merged: dict[str, str] = {}
    for overrides in lists:
        for override in overrides:
            key = override_key(override)
            merged.pop(key, None)
            merged[key] = override
    return list(merged.values())


def _is_sweep_override(override: str) -> bool:
    key = _parse_override(override).key_or_group
    return key == "sweep" or key.startswith(("sweep.", "sweep/"))


def changed_settings(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The settings (of :data:`FROZEN_SETTINGS`) that differ between a sweep's sweep.json and
    the current invocation: a resumed sweep must keep them, or its trials would not compare."""
    return [
        k
        for k in FROZEN_SETTINGS
        if json.dumps(stored.get(k), sort_keys=True) != json.dumps(current.get(k), sort_keys=True)
    ]


def scalar_objective(expression: str, objectives: Mapping[str, float]) -> float:
    """Value of the scalar objective expression (e.g. ``LeRF - MoRF``)."""
    return evaluate_expression(expression, objectives)


def oriented_values(
    record: Mapping[str, Any], mode: str, objective: str, metrics: Sequence[MetricSpec]
) -> list[float]:
    """A finished trial's values for the GP, oriented for maximisation."""
    objectives = record["objectives"]
    if mode == "scalar":
        return [scalar_objective(objective, objectives)]
    return [m.sign * float(objectives[m.name]) for m in metrics]


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# ---------------------------------------------------------------------------------------------
# resume=<dir>: command-line sugar handled before Hydra parses the arguments


def expand_resume(argv: Sequence[str]) -> list[str]:
    """Replace ``resume=<sweep dir>`` by the overrides the sweep was started with (from its
    sweep.json), then the other arguments given now, then ``hydra.run.dir=<sweep dir>``."""
    resume = [a for a in argv[1:] if a.startswith("resume=")]
    if not resume:
        return list(argv)
    if len(resume) > 1:
        raise SweepError(f"resume= given {len(resume)} times")
    directory = Path(resume[0].split("=", 1)[1]).expanduser().resolve()
    settings_path = directory / SETTINGS_FILE
    if not settings_path.is_file():
        raise SweepError(
            f"resume={directory}: no {SETTINGS_FILE} there, so it is not a sweep directory"
        )
    stored = json.loads(settings_path.read_text())["command"]
    flags = [a for a in argv[1:] if a.startswith("-")]
    given = [a for a in argv[1:] if not a.startswith("-") and not a.startswith("resume=")]
    stored_overrides = [
        o for o in stored["hydra"] + stored["task"] if override_key(o) != "hydra.run.dir"
    ]
    return [
        argv[0],
        *flags,
        *merge_overrides(stored_overrides, given, [f"hydra.run.dir={directory}"]),
    ]


# ---------------------------------------------------------------------------------------------
# The sweep


class Sweep:
    """One sweep directory: its settings, journal and loop (see the module docstring).

    Args:
        cfg: the composed sweep config (train config + ``sweep``).
        sweep_dir: the sweep directory (the sweep app's ``hydra.run.dir``).
        hydra_cfg: the sweep app's Hydra config (``HydraConfig.get()``): its overrides build the
            launcher's master config, its config sources locate conf/.
    """

    def __init__(self, cfg: DictConfig, sweep_dir: str | Path, hydra_cfg: DictConfig) -> None:
        self.cfg = cfg
        self.sweep_dir = Path(sweep_dir).resolve()
        self.hydra_cfg = hydra_cfg
        settings = cfg.sweep
        self.space_config = _plain(settings.space)
        self.space = SearchSpace.from_config(self.space_config)
        self.metrics = parse_metrics(_plain(settings.metrics))
        self.mode = str(settings.mode)
        self.objective = str(settings.objective)
        self.n_trials = int(settings.n_trials)
        self.n_initial = int(settings.n_initial)
        self.parallel = int(settings.parallel)
        self.seed = int(settings.seed)
        self.trial_process = str(settings.trial_process)
        self.trial_timeout = (
            None if settings.trial_timeout is None else float(settings.trial_timeout)
        )
        self.optimiser = dict(_plain(settings.optimiser) or {})
        self.reference_point = _plain(settings.reference_point)
        self.conf_dir = self._main_config_dir()
        self.repo_root = self.conf_dir.parent
        self.train_script = self._resolve_script(str(settings.train_script))
        self.journal = Journal(self.sweep_dir / JOURNAL_FILE)
        self._validate()
        self.trial_overrides = self._trial_overrides([str(o) for o in settings.trial_overrides])
        self.devices = self._devices(_plain(settings.devices))
        self.experiment_dir = (
            Path(settings.experiment_dir)
            if settings.experiment_dir
            else self.conf_dir / "experiment"
        )
        self.experiment_name = str(settings.experiment_name) if settings.experiment_name else None

    # -- set-up -------------------------------------------------------------------------------

    def _validate(self) -> None:
        if self.mode not in MODES:
            raise SweepError(f"sweep.mode must be one of {MODES}, got {self.mode!r}")
        if self.trial_process not in TRIAL_PROCESSES:
            raise SweepError(
                f"sweep.trial_process must be one of {TRIAL_PROCESSES}, got {self.trial_process!r}"
            )
        if self.n_trials < 1 or self.n_initial < 0 or self.parallel < 1:
            raise SweepError(
                f"need sweep.n_trials >= 1, sweep.n_initial >= 0, sweep.parallel >= 1 "
                f"(got {self.n_trials}, {self.n_initial}, {self.parallel})"
            )
        names = {m.name for m in self.metrics}
        unknown = expression_names(self.objective) - names
        if unknown:
            raise SweepError(
                f"sweep.objective {self.objective!r} uses {sorted(unknown)}, not among the metrics {sorted(names)}"
            )
        if self.mode == "pareto" and len(self.metrics) < 2:
            raise SweepError("sweep.mode=pareto needs at least two metrics")
        if self.reference_point is not None:
            if self.mode != "pareto" or set(self.reference_point) != names:
                raise SweepError(
                    f"sweep.reference_point must map every metric {sorted(names)} to a value (pareto mode only)"
                )
        for name, target in self.space.targets().items():
            if OmegaConf.select(self.cfg, target, default="__absent__") == "__absent__":
                raise SweepError(
                    f"sweep space: {name} targets {target}, which is not a key of the training config "
                    f"(check the spelling, e.g. loss.ce_weight)"
                )
        if not self.train_script.is_file():
            raise SweepError(f"sweep.train_script: {self.train_script} does not exist")

    def _main_config_dir(self) -> Path:
        for source in self.hydra_cfg.runtime.config_sources:
            if source.provider == "main" and source.schema == "file":
                return Path(source.path).resolve()
        raise SweepError("the sweep needs its config directory on the filesystem (conf/)")

    def _resolve_script(self, script: str) -> Path:
        path = Path(script).expanduser()
        if not path.is_absolute():
            path = self.repo_root / path
        return path.resolve()

    def _trial_overrides(self, extra: Sequence[str]) -> list[str]:
        """train.py overrides shared by every trial: the command line (minus sweep settings),
        the faithfulness callback when the config lacks it, the space's own overrides and
        ``sweep.trial_overrides``."""
        command = [o for o in self.hydra_cfg.overrides.task if not _is_sweep_override(o)]
        automatic = []
        if OmegaConf.select(self.cfg, "callbacks.faithfulness") is None:
            if any(override_key(o) == "callbacks" for o in command):
                raise SweepError(
                    "the trials need the faithfulness callback (it logs val/ROAD_MoRF_AUC and val/ROAD_LeRF_AUC), "
                    "but the callbacks= override given selects a config without it: use callbacks=faithfulness"
                )
            automatic.append("callbacks=faithfulness")
        return merge_overrides(command, automatic, self.space.overrides, extra)

    def _devices(self, setting: Any) -> list[str] | None:
        """CUDA device ids handed out one per subprocess trial (see ``sweep.devices``)."""
        if self.trial_process != "subprocess":
            import torch

            if self.parallel > 1 and torch.cuda.device_count() > 1:
                log.warning(
                    "inprocess trials use the GPUs their job process sees (sweep.devices applies to "
                    "subprocess trials): with a local launcher they share the first GPU"
                )
            return None
        if setting is None:
            return None
        if setting == "auto":
            target = str(OmegaConf.select(self.hydra_cfg, "launcher._target_", default=""))
            if "submitit" in target and "Local" not in target:
                return None  # SLURM hands out the GPUs
            import torch

            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible is not None:
                return [d.strip() for d in visible.split(",") if d.strip()] or None
            return [str(i) for i in range(torch.cuda.device_count())] or None
        if isinstance(setting, (list, tuple)):
            return [str(d) for d in setting] or None
        raise SweepError(
            f"sweep.devices must be auto, null or a list of CUDA device ids, got {setting!r}"
        )

    def _settings_snapshot(self) -> dict[str, Any]:
        return {
            "space": self.space_config,
            "mode": self.mode,
            "objective": self.objective,
            "metrics": {
                m.name: {"key": m.key, "direction": m.direction, "worst": m.worst}
                for m in self.metrics
            },
            "seed": self.seed,
            "trial_overrides": self.trial_overrides,
            "n_trials": self.n_trials,
            "n_initial": self.n_initial,
            "parallel": self.parallel,
            "trial_process": self.trial_process,
            "reference_point": self.reference_point,
            "conf_dir": str(self.conf_dir),
            "experiment_dir": str(self.experiment_dir),
            "command": {
                "task": list(self.hydra_cfg.overrides.task),
                "hydra": list(self.hydra_cfg.overrides.hydra),
            },
        }

    def _write_settings(self) -> dict[str, Any]:
        """Write sweep.json; on resume, refuse settings that would change what trials mean."""
        path = self.sweep_dir / SETTINGS_FILE
        current = self._settings_snapshot()
        if path.is_file():
            stored = json.loads(path.read_text())
            changed = changed_settings(stored, current)
            if changed:
                details = "; ".join(
                    f"{k}: was {stored.get(k)!r}, now {current[k]!r}" for k in changed
                )
                raise SweepError(
                    f"the sweep in {self.sweep_dir} was started with other settings ({details}). "
                    f"Resume it with the same ones, or start a new sweep directory"
                )
            current["created"] = stored.get("created")
            current["experiment_name"] = stored.get("experiment_name")
        else:
            current["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        if self.experiment_name:
            current["experiment_name"] = self.experiment_name
        if not current.get("experiment_name"):
            current["experiment_name"] = "sweep_" + re.sub(
                r"[^\w.-]", "_", f"{self.sweep_dir.parent.name}_{self.sweep_dir.name}"
            )
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(current, indent=2) + "\n")
        temporary.replace(path)
        return current

    # -- launcher -----------------------------------------------------------------------------

    def _build_launcher_context(self) -> None:
        """The MULTIRUN master config (the sweep's own overrides, job directories under
        trials/) and the HydraContext that launchers need."""
        from hydra._internal.callbacks import Callbacks
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra._internal.utils import create_config_search_path
        from hydra.types import HydraContext, RunMode

        loader = ConfigLoaderImpl(
            config_search_path=create_config_search_path(f"file://{self.conf_dir}")
        )
        overrides = merge_overrides(
            list(self.hydra_cfg.overrides.hydra),
            [f"hydra.sweep.dir={self.sweep_dir / 'trials'}"],
        ) + list(self.hydra_cfg.overrides.task)
        self.master_config = loader.load_configuration(
            config_name=self.hydra_cfg.job.config_name,
            overrides=overrides,
            run_mode=RunMode.MULTIRUN,
        )
        self.hydra_context = HydraContext(
            config_loader=loader, callbacks=Callbacks(self.master_config)
        )

    def _launch(self, specs: Sequence[TrialSpec]) -> None:
        """Run a batch through the launcher; trials left unfinished by a launcher error (a
        worker killed, a SLURM job lost) are journaled as failed."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.plugins import Plugins
        from hydra.core.utils import JobStatus, configure_log

        task = TrialTask(
            journal_path=str(self.journal.path),
            trials={s.dirname: s for s in specs},
            metrics=self.metrics,
            n_trials=self.n_trials,
            trial_process=self.trial_process,
            train_script=str(self.train_script),
            cwd=str(Path.cwd()),
            timeout=self.trial_timeout,
            devices=self.devices,
            lock_dir=str(self.sweep_dir / ".locks"),
            sweep_pid=os.getpid(),
            sweep_host=os.uname().nodename,
        )
        jobs = [[*s.overrides, f"hydra.sweep.subdir={s.dirname}"] for s in specs]
        saved = HydraConfig.instance().cfg
        returns: Sequence[Any] = []
        launch_error: Exception | None = None
        try:
            launcher = Plugins.instance().instantiate_launcher(
                hydra_context=self.hydra_context, task_function=task, config=self.master_config
            )
            returns = launcher.launch(jobs, initial_job_idx=specs[0].trial)
        except Exception as exc:  # keep the sweep going; the batch's trials are marked below
            launch_error = exc
            log.error(
                "launching trials %s failed: %s: %s",
                [s.trial for s in specs],
                type(exc).__name__,
                exc,
            )
        finally:
            # jobs run in this process (one at a time) reconfigure Hydra's state and logging
            HydraConfig.instance().cfg = saved
            configure_log(saved.hydra.job_logging, saved.hydra.verbose)
        state = self.journal.latest()
        for index, spec in enumerate(specs):
            if state.get(spec.trial, {}).get("status") in FINISHED:
                continue
            reason = launch_error
            if index < len(returns) and returns[index].status == JobStatus.FAILED:
                reason = returns[index]._return_value
            self.journal.append(
                make_record(
                    spec.trial,
                    "failed",
                    spec.params,
                    {m.name: m.worst for m in self.metrics},
                    run_dir=str(self.sweep_dir / "trials" / spec.dirname),
                    seconds=None,
                    source=spec.source,
                    error=f"the job ended without a result: {type(reason).__name__}: {reason}",
                )
            )

    # -- proposals ----------------------------------------------------------------------------

    def _finished(self) -> list[dict[str, Any]]:
        return [r for r in self.journal.latest().values() if r["status"] in FINISHED]

    def _propose(self, first_trial: int, q: int) -> list[tuple[dict[str, Any], str]]:
        """(params, source) of trials first_trial .. first_trial + q - 1."""
        from ptame.sweep.optimiser import propose, sobol_points

        finished = self._finished()
        if first_trial < self.n_initial or len(finished) < 2:
            if first_trial >= self.n_initial:
                log.warning(
                    "fewer than 2 finished trials: Sobol points instead of BoTorch proposals"
                )
            points = sobol_points(self.space, first_trial + q, seed=self.seed)[first_trial:]
            return [(p, "sobol") for p in points]
        values = [oriented_values(r, self.mode, self.objective, self.metrics) for r in finished]
        reference = None
        if self.mode == "pareto" and self.reference_point is not None:
            reference = [m.sign * float(self.reference_point[m.name]) for m in self.metrics]
        points = propose(
            self.space,
            [r["params"] for r in finished],
            values,
            q=q,
            seed=self.seed + first_trial,
            reference_point=reference,
            num_restarts=int(self.optimiser.get("num_restarts", 10)),
            raw_samples=int(self.optimiser.get("raw_samples", 512)),
            max_enumerated=int(self.optimiser.get("max_enumerated", 64)),
        )
        return [(p, "botorch") for p in points]

    def _spec(self, trial: int, params: Mapping[str, Any], source: str) -> TrialSpec:
        complete = self.space.complete(params)
        violations = self.space.violations(complete)
        if violations:  # never launch an infeasible trial
            raise SpaceError(f"proposal for trial {trial} violates {violations}: {complete}")
        overrides = merge_overrides(self.trial_overrides, self.space.trial_overrides(complete))
        return TrialSpec(trial, complete, overrides, source)

    # -- loop ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run (or continue) the sweep to ``n_trials`` finished trials, then write the report.

        Returns:
            the report summary (see :func:`ptame.sweep.report.write_report`).
        """
        from ptame.sweep.report import write_report

        settings = self._write_settings()
        self._build_launcher_context()
        self._announce()
        self._rerun_unfinished()
        while (known := len(self.journal.latest())) < self.n_trials:
            self._run_new_batch(known)
        summary = write_report(self.sweep_dir)
        if summary.get("best") is not None:
            best = summary["best"]
            log.info(
                "best trial %d: %s = %.4f, %s; experiment config %s (train with: python train.py experiment=%s)",
                best["trial"],
                self.objective,
                best["objective"],
                best["params"],
                summary.get("experiment_path"),
                settings["experiment_name"],
            )
        log.info("report: %s", self.sweep_dir / "report.md")
        return summary

    def _announce(self) -> None:
        state = self.journal.latest()
        finished = sum(r["status"] in FINISHED for r in state.values())
        acquisition = (
            f"qLogNEI on {self.objective}"
            if self.mode == "scalar"
            else "qLogNEHVI on " + ", ".join(f"{m.name} ({m.direction})" for m in self.metrics)
        )
        constraints = (
            f" with {[c.text for c in self.space.constraints]}" if self.space.constraints else ""
        )
        resuming = (
            f"; resuming: {finished} finished, {len(state) - finished} unfinished to re-run"
            if state
            else ""
        )
        log.info(
            "sweep %s: %d trials (%d Sobol + BoTorch %s), space %s%s, %d at a time (%s trials)%s",
            self.sweep_dir,
            self.n_trials,
            min(self.n_initial, self.n_trials),
            acquisition,
            self.space.names,
            constraints,
            self.parallel,
            self.trial_process,
            resuming,
        )

    def _journal_proposal(self, spec: TrialSpec, **extra: Any) -> None:
        self.journal.append(
            make_record(
                spec.trial,
                "proposed",
                spec.params,
                run_dir=str(self.sweep_dir / "trials" / spec.dirname),
                source=spec.source,
                overrides=list(spec.overrides),
                **extra,
            )
        )

    def _rerun_unfinished(self) -> None:
        """Trials that were proposed or running when the sweep died: proposed again with their
        parameters (in batches of ``parallel``) and run from scratch."""
        unfinished = [r for r in self.journal.latest().values() if r["status"] not in FINISHED]
        for start in range(0, len(unfinished), self.parallel):
            specs = []
            for record in unfinished[start : start + self.parallel]:
                params = {n: record["params"][n] for n in self.space.names}
                spec = self._spec(record["trial"], params, record.get("source") or "sobol")
                # a half-written run directory (checkpoints, logs) must not mix with the new run
                shutil.rmtree(self.sweep_dir / "trials" / spec.dirname, ignore_errors=True)
                self._journal_proposal(spec, resumed=True)
                specs.append(spec)
            self._launch(specs)
            self._log_progress()

    def _run_new_batch(self, known: int) -> None:
        """Propose trials ``known, known + 1, ...`` (at most ``parallel``; Sobol ones and
        BoTorch ones are never mixed in a batch), journal the proposals, run them."""
        q = min(self.parallel, self.n_trials - known)
        if known < self.n_initial:
            q = min(q, self.n_initial - known)
        specs = []
        for offset, (params, source) in enumerate(self._propose(known, q)):
            spec = self._spec(known + offset, params, source)
            self._journal_proposal(spec)
            specs.append(spec)
        self._launch(specs)
        self._log_progress()

    def _log_progress(self) -> None:
        state = self.journal.latest()
        done = [r for r in state.values() if r["status"] in FINISHED]
        completed = [r for r in done if r["status"] == "completed"]
        if completed:
            best = max(completed, key=lambda r: scalar_objective(self.objective, r["objectives"]))
            value = scalar_objective(self.objective, best["objectives"])
            best_text = f"best so far: trial {best['trial']} ({self.objective} = {value:.4f})"
        else:
            best_text = "no completed trial yet"
        log.info(
            "progress: %d/%d trials finished (%d failed); %s",
            len(done),
            self.n_trials,
            len(done) - len(completed),
            best_text,
        )


def run_sweep(cfg: DictConfig) -> dict[str, Any]:
    """Entry point of sweep.py (inside ``@hydra.main``): the sweep directory is the run's
    ``hydra.run.dir``; an existing journal there is continued."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    return Sweep(cfg, hydra_cfg.runtime.output_dir, hydra_cfg).run()
