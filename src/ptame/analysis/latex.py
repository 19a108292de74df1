"""The comparison table as LaTeX (booktabs), the best value of each column in bold.

"Best" follows each metric's direction (:data:`METRIC_DIRECTIONS`): AD lower, IC higher, ROAD
MoRF lower, LeRF higher, insertion higher, deletion lower, pointing games higher, R higher,
forward passes / GFLOPs / ms lower. Values are compared as printed (rounded), so methods that
print the same best value are all bold; a column with fewer than two values has no bold entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ptame.analysis.contributions import CONTRIBUTION_PREFIX
from ptame.evaluation import table_columns

#: "min" (lower is better) or "max" per metric; metrics absent here are never bold.
METRIC_DIRECTIONS: dict[str, str] = {
    "ROAD_MoRF_AUC": "min",
    "ROAD_LeRF_AUC": "max",
    "ROAD_MoRF_confidence_AUC": "min",
    "ROAD_LeRF_confidence_AUC": "max",
    "insertion_AUC": "max",
    "deletion_AUC": "min",
    "pointing_game": "max",
    "energy_pointing_game": "max",
    "pointing_game_tolerant": "max",
    "resolution": "max",
    "forward_passes": "min",
    "gflops": "min",
    "ms_per_image": "min",
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
    "pointing_game_tolerant": "PG (tol.)",
    "resolution": "R",
    "forward_passes": "Fwd passes",
    "gflops": "GFLOPs",
    "ms_per_image": "ms/image",
}


def metric_direction(column: str) -> str | None:
    """``"min"``, ``"max"`` or None (no best value) for a result column such as ``AD@15``."""
    if column.startswith("AD@"):
        return "min"
    if column.startswith("IC@"):
        return "max"
    return METRIC_DIRECTIONS.get(column)


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


def format_value(column: str, value: float | None) -> str | None:
    """The printed value (no LaTeX markup), or None when missing / NaN.

    AD and IC are percentages already (2 decimals); R and forward passes as counts; GFLOPs and
    ms/image with 3 significant digits; AUCs and pointing games as fractions (4 decimals), as
    in results.md.
    """
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    if column.startswith(("AD@", "IC@")):
        return f"{value:.2f}"
    if column in ("resolution", "forward_passes"):
        return f"{value:g}"
    if column in ("ms_per_image", "gflops"):
        return f"{value:.3g}"
    return f"{value:.4f}"


def best_methods(results: Mapping[str, Mapping[str, float]], column: str) -> set[str]:
    """Methods holding the best printed value of ``column`` (empty without a direction or with
    fewer than two values)."""
    direction = metric_direction(column)
    printed = {
        method: float(text)
        for method, figures in results.items()
        if (text := format_value(column, figures.get(column))) is not None
    }
    if direction is None or len(printed) < 2:
        return set()
    best = min(printed.values()) if direction == "min" else max(printed.values())
    return {method for method, value in printed.items() if value == best}


def latex_columns(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The table's columns: those of results.md (no ROAD curve points, no layer contributions)."""
    return [
        column for column in table_columns(results)
        if ("@" not in column or column.startswith(("AD@", "IC@")))
        and not column.startswith(CONTRIBUTION_PREFIX)
    ]


def latex_table(
    results: Mapping[str, Mapping[str, float]],
    columns: Sequence[str] | None = None,
    caption: str | None = None,
    label: str | None = None,
) -> str:
    """A booktabs table: one row per method, the best value of each column in bold.

    Args:
        results: ``{method: {metric: value}}`` as in results.json.
        columns: the metric columns, in order; None: :func:`latex_columns`.
        caption, label: wrap the tabular in a ``table`` float with these (None: bare tabular).

    Returns:
        LaTeX source (needs ``\\usepackage{booktabs}``), ending with a newline.
    """
    columns = latex_columns(results) if columns is None else list(columns)
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
            text = format_value(column, figures.get(column))
            if text is None:
                cells.append("--")
                continue
            text = text + "\\%" if column.startswith(("AD@", "IC@")) else text
            cells.append(f"\\textbf{{{text}}}" if method in best[column] else text)
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


def write_latex_table(path: str | Path, results: Mapping[str, Mapping[str, float]]) -> Path:
    """Write results.tex: the comparison table, then the layer contributions (if any)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = latex_table(results)
    contributions = layer_contribution_table(results)
    if contributions is not None:
        text += "\n% layer contributions: each auxiliary layer's share of the fusion weights' mass\n"
        text += contributions
    path.write_text(text)
    return path
