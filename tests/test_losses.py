import math

import pytest
import torch
from hydra.utils import instantiate
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from ptame.losses import PTAMELoss, area_loss, select_class_subset, variation_loss

from .helpers.entry_points import CONF_DIR

MAPS = torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]])  # (B=1, S=1, 2, 2)


def test_area_loss_by_hand():
    # paper: mean(E ** 2) = (0 + 0.25 + 1 + 0.0625) / 4
    assert area_loss(MAPS, power=2.0).item() == pytest.approx(1.3125 / 4)
    # power 1 is the plain mean, with or without epsilon (release behaviour)
    assert area_loss(MAPS, power=1.0, epsilon=0.0005).item() == pytest.approx(1.75 / 4)
    # release: mean((E + 0.0005) ** 0.3)
    expected = sum((v + 0.0005) ** 0.3 for v in (0.0, 0.5, 1.0, 0.25)) / 4
    assert area_loss(MAPS, power=0.3, epsilon=0.0005).item() == pytest.approx(expected, rel=1e-6)


def test_area_loss_gradient_is_finite_at_zero_for_fractional_powers():
    maps = torch.zeros(1, 1, 2, 2, requires_grad=True)
    area_loss(maps, power=0.5).backward()
    assert torch.isfinite(maps.grad).all()


def test_variation_loss_paper_by_hand():
    # dx: |0.5-0| and |0.25-1| -> squares 0.25 + 0.5625; dy: |1-0|, |0.25-0.5| -> 1 + 0.0625
    total = 0.25 + 0.5625 + 1.0 + 0.0625
    assert variation_loss(MAPS, power=2.0).item() == pytest.approx(total / 4)


def test_variation_loss_release_formula_with_border():
    maps = torch.arange(18, dtype=torch.float32).view(2, 1, 3, 3) / 17  # B = 2
    p, border_penalty = 2.0, 0.3
    m = maps[:, 0]
    dx = sum(((m[b, i, j + 1] - m[b, i, j]).abs() ** p).item() for b in range(2) for i in range(3) for j in range(2))
    dy = sum(((m[b, i + 1, j] - m[b, i, j]).abs() ** p).item() for b in range(2) for i in range(2) for j in range(3))
    border = sum(
        (m[b, 0, :] ** p).sum().item() + (m[b, -1, :] ** p).sum().item()
        + (m[b, :, 0] ** p).sum().item() + (m[b, :, -1] ** p).sum().item()
        for b in range(2)
    )
    expected = (dx + dy + border_penalty * border) / (p * 2)
    got = variation_loss(maps, p, border_penalty, normalisation="release").item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_total_loss_is_the_weighted_sum_of_terms():
    loss = PTAMELoss(ce_weight=0.7, area_weight=0.2, variation_weight=0.1, area_power=2.0)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    terms = loss(logits, torch.tensor([0]), MAPS)
    ce = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["area"].item() == pytest.approx(1.3125 / 4)
    assert terms["variation"].item() == pytest.approx(1.875 / 4)
    assert terms["loss"].item() == pytest.approx(0.7 * ce + 0.2 * 1.3125 / 4 + 0.1 * 1.875 / 4, rel=1e-6)


def test_batch_subset_is_the_batch_predictions_for_every_image():
    predictions = torch.tensor([3, 1, 3])
    subset = select_class_subset(predictions, num_classes=5, mode="batch")
    assert subset.tolist() == [[3, 1, 3]]  # (1, B): the same classes for every image


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 6),
    num_classes=st.integers(1, 12),
    size=st.integers(1, 15),
    seed=st.integers(0, 2**16),
)
def test_random_subset_contains_the_prediction_first_and_distinct_classes(batch, num_classes, size, seed):
    generator = torch.Generator().manual_seed(seed)
    predictions = torch.randint(num_classes, (batch,), generator=generator)
    subset = select_class_subset(predictions, num_classes, "random", size, generator)
    assert subset.shape == (batch, min(size, num_classes))
    assert torch.equal(subset[:, 0], predictions)
    for row in subset.tolist():
        assert len(set(row)) == len(row)
        assert all(0 <= c < num_classes for c in row)


def test_random_subset_is_uniform_over_the_other_classes():
    generator = torch.Generator().manual_seed(0)
    predictions = torch.zeros(20000, dtype=torch.long)
    subset = select_class_subset(predictions, 5, "random", 2, generator)
    counts = torch.bincount(subset[:, 1], minlength=5).float() / 20000
    assert counts[0] == 0
    assert torch.allclose(counts[1:], torch.full((4,), 0.25), atol=0.02)


def test_random_subset_defaults_to_the_batch_size():
    subset = select_class_subset(torch.tensor([0, 1, 2]), 100, "random", None)
    assert subset.shape == (3, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ce_weight": -1.0}, "ce_weight"),
        ({"area_weight": float("nan")}, "area_weight"),
        ({"area_power": 0.0}, "area_power"),
        ({"class_subset": "all"}, "class_subset"),
        ({"variation_normalisation": "sum"}, "variation_normalisation"),
        ({"subset_size": 0}, "subset_size"),
    ],
)
def test_bad_loss_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PTAMELoss(**kwargs)


def test_reference_preset_reproduces_the_release_formulas():
    loss = instantiate(OmegaConf.load(CONF_DIR / "loss" / "reference.yaml"))
    torch.manual_seed(0)
    maps = torch.rand(4, 4, 7, 7)  # (B, S=B, h, w) as in the release's batch subset
    logits, predictions = torch.randn(4, 10), torch.tensor([1, 2, 3, 1])
    terms = loss(logits, predictions, maps)
    area = ((maps + 0.0005) ** 0.3).mean()
    p = 2
    dx = ((maps[..., :, 1:] - maps[..., :, :-1]).abs() ** p).sum()
    dy = ((maps[..., 1:, :] - maps[..., :-1, :]).abs() ** p).sum()
    border = sum((edge**p).sum() for edge in (maps[..., 0, :], maps[..., -1, :], maps[..., :, 0], maps[..., :, -1]))
    variation = (dx + dy + 0.3 * border) / (p * 4)
    ce = torch.nn.functional.cross_entropy(logits, predictions)
    assert terms["area"].item() == pytest.approx(area.item(), rel=1e-6)
    assert terms["variation"].item() == pytest.approx(variation.item(), rel=1e-6)
    assert terms["loss"].item() == pytest.approx((1.5 * ce + 2 * area + 0.01 * variation).item(), rel=1e-6)
    assert loss.class_subset == "batch"
