"""The sweep's report, from its directory alone (sweep.json + journal.jsonl).

Writes into the sweep directory: ``trials.csv`` and ``report.md`` (the trials table, the best
parameters), ``objective_vs_trial.png`` (the scalar objective per trial and the best so far),
``pareto_front.png`` (pareto mode: the metrics of every trial, the Pareto-optimal ones joined)
and ``best.yaml``, an experiment config of the best trial that is also written as
``<experiment_dir>/<experiment_name>.yaml`` so that ``train.py experiment=<name>`` trains it.

On demand (e.g. while a sweep runs, or after copying a sweep directory)::

    python -m ptame.sweep.report outputs/sweep/<experiment>/<date_time>
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ptame.sweep.journal import Journal
from ptame.sweep.space import evaluate_expression

log = logging.getLogger(__name__)

PARETO_NOTE = "; in pareto mode it picks the best of the Pareto-optimal trials"
# experiment YAML: groups that are not training choices
_SKIPPED_GROUPS = ("hydra/", "experiment", "sweep")


def load_sweep(sweep_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(settings from sweep.json, the last journal record of every trial in id order)."""
    sweep_dir = Path(sweep_dir)
    settings_path = sweep_dir / "sweep.json"
    if not settings_path.is_file():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory (no sweep.json)")
    settings = json.loads(settings_path.read_text())
    return settings, list(Journal(sweep_dir / "journal.jsonl").latest().values())


def pareto_mask(points: Sequence[Sequence[float]]) -> list[bool]:
    """Non-dominated flags of points to be maximised in every coordinate."""
    flags = []
    for i, p in enumerate(points):
        dominated = any(
            all(b >= a for a, b in zip(p, q)) and any(b > a for a, b in zip(p, q))
            for j, q in enumerate(points)
            if j != i
        )
        flags.append(not dominated)
    return flags


def summarise(settings: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-trial rows (objective, Pareto flag) and the best completed trial.

    Best: the largest scalar objective among completed trials; in pareto mode among the
    Pareto-optimal completed trials (so the pick is always on the front).
    """
    metrics = settings["metrics"]
    rows = []
    for record in records:
        row = dict(record)
        objectives = record.get("objectives")
        row["objective"] = (
            evaluate_expression(settings["objective"], objectives) if objectives else None
        )
        rows.append(row)
    completed = [r for r in rows if r["status"] == "completed"]
    signs = {
        name: (1.0 if spec["direction"] == "maximize" else -1.0) for name, spec in metrics.items()
    }
    oriented = [[signs[n] * r["objectives"][n] for n in metrics] for r in completed]
    front_flags = pareto_mask(oriented) if completed else []
    front = {r["trial"] for r, flag in zip(completed, front_flags) if flag}
    for row in rows:
        row["pareto"] = row["trial"] in front
    pool = (
        [r for r in completed if r["trial"] in front] if settings["mode"] == "pareto" else completed
    )
    best = max(pool, key=lambda r: r["objective"]) if pool else None
    return {"rows": rows, "best": best, "front": sorted(front)}


def _parameter_names(settings: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    names = list((settings["space"].get("parameters") or {}).keys()) + list(
        (settings["space"].get("derived") or {}).keys()
    )
    for row in rows:
        names += [k for k in row["params"] if k not in names]
    return names


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(path: Path, settings: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Path:
    """trials.csv: one row per trial (parameters, metrics, objective, status, timing)."""
    names = _parameter_names(settings, rows)
    metrics = list(settings["metrics"])
    header = [
        "trial",
        "status",
        "source",
        *names,
        *metrics,
        "objective",
        "pareto",
        "seconds",
        "run_dir",
        "error",
    ]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            objectives = row.get("objectives") or {}
            writer.writerow(
                [row["trial"], row["status"], row.get("source", "")]
                + [row["params"].get(n, "") for n in names]
                + [objectives.get(m, "") for m in metrics]
                + [
                    _blank_none(row["objective"]),
                    row["pareto"],
                    _blank_none(row.get("seconds")),
                    row.get("run_dir") or "",
                    row.get("error") or "",
                ]
            )
    return path


def _blank_none(value: Any) -> Any:
    return "" if value is None else value


def plot_objective(
    path: Path, settings: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
) -> Path:
    """The scalar objective per trial (completed: dots, failed: crosses at their worst value)
    and the best so far, with the Sobol / BoTorch boundary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    done = [r for r in rows if r["objective"] is not None]
    completed = [r for r in done if r["status"] == "completed"]
    failed = [r for r in done if r["status"] == "failed"]
    axis.plot(
        [r["trial"] for r in completed], [r["objective"] for r in completed], "o", label="completed"
    )
    if failed:
        axis.plot(
            [r["trial"] for r in failed],
            [r["objective"] for r in failed],
            "x",
            color="tab:red",
            label="failed (worst value)",
        )
    best, trace = -math.inf, []
    for row in completed:
        best = max(best, row["objective"])
        trace.append((row["trial"], best))
    if trace:
        axis.step(
            [t for t, _ in trace],
            [b for _, b in trace],
            where="post",
            color="black",
            label="best so far",
        )
    initial = int(settings.get("n_initial", 0))
    if 0 < initial < len(rows):
        axis.axvline(initial - 0.5, color="grey", linestyle=":", label="Sobol | BoTorch")
    axis.set_xlabel("trial")
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are whole numbers
    axis.set_ylabel(settings["objective"])
    axis.set_title(f"Sweep objective ({settings['mode']} mode)")
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_pareto(path: Path, settings: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Path:
    """The first two metrics of every finished trial; the Pareto-optimal completed ones joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, second = list(settings["metrics"])[:2]
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    for status, marker, color in (("completed", "o", "tab:blue"), ("failed", "x", "tab:red")):
        chosen = [r for r in rows if r["status"] == status]
        if chosen:
            axis.plot(
                [r["objectives"][first] for r in chosen],
                [r["objectives"][second] for r in chosen],
                marker,
                color=color,
                linestyle="none",
                label=status,
            )
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["objectives"][first])
    if front:
        axis.plot(
            [r["objectives"][first] for r in front],
            [r["objectives"][second] for r in front],
            "-o",
            color="black",
            label="Pareto front",
        )
        for row in front:
            axis.annotate(
                str(row["trial"]),
                (row["objectives"][first], row["objectives"][second]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    directions = settings["metrics"]
    axis.set_xlabel(f"{first} ({directions[first]['direction']})")
    axis.set_ylabel(f"{second} ({directions[second]['direction']})")
    axis.set_title("Pareto front")
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def experiment_yaml(overrides: Sequence[str], conf_dir: str | Path, comments: Sequence[str]) -> str:
    """An experiment config (``@package _global_``) that reproduces the training config
    composed from ``overrides``: ``override /group: choice`` for every config group choice,
    then the whole composed config (interpolations kept)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    loader = ConfigLoaderImpl(
        config_search_path=create_config_search_path(f"file://{Path(conf_dir).resolve()}")
    )
    cfg = loader.load_configuration(
        config_name="train", overrides=list(overrides), run_mode=RunMode.RUN
    )
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    defaults = [
        {f"override /{group}": choice}
        for group, choice in choices.items()
        if choice is not None and not group.startswith(_SKIPPED_GROUPS)
    ]
    body = OmegaConf.to_container(cfg, resolve=False)
    body.pop("hydra", None)
    header = "# @package _global_\n" + "".join(f"# {line}\n" for line in comments)
    return header + OmegaConf.to_yaml(OmegaConf.create({"defaults": defaults, **body}))


def markdown_table(settings: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    names = _parameter_names(settings, rows)
    metrics = list(settings["metrics"])
    header = ["trial", "status", "source", *names, *metrics, "objective", "pareto", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        objectives = row.get("objectives") or {}
        cells = [row["trial"], row["status"], row.get("source", "")] + [
            row["params"].get(n) for n in names
        ]
        cells += [objectives.get(m) for m in metrics] + [
            row["objective"],
            "yes" if row["pareto"] else "",
            row.get("seconds"),
        ]
        lines.append("| " + " | ".join(_format(c) for c in cells) + " |")
    return "\n".join(lines)


def write_report(sweep_dir: str | Path, conf_dir: str | Path | None = None) -> dict[str, Any]:
    """Write every report file into ``sweep_dir`` (and the best experiment config).

    Returns:
        ``{"best": best row or None, "front": [trial ids], "experiment_path": path or None,
        "files": [paths written]}``.
    """
    sweep_dir = Path(sweep_dir)
    settings, records = load_sweep(sweep_dir)
    summary = summarise(settings, records)
    rows, best = summary["rows"], summary["best"]
    files = [write_csv(sweep_dir / "trials.csv", settings, rows)]
    if any(r["objective"] is not None for r in rows):
        files.append(plot_objective(sweep_dir / "objective_vs_trial.png", settings, rows))
    if settings["mode"] == "pareto" and any(r["status"] == "completed" for r in rows):
        files.append(plot_pareto(sweep_dir / "pareto_front.png", settings, rows))
    experiment_path = None
    name = settings.get("experiment_name")
    if best is not None and best.get("overrides"):
        comments = [
            f"Best trial {best['trial']} of the sweep {sweep_dir.resolve()}",
            f"({settings['objective']} = {best['objective']:.6g}; "
            + ", ".join(f"{k} {v:.6g}" for k, v in best["objectives"].items())
            + ").",
            "Tuned: " + ", ".join(f"{k}={_format(v)}" for k, v in best["params"].items()),
            "Same as: python train.py " + " ".join(best["overrides"]),
            f"Train with: python train.py experiment={name}",
        ]
        text = experiment_yaml(best["overrides"], conf_dir or settings["conf_dir"], comments)
        (sweep_dir / "best.yaml").write_text(text)
        files.append(sweep_dir / "best.yaml")
        experiment_dir = Path(
            settings.get("experiment_dir") or Path(settings["conf_dir"]) / "experiment"
        )
        experiment_dir.mkdir(parents=True, exist_ok=True)
        experiment_path = experiment_dir / f"{name}.yaml"
        experiment_path.write_text(text)
    files.append(_write_markdown(sweep_dir, settings, summary, experiment_path))
    summary["experiment_path"] = experiment_path
    summary["files"] = files
    return summary


def _write_markdown(
    sweep_dir: Path,
    settings: Mapping[str, Any],
    summary: Mapping[str, Any],
    experiment_path: Path | None,
) -> Path:
    rows, best = summary["rows"], summary["best"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "failed")}
    unfinished = len(rows) - counts["completed"] - counts["failed"]
    space = settings["space"]
    lines = [
        f"# Sweep report: {sweep_dir.resolve()}",
        "",
        f"{len(rows)} of {settings['n_trials']} trials proposed: {counts['completed']} completed, {counts['failed']} failed, "
        f"{unfinished} unfinished. First {settings['n_initial']} trials: Sobol; then BoTorch "
        + (
            "qLogNoisyExpectedImprovement"
            if settings["mode"] == "scalar"
            else "qLogNoisyExpectedHypervolumeImprovement"
        )
        + ".",
        "",
        f"- Objective (maximised{PARETO_NOTE if settings['mode'] == 'pareto' else ''}): `{settings['objective']}`",
        "- Metrics: "
        + ", ".join(
            f"{n} = `{m['key']}` ({m['direction']}, failed trials: {m['worst']})"
            for n, m in settings["metrics"].items()
        ),
        "- Parameters: "
        + ", ".join(
            f"{n} -> `{p.get('target')}`" for n, p in (space.get("parameters") or {}).items()
        ),
        "- Derived: "
        + (
            ", ".join(
                f"{n} = {d['expression']} -> `{d.get('target')}`"
                for n, d in (space.get("derived") or {}).items()
            )
            or "none"
        ),
        "- Constraints: " + (", ".join(f"`{c}`" for c in space.get("constraints") or []) or "none"),
        "- Trial overrides: `" + " ".join(settings.get("trial_overrides") or []) + "`",
        "",
        "## Best trial",
        "",
    ]
    if best is None:
        lines.append("No completed trial yet.")
    else:
        lines += [
            f"Trial {best['trial']}: {settings['objective']} = {best['objective']:.6g} ("
            + ", ".join(f"{k} {v:.6g}" for k, v in best["objectives"].items())
            + f"), run directory `{best.get('run_dir')}`.",
            "",
            "| parameter | value |",
            "|---|---|",
            *[f"| {k} | {_format(v)} |" for k, v in best["params"].items()],
            "",
        ]
        if experiment_path is not None:
            lines += [
                f"Experiment config: `{experiment_path}` (copy: `best.yaml`). Train it with "
                f"`python train.py experiment={settings.get('experiment_name')}`.",
            ]
    if settings["mode"] == "pareto":
        lines += [
            "",
            "## Pareto front",
            "",
            "Pareto-optimal completed trials: " + (", ".join(map(str, summary["front"])) or "none"),
            "",
        ]
        if (sweep_dir / "pareto_front.png").is_file():
            lines.append("![Pareto front](pareto_front.png)")
    lines += ["", "## Trials", "", markdown_table(settings, rows), ""]
    if (sweep_dir / "objective_vs_trial.png").is_file():
        lines += ["![Objective versus trial](objective_vs_trial.png)", ""]
    failed = [r for r in rows if r["status"] == "failed" and r.get("error")]
    if failed:
        lines += (
            ["## Failed trials", ""]
            + [f"- trial {r['trial']}: {r['error']}" for r in failed]
            + [""]
        )
    path = sweep_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ptame.sweep.report <sweep dir>``: write the report and print it."""
    parser = argparse.ArgumentParser(
        description="Write the report of a sweep directory from its journal."
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument(
        "--conf-dir", type=Path, default=None, help="config directory (default: the sweep's)"
    )
    arguments = parser.parse_args(argv)
    summary = write_report(arguments.sweep_dir, arguments.conf_dir)
    print((arguments.sweep_dir / "report.md").read_text())
    for path in summary["files"]:
        print(f"written: {path}")


if __name__ == "__main__":
    main()
