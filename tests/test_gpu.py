"""Checks that need a CUDA device (marker ``gpu``; ``make test`` deselects them): the fused
regulariser kernel, the imputation solver and the metrics give the CPU's figures on the GPU; the
training step makes no host synchronisation."""

from __future__ import annotations

import pytest
import torch

from ptame.evaluation.suite import metric_precision
from ptame.losses import PTAMELoss, regulariser_terms
from ptame.metrics import ROAD, AverageDropIncrease
from ptame.metrics.imputation import ATOL, noisy_linear_imputation
from ptame.module import PTAMEModule
from ptame.networks import torchvision_auxiliary, torchvision_backbone

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_regularisers_on_cuda_match_the_pytorch_reference(dtype):
    torch.manual_seed(0)
    scores = (torch.randn(16, 16, 56, 56) * 3).to(dtype)
    results = {}
    for implementation, device in (("torch", "cpu"), ("triton", "cuda")):
        x = scores.clone().to(device).requires_grad_(True)  # a leaf on each device
        area, variation = regulariser_terms(x, 0.3, 5e-4, 2.0, 0.3, "release", implementation)
        (0.8 * area + 0.01 * variation).backward()
        results[implementation] = [area.detach().cpu(), variation.detach().cpu(), x.grad.float().cpu()]
    for reference, fused in zip(results["torch"], results["triton"]):
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(fused, reference.float(), rtol=tolerance, atol=tolerance * float(reference.abs().max()))


def test_imputation_on_cuda_matches_the_cpu_within_the_guaranteed_bound():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(28, 3, 224, 224, generator=generator)
    keep = torch.rand(28, 224, 224, generator=generator) > torch.linspace(0.05, 0.95, 28).view(-1, 1, 1)
    keep[0] = False
    keep[0, 0, 0] = keep[0, -1, -1] = True  # two kept pixels: near-singular
    cpu = noisy_linear_imputation(images, keep, noise_std=0.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        gpu = noisy_linear_imputation(images.cuda(), keep.cuda(), noise_std=0.0).cpu()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (gpu - cpu).abs().max() <= 2 * ATOL


def test_imputation_replayed_from_cuda_graphs_gives_the_eager_values():
    """cuda_graphs=True captures one CG iteration and replays it between checks (recapturing when
    rows retire): the same kernels on the same buffers, so the eager solver's values."""
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(28, 3, 224, 224, generator=generator).cuda()
    keep = (torch.rand(28, 224, 224, generator=generator) > torch.linspace(0.05, 0.95, 28).view(-1, 1, 1)).cuda()
    keep[0] = False
    keep[0, 0, 0] = keep[0, -1, -1] = True  # near-singular: iterates longest, after the others retired
    eager = noisy_linear_imputation(images, keep, noise_std=0.0)
    replayed = noisy_linear_imputation(images, keep, noise_std=0.0, cuda_graphs=True)
    again = noisy_linear_imputation(images, keep, noise_std=0.0, cuda_graphs=True)
    assert torch.equal(replayed, again)
    assert float((replayed - eager).abs().max()) <= 1e-6


def test_road_and_ad_ic_give_the_cpus_figures_on_the_gpu_in_float32():
    torch.manual_seed(2)
    backbone = torchvision_backbone("resnet18", num_classes=10)
    images = torch.rand(8, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    maps = torch.rand(8, 96, 96, generator=torch.Generator().manual_seed(4))
    indices = torch.arange(8)
    figures = {}
    for device in ("cpu", "cuda"):
        network = backbone.to(device)
        metrics = [ROAD(network, percentages=[20, 60]), AverageDropIncrease(network)]
        with metric_precision(device):
            for metric in metrics:
                metric.to(device).update(images.to(device), maps.to(device), indices.to(device))
        figures[device] = {k: float(v) for metric in metrics for k, v in metric.compute().items()}
    for key, value in figures["cpu"].items():
        # accuracies are counts of 8: equal unless a near-tie flips; confidences to rounding
        assert figures["cuda"][key] == pytest.approx(value, abs=1e-4 if "@" in key or "AUC" in key else 1e-3), key


@pytest.mark.parametrize("batch_size", [32, 256])
@pytest.mark.parametrize("mode", ["batch", "random"])
def test_training_step_makes_no_host_synchronisation(mode, batch_size):
    module = PTAMEModule(torchvision_backbone("resnet50"), torchvision_auxiliary("resnet18"),
                         PTAMELoss(class_subset=mode), channels_last=True,
                         frozen_dtype="bfloat16").cuda().train()
    optimizer = module.make_optimizer()  # fused AdamW, as in training
    images = torch.rand(batch_size, 3, 224, 224, device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.compute_loss(images)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # builds the training copies, autotunes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_frozen_passes_replayed_as_cuda_graphs_train_as_the_compiled_ones():
    """``model.compile_mode=reduce-overhead``: the frozen passes run as CUDA graphs (outputs in
    the graphs' memory pool, overwritten from the next step on). The same compiled kernels
    without graphs (``default``) give the same losses and attention weights over four steps, so
    no graph output is read after it was overwritten."""
    from .helpers.networks import make_auxiliary, make_backbone

    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)).cuda()
    results = {}
    for compile_mode in ("default", "reduce-overhead"):
        torch.manual_seed(0)
        module = PTAMEModule(make_backbone(), make_auxiliary(),
                             PTAMELoss(class_subset="random", subset_size=4), lr=1e-2,
                             input_size=(32, 32), channels_last=True, frozen_dtype="bfloat16",
                             compile=True, compile_mode=compile_mode, seed=1)
        module = module.cuda().train()
        optimizer = module.make_optimizer()
        losses = []
        for _ in range(4):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = module.compute_loss(images)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        assert module._replays_cuda_graphs() == (compile_mode == "reduce-overhead")
        results[compile_mode] = (losses, module.ptame.attention.fusion.weight.detach().float().cpu())
    (compiled_losses, compiled_weights), (graph_losses, graph_weights) = results.values()
    assert graph_losses == pytest.approx(compiled_losses, rel=1e-4), (graph_losses, compiled_losses)
    assert graph_losses[-1] < graph_losses[0]
    torch.testing.assert_close(graph_weights, compiled_weights, rtol=1e-4, atol=1e-6)
