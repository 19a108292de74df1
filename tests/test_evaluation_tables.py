"""The LaTeX comparison table and the layer contributions (Table 2's bottom rows)."""

from __future__ import annotations

import math

import pytest
import torch

from ptame.evaluation.contributions import (
    contribution_figures,
    format_layer_contributions,
    layer_contributions,
)
from ptame.evaluation.tables import TABLE_COLUMNS, best_methods, latex_table, write_latex_table
from ptame.metrics import metric_direction
from ptame.explainers import PTAMEExplainer, RandomExplainer
from ptame.model import PTAME

from .helpers.networks import make_auxiliary, make_backbone

RESULTS = {
    "ptame": {"AD@100": 8.35, "IC@100": 50.0, "ROAD_MoRF_AUC": 0.2613, "ROAD_LeRF_AUC": 0.7127,
              "pointing_game": 0.80, "forward_passes": 1.0, "ms_per_image": 3.2, "resolution": 3136.0},
    "grad_cam": {"AD@100": 13.61, "IC@100": 38.1, "ROAD_MoRF_AUC": 0.2480, "ROAD_LeRF_AUC": 0.7338,
                 "pointing_game": 0.70, "forward_passes": 1.0, "ms_per_image": 1.5, "resolution": 49.0},
    "rise": {"AD@100": 11.12, "IC@100": 50.0, "ROAD_MoRF_AUC": 0.2342, "ROAD_LeRF_AUC": math.nan,
             "pointing_game": 0.60, "forward_passes": 8001.0, "ms_per_image": 900.0, "resolution": 49.0},
}


def rows(tex: str) -> dict[str, list[str]]:
    """Method -> cells of the first tabular's body rows."""
    body = tex.split("\\midrule\n", 1)[1].split("\\bottomrule", 1)[0]
    cells = [line.removesuffix(" \\\\").split(" & ") for line in body.strip().splitlines()]
    return {row[0]: row[1:] for row in cells}


def test_every_table_column_has_a_direction():
    assert all(metric_direction(column) in ("min", "max") for column in TABLE_COLUMNS)
    assert metric_direction("AD@15") == "min" and metric_direction("IC@15") == "max"
    assert metric_direction("ROAD_MoRF_AUC") == "min" and metric_direction("ROAD_LeRF_AUC") == "max"
    assert metric_direction("something_else") is None


def test_latex_table_bolds_the_best_value_per_column_in_its_direction():
    tex = latex_table(RESULTS)
    header = tex.split("\\toprule\n", 1)[1].split(" \\\\", 1)[0].split(" & ")
    assert header == ["Method", "AD 100\\% $\\downarrow$", "IC 100\\% $\\uparrow$", "MoRF $\\downarrow$",
                      "LeRF $\\uparrow$", "PG $\\uparrow$", "R $\\uparrow$", "Fwd passes $\\downarrow$",
                      "ms/image $\\downarrow$"]
    table = rows(tex)
    assert table["ptame"] == ["\\textbf{8.35\\%}", "\\textbf{50.00\\%}", "0.2613", "0.7127",
                              "\\textbf{0.8000}", "\\textbf{3136}", "\\textbf{1}", "3.2"]
    # LeRF higher is better; RISE's missing LeRF is "--" and does not compete
    assert table["grad\\_cam"] == ["13.61\\%", "38.10\\%", "0.2480", "\\textbf{0.7338}",
                                   "0.7000", "49", "\\textbf{1}", "\\textbf{1.5}"]
    assert table["rise"] == ["11.12\\%", "\\textbf{50.00\\%}", "\\textbf{0.2342}", "--",
                             "0.6000", "49", "8001", "900"]
    assert tex.count("\\toprule") == 1 and tex.rstrip().endswith("\\end{tabular}")


def test_ties_are_judged_on_printed_values_and_single_values_are_not_bold():
    results = {"a": {"AD@50": 10.004, "gflops": 1.0}, "b": {"AD@50": 9.996}}
    assert best_methods(results, "AD@50") == {"a", "b"}  # both print as 10.00
    assert best_methods(results, "gflops") == set()
    assert best_methods({"a": {"AD@50": 1.0}}, "AD@50") == set()


def test_table_float_and_layer_contributions_are_written(tmp_path):
    results = {name: dict(figures) for name, figures in RESULTS.items()}
    results["ptame"].update({"layer_contribution/layer2": 0.25, "layer_contribution/layer3": 0.75})
    tex = latex_table(results, caption="Comparison on 15_images", label="tab:comparison")
    assert "\\begin{table}[t]" in tex and "\\caption{Comparison on 15\\_images}" in tex
    assert "\\label{tab:comparison}" in tex and tex.rstrip().endswith("\\end{table}")
    assert "layer\\_contribution" not in tex  # not a column of the comparison table
    path = write_latex_table(tmp_path / "results.tex", results)
    written = path.read_text()
    assert written.startswith(latex_table(results))
    assert "Layer & ptame \\\\" in written
    assert "layer2 & 25.00\\% \\\\" in written and "layer3 & 75.00\\% \\\\" in written


def ptame_explainer() -> PTAMEExplainer:
    return PTAMEExplainer(PTAME(make_backbone(), make_auxiliary(), input_size=(32, 32)))


def test_layer_contributions_match_a_hand_computation():
    explainer = ptame_explainer()
    fusion = explainer.model.attention.fusion.weight  # (C=5, 4 + 6 + 8, 1, 1)
    weights = torch.zeros(5, 18)
    weights[0, :4] = torch.tensor([1.0, -1.0, 0.5, 0.5])   # level1: |.| sum 3
    weights[2, 4:10] = -1.0                                # level2: 6
    weights[4, 10:18] = torch.tensor([3.0, 0, 0, 0, 0, 0, 0, -0.0])  # level3: 3
    with torch.no_grad():
        fusion.copy_(weights.view_as(fusion))
    shares = layer_contributions(explainer)
    assert list(shares) == ["level1", "level2", "level3"]
    assert shares == pytest.approx({"level1": 3 / 12, "level2": 6 / 12, "level3": 3 / 12})


def test_trained_contributions_sum_to_one_and_only_attention_explainers_have_them():
    explainer = ptame_explainer()
    figures = contribution_figures({"ptame": explainer, "random": RandomExplainer(explainer.backbone)})
    assert list(figures) == ["ptame"]
    shares = figures["ptame"]
    assert list(shares) == [f"layer_contribution/level{i}" for i in (1, 2, 3)]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(0 < value < 1 for value in shares.values())
    lines = format_layer_contributions(figures).splitlines()[1:]
    assert [line.split() for line in lines] == [
        ["ptame", f"level{i}", f"{100 * shares[f'layer_contribution/level{i}']:.2f}%"] for i in (1, 2, 3)
    ]


def test_costs_print_in_plain_notation_with_three_significant_digits():
    from ptame.evaluation.tables import format_number

    assert [format_number("ms_per_image", v) for v in (1310.2, 36.07, 0.4762, 0.000123)] == [
        "1310", "36.1", "0.476", "0.000123"]  # never 1.31e+03 in a paper's table
    assert format_number("gflops", 11.909) == "11.9"


def test_tables_show_each_figure_with_its_standard_error():
    from ptame.evaluation.tables import latex_table, markdown_table

    results = {"ptame": {"AD@15": 4.81, "AD@15_se": 0.21, "deletion_AUC": 0.2774, "deletion_AUC_se": 0.0051},
               "random": {"AD@15": 40.1, "AD@15_se": 1.1, "deletion_AUC": 0.6}}
    markdown = markdown_table(results)
    assert "| ptame | 4.81% ± 0.21 | 0.2774 ± 0.0051 |" in markdown
    assert "| random | 40.10% ± 1.10 | 0.6000 |" in markdown and "_se" not in markdown
    assert "\\textbf{4.81\\%}\\,{\\scriptsize$\\pm$0.21}" in latex_table(results)


def test_results_tex_splits_a_wide_table_into_page_wide_parts(tmp_path):
    from ptame.evaluation.tables import PAGE_COLUMNS, write_latex_table

    columns = ["AD@100", "AD@50", "AD@15", "IC@100", "IC@50", "IC@15", "ROAD_MoRF_AUC", "ROAD_LeRF_AUC",
               "insertion_AUC", "deletion_AUC", "ms_per_image"]
    results = {"ptame": {c: 0.1 + i for i, c in enumerate(columns)}, "random": {c: 0.2 + i for i, c in enumerate(columns)}}
    tex = write_latex_table(tmp_path / "results.tex", results).read_text()
    tabulars = tex.count("\\begin{tabular}")
    assert tabulars == 2 and tex.count("\\end{tabular}") == 2 and "% part 2 of 2" in tex
    widths = [line.count("&") for line in tex.splitlines() if line.startswith("Method")]
    assert widths == [PAGE_COLUMNS, len(columns) - PAGE_COLUMNS]  # every part within a page's width
    assert tex.count("\nptame & ") == 2  # each part repeats the method column
