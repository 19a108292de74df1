"""P-TAME training step time divided by one backbone forward on the same batch.

ResNet-50 backbone, ResNet-18 auxiliary (layer1..4), 224x224 images, random weights (timing does
not depend on them), |S| = batch size in both class-subset modes: ``batch`` (the release: S = the
batch's predictions) and ``random`` (the paper: c* plus uniformly drawn classes). The step is the
module's own ``compute_loss`` + backward + its AdamW step (``make_optimizer``), with the frozen
networks' training copies (BatchNorm folded, channels_last, bf16 weights and autocast on GPU); the
forward it is divided by is the same backbone copy's, on the same batch, timed in the same run,
interleaved. The physical floor is about 3.3 (a forward without gradients to pick c*, the
auxiliary, a forward with activations kept, a backward to the input only). Goals: <= 3.5 on a GPU,
<= 4.0 on a CPU.

    .venv/bin/python benchmarks/train_step.py [--device cpu|cuda] [--batch-sizes 32 64 256]
        [--modes batch random] [--repeats 10] [--compile [--compile-modes default reduce-overhead]]
        [--check-syncs] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from ptame.losses import PTAMELoss
from ptame.module import COMPILE_MODES, PTAMEModule
from ptame.networks import torchvision_auxiliary, torchvision_backbone
from profiling import print_profile

GOALS = {"cuda": 3.5, "cpu": 4.0}


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device) -> float:
    synchronise(device)
    start = time.perf_counter()
    function()
    synchronise(device)
    return time.perf_counter() - start


def build(mode: str, device: torch.device, compile: bool, compile_mode: str = "default") -> PTAMEModule:
    on_gpu = device.type == "cuda"
    module = PTAMEModule(
        torchvision_backbone("resnet50"),
        torchvision_auxiliary("resnet18"),
        PTAMELoss(class_subset=mode, subset_size=None, area_power=0.3, area_epsilon=0.0005,
                  border_penalty=0.3, variation_normalisation="release"),
        channels_last=True,  # the presets' default, on CPU (oneDNN) and GPU (cuDNN)
        compile=compile,
        compile_mode=compile_mode,
        frozen_dtype="bfloat16" if on_gpu else "float32",
    ).to(device)
    module.train()
    return module


def measure(module: PTAMEModule, batch_size: int, device: torch.device, repeats: int,
            warmup: int, check_syncs: bool, profile: bool = False) -> dict[str, float]:
    """Median seconds of one backbone forward and of one training step on one batch."""
    on_gpu = device.type == "cuda"
    optimizer = module.make_optimizer()  # the one training uses (fused AdamW where available)
    images = torch.rand(batch_size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else nullcontext()
    backbone, _ = module.frozen_networks()

    def backbone_forward() -> None:
        with torch.no_grad(), autocast:
            backbone(images)

    def train_step() -> None:
        with autocast:
            loss = module.compute_loss(images)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        backbone_forward()
        train_step()
    syncs = float("nan")
    if check_syncs and on_gpu:
        synchronise(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            train_step()
            syncs = 0.0
        except RuntimeError as error:
            print(f"  host synchronisation in the step: {str(error).splitlines()[0]}")
            syncs = 1.0
        finally:
            torch.cuda.set_sync_debug_mode("default")
    if profile:
        print_profile(train_step, device, f"one step, batch {batch_size}, {module.loss.class_subset} subset")
    forwards, steps = [], []
    for _ in range(repeats):
        forwards.append(timed(backbone_forward, device))
        steps.append(timed(train_step, device))
    return {"forward": statistics.median(forwards), "step": statistics.median(steps), "syncs": syncs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default: 32 64 256 on GPU, 8 on CPU")
    parser.add_argument("--modes", nargs="+", default=["batch", "random"], choices=["batch", "random"])
    parser.add_argument("--repeats", type=int, default=None, help="default: 10 on GPU, 3 on CPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the frozen networks")
    parser.add_argument("--compile-modes", nargs="+", default=["default"], choices=COMPILE_MODES,
                        help="with --compile: model.compile_mode, one row each (reduce-overhead: CUDA graphs)")
    parser.add_argument("--check-syncs", action="store_true",
                        help="GPU: run one step with torch.cuda sync debug mode 'error'")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one step")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    batch_sizes = args.batch_sizes or ([32, 64, 256] if on_gpu else [8])
    repeats = args.repeats or (10 if on_gpu else 3)
    goal = GOALS[device.type]
    compile_modes = args.compile_modes if args.compile else ["eager"]
    print(f"device={device} threads={torch.get_num_threads()} compile={args.compile} goal <= {goal}")
    print(f"{'batch':>6} {'subset':>7} {'|S|':>5} {'compile':>16} {'forward ms':>11} {'step ms':>9} "
          f"{'ratio':>6} {'images/s':>9} {'syncs':>6}")
    for compile_mode in compile_modes:
        for mode in args.modes:
            module = build(mode, device, args.compile, "default" if compile_mode == "eager" else compile_mode)
            for batch_size in batch_sizes:
                result = measure(module, batch_size, device, repeats, args.warmup, args.check_syncs,
                                 args.profile)
                ratio = result["step"] / result["forward"]
                verdict = "" if ratio <= goal else "  ABOVE GOAL"
                print(f"{batch_size:>6} {mode:>7} {batch_size:>5} {compile_mode:>16} "
                      f"{result['forward'] * 1e3:>11.2f} {result['step'] * 1e3:>9.2f} {ratio:>6.2f} "
                      f"{batch_size / result['step']:>9.0f} {result['syncs']:>6}{verdict}", flush=True)
            del module
            if on_gpu:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
