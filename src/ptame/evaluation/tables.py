"""The result tables of an evaluation: ``results.json`` / ``.csv`` / ``.md`` / ``.tex`` and the
plain-text localisation table of training.

The LaTeX table (booktabs) marks the best value of each column in bold, in the direction the
metric computing it declares (:func:`ptame.metrics.metric_direction`): AD lower, IC higher, ROAD
MoRF lower, LeRF higher, insertion higher, deletion lower, pointing games higher, R higher,
forward passes / GFLOPs / ms lower. Values are compared as printed (rounded), so methods that
print the same best value are all bold; a column with fewer than two values has no bold entry.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ptame.evaluation.contributions import CONTRIBUTION_PREFIX
from ptame.io import write_json_atomic, write_text_atomic
from ptame.metrics import metric_direction
from ptame.metrics.base import STANDARD_ERROR_SUFFIX
from ptame.metrics.localisation import CLASS_SPECIFIC_KEYS

# Column order of the result tables (Table 1 of the paper first).
TABLE_COLUMNS = [
    "AD@100", "AD@50", "AD@15", "IC@100", "IC@50", "IC@15", "ROAD_MoRF_AUC", "ROAD_LeRF_AUC",
    "insertion_AUC", "deletion_AUC", "pointing_game", "energy_pointing_game", "pointing_game_strict",
    "resolution", "forward_passes", "gflops", "ms_per_image",
]

def table_columns(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Known columns in Table 1 order, then any other metric, for the methods in ``results``."""
    present = {key for figures in results.values() for key in figures}
    return [c for c in TABLE_COLUMNS if c in present] + sorted(present - set(TABLE_COLUMNS))


def summary_columns(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The columns of results.md and results.tex: :func:`table_columns` without the ROAD curve
    points, the layer contributions and the standard errors (these are shown beside their
    figure; all stay in results.json / results.csv)."""
    return [
        column for column in table_columns(results)
        if ("@" not in column or column.startswith(("AD@", "IC@")))
        and not column.startswith(CONTRIBUTION_PREFIX) and not column.endswith(STANDARD_ERROR_SUFFIX)
    ]


def with_error(column: str, text: str, figures: Mapping[str, float], plus_minus: str = " ± ") -> str:
    """``text`` followed by the figure's standard error when the results have one."""
    error = format_number(column, figures.get(column + STANDARD_ERROR_SUFFIX))
    return text if error is None else f"{text}{plus_minus}{error}"


def plain_significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits without scientific notation and without
    trailing zeros, as ``:g`` would print them (1310, 0.476, 0.000123, 3.2); numbers past those
    digits are rounded to units."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    text = f"{round(value, decimals):.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text  # as :g does


def format_number(column: str, value: float | None) -> str | None:
    """A table cell's number without units or markup, or None when missing / NaN.

    AD and IC (percentages already): 2 decimals; R and forward passes as counts; GFLOPs and
    ms/image: 3 significant digits in plain notation (1310, not 1.31e+03); AUCs and pointing
    games (fractions): 4 decimals.
    """
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    if column.startswith(("AD@", "IC@")):
        return f"{value:.2f}"
    if column in ("resolution", "forward_passes"):
        return f"{value:g}"
    if column in ("ms_per_image", "gflops"):
        return plain_significant(value)
    return f"{value:.4f}"


def _markdown_cell(column: str, value: float | None) -> str:
    text = format_number(column, value)
    if text is None:
        return "-"
    return text + "%" if column.startswith(("AD@", "IC@")) else text


def markdown_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table (:func:`summary_columns`): one row per method, AD/IC in percent, AUCs
    as fractions, each figure ``± its standard error over images`` where the results have one."""
    columns = summary_columns(results)
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, figures in results.items():
        cells = [_markdown_cell(c, figures.get(c)) for c in columns]
        cells = [cell if cell == "-" else with_error(c, cell, figures) for c, cell in zip(columns, cells)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Every figure (:func:`table_columns`) as CSV, one row per method, full precision."""
    columns = table_columns(results)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["method", *columns])
    for method, figures in results.items():
        writer.writerow([method, *[figures.get(c, "") for c in columns]])
    return buffer.getvalue()


#: results.json keys beside the methods: where the numbers come from, the files left out
RESULT_METADATA_KEYS = ("provenance", "skipped_images")


def method_results(saved: Mapping[str, Any]) -> dict[str, Mapping[str, float]]:
    """The ``{method: figures}`` part of a loaded results.json (without :data:`RESULT_METADATA_KEYS`)."""
    return {key: value for key, value in saved.items() if key not in RESULT_METADATA_KEYS}


def provenance_note(provenance: Mapping[str, Any] | None) -> str:
    """A paragraph under the markdown table: images, metric conventions, seed, checkpoint,
    commit ("" without provenance)."""
    if not provenance:
        return ""
    metrics = provenance.get("metrics") or {}
    road = metrics.get("road") or {}
    parts = [f"{provenance.get('images')} images", f"seed {provenance.get('seed')}"]
    if road:
        parts.append(f"ROAD at {road.get('percentages')} % with {road.get('imputer')} imputation, "
                     f"{road.get('auc')} AUC, {road.get('pixels')} pixel counts")
    if metrics.get("precision"):
        parts.append(f"{metrics['precision']} forward passes")
    if provenance.get("checkpoint"):
        parts.append(f"checkpoint {provenance['checkpoint']}")
    parts.append(f"ptame {provenance.get('ptame_version')} ({provenance.get('git_commit') or 'no git commit'})")
    return "\n\n" + "; ".join(parts) + ".\n"


def write_tables(
    run_dir: str | Path, results: Mapping[str, Mapping[str, float]], extra: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write results.json, results.csv, results.md and results.tex into ``run_dir``; ``extra``
    entries (:data:`RESULT_METADATA_KEYS`: ``provenance``, ``skipped_images``) go into
    results.json beside the methods (read the methods back with :func:`method_results`)."""
    run_dir = Path(run_dir)
    unknown = set(extra or {}) - set(RESULT_METADATA_KEYS)
    if unknown or set(results) & set(RESULT_METADATA_KEYS):
        raise ValueError(f"results.json keys {sorted(unknown or set(results) & set(RESULT_METADATA_KEYS))} "
                         f"clash with the reserved {RESULT_METADATA_KEYS}")
    return {
        "json": write_json_atomic(run_dir / "results.json", {**results, **(extra or {})}),
        "csv": write_text_atomic(run_dir / "results.csv", csv_table(results)),
        "md": write_text_atomic(run_dir / "results.md", markdown_table(results)
                                + provenance_note((extra or {}).get("provenance"))),
        "tex": write_latex_table(run_dir / "results.tex", results),
    }


_LABELS: dict[str, str] = {
    "ROAD_MoRF_AUC": "MoRF",
    "ROAD_LeRF_AUC": "LeRF",
    "ROAD_MoRF_confidence_AUC": "MoRF conf.",
    "ROAD_LeRF_confidence_AUC": "LeRF conf.",
    "insertion_AUC": "Ins.",
    "deletion_AUC": "Del.",
    "pointing_game": "PG",
    "energy_pointing_game": "Energy PG",
    "pointing_game_strict": "PG (strict)",
    "resolution": "R",
    "forward_passes": "Fwd passes",
    "gflops": "GFLOPs",
    "ms_per_image": "ms/image",
}


def escape_latex(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (method and metric names)."""
    replacements = {
        "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    }
    return "".join(replacements.get(character, character) for character in text)


def column_label(column: str) -> str:
    """The LaTeX header of a column with its direction's arrow (``AD 15\\% $\\downarrow$``)."""
    if column.startswith(("AD@", "IC@")):
        label = f"{column[:2]} {column[3:]}\\%"
    else:
        label = escape_latex(_LABELS.get(column, column))
    direction = metric_direction(column)
    if direction is None:
        return label
    return label + (r" $\downarrow$" if direction == "min" else r" $\uparrow$")


def best_methods(results: Mapping[str, Mapping[str, float]], column: str) -> set[str]:
    """Methods holding the best printed value of ``column`` (empty without a direction or with
    fewer than two values)."""
    direction = metric_direction(column)
    printed = {
        method: float(text)
        for method, figures in results.items()
        if (text := format_number(column, figures.get(column))) is not None
    }
    if direction is None or len(printed) < 2:
        return set()
    best = min(printed.values()) if direction == "min" else max(printed.values())
    return {method for method, value in printed.items() if value == best}


def latex_table(
    results: Mapping[str, Mapping[str, float]],
    columns: Sequence[str] | None = None,
    caption: str | None = None,
    label: str | None = None,
) -> str:
    """A booktabs table: one row per method, the best value of each column in bold.

    Args:
        results: ``{method: {metric: value}}`` as in results.json.
        columns: the metric columns, in order; None: :func:`summary_columns`.
        caption, label: wrap the tabular in a ``table`` float with these (None: bare tabular).

    Returns:
        LaTeX source (needs ``\\usepackage{booktabs}``), ending with a newline.
    """
    columns = summary_columns(results) if columns is None else list(columns)
    best = {column: best_methods(results, column) for column in columns}
    lines = [
        "% generated by ptame (evaluate.py); needs \\usepackage{booktabs}",
        "\\begin{tabular}{l" + "r" * len(columns) + "}",
        "\\toprule",
        " & ".join(["Method", *(column_label(c) for c in columns)]) + " \\\\",
        "\\midrule",
    ]
    for method, figures in results.items():
        cells = [escape_latex(method)]
        for column in columns:
            text = format_number(column, figures.get(column))
            if text is None:
                cells.append("--")
                continue
            text = text + "\\%" if column.startswith(("AD@", "IC@")) else text
            text = f"\\textbf{{{text}}}" if method in best[column] else text
            cells.append(with_error(column, text, figures, "\\,{\\scriptsize$\\pm$"))
            if cells[-1] != text:
                cells[-1] += "}"
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if caption is not None or label is not None:
        inner = ["\\begin{table}[t]", "\\centering"]
        if caption is not None:
            inner.append(f"\\caption{{{escape_latex(caption)}}}")
        if label is not None:
            inner.append(f"\\label{{{label}}}")
        lines = [lines[0], *inner, *lines[1:], "\\end{table}"]
    return "\n".join(lines) + "\n"


def layer_contribution_table(results: Mapping[str, Mapping[str, float]]) -> str | None:
    """Table 2's bottom rows as a booktabs tabular: one column per method with layer
    contributions (``layer_contribution/<layer>`` in results), one row per layer, in percent.
    None when no method has them."""
    methods = [method for method, figures in results.items()
               if any(key.startswith(CONTRIBUTION_PREFIX) for key in figures)]
    if not methods:
        return None
    layers: list[str] = []
    for method in methods:
        for key in results[method]:
            layer = key[len(CONTRIBUTION_PREFIX):]
            if key.startswith(CONTRIBUTION_PREFIX) and layer not in layers:
                layers.append(layer)
    lines = [
        "\\begin{tabular}{l" + "r" * len(methods) + "}",
        "\\toprule",
        " & ".join(["Layer", *(escape_latex(m) for m in methods)]) + " \\\\",
        "\\midrule",
    ]
    for layer in layers:
        cells = [escape_latex(layer)]
        for method in methods:
            value = results[method].get(CONTRIBUTION_PREFIX + layer)
            cells.append("--" if value is None else f"{100 * value:.2f}\\%")
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


#: the most metric columns one tabular of results.tex holds; wider tables are split in parts
#: that each fit a page's width
PAGE_COLUMNS = 8


def page_tables(results: Mapping[str, Mapping[str, float]], per_table: int = PAGE_COLUMNS) -> str:
    """:func:`latex_table` split into tabulars of at most ``per_table`` metric columns each (the
    method column repeated), so that results.tex fits a page whatever the number of metrics."""
    columns = summary_columns(results)
    parts = [columns[start:start + per_table] for start in range(0, len(columns), per_table)] or [[]]
    texts = [latex_table(results, part) for part in parts]
    if len(texts) == 1:
        return texts[0]
    return texts[0] + "".join(f"\n% part {i} of {len(texts)}\n\\medskip\n" + text.split("\n", 1)[1]
                              for i, text in enumerate(texts[1:], start=2))


def write_latex_table(path: str | Path, results: Mapping[str, Mapping[str, float]]) -> Path:
    """Write results.tex: the comparison table (split in page-wide parts, :func:`page_tables`),
    then the layer contributions (if any)."""
    text = page_tables(results)
    contributions = layer_contribution_table(results)
    if contributions is not None:
        text += "\n% layer contributions: each auxiliary layer's share of the fusion weights' mass\n"
        text += contributions
    return write_text_atomic(path, text)


def format_localisation_table(
    results: Mapping[str, float], names: Iterable[str], pointing_tolerance: float = 0.0
) -> str:
    """A plain-text table: one row per method; pointing game (with its tolerance in the header),
    energy, and the strict pointing game when ``results`` has it."""
    names = list(names)
    strict = any(f"{name}/pointing_game_strict" in results for name in names)
    pointing_header = "pointing game"
    if pointing_tolerance > 0:
        pointing_header += f" (< {pointing_tolerance:g} px)"
    header = f"{'method':<18}{pointing_header:>26}{'energy':>10}"
    lines = [header + (f"{'pointing (strict)':>20}" if strict else "")]
    for name in names:
        pointing = results.get(f"{name}/pointing_game", math.nan)
        energy = results.get(f"{name}/energy_pointing_game", math.nan)
        line = f"{name:<18}{pointing:>26.3f}{energy:>10.3f}"
        if strict:
            line += f"{results.get(f'{name}/pointing_game_strict', math.nan):>20.3f}"
        lines.append(line)
    if any(f"{name}/class_pointing_game" in results for name in names):
        lines += ["", format_class_specific_table(results, names, pointing_tolerance)]
    return "\n".join(lines)


def format_class_specific_table(
    results: Mapping[str, float], names: Iterable[str], pointing_tolerance: float = 0.0
) -> str:
    """A plain-text table of :class:`~ptame.metrics.localisation.ClassSpecificLocalisation`: per
    method, the pointing game and energy of each object's class on that object and on the other."""
    tolerance = f" (< {pointing_tolerance:g} px)" if pointing_tolerance > 0 else ""
    lines = [f"Class-specific, each object's class explained{tolerance}: on that object (high is good) "
             "and on the other object (low is good)",
             f"{'method':<18}{'pointing: object':>18}{'other':>8}{'energy: object':>17}{'other':>8}"]
    for name in names:
        values = [results.get(f"{name}/{key}", math.nan) for key in CLASS_SPECIFIC_KEYS]
        lines.append(f"{name:<18}{values[0]:>18.3f}{values[1]:>8.3f}{values[2]:>17.3f}{values[3]:>8.3f}")
    return "\n".join(lines)
