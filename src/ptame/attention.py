"""The P-TAME attention mechanism (paper Fig. 3): feature branches and a fusion module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptame.maps import UPSAMPLING_MODES, resize_maps

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class FeatureBranch(nn.Module):
    """One feature branch (Fig. 3b): 1x1 conv (c -> c, bias) -> BatchNorm -> + skip -> activation.

    Input and output: (B, c, h, w); spatial size and channel count are preserved.
    """

    def __init__(self, channels: int, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=True)
        self.norm = nn.BatchNorm2d(channels)
        self.activation = ACTIVATIONS[activation]()

    def forward(self, features: Tensor) -> Tensor:
        return self.activation(self.norm(self.conv(features)) + features)


class AttentionMechanism(nn.Module):
    """Feature branches, bilinear upsampling to the largest map, concatenation, 1x1 fusion.

    Args:
        in_channels: channel count of each auxiliary feature map, in the auxiliary's layer order.
        num_classes: C, the number of class-specific maps (the backbone's output size).
        activation: the branch activation.
        upsampling: how smaller maps reach the largest one: ``"one_step"`` (one bilinear resize,
            any ratio; the paper) or ``"stepwise"`` (repeated x2 bilinear steps, power-of-two
            ratios: the authors' release, whose weights give its maps only this way).

    ``forward(features)`` takes the list of (B, c_l, h_l, w_l) feature maps and returns raw fused
    scores (B, C, h, w) at the resolution of the largest feature map (largest h*w); apply a
    sigmoid (training, paper) or a per-map min-max (the release at evaluation) to get maps in
    [0, 1]. Any size ratio between levels is supported (bilinear, align_corners=False).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, activation: str = "relu",
                 upsampling: str = "one_step"):
        super().__init__()
        if upsampling not in UPSAMPLING_MODES:
            raise ValueError(f"upsampling must be one of {UPSAMPLING_MODES}, got {upsampling!r}")
        self.upsampling = upsampling
        if len(in_channels) == 0:
            raise ValueError("the attention mechanism needs at least one feature map")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.in_channels = [int(c) for c in in_channels]
        self.num_classes = int(num_classes)
        self.branches = nn.ModuleList(FeatureBranch(c, activation) for c in self.in_channels)
        # No bias: the release's fusion conv has none, and a shared offset would not be a class map.
        self.fusion = nn.Conv2d(sum(self.in_channels), self.num_classes, kernel_size=1, bias=False)

    def _check(self, features: Sequence[Tensor]) -> None:
        if len(features) != len(self.branches):
            raise ValueError(
                f"attention mechanism built for {len(self.branches)} feature maps, "
                f"got {len(features)}"
            )
        for index, (feature, channels) in enumerate(zip(features, self.in_channels, strict=True)):
            if feature.ndim != 4 or feature.shape[1] != channels:
                raise ValueError(
                    f"feature map {index} should be (B, {channels}, h, w), "
                    f"got {tuple(feature.shape)}"
                )

    def forward(self, features: Sequence[Tensor], classes: Tensor | None = None) -> Tensor:
        """Raw class scores: ``class_scores(process(features), classes)``.

        Args:
            features: list of (B, c_l, h_l, w_l) auxiliary feature maps.
            classes: optional (B, S) class indices; when given only those S maps are computed.

        Returns:
            (B, C, h, w) scores, or (B, S, h, w) when ``classes`` is given, at the size of the
            largest feature map.
        """
        return self.class_scores(self.process(features), classes)

    def process(self, features: Sequence[Tensor]) -> list[Tensor]:
        """The feature branches: list of (B, c_l, h_l, w_l) processed maps. Run it once per
        batch and pass the result to :meth:`class_scores` for every set of classes (the
        branches' BatchNorm updates its statistics at each call in training)."""
        self._check(features)
        return [branch(feature) for branch, feature in zip(self.branches, features, strict=True)]

    def class_scores(self, processed: Sequence[Tensor], classes: Tensor | None = None) -> Tensor:
        """Raw scores of ``classes`` (B, S) per image or (1, S) shared by every image, or of all
        C classes, from the processed branches.

        Equivalent to ``fusion(concat(upsample(processed_l)))``, computed as
        ``sum_l upsample(W_l processed_l)``: the 1x1 fusion is linear per pixel and bilinear
        upsampling is linear per channel, so projecting each branch onto the requested class maps
        first and upsampling only those maps gives the same scores at a fraction of the cost.
        The projections are batched matrix products with the rows of the fusion weights that
        the classes select (an embedding lookup, whose backward sums the rows of repeated
        classes without atomic contention), and the upsampling is two matrix products per map
        (:func:`ptame.maps.resize_maps`), so the cost grows with the number of maps, not with a
        scatter in the backward pass.

        Returns:
            (B, S, h, w) or (B, C, h, w) scores at the size of the largest processed map.
        """
        batch = processed[0].shape[0]
        if classes is not None and (classes.ndim != 2 or classes.shape[0] not in (1, batch)):
            raise ValueError(f"classes must be (B, S) with B={batch} or (1, S), got {tuple(classes.shape)}")
        target_size = tuple(max((p.shape[-2:] for p in processed), key=lambda s: s[0] * s[1]))
        weights = self.fusion.weight.flatten(1).split(self.in_channels, dim=1)
        scores = None
        for level, weight in zip(processed, weights, strict=True):
            projected = self._project(level, weight, classes)
            if tuple(projected.shape[-2:]) != target_size:
                projected = resize_maps(projected, target_size, self.upsampling)
            scores = projected if scores is None else scores + projected
        return scores

    @staticmethod
    def _project(processed: Tensor, weight: Tensor, classes: Tensor | None) -> Tensor:
        """(B, S or C, h, w) = the class rows of ``weight`` (C, k) times ``processed`` (B, k, h, w);
        ``classes`` (B, S), (1, S) shared, or None for all C."""
        batch, channels, height, width = processed.shape
        pixels = processed.flatten(2)  # (B, k, h w); a view for contiguous and channels_last
        if classes is None:
            rows = weight.to(processed.dtype).unsqueeze(0)  # (1, C, k)
        else:
            rows = F.embedding(classes, weight).to(processed.dtype)  # (B or 1, S, k)
        if rows.shape[0] == 1:  # rows shared by every image: one GEMM against all pixels
            return torch.matmul(rows[0], pixels).view(batch, rows.shape[1], height, width)
        return torch.bmm(rows, pixels).view(batch, rows.shape[1], height, width)

    def layer_contributions(self) -> list[float]:
        """Share of the fusion weights' absolute mass that belongs to each feature branch.

        Returns one fraction per auxiliary layer (summing to 1), as in Table 2 of the paper.
        """
        weights = self.fusion.weight.detach().abs().sum(dim=(0, 2, 3))
        shares = [chunk.sum() for chunk in weights.split(self.in_channels)]
        total = sum(shares)
        return [float(s / total) for s in shares]

