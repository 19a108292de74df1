"""The training step against a direct, naive implementation of Eq. 1-4: the same loss terms and
the same gradients of the attention's weights, for both class-subset modes; the fused area and
variation kernel against its PyTorch reference; the frozen networks' training copies."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ptame.losses import PTAMELoss, regulariser_terms, select_class_subset
from ptame.module import PTAMEModule
from ptame.networks.inference import inference_copy

from .helpers.entry_points import REPO_ROOT
from .helpers.networks import make_auxiliary, make_backbone

LOSSES = {
    "batch": dict(ce_weight=1.5, area_weight=2.0, variation_weight=0.01, area_power=0.3,
                  area_epsilon=0.0005, border_penalty=0.3, variation_normalisation="release",
                  class_subset="batch"),
    "random": dict(ce_weight=0.5, area_weight=0.45, variation_weight=0.05, area_power=1.0,
                   class_subset="random", subset_size=4),
}


def naive_terms(module: PTAMEModule, images: torch.Tensor, generator: torch.Generator) -> dict:
    """Eq. 1-4 written out: every (image, class) map computed on its own, each branch projected
    onto the class and upsampled with F.interpolate, summed, sigmoid; mask with c*'s map."""
    backbone, auxiliary = module.ptame.backbone, module.ptame.auxiliary
    attention, loss = module.ptame.attention, module.loss
    with torch.no_grad():
        predictions = backbone(images).argmax(dim=1)
        features = auxiliary(images)
    subset = select_class_subset(predictions, module.ptame.num_classes, loss.class_subset,
                                 loss.subset_size, generator).expand(images.shape[0], -1)
    processed = [branch(feature) for branch, feature in zip(attention.branches, features)]
    weights = attention.fusion.weight[:, :, 0, 0].split(attention.in_channels, dim=1)
    size = tuple(max((p.shape[-2:] for p in processed), key=lambda s: s[0] * s[1]))

    def class_map(b: int, c: int) -> torch.Tensor:
        score = 0
        for weight, level in zip(weights, processed):
            projected = torch.einsum("k,khw->hw", weight[c], level[b])
            score = score + F.interpolate(projected[None, None], size=size, mode="bilinear",
                                          align_corners=False)[0, 0]
        return torch.sigmoid(score)

    batch = images.shape[0]
    maps = torch.stack([torch.stack([class_map(b, int(c)) for c in subset[b]]) for b in range(batch)])
    target = torch.stack([class_map(b, int(predictions[b])) for b in range(batch)])
    masked = images * F.interpolate(target[:, None], size=images.shape[-2:], mode="bilinear",
                                    align_corners=False)
    ce = F.cross_entropy(backbone(masked), predictions)
    if loss.area_power == 1:
        area = maps.mean()
    else:
        area = (maps + loss.area_epsilon).clamp_min(1e-12).pow(loss.area_power).mean()
    q = loss.variation_power
    total = ((maps[..., :, 1:] - maps[..., :, :-1]).abs() ** q).sum() + (
        (maps[..., 1:, :] - maps[..., :-1, :]).abs() ** q).sum()
    border = sum((edge ** q).sum() for edge in (maps[..., 0, :], maps[..., -1, :],
                                                maps[..., :, 0], maps[..., :, -1]))
    total = total + loss.border_penalty * border
    variation = total / (maps.numel() if loss.variation_normalisation == "mean" else q * batch)
    return {"loss": loss.ce_weight * ce + loss.area_weight * area + loss.variation_weight * variation,
            "ce": ce, "area": area, "variation": variation}


@pytest.mark.parametrize("mode", ["batch", "random"])
def test_step_gives_the_values_and_gradients_of_a_naive_eq_1_to_4(mode):
    torch.manual_seed(0)
    module = PTAMEModule(make_backbone(num_classes=7), make_auxiliary(),
                         PTAMELoss(**LOSSES[mode]), input_size=(21, 19), seed=5)
    module.train()
    images = torch.rand(6, 3, 21, 19, generator=torch.Generator().manual_seed(1))
    parameters = list(module.ptame.attention.parameters())

    terms = module.compute_loss(images)
    fast_gradients = torch.autograd.grad(terms["loss"], parameters)
    expected = naive_terms(module, images, torch.Generator().manual_seed(5))
    naive_gradients = torch.autograd.grad(expected["loss"], parameters)

    for key in ("loss", "ce", "area", "variation"):
        torch.testing.assert_close(terms[key], expected[key], rtol=2e-5, atol=1e-6, msg=key)
    for fast, naive in zip(fast_gradients, naive_gradients, strict=True):
        assert naive.abs().max() > 0
        torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-6)


def test_frozen_training_copies_fold_batchnorm_and_compute_the_same_outputs():
    backbone, auxiliary = make_backbone(), make_auxiliary()
    images = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    fast_backbone, fast_auxiliary = inference_copy(backbone), inference_copy(auxiliary)
    for copy in (fast_backbone, fast_auxiliary):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in copy.modules())
        assert not any(p.requires_grad for p in copy.parameters()) and not copy.training
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())  # untouched
    with torch.no_grad():
        torch.testing.assert_close(fast_backbone(images), backbone(images), rtol=1e-5, atol=1e-6)
        for fast, slow in zip(fast_auxiliary(images), auxiliary(images), strict=True):
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    half = inference_copy(backbone, dtype=torch.bfloat16, channels_last=True)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        reference = backbone(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(half(images).float(), reference, rtol=0.05, atol=0.05)


def test_module_trains_with_bfloat16_training_copies_and_keeps_float32_networks():
    module = PTAMEModule(make_backbone(), make_auxiliary(), PTAMELoss(class_subset="batch"),
                         input_size=(20, 20), frozen_dtype="bfloat16")
    images = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    terms = module.compute_loss(images)
    terms["loss"].backward()
    backbone, _ = module.frozen_networks()
    assert {p.dtype for p in backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.ptame.backbone.parameters()} == {torch.float32}
    assert torch.isfinite(terms["loss"]) and module.ptame.attention.fusion.weight.grad.abs().sum() > 0


FUSED_CHECK = r"""
import torch
from ptame.losses import regulariser_terms
torch.manual_seed(0)
cases = [((3, 4, 7, 9), dict(area_power=0.3, area_epsilon=5e-4, variation_power=2.0,
                             border_penalty=0.3, normalisation="release")),
         ((2, 3, 5, 5), dict(area_power=1.0, variation_power=2.0, normalisation="mean")),
         ((2, 2, 6, 4), dict(area_power=2.0, variation_power=1.5, border_penalty=0.5)),
         ((1, 2, 70, 9), dict(area_power=0.5, area_epsilon=5e-4, border_penalty=0.3,
                              normalisation="release"))]
for shape, settings in cases:
    scores = torch.randn(shape) * 3
    scores[0, 0, 0, :3] = -100  # saturated: maps exactly 0
    results = {}
    for implementation in ("torch", "triton"):
        x = scores.clone().requires_grad_(True)
        area, variation = regulariser_terms(x, implementation=implementation, **settings)
        (0.7 * area + 1.3 * variation).backward()
        results[implementation] = (area.detach(), variation.detach(), x.grad)
    for reference, fused in zip(results["torch"], results["triton"]):
        # float32 rounding: relative to the largest value (gradients cancel in differences)
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))
    assert results["torch"][2].abs().max() > 0
print("fused regularisers match")
"""


def test_fused_regularisers_match_the_pytorch_reference_under_the_triton_interpreter():
    """The Triton kernel (forward sums and backward gradient) run by Triton's interpreter on the
    CPU: tiled maps (70 rows), general powers, the release's border and normalisation."""
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-c", FUSED_CHECK], cwd=REPO_ROOT, text=True,
                            capture_output=True, env={**os.environ, "TRITON_INTERPRET": "1"},
                            timeout=600)
    assert result.returncode == 0 and "fused regularisers match" in result.stdout, result.stderr[-3000:]


def test_regularisers_reject_bad_arguments():
    with pytest.raises(ValueError, match="scores \\(B, S, h, w\\)"):
        regulariser_terms(torch.zeros(2, 3, 4), 1.0)
    with pytest.raises(ValueError, match="regulariser implementation must be one of"):
        regulariser_terms(torch.zeros(1, 1, 2, 2), 1.0, implementation="cuda")
    with pytest.raises(ValueError, match="exactly one of subset_maps and subset_scores"):
        PTAMELoss()(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="loss.implementation must be one of"):
        PTAMELoss(implementation="cuda")


def test_a_step_casts_no_frozen_weight_and_needs_no_scatter(tmp_path):
    """torch.profiler over one step under bf16 autocast: no copy of a tensor shaped like a frozen
    weight (the training copies hold bf16 weights already), no indexing backward (the class rows
    of the fusion weights are an embedding) and no upsampling backward (matrix products)."""
    module = PTAMEModule(make_backbone(), make_auxiliary(), PTAMELoss(class_subset="batch"),
                         input_size=(20, 20), frozen_dtype="bfloat16")
    images = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(4))
    backbone, auxiliary = module.frozen_networks()
    frozen_shapes = {tuple(p.shape) for net in (backbone, auxiliary) for p in net.parameters()
                     if p.dim() > 1}
    with torch.profiler.profile(record_shapes=True) as profile:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.compute_loss(images)["loss"]
        loss.backward()
    events = profile.events()
    names = {event.name for event in events}
    assert "aten::conv2d" in names and "aten::embedding_dense_backward" in names
    assert not names & {"aten::index_put_", "aten::_index_put_impl_", "IndexBackward0",
                        "aten::upsample_bilinear2d_backward", "UpsampleBilinear2DBackward0"}
    casts = [event for event in events if event.name == "aten::_to_copy"
             and event.input_shapes and tuple(event.input_shapes[0]) in frozen_shapes]
    assert not casts, [(e.name, e.input_shapes) for e in casts]
