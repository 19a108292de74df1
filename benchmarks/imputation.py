"""ROAD noisy linear imputation: ptame's batched multigrid CG against a scipy sparse direct solve.

For each image, the 14 imputations of the ROAD protocol (remove 10, 20, 30, 40, 50, 70, 90 % of
the pixels, most relevant first (MoRF) and least relevant first (LeRF), ranked by a smooth random
saliency map) are computed three ways, interleaved image by image so that the ratios are robust to
a noisy machine:

* ``scipy per channel``: the straightforward reference, written here from the definition: build
  the sparse matrix of the system with scipy.sparse, then ``spsolve`` once per colour channel;
* ``scipy multi-RHS``: the same, factorising once for the 3 channels (``spsolve`` with a matrix
  right-hand side), as the ROAD reference code does: the stronger baseline;
* ``ptame``: :func:`ptame.metrics.imputation.noisy_linear_imputation` on the 14 masked copies of
  the image stacked as one batch (of several images with ``--images-per-call``), noise off.

It prints per-image seconds of each, the speed-ups, and the max |difference| on imputed pixels.
``--against REV`` also times the solver of git revision ``REV`` (or of a copy of that module's
file, for a machine without the repository's history) on the same calls, alternating with
today's (which one runs first alternates per call), and prints today's time as a ratio of it.
Goal: >= 10x faster than the per-channel reference on CPU, max |difference| <= 1e-3. Torch runs on
one thread by default, like scipy's solver (``--threads 0`` keeps torch's default).

    .venv/bin/python benchmarks/imputation.py [--device cpu|cuda] [--images 4] [--size 224]
        [--threads 1] [--images-per-call 1] [--profile] [--cuda-graphs] [--against REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

from ptame.metrics.imputation import ATOL, noisy_linear_imputation
from profiling import print_profile

PERCENTAGES = (10, 20, 30, 40, 50, 70, 90)
NEIGHBOURS = [  # (row offset, column offset, weight)
    (-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12),
    (0, -1, 1 / 6), (0, 1, 1 / 6),
    (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12),
]


def sparse_system(
    image: np.ndarray, keep: np.ndarray
) -> tuple[scipy.sparse.csc_matrix, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The ROAD system from its definition: A (n x n), b (n x C), the removed pixels' coordinates.

    For removed pixel i: (sum of in-image neighbour weights) x_i - sum_{removed j} w_ij x_j
    = sum_{kept j} w_ij v_j.
    """
    height, width = keep.shape
    rows_i, cols_i = np.nonzero(~keep)
    count = rows_i.size
    index = np.full((height, width), -1, dtype=np.int64)
    index[rows_i, cols_i] = np.arange(count)
    diagonal = np.zeros(count)
    rhs = np.zeros((count, image.shape[0]))
    entries_r, entries_c, entries_v = [np.arange(count)], [np.arange(count)], []
    for dr, dc, weight in NEIGHBOURS:
        rows_j, cols_j = rows_i + dr, cols_i + dc
        inside = (rows_j >= 0) & (rows_j < height) & (cols_j >= 0) & (cols_j < width)
        diagonal[inside] += weight
        equation = np.nonzero(inside)[0]
        rows_j, cols_j = rows_j[inside], cols_j[inside]
        known = keep[rows_j, cols_j]
        np.add.at(rhs, equation[known], weight * image[:, rows_j[known], cols_j[known]].T)
        entries_r.append(equation[~known])
        entries_c.append(index[rows_j[~known], cols_j[~known]])
        entries_v.append(np.full(int((~known).sum()), -weight))
    values = np.concatenate([diagonal, *entries_v])
    matrix = scipy.sparse.csc_matrix(
        (values, (np.concatenate(entries_r), np.concatenate(entries_c))), shape=(count, count)
    )
    return matrix, rhs, (rows_i, cols_i)


def scipy_imputation(image: np.ndarray, keep: np.ndarray, per_channel: bool) -> np.ndarray:
    """(C, H, W) float64 image with its removed pixels imputed by a sparse direct solve."""
    matrix, rhs, (rows, cols) = sparse_system(image, keep)
    out = image.copy()
    if per_channel:
        for channel in range(image.shape[0]):
            out[channel, rows, cols] = scipy.sparse.linalg.spsolve(matrix, rhs[:, channel])
    else:
        out[:, rows, cols] = scipy.sparse.linalg.spsolve(matrix, rhs).T
    return out


def road_masks(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 14, size, size) bool keep masks: MoRF and LeRF removal of each percentage.

    Ranking by a smooth random saliency map: a 7x7 random map upsampled bilinearly, plus a tiny
    jitter to break ties.
    """
    coarse = torch.rand(count, 1, 7, 7, generator=generator)
    saliency = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    saliency = saliency + 1e-6 * torch.rand(saliency.shape, generator=generator)
    order = saliency.flatten(1).argsort(dim=1, descending=True)
    masks = []
    for percentage in PERCENTAGES:
        removed = round(percentage / 100 * size * size)
        for ranked in (order[:, :removed], order[:, -removed:]):  # MoRF, LeRF
            keep = torch.ones(count, size * size, dtype=torch.bool)
            keep.scatter_(1, ranked, False)
            masks.append(keep.view(count, size, size))
    return torch.stack(masks, dim=1)


def smooth_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 3, size, size) images in [0, 1]: random structure at 3 scales plus pixel noise."""
    images = torch.zeros(count, 3, size, size)
    for scale in (4, 16, 64):
        noise = torch.rand(count, 3, scale, scale, generator=generator)
        images += F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    images = images / 3 + 0.1 * (torch.rand(images.shape, generator=generator) - 0.5)
    return images.clamp(0, 1)


def solver_at(revision: str):
    """The noisy linear imputation function of git revision ``revision`` (or of the module file at
    that path), loaded as its own module."""
    path = Path(revision)
    if not path.is_file():
        source = subprocess.run(
            ["git", "show", f"{revision}:src/ptame/metrics/imputation/noisy_linear.py"],
            cwd=Path(__file__).resolve().parents[1], check=True, capture_output=True, text=True,
        ).stdout
        path = Path(tempfile.mkdtemp()) / "noisy_linear_at_revision.py"
        path.write_text(source)
    spec = importlib.util.spec_from_file_location("noisy_linear_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.noisy_linear_imputation


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="ptame's device (scipy runs on CPU)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0: default")
    parser.add_argument("--images-per-call", type=int, default=1, help="images per ptame batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scipy-images", type=int, default=None,
                        help="images also solved by scipy (default: all; the speed-ups use them)")
    parser.add_argument("--repeats", type=int, default=1, help="timed ptame calls per group (median)")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of the first call")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="on CUDA, also time every call with cuda_graphs=True (A/B in the same run)")
    parser.add_argument("--against", metavar="REV", default=None,
                        help="also time the solver of this git revision (or module file) on the same calls (A/B)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    images = smooth_images(args.images, args.size, generator)
    masks = road_masks(args.images, args.size, generator)

    warm = images[:1].expand(2, -1, -1, -1).to(device)
    noisy_linear_imputation(warm, masks[0, :2].to(device), noise_std=0.0)
    graphs = args.cuda_graphs and device.type == "cuda"
    if graphs:
        noisy_linear_imputation(warm, masks[0, :2].to(device), noise_std=0.0, cuda_graphs=True)
    previous = solver_at(args.against) if args.against else None
    if previous is not None:
        previous(warm, masks[0, :2].to(device), noise_std=0.0)
    previous_calls: list[float] = []
    previous_difference = 0.0
    synchronise(device)
    graph_calls: list[float] = []
    graph_difference = 0.0
    times = {"scipy per channel": [], "scipy multi-RHS": [], "ptame": []}
    calls = []
    max_difference = 0.0
    scipy_images = args.images if args.scipy_images is None else args.scipy_images
    for group in torch.arange(args.images).split(args.images_per_call):
        count = len(group)
        batch = images[group, None].expand(-1, masks.shape[1], -1, -1, -1).flatten(0, 1).to(device)
        keep = masks[group].flatten(0, 1).to(device)
        if args.profile and not calls:
            print_profile(lambda: noisy_linear_imputation(batch, keep, noise_std=0.0), device,
                          f"one call of {batch.shape[0]} imputations")
        durations, previous_durations = [], []
        for repeat in range(max(1, args.repeats)):
            order = ["ours", "previous"] if previous is not None else ["ours"]
            if (len(calls) + repeat) % 2:
                order.reverse()
            for which in order:
                solve = noisy_linear_imputation if which == "ours" else previous
                synchronise(device)
                start = time.perf_counter()
                result = solve(batch, keep, noise_std=0.0)
                synchronise(device)
                (durations if which == "ours" else previous_durations).append(time.perf_counter() - start)
                if which == "ours":
                    ours = result
                else:
                    theirs = result
        if previous is not None:
            previous_calls.append(statistics.median(previous_durations))
            previous_difference = max(previous_difference, float((theirs - ours).abs().max()))
        calls.append((statistics.median(durations), batch.shape[0]))
        if graphs:  # the same call replaying captured CUDA graphs, interleaved with the eager one
            graph_durations = []
            for _ in range(max(1, args.repeats)):
                synchronise(device)
                start = time.perf_counter()
                replayed = noisy_linear_imputation(batch, keep, noise_std=0.0, cuda_graphs=True)
                synchronise(device)
                graph_durations.append(time.perf_counter() - start)
            graph_calls.append(statistics.median(graph_durations))
            graph_difference = max(graph_difference, float((replayed - ours).abs().max()))
        times["ptame"] += [calls[-1][0] / count] * count
        ours = ours.double().cpu().numpy().reshape(count, masks.shape[1], *ours.shape[1:])
        for index, imputed in zip(group.tolist(), ours):
            if index >= scipy_images:
                continue
            image, keep = images[index].double().numpy(), masks[index].numpy()
            for per_channel, name in ((True, "scipy per channel"), (False, "scipy multi-RHS")):
                start = time.perf_counter()
                reference = [scipy_imputation(image, k, per_channel) for k in keep]
                times[name].append(time.perf_counter() - start)
                for result, expected, k in zip(imputed, reference, keep):
                    difference = float(np.abs(result - expected)[:, ~k].max())
                    max_difference = max(max_difference, difference)

    print(f"{args.images} images {args.size}x{args.size} RGB, 14 imputations each; ptame on "
          f"{device} (torch threads: {torch.get_num_threads()}, {args.images_per_call} image(s) "
          f"per call), scipy {scipy.__version__} on CPU")
    for name, values in times.items():
        if values:
            print(f"  {name:18s} {statistics.mean(values):8.3f} s per image "
                  f"(per image: {', '.join(f'{v:.3f}' for v in values)})")
    per_imputation = sum(seconds for seconds, _ in calls) / sum(count for _, count in calls)
    print(f"  ptame: {statistics.mean(s for s, _ in calls) * 1000:.1f} ms per call of "
          f"{calls[0][1]} imputations, {per_imputation * 1000:.3f} ms per imputation")
    if graph_calls:
        per_graph = sum(graph_calls) / sum(count for _, count in calls)
        print(f"  ptame with CUDA graphs: {per_graph * 1000:.3f} ms per imputation "
              f"({per_imputation / per_graph:.2f}x the eager speed); max |difference| from eager "
              f"{graph_difference:.2e}")
    if previous_calls:
        ours_total = sum(seconds for seconds, _ in calls)
        print(f"  against revision {args.against}: {sum(previous_calls) * 1000 / len(previous_calls):.1f} ms "
              f"per call; today's time {ours_total / sum(previous_calls):.3f}x its time (per call: "
              f"{', '.join(f'{s / p:.2f}' for (s, _), p in zip(calls, previous_calls))}); max "
              f"|difference| {previous_difference:.2e}")
    ours_time = statistics.mean(times["ptame"][:scipy_images]) if scipy_images else None
    for name in ("scipy per channel", "scipy multi-RHS"):
        if times[name] and ours_time:
            print(f"  speed-up vs {name:18s} {statistics.mean(times[name]) / ours_time:6.1f}x")
    if scipy_images:
        print(f"  max |difference| on imputed pixels: {max_difference:.2e} "
              f"(guaranteed bound {ATOL:g}; goal <= 1e-3)")


if __name__ == "__main__":
    main()
