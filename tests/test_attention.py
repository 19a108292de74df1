import pytest
import torch
import torch.nn.functional as F

from ptame.attention import AttentionMechanism, FeatureBranch


def features_of(sizes, channels, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=generator) for c, (h, w) in zip(channels, sizes)]


@pytest.mark.parametrize(
    "sizes",
    [
        [(15, 15), (7, 7), (4, 4)],  # odd, non-integer ratios
        [(10, 13), (3, 5), (10, 13)],  # rectangular, equal largest sizes, ratio 10/3
        [(7, 7), (7, 7), (7, 7)],  # equal resolutions (inverted-residual auxiliaries)
        [(4, 4), (9, 9)],  # largest map is not the first
    ],
)
def test_output_resolution_is_largest_feature_map(sizes):
    channels = [3, 5, 2][: len(sizes)]
    attention = AttentionMechanism(channels, num_classes=6).eval()
    scores = attention(features_of(sizes, channels))
    largest = max(sizes, key=lambda s: s[0] * s[1])
    assert scores.shape == (2, 6, *largest)


def test_branch_matches_hand_computation():
    branch = FeatureBranch(3).eval()
    torch.manual_seed(0)
    branch.norm.running_mean.normal_()
    branch.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 4, 5)
    conv = F.conv2d(x, branch.conv.weight, branch.conv.bias)
    norm = (conv - branch.norm.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        branch.norm.running_var.view(1, -1, 1, 1) + branch.norm.eps
    ) * branch.norm.weight.view(1, -1, 1, 1) + branch.norm.bias.view(1, -1, 1, 1)
    expected = torch.relu(norm + x)
    assert torch.allclose(branch(x), expected, atol=1e-6)


def test_fusion_equals_hand_computation_and_has_no_bias():
    channels, sizes = [2, 3], [(6, 6), (3, 3)]
    attention = AttentionMechanism(channels, num_classes=4).eval()
    assert attention.fusion.bias is None
    features = features_of(sizes, channels)
    processed = [attention.branches[0](features[0])]
    processed.append(
        F.interpolate(attention.branches[1](features[1]), size=(6, 6), mode="bilinear", align_corners=False)
    )
    stacked = torch.cat(processed, dim=1)
    expected = torch.einsum("ck,bkhw->bchw", attention.fusion.weight.flatten(1), stacked)
    assert torch.allclose(attention(features), expected, atol=1e-5)


def test_selected_classes_equal_rows_of_the_full_fusion():
    channels, sizes = [4, 6, 3], [(9, 9), (5, 5), (2, 2)]
    attention = AttentionMechanism(channels, num_classes=7).eval()
    features = features_of(sizes, channels, batch=3)
    full = attention(features)
    classes = torch.tensor([[6, 0, 0], [2, 5, 1], [3, 3, 4]])
    subset = attention(features, classes)
    expected = torch.stack([full[b, classes[b]] for b in range(3)])
    assert torch.allclose(subset, expected, atol=1e-5)


def test_layer_contributions_are_shares_of_fusion_weight_mass():
    attention = AttentionMechanism([2, 3], num_classes=2)
    with torch.no_grad():
        attention.fusion.weight.copy_(torch.tensor([[1.0, -1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, -4.0]]).view(2, 5, 1, 1))
    assert attention.layer_contributions() == pytest.approx([2 / 8, 6 / 8])


def test_wrong_feature_maps_are_refused_with_a_clear_message():
    attention = AttentionMechanism([2, 3], num_classes=2)
    with pytest.raises(ValueError, match="built for 2 feature maps"):
        attention(features_of([(4, 4)], [2]))
    with pytest.raises(ValueError, match=r"feature map 1 should be \(B, 3, h, w\)"):
        attention(features_of([(4, 4), (2, 2)], [2, 5]))


def test_one_step_and_stepwise_upsampling_against_direct_computations():
    """one_step = one F.interpolate to the largest size (the paper, any ratio); stepwise = the
    release's repeated nn.Upsample(scale_factor=2, mode="bilinear"): 7 -> 14 -> 28 -> 56."""
    torch.manual_seed(0)
    features = [torch.randn(2, 3, 56, 56), torch.randn(2, 4, 28, 28), torch.randn(2, 5, 7, 7)]
    maps = {}
    for mode in ("one_step", "stepwise"):
        torch.manual_seed(1)
        attention = AttentionMechanism([3, 4, 5], num_classes=6, upsampling=mode).eval()
        with torch.no_grad():
            maps[mode] = attention(features)
            processed = attention.process(features)
            weights = attention.fusion.weight[:, :, 0, 0].split([3, 4, 5], dim=1)
            direct = 0
            for level, weight in zip(processed, weights):
                projected = torch.einsum("ck,bkhw->bchw", weight, level)
                if mode == "one_step":
                    up = F.interpolate(projected, size=(56, 56), mode="bilinear", align_corners=False)
                else:
                    up = projected
                    while up.shape[-1] < 56:
                        up = torch.nn.Upsample(scale_factor=2, mode="bilinear")(up)
                direct = direct + up
        torch.testing.assert_close(maps[mode], direct, rtol=1e-5, atol=1e-5)
    # the same weights, other maps: the two modes are not interchangeable
    difference = (torch.sigmoid(maps["one_step"]) - torch.sigmoid(maps["stepwise"])).abs().max()
    assert difference > 0.01
    with pytest.raises(ValueError, match="power-of-two ratio"):
        AttentionMechanism([3, 4], 2, upsampling="stepwise")([torch.randn(1, 3, 12, 12), torch.randn(1, 4, 5, 5)])
    with pytest.raises(ValueError, match="upsampling must be one of"):
        AttentionMechanism([3], 2, upsampling="bicubic")
