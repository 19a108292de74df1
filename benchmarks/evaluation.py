"""Evaluation speed: ROAD per image, the Table 1 metric suite per image, P-TAME's explanation cost
in backbone forwards, and what bf16 evaluation changes in the figures.

ResNet-50 backbone, ResNet-18 auxiliary (layer1..4), random weights, 224x224 images with smooth
random structure, P-TAME with an untrained head (its maps, upsampled from 56x56, are smooth like
trained ones: the imputation's work depends on how scattered the removed pixels are). Everything
runs through ptame's own evaluation loop (:func:`ptame.evaluation.suite.evaluate_explainers`) on
``--images`` images in batches of ``--batch-size`` and is extrapolated to 2000 images, the size of
the paper's test subset. The faithfulness callback runs the same loop with AD/IC and ROAD.

    .venv/bin/python benchmarks/evaluation.py [--device cuda] [--images 512] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ptame.evaluation.suite import build_metrics, evaluate_explainers, metric_precision
from ptame.explainers import PTAMEExplainer
from ptame.metrics import measure_cost
from ptame.metrics.base import classify
from ptame.model import PTAME
from ptame.networks import torchvision_auxiliary, torchvision_backbone

PAPER = {
    "adic": {"thresholds": [100, 50, 15]},
    "road": {"percentages": [10, 20, 30, 40, 50, 70, 90]},
    "insertion_deletion": {"steps": 32},
}


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def smooth_images(count: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 3, size, size)
    for scale in (4, 16, 64):
        noise = torch.rand(count, 3, scale, scale, generator=generator)
        images += F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    return (images / 3).clamp(0, 1)


def batches(images: torch.Tensor, batch_size: int):
    for start in range(0, images.shape[0], batch_size):
        part = images[start : start + batch_size]
        yield {"image": part, "index": torch.arange(start, start + part.shape[0])}


class ForwardCounter:
    """Counts the images a module's forward sees (a forward hook), e.g. every backbone pass of
    the explanation and the metrics."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.images = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output) -> None:
        self.images += inputs[0].shape[0]


def timed_suite(explainer, settings, images, batch_size, device, precision="float32"):
    """(seconds, figures, backbone forwards per image) of one pass of ``settings``' metrics
    over ``images``."""
    suite = {k: m.to(device) for k, m in build_metrics(explainer.backbone, settings, False).items()}
    counter = ForwardCounter(explainer.backbone)
    synchronise(device)
    start = time.perf_counter()
    try:
        figures = evaluate_explainers({"ptame": explainer}, {"ptame": suite}, batches(images, batch_size),
                                      device, precision=precision)["ptame"]
        synchronise(device)
    finally:
        counter.handle.remove()
    return time.perf_counter() - start, figures, counter.images / images.shape[0]


def ms_per_image(forward, images: int, repeats: int, device: torch.device) -> float:
    """Median milliseconds per image of ``forward()`` (no gradients, after two warm-up calls)."""
    times = []
    with torch.no_grad():
        for _ in range(2):
            forward()
        for _ in range(repeats):
            synchronise(device)
            start = time.perf_counter()
            forward()
            synchronise(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times) / images * 1000


def floor_line(forwards_per_image: float, forward_ms: float) -> str:
    """What the backbone passes alone take for 2000 images at the float32 speed of the metrics'
    forwards (``ptame.metrics.base.classify``), measured in the same run."""
    return (f"    its {forwards_per_image:.1f} backbone forwards per image alone: "
            f"{forwards_per_image * forward_ms * 2000 / 1000:.1f} s for 2000 images "
            f"(the float32 floor at {forward_ms:.3f} ms per image)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None, help="default: 512 on GPU, 16 on CPU")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision-images", type=int, default=None,
                        help="images for the float32 / bf16 comparison (default: GPU only, 256)")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    count = args.images or (512 if on_gpu else 16)
    torch.manual_seed(0)
    model = PTAME(torchvision_backbone("resnet50"), torchvision_auxiliary("resnet18"))
    explainer = PTAMEExplainer(model, "minmax").to(device).eval()
    images = smooth_images(count, 224, seed=1)
    print(f"device={device} images={count} batch={args.batch_size} threads={torch.get_num_threads()}")

    # P-TAME's explanation cost in backbone forwards, at the evaluation batch size, after warm-up
    batch = images[: args.batch_size].to(device)
    repeats = 10 if on_gpu else 3
    with metric_precision(device):
        cost = measure_cost(explainer, batch, repeats=repeats)
        forward_ms = ms_per_image(lambda: explainer.backbone(batch), batch.shape[0], repeats, device)
        # the floor uses the metrics' own call (classify: calls of at most 8 images on CPU)
        metric_forward_ms = ms_per_image(lambda: classify(explainer.backbone, batch), batch.shape[0],
                                         repeats, device)
    print(f"P-TAME explanation: {cost.ms_per_image:.3f} ms/image = {cost.ms_per_image / forward_ms:.2f} "
          f"backbone forwards ({forward_ms:.3f} ms/image in one call), {cost.forward_passes:g} forward pass, "
          f"{cost.gflops:.1f} GFLOPs (goal <= 1.6 forwards)")

    timed_suite(explainer, {"road": PAPER["road"]}, images[: args.batch_size], args.batch_size, device)  # warm-up
    seconds, figures, forwards = timed_suite(explainer, {"road": PAPER["road"]}, images, args.batch_size, device)
    print(f"ROAD (7 percentages x MoRF/LeRF, noisy linear): {seconds / count * 1000:.1f} ms/image, "
          f"{seconds / count * 2000:.1f} s for 2000 images (goal on one H200: <= 15 s)")
    print(floor_line(forwards, metric_forward_ms))
    seconds, figures, forwards = timed_suite(explainer, {"adic": PAPER["adic"], "road": PAPER["road"]},
                                             images, args.batch_size, device)
    print(f"faithfulness callback (AD/IC + ROAD): {seconds / count * 2000:.1f} s for 2000 images "
          f"(goal: <= 15 s)")
    print(floor_line(forwards, metric_forward_ms))
    seconds, figures, forwards = timed_suite(explainer, PAPER, images, args.batch_size, device)
    total = seconds / count * 2000 + cost.ms_per_image * 8 / 1000
    print(f"Table 1 suite (AD/IC, ROAD, insertion/deletion, cost): {total:.1f} s for 2000 images "
          f"(goal: <= 30 s end to end)")
    print(floor_line(forwards, metric_forward_ms))

    compare = args.precision_images if args.precision_images is not None else (256 if on_gpu else 0)
    if compare:
        subset = images[:compare]
        settings = {"adic": PAPER["adic"], "road": PAPER["road"]}
        results = {}
        for precision in ("float32", "bf16"):
            seconds, results[precision], _ = timed_suite(explainer, settings, subset, args.batch_size, device,
                                                         precision)
            print(f"  {precision:8s} AD/IC + ROAD on {compare} images: {seconds:.1f} s")
        keys = ("AD@100", "AD@50", "AD@15", "IC@15", "ROAD_MoRF_AUC", "ROAD_LeRF_AUC")
        print("bf16 evaluation moves the figures by: " + ", ".join(
            f"{key} {results['bf16'][key] - results['float32'][key]:+.4f}" for key in keys))


if __name__ == "__main__":
    main()
