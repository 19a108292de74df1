"""AD/IC, ROAD, insertion/deletion and cost figures against hand-computed values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ptame.metrics.imputation as imputation_module
from ptame.metrics import ROAD, AverageDropIncrease, InsertionDeletion, curve_auc, measure_cost
from ptame.metrics.base import CPU_IMAGES_PER_FORWARD, classify, deduplicate, top_pixels
from ptame.metrics.imputation import CALL_BYTES_PER_VALUE
from ptame.networks import Backbone


def region_backbone(height=4, width=4, scale=4.0):
    """Two classes; logit 0 = scale * mean of the top-left 2x2 block's red channel, logit 1 = 0."""

    def logits(x):
        evidence = scale * x[:, 0, :2, :2].mean(dim=(1, 2))
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)

    return Backbone(logits, (0, 0, 0), (1, 1, 1), name="region")


def p_class0(evidence):
    return 1 / (1 + math.exp(-evidence))


def test_top_pixels_never_keep_more_than_asked_even_with_ties():
    maps = torch.ones(2, 4, 4)
    for fraction, count in [(0.5, 8), (0.15, 2), (1.0, 16), (0.0, 0)]:
        assert top_pixels(maps, fraction, torch.tensor([0, 1]), 0).sum(dim=(1, 2)).tolist() == [count, count]
    maps = torch.arange(16.0).view(1, 4, 4)
    assert top_pixels(maps, 0.25, torch.tensor([0]), 0)[0].flatten().nonzero().flatten().tolist() == [12, 13, 14, 15]


def test_average_drop_and_increase_by_hand():
    backbone = region_backbone()
    images = torch.ones(2, 3, 4, 4)
    maps = torch.zeros(2, 4, 4)
    maps[0, :2, :2] = 0.5  # image 0: the map highlights the evidence at half strength
    maps[0, 3, 3] = 0.25
    maps[1, 2:, 2:] = 1.0  # image 1: the map points elsewhere
    metric = AverageDropIncrease(backbone, thresholds=[100, 25])
    metric.update(images, maps, torch.tensor([0, 1]))
    p = p_class0(4.0)
    # 100%: image 0 keeps 0.5 on the evidence; image 1 keeps 0 there
    p0_100, p1_100 = p_class0(2.0), p_class0(0.0)
    # 25% = 4 pixels: image 0 keeps its 4 block pixels at 0.5; image 1 keeps its block -> evidence 0
    p0_25, p1_25 = p_class0(2.0), p_class0(0.0)
    result = metric.compute()
    assert result["AD@100"].item() == pytest.approx(100 * ((p - p0_100) / p + (p - p1_100) / p) / 2, rel=1e-5)
    assert result["AD@25"].item() == pytest.approx(100 * ((p - p0_25) / p + (p - p1_25) / p) / 2, rel=1e-5)
    assert result["IC@100"].item() == 0.0


def test_binary_mask_and_increase_in_confidence():
    backbone = region_backbone()
    images = torch.full((1, 3, 4, 4), 0.5)
    maps = torch.zeros(1, 4, 4)
    maps[0, :2, :2] = 0.1
    soft = AverageDropIncrease(backbone, thresholds=[25], soft=True)
    binary = AverageDropIncrease(backbone, thresholds=[25], soft=False)
    soft.update(images, maps, torch.tensor([0]))
    binary.update(images, maps, torch.tensor([0]))
    assert binary.compute()["AD@25"].item() == pytest.approx(0.0, abs=1e-6)  # evidence fully kept
    expected = 100 * (p_class0(2.0) - p_class0(0.2)) / p_class0(2.0)
    assert soft.compute()["AD@25"].item() == pytest.approx(expected, rel=1e-5)
    brighter = torch.full((1, 3, 4, 4), 0.5)
    maps_up = torch.ones(1, 4, 4)
    up = AverageDropIncrease(lambda x: region_backbone()(x.clamp(max=1) * 2), thresholds=[100])
    up.update(brighter, maps_up, torch.tensor([0]))
    assert up.compute()["IC@100"].item() == 0.0


def test_average_is_per_image_not_a_mean_of_batch_means_and_duplicates_count_once():
    backbone = region_backbone()
    images = torch.ones(3, 3, 4, 4)
    maps = torch.zeros(3, 4, 4)
    maps[0, :2, :2] = 1.0  # no drop
    metric = AverageDropIncrease(backbone, thresholds=[100])
    metric.update(images[:1], maps[:1], torch.tensor([0]))
    metric.update(images[1:], maps[1:], torch.tensor([1, 2]))
    metric.update(images[2:], maps[2:], torch.tensor([2]))  # a padded duplicate
    p = p_class0(4.0)
    assert metric.compute()["AD@100"].item() == pytest.approx(100 * (2 * (p - 0.5) / p) / 3, rel=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000))
def test_average_drop_is_a_percentage(seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 3, 4, 4, generator=generator)
    maps = torch.rand(3, 4, 4, generator=generator)
    metric = AverageDropIncrease(region_backbone(), thresholds=[100, 50, 15])
    metric.update(images, maps, torch.arange(3))
    for key, value in metric.compute().items():
        assert 0.0 <= value.item() <= 100.0, key


def test_auc_conventions_by_hand():
    heights = torch.tensor([0.8, 0.6, 0.2], dtype=torch.float64)
    fractions = [0.1, 0.5, 0.9]
    normalised = ((0.8 + 0.6) / 2 * 0.4 + (0.6 + 0.2) / 2 * 0.4) / 0.8
    padded = (1 + 0.8) / 2 * 0.1 + (0.8 + 0.6) / 2 * 0.4 + (0.6 + 0.2) / 2 * 0.4 + (0.2 + 0) / 2 * 0.1
    assert curve_auc(fractions, heights).item() == pytest.approx(normalised)
    assert curve_auc(fractions, heights, "padded").item() == pytest.approx(padded)


def half_image_backbone(size=8):
    """Class 0 while the left half of the red channel is bright on average, else class 1."""

    def logits(x):
        left = x[:, 0, :, : size // 2].mean(dim=(1, 2))
        return torch.stack([20 * (left - 0.4), torch.zeros_like(left)], dim=1)

    return Backbone(logits, (0, 0, 0), (1, 1, 1), name="half")


def test_road_with_an_oracle_map_orders_morf_below_lerf():
    size = 8
    images = torch.zeros(4, 3, size, size)
    images[:, :, :, : size // 2] = 1.0
    oracle = torch.zeros(4, size, size)
    oracle[:, :, : size // 2] = 1.0
    oracle += torch.linspace(0, 0.01, size * size).view(1, size, size)
    metric = ROAD(half_image_backbone(size), percentages=[10, 30, 50, 70, 90], imputer="zero")
    metric.update(images, oracle, torch.arange(4))
    curves = metric.curves()
    # MoRF removes the bright half first: the prediction flips once > 60% of it is gone (p >= 50)
    assert curves["MoRF"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    # LeRF removes the dark half first: the prediction holds until the bright half is hit hard
    assert curves["LeRF"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    result = metric.compute()
    assert result["ROAD_MoRF_AUC"] < result["ROAD_LeRF_AUC"]
    assert result["ROAD_MoRF@50"].item() == 0.0


def test_road_removal_masks_remove_exactly_the_requested_share_with_ties():
    metric = ROAD(half_image_backbone(), percentages=[10, 50, 90], imputer="mean")
    keep = metric.removal_masks(torch.zeros(2, 8, 8), torch.tensor([0, 1]))
    removed = (~keep).sum(dim=(-1, -2))
    assert removed[:, 0].tolist() == [[6, 32, 58]] * 2  # MoRF
    assert removed[:, 1].tolist() == [[6, 32, 58]] * 2  # LeRF
    # ties broken by a seeded jitter: reproducible per image index, different across images
    again = metric.removal_masks(torch.zeros(2, 8, 8), torch.tensor([0, 1]))
    assert torch.equal(keep, again) and not torch.equal(keep[0], keep[1])


def test_road_is_independent_of_batching():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 8, 8, generator=generator)
    maps = torch.rand(5, 8, 8, generator=generator)
    whole = ROAD(half_image_backbone(), percentages=[20, 60], imputer="mean")
    whole.update(images, maps, torch.arange(5))
    split = ROAD(half_image_backbone(), percentages=[20, 60], imputer="mean")
    split.update(images[:2], maps[:2], torch.arange(2))
    split.update(images[2:], maps[2:], torch.arange(2, 5))
    for key, value in whole.compute().items():
        assert torch.equal(value, split.compute()[key]), key


def test_insertion_deletion_by_hand():
    size = 4
    images = torch.zeros(1, 3, size, size)
    images[:, 0, :, :2] = 1.0
    order_map = torch.zeros(1, size, size)
    order_map[0, :, :2] = 1.0  # the bright left half first
    metric = InsertionDeletion(half_image_backbone(size), steps=2, insertion_substrate="zero")
    metric.update(images, order_map, torch.tensor([0]))
    backbone = half_image_backbone(size)
    p = lambda x: backbone(x).softmax(dim=1)[0, 0].item()  # noqa: E731
    full, empty = p(images), p(torch.zeros_like(images))
    # after one step (half the pixels), insertion has the whole bright half, deletion none of it
    insertion = (empty + full) / 2 * 0.5 + (full + full) / 2 * 0.5
    deletion = (full + empty) / 2 * 0.5 + (empty + empty) / 2 * 0.5
    result = metric.compute()
    assert result["insertion_AUC"].item() == pytest.approx(insertion, rel=1e-5)
    assert result["deletion_AUC"].item() == pytest.approx(deletion, rel=1e-5)


def test_deduplicate_keeps_one_value_per_index():
    indices, values = deduplicate(torch.tensor([3, 1, 3, 2]), torch.tensor([10.0, 20.0, 30.0, 40.0]))
    assert indices.tolist() == [1, 2, 3] and values.tolist() == [20.0, 40.0, 10.0]


def test_metrics_need_indices_and_finite_maps():
    metric = AverageDropIncrease(region_backbone())
    with pytest.raises(ValueError, match="dataset indices"):
        metric.update(torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.rand(1, 3, 4, 4), torch.full((1, 4, 4), float("nan")), torch.tensor([0]))
    with pytest.raises(ValueError, match="thresholds"):
        AverageDropIncrease(region_backbone(), thresholds=[0])
    with pytest.raises(ValueError, match="imputer"):
        ROAD(region_backbone(), imputer="magic")


def test_cost_counts_backbone_passes_and_flops():
    from ptame.explainers import CentreGaussianExplainer

    from .helpers.networks import make_backbone

    backbone = make_backbone()
    cost = measure_cost(CentreGaussianExplainer(backbone), torch.rand(4, 3, 16, 16))
    assert cost.forward_passes == 1.0  # the prediction it explains
    expected_flops = 2 * 16 * 16 * 8 * 27 + 2 * 8 * 5  # conv + linear multiply-adds
    assert cost.gflops == pytest.approx(expected_flops / 1e9, rel=0.01)
    assert cost.resolution == 256 and cost.ms_per_image > 0


class _SlowFirstCall(torch.nn.Module):
    """An explainer whose calls sleep: ``first`` seconds the first time (autotuning, compilation),
    ``after`` seconds afterwards."""

    def __init__(self, first: float, after: float) -> None:
        super().__init__()
        self.durations, self.calls = (first, after), 0

    def forward(self, images, targets=None):
        import time

        time.sleep(self.durations[0] if self.calls == 0 else self.durations[1])
        self.calls += 1
        return images.mean(1)


def test_cost_times_warm_calls_not_the_first_one():
    explainer = _SlowFirstCall(first=0.4, after=0.02)
    cost = measure_cost(explainer, torch.rand(2, 3, 8, 8), repeats=3, warmup=1, budget_seconds=5.0)
    assert explainer.calls == 1 + 1 + 3  # FLOP count, warm-up, timed
    assert 0.02 / 2 * 1000 <= cost.ms_per_image < 0.1 / 2 * 1000  # the warm calls' 10 ms per image


def test_cost_of_a_slow_method_stays_within_its_budget():
    explainer = _SlowFirstCall(first=0.3, after=0.3)
    cost = measure_cost(explainer, torch.rand(2, 3, 8, 8), repeats=5, warmup=2, budget_seconds=0.5)
    assert explainer.calls == 2  # FLOP count, then one timed call
    assert cost.ms_per_image == pytest.approx(150, rel=0.5)


def test_telea_and_mean_imputers_fill_only_removed_pixels():
    from ptame.metrics.imputation import mean_imputation, telea_imputation

    images = torch.zeros(1, 3, 16, 16)
    images[:, :, :, 8:] = 1.0
    keep = torch.ones(1, 16, 16, dtype=torch.bool)
    keep[0, 6:10, 2:5] = False  # a hole inside the dark half
    for impute in (telea_imputation, mean_imputation):
        filled = impute(images, keep)
        assert torch.equal(filled[:, :, keep[0]], images[:, :, keep[0]])
    assert telea_imputation(images, keep)[:, :, ~keep[0]].max() < 0.1  # inpainted from dark pixels
    kept_mean = images[0, 0][keep[0]].mean()
    assert torch.allclose(mean_imputation(images, keep)[0, 0][~keep[0]], kept_mean)


def weighted_evidence_backbone(weights: torch.Tensor, threshold: float):
    """Two classes: logit 0 = sum of weights * red channel (weights (H, W) >= 0), logit 1 =
    threshold. Removing pixels (zero imputation) can only lower class 0's evidence."""

    def logits(x):
        evidence = (x[:, 0] * weights).sum(dim=(1, 2))
        return torch.stack([evidence, torch.full_like(evidence, threshold)], dim=1)

    return Backbone(logits, (0, 0, 0), (1, 1, 1), name="weighted-evidence")


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    sparsity=st.floats(0.05, 0.9),
    threshold_share=st.floats(0.05, 0.95),
)
def test_road_oracle_orders_morf_below_lerf_at_every_percentage(seed, sparsity, threshold_share):
    """For the oracle map (the model's own pixel weights), removing the most relevant pixels
    first never leaves more evidence than removing the least relevant first: MoRF confidence
    <= LeRF confidence at every p, and both curves fall monotonically with p."""
    generator = torch.Generator().manual_seed(seed)
    size = 8
    weights = torch.rand(size, size, generator=generator)
    weights = weights * (torch.rand(size, size, generator=generator) < sparsity)
    total = float(weights.sum())
    backbone = weighted_evidence_backbone(weights, threshold=threshold_share * total)
    images = torch.ones(2, 3, size, size)
    # the oracle: the weights themselves (the metric's seeded jitter breaks the ties at zero)
    oracle = (weights / weights.max().clamp_min(1e-12)).expand(2, size, size).clone()
    percentages = [10, 20, 30, 40, 50, 70, 90]
    metric = ROAD(backbone, percentages=percentages, imputer="zero", seed=seed)
    metric.update(images, oracle, torch.arange(2))
    curves = metric.curves()
    morf, lerf = curves["MoRF_confidence"], curves["LeRF_confidence"]
    assert (morf <= lerf + 1e-6).all()
    assert (morf[1:] <= morf[:-1] + 1e-6).all()
    assert (lerf[1:] <= lerf[:-1] + 1e-6).all()
    assert (curves["MoRF"] <= curves["LeRF"]).all()
    result = metric.compute()
    assert result["ROAD_MoRF_AUC"] <= result["ROAD_LeRF_AUC"]


def test_road_curves_carry_the_standard_error_of_each_point():
    from .helpers.networks import make_backbone

    metric = ROAD(make_backbone(), percentages=[30, 70], imputer="mean")
    torch.manual_seed(0)
    metric.update(torch.rand(5, 3, 16, 16), torch.rand(5, 16, 16), torch.arange(5))
    curves = metric.curves()
    _, values = metric.per_image()  # (5, 2, 2, 2): image, order, percentage, (correct, confidence)
    for o, order in enumerate(("MoRF", "LeRF")):
        expected = values[:, o, :, 0].std(dim=0, unbiased=True) / 5**0.5
        assert torch.allclose(curves[f"{order}_se"], expected)
    errors = metric.standard_errors()
    assert errors["ROAD_MoRF@30"] == pytest.approx(float(curves["MoRF_se"][0]))


def test_every_figure_is_the_mean_of_its_per_image_values():
    """The standard errors are of per-image values whose mean is the published figure (AUCs are
    linear in the curve: the mean of per-image AUCs is the AUC of the mean curve)."""
    from .helpers.networks import make_backbone

    backbone = make_backbone()
    torch.manual_seed(0)
    images, maps = torch.rand(6, 3, 16, 16), torch.rand(6, 16, 16)
    for metric in (AverageDropIncrease(backbone, thresholds=[100, 50]), ROAD(backbone, percentages=[30, 70], imputer="mean"),
                   InsertionDeletion(backbone, steps=4)):
        metric.update(images, maps, torch.arange(6))
        figures, per_image = metric.compute(), metric.per_image_figures()
        assert figures.keys() == per_image.keys()
        for key, value in figures.items():
            assert per_image[key].shape == (6,)
            assert float(per_image[key].mean()) == pytest.approx(float(value), rel=1e-6, abs=1e-6), key


def test_road_imputes_a_whole_batch_per_call_on_a_gpu_and_feeds_the_backbone_in_chunks(monkeypatch):
    """On a GPU every imputation of a batch goes to the imputer in one call (its fixed cost per
    call is launch-bound); the backbone still sees chunk_size images at a time. The numbers do
    not depend on how the imputations are grouped into calls."""
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 8, 8, generator=generator)
    maps = torch.rand(3, 8, 8, generator=generator)
    metric = ROAD(half_image_backbone(), percentages=[20, 60], imputer="mean", chunk_size=5)
    assert metric.imputations_per_call(12, 192, torch.device("cpu")) == 5
    available = {"bytes": 10**12}
    monkeypatch.setattr(imputation_module, "available_memory", lambda device: available["bytes"])
    assert metric.imputations_per_call(12, 192, torch.device("cuda")) == 12
    available["bytes"] = 4 * CALL_BYTES_PER_VALUE * 192 * 7  # a quarter holds 7 imputations
    assert metric.imputations_per_call(12, 192, torch.device("cuda")) == 7
    available["bytes"] = 0  # never fewer than the CPU's calls
    assert metric.imputations_per_call(12, 192, torch.device("cuda")) == 5
    calls = {"impute": [], "backbone": []}

    def recording(kind, function):
        def wrapped(batch, *args):
            calls[kind].append(batch.shape[0])
            return function(batch, *args)
        return wrapped

    chunked = ROAD(half_image_backbone(), percentages=[20, 60], imputer="mean", chunk_size=5)
    chunked.update(images, maps, torch.arange(3))
    whole = ROAD(recording("backbone", half_image_backbone()), percentages=[20, 60], imputer="mean",
                 chunk_size=5)
    whole.__dict__["impute"] = recording("impute", whole.impute)
    monkeypatch.setattr(ROAD, "imputations_per_call", lambda self, count, values, device: count)
    whole.update(images, maps, torch.arange(3))
    assert calls["impute"] == [12]  # 3 images x 2 directions x 2 percentages
    assert calls["backbone"] == [3, 5, 5, 2]  # the predictions, then the imputed images
    for key, value in chunked.compute().items():
        assert torch.equal(value, whole.compute()[key]), key


def test_metrics_call_a_cpu_backbone_on_at_most_eight_images_with_the_same_logits():
    """:func:`classify`: calls of CPU_IMAGES_PER_FORWARD images on CPU (a CPU forward slows down
    per image once a call's activations outgrow the caches); the logits are one call's."""
    sizes: list[int] = []
    backbone = half_image_backbone()

    def recording(images):
        sizes.append(images.shape[0])
        return backbone(images)

    images = torch.rand(19, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    assert CPU_IMAGES_PER_FORWARD == 8
    logits = classify(recording, images)
    assert sizes == [8, 8, 3]
    torch.testing.assert_close(logits, backbone(images), rtol=0, atol=1e-6)
    sizes.clear()
    classify(recording, images[:8])
    assert sizes == [8]


def test_insertion_deletion_curves_do_not_depend_on_how_points_are_grouped_into_calls():
    """The B x (steps + 1) curve points of a batch are classified chunk_size at a time across
    images; any chunk size, and any batching of the images, gives the same curves."""
    generator = torch.Generator().manual_seed(6)
    images = torch.rand(3, 3, 8, 8, generator=generator)
    maps = torch.rand(3, 8, 8, generator=generator)
    sizes: list[int] = []
    backbone = half_image_backbone()

    def recording(batch):
        sizes.append(batch.shape[0])
        return backbone(batch)

    chunked = InsertionDeletion(recording, steps=3, chunk_size=5)
    chunked.update(images, maps, torch.arange(3))
    # the targets, then 3 images x 4 points per curve in chunks of 5, for insertion and deletion
    assert sizes == [3, 5, 5, 2, 5, 5, 2]
    whole = InsertionDeletion(half_image_backbone(), steps=3, chunk_size=1000)
    whole.update(images, maps, torch.arange(3))
    one_by_one = InsertionDeletion(half_image_backbone(), steps=3, chunk_size=1)
    for i in range(3):
        one_by_one.update(images[i : i + 1], maps[i : i + 1], torch.tensor([i]))
    for other in (whole, one_by_one):
        torch.testing.assert_close(other.per_image()[1], chunked.per_image()[1], rtol=0, atol=1e-6)
    curves = chunked.curves()
    assert curves["deletion"][0] > curves["deletion"][-1]  # from the image to zeros


@pytest.mark.parametrize("metric_class", [AverageDropIncrease, ROAD, InsertionDeletion])
def test_metrics_take_the_callers_logits_of_the_images_and_give_the_same_figures(metric_class):
    """``update(..., logits=)``: the backbone's logits of the unmodified images come from the
    caller (one forward shared by a batch's explainer and metrics), the metric never classifies
    the unmodified images itself, and the figures are those of its own forward."""
    generator = torch.Generator().manual_seed(8)
    images = torch.rand(3, 3, 8, 8, generator=generator)
    maps = torch.rand(3, 8, 8, generator=generator)
    backbone = half_image_backbone()
    seen: list[torch.Tensor] = []

    def recording(batch):
        seen.append(batch)
        return backbone(batch)

    settings = {ROAD: dict(percentages=[20, 60], imputer="mean"), AverageDropIncrease: dict(thresholds=[50, 15]),
                InsertionDeletion: dict(steps=3)}[metric_class]
    assert metric_class.takes_logits
    own = metric_class(backbone, **settings)
    own.update(images, maps, torch.arange(3))
    shared = metric_class(recording, **settings)
    shared.update(images, maps, torch.arange(3), logits=backbone(images))
    assert seen and not any(batch.shape == images.shape and torch.equal(batch, images) for batch in seen)
    for key, value in own.compute().items():
        assert torch.equal(value, shared.compute()[key]), key
    with pytest.raises(ValueError, match=r"logits must be the backbone's \(B, C\) = \(3, C\) logits"):
        shared.update(images, maps, torch.arange(3), logits=backbone(images)[:2])
