"""P-TAME training step time divided by one backbone forward on the same batch.

ResNet-50 backbone, ResNet-18 auxiliary (layer1..4), 224x224 images, random weights (timing
does not depend on them). Both timings are taken in this one run, interleaved, so the printed
ratio is robust to a noisy machine. Goal: ratio <= 4.0.

    .venv/bin/python benchmarks/train_step.py [--device cpu|cuda] [--batch-size 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from ptame.losses import PTAMELoss
from ptame.module import PTAMEModule
from ptame.networks import torchvision_auxiliary, torchvision_backbone


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device) -> float:
    synchronise(device)
    start = time.perf_counter()
    function()
    synchronise(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 64 on GPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    on_gpu = device.type == "cuda"

    module = PTAMEModule(
        torchvision_backbone("resnet50"),
        torchvision_auxiliary("resnet18"),
        PTAMELoss(class_subset="batch", area_power=0.3, area_epsilon=0.0005,
                  border_penalty=0.3, variation_normalisation="release"),
        channels_last=on_gpu,
    ).to(device)
    module.train()
    module.configure_model()
    optimizer = torch.optim.AdamW(module.ptame.attention.parameters(), lr=1e-4)
    images = torch.rand(batch_size, 3, 224, 224, device=device)
    if on_gpu:
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else nullcontext()

    def backbone_forward() -> None:
        with torch.no_grad(), autocast:
            module.ptame.backbone(images)

    def train_step() -> None:
        with autocast:
            loss = module.compute_loss(images)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        backbone_forward()
        train_step()
    forward_times, step_times = [], []
    for _ in range(args.repeats):
        forward_times.append(timed(backbone_forward, device))
        step_times.append(timed(train_step, device))
    forward = statistics.median(forward_times)
    step = statistics.median(step_times)
    print(f"device={device} batch={batch_size} threads={torch.get_num_threads()}")
    print(f"backbone forward (ResNet-50): {forward * 1000:.1f} ms (median of {args.repeats})")
    print(f"P-TAME training step:        {step * 1000:.1f} ms (median of {args.repeats})")
    verdict = "OK" if step / forward <= 4.0 else "ABOVE GOAL"
    print(f"ratio step / forward = {step / forward:.2f} (goal <= 4.0: {verdict})")


if __name__ == "__main__":
    main()
