"""Model parameter randomisation test (MPRT; Adebayo et al. 2018, the paper's Fig. 5).

The backbone of a deep copy of the explainer is randomised cumulatively, one named block at a
time (bottom-up: from the input towards the logits, as the paper does following Hedström et
al.; or top-down, Adebayo et al.'s cascading order), and after every block the maps are compared
with those of the original model by SSIM. An explainer that is sensitive to the model's
parameters gives dissimilar maps (low SSIM) once the model is randomised; an explainer whose maps
stay the same (SSIM near 1, e.g. an edge detector) fails the sanity check.

Which class is explained (``targets``):

- ``"original"``: the original model's prediction, fixed for every step (Adebayo et al.; the
  Quantus implementation passes the same targets to every randomised model).
- ``"randomised"``: each randomised model's own prediction, i.e. c* = argmax f(x) of the model
  being explained, which is what P-TAME always explains.

P-TAME uses the backbone only to find the class to explain (its maps come from the frozen
auxiliary and the trained head), so with ``"original"`` targets its maps are exactly those of the
original model at every step (SSIM 1); its maps change only through the randomised model's
prediction (``"randomised"``). Both are computed by default and reported separately.

Re-initialisation: every module of a block is reset with its own ``reset_parameters`` (or
``_reset_parameters``, e.g. ``nn.MultiheadAttention``), i.e. PyTorch's default initialisation
(normalisation layers go back to weight 1, bias 0 and fresh running statistics); parameters held
directly by a module without a reset method (ViT's class token and position embedding) are drawn
from N(0, 0.02^2). The random numbers of a block come from a hash of ``(seed, block index)`` (its
position in the preset), so a block gets the same values in either order and run after run, and
never the draws of a network built right after ``torch.manual_seed(seed)`` (which would
"randomise" it back to its own initial weights).
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image import StructuralSimilarityIndexMeasure

from ptame.analysis.figures import grid_maps
from ptame.explainers.base import Explainer
from ptame.explainers.target_layers import backbone_architecture
from ptame.networks import Backbone, _CallableModule

#: Named blocks per backbone architecture, bottom-up (input to logits): label -> module (or
#: parameter) names of ``backbone.model``.
MPRT_BLOCKS: dict[str, dict[str, list[str]]] = {
    "small_vgg": {name: [name] for name in ("stem", "layer1", "layer2", "layer3", "layer4", "fc")},
    "small_resnet": {name: [name] for name in ("stem", "layer1", "layer2", "layer3", "layer4", "fc")},
    "vgg16": {
        "conv1": ["features.0", "features.2"],
        "conv2": ["features.5", "features.7"],
        "conv3": ["features.10", "features.12", "features.14"],
        "conv4": ["features.17", "features.19", "features.21"],
        "conv5": ["features.24", "features.26", "features.28"],
        "fc6": ["classifier.0"],
        "fc7": ["classifier.3"],
        "fc8": ["classifier.6"],
    },
    **{
        arch: {"conv1": ["conv1", "bn1"], **{f"layer{i}": [f"layer{i}"] for i in range(1, 5)},
               "fc": ["fc"]}
        for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    },
    "vit_b_16": {
        "patch_embedding": ["conv_proj", "class_token", "encoder.pos_embedding"],
        **{f"encoder_layer_{i}": [f"encoder.layers.encoder_layer_{i}"] for i in range(12)},
        "head": ["encoder.ln", "heads"],
    },
}
ORDERS = ("bottom_up", "top_down")
TARGET_MODES = ("original", "randomised")
#: std of the normal draw for parameters without a module reset method (ViT's own init).
BARE_PARAMETER_STD = 0.02


def network_of(explainer: Explainer) -> nn.Module:
    """The raw network (``explainer.backbone.model``) whose blocks MPRT randomises."""
    backbone = getattr(explainer, "backbone", None)
    if not isinstance(backbone, Backbone):
        name = getattr(explainer, "name", type(explainer).__name__)
        raise TypeError(f"MPRT needs an explainer with a ptame.networks.Backbone; {name!r} has "
                        f"{type(backbone).__name__}")
    if isinstance(backbone.model, _CallableModule):
        raise TypeError(f"MPRT cannot randomise backbone {backbone.name!r}: it wraps a plain callable")
    return backbone.model


def default_blocks(backbone: Backbone) -> dict[str, list[str]]:
    """The preset blocks for the backbone's architecture (:data:`MPRT_BLOCKS`), else the
    network's top-level children that hold parameters, in registration order (the forward
    order for ``nn.Sequential`` and the usual layout of other networks)."""
    arch = backbone_architecture(backbone)
    if arch in MPRT_BLOCKS:
        return {label: list(names) for label, names in MPRT_BLOCKS[arch].items()}
    children = {
        name: [name] for name, child in backbone.model.named_children()
        if any(True for _ in child.parameters())
    }
    if not children:
        raise ValueError(
            f"backbone {backbone.name!r} has no preset MPRT blocks and no sub-modules with "
            "parameters; give the blocks explicitly"
        )
    return children


def parse_blocks(
    blocks: Mapping[str, Sequence[str]] | Sequence[str] | None, backbone: Backbone
) -> dict[str, list[str]]:
    """``{label: [names]}`` from a config value: None (the preset), a list of names (each its
    own block) or a mapping label -> name or list of names."""
    if blocks is None:
        return default_blocks(backbone)
    if isinstance(blocks, Mapping):
        parsed = {str(label): [names] if isinstance(names, str) else [str(n) for n in names]
                  for label, names in blocks.items()}
    elif isinstance(blocks, Iterable) and not isinstance(blocks, str):
        parsed = {str(name): [str(name)] for name in blocks}
    else:
        raise ValueError(f"MPRT blocks must be null, a list of names or a mapping, got {blocks!r}")
    if not parsed or any(not names for names in parsed.values()):
        raise ValueError(f"MPRT blocks must name at least one module per block, got {blocks!r}")
    return parsed


def _resolve(network: nn.Module, name: str) -> nn.Module | nn.Parameter:
    try:
        return network.get_submodule(name)
    except AttributeError:
        pass
    try:
        return network.get_parameter(name)
    except AttributeError:
        raise ValueError(
            f"MPRT block entry {name!r} is neither a module nor a parameter of "
            f"{type(network).__name__}; see named_modules() / named_parameters()"
        ) from None


def _reset_module(module: nn.Module) -> None:
    """Re-initialise the parameters owned directly by ``module`` (its children separately)."""
    reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
    if callable(reset):
        reset()
        return
    with torch.no_grad():
        for parameter in module.parameters(recurse=False):
            parameter.normal_(0.0, BARE_PARAMETER_STD)


def _reset_target(target: nn.Module | nn.Parameter) -> None:
    if isinstance(target, nn.Parameter):
        with torch.no_grad():
            target.normal_(0.0, BARE_PARAMETER_STD)
        return
    for module in target.modules():
        _reset_module(module)


def block_parameters(network: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """The distinct parameters of the modules / parameters ``names`` of ``network``.

    Raises:
        ValueError: a name that is neither a module nor a parameter of ``network``.
    """
    found: dict[int, nn.Parameter] = {}
    for name in names:
        target = _resolve(network, name)
        for parameter in [target] if isinstance(target, nn.Parameter) else target.parameters():
            found.setdefault(id(parameter), parameter)
    return list(found.values())


def randomise_block(network: nn.Module, names: Sequence[str], seed: int) -> int:
    """Re-initialise the modules / parameters ``names`` of ``network`` in place, seeded.

    Returns:
        the number of parameter elements in the block.

    Raises:
        ValueError: an unknown name, or a block without parameters.
    """
    parameters = block_parameters(network, names)
    count = sum(parameter.numel() for parameter in parameters)
    if count == 0:
        raise ValueError(f"MPRT block {list(names)} has no parameters to randomise")
    devices = sorted({p.device.index or 0 for p in parameters if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        for name in names:
            _reset_target(_resolve(network, name))
    return count


def block_seed(seed: int, index: int) -> int:
    """The torch seed of block ``index`` for the MPRT seed ``seed`` (a 63-bit hash of both)."""
    digest = hashlib.sha256(f"ptame-mprt:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def ssim_kernel_sigma(height: int, width: int) -> float:
    """Gaussian sigma of the SSIM window for (height, width) maps: 1.5 (an 11 px window, the
    usual setting) when both sides are >= 11, else the widest window that fits the map."""
    side = min(height, width)
    if side < 3:
        raise ValueError(f"SSIM needs maps of at least 3x3 pixels, got {height}x{width}")
    half = min(5, (side - 1) // 2)
    # torchmetrics' window is 2 * int(3.5 sigma + 0.5) + 1 pixels wide
    return 1.5 if half == 5 else half / 3.5


def map_ssim(maps: Tensor, reference: Tensor) -> Tensor:
    """Per-map SSIM (B,) between (B, h, w) maps in [0, 1] and reference maps (data range 1),
    by torchmetrics' StructuralSimilarityIndexMeasure (Gaussian window, see
    :func:`ssim_kernel_sigma`)."""
    if maps.shape != reference.shape or maps.ndim != 3:
        raise ValueError(f"SSIM needs two (B, h, w) map stacks of one shape, got "
                         f"{tuple(maps.shape)} and {tuple(reference.shape)}")
    metric = StructuralSimilarityIndexMeasure(
        data_range=1.0, sigma=ssim_kernel_sigma(*maps.shape[-2:]), reduction="none",
        sync_on_compute=False,
    ).to(maps.device)
    metric.update(maps.unsqueeze(1).float(), reference.unsqueeze(1).float())
    return metric.compute().view(-1)


def explanation_maps(
    explainer: Explainer, images: Tensor, targets: Tensor, resolution: str = "explanation",
    batch_size: int = 32,
) -> Tensor:
    """Maps (B, h, w) for ``targets``: at the explanation's own resolution when the explainer
    exposes it (``low_resolution_maps``, P-TAME / T-TAME) and ``resolution="explanation"``,
    else at the images' resolution."""
    if resolution not in ("explanation", "image"):
        raise ValueError(f"MPRT resolution must be 'explanation' or 'image', got {resolution!r}")
    return grid_maps(explainer, images, targets, resolution == "explanation", batch_size).clamp(0, 1)


@dataclass
class MPRTResult:
    """SSIM after each cumulative randomisation step of one explainer.

    ``blocks`` are the labels in randomisation order; ``ssim[mode]`` / ``ssim_std[mode]`` the mean /
    std over images after each step per target mode; ``prediction_agreement`` the share of images
    whose randomised model still predicts the original class; ``ssim_per_image[mode][step]``
    the SSIM of every image; ``passes[mode]``: the mean SSIM after the first step is below
    ``threshold``.
    """

    explainer: str
    order: str
    blocks: list[str]
    ssim: dict[str, list[float]] = field(default_factory=dict)
    ssim_std: dict[str, list[float]] = field(default_factory=dict)
    prediction_agreement: list[float] = field(default_factory=list)
    ssim_per_image: dict[str, list[list[float]]] = field(default_factory=dict)
    threshold: float = 0.5
    images: int = 0
    map_size: list[int] = field(default_factory=list)

    @property
    def passes(self) -> dict[str, bool]:
        return {mode: bool(values[0] < self.threshold) for mode, values in self.ssim.items()}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passes": self.passes}


def model_parameter_randomisation(
    explainer: Explainer,
    images: Tensor,
    blocks: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    order: str = "bottom_up",
    targets: Sequence[str] = TARGET_MODES,
    seed: int = 0,
    resolution: str = "explanation",
    threshold: float = 0.5,
    batch_size: int = 32,
) -> MPRTResult:
    """Run MPRT for one explainer on ``images`` (B, 3, H, W) in [0, 1].

    Args:
        explainer: an explainer with a :class:`~ptame.networks.Backbone` (left untouched: a deep
            copy is randomised).
        blocks: see :func:`parse_blocks` (None: the preset for the backbone).
        order: ``"bottom_up"`` (input first, the paper) or ``"top_down"`` (logits first).
        targets: target modes to compute, ``"original"`` and/or ``"randomised"`` (module doc).
        seed: block ``i`` of the preset is drawn with torch seed ``block_seed(seed, i)``.
        resolution: ``"explanation"`` (maps before upsampling, when the explainer exposes them)
            or ``"image"``.
        threshold: SSIM below which the first step counts as passing.
        batch_size: images per explainer call.

    Returns:
        the :class:`MPRTResult` (SSIM after each step, mean over images).
    """
    targets = [str(mode) for mode in targets]
    if not targets or any(mode not in TARGET_MODES for mode in targets):
        raise ValueError(f"MPRT targets must be a non-empty subset of {TARGET_MODES}, got {targets}")
    steps = cumulative_randomisations(explainer, blocks, order, seed)
    with torch.no_grad():
        original_targets = explainer.backbone(images).argmax(dim=1)
    reference = explanation_maps(explainer, images, original_targets, resolution, batch_size)
    result = MPRTResult(
        explainer=str(getattr(explainer, "name", type(explainer).__name__)), order=order,
        blocks=[], threshold=float(threshold), images=int(images.shape[0]),
        map_size=[int(s) for s in reference.shape[-2:]],
        ssim={mode: [] for mode in targets}, ssim_std={mode: [] for mode in targets},
        ssim_per_image={mode: [] for mode in targets},
    )
    for label, randomised in steps:
        result.blocks.append(label)
        with torch.no_grad():
            predictions = randomised.backbone(images).argmax(dim=1)
        result.prediction_agreement.append(float((predictions == original_targets).float().mean()))
        for mode in targets:
            wanted = original_targets if mode == "original" else predictions
            maps = explanation_maps(randomised, images, wanted, resolution, batch_size)
            scores = map_ssim(maps, reference)
            result.ssim[mode].append(float(scores.mean()))
            result.ssim_std[mode].append(float(scores.std(unbiased=False)))
            result.ssim_per_image[mode].append([float(v) for v in scores])
    return result


def cumulative_randomisations(
    explainer: Explainer,
    blocks: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    order: str = "bottom_up",
    seed: int = 0,
) -> Iterator[tuple[str, Explainer]]:
    """Yield ``(block label, randomised explainer)`` after each cumulative step.

    One deep copy of ``explainer`` (which stays untouched) is randomised further at every step:
    after step k the first k blocks (in ``order``) are random. The same copy is yielded each
    time. Arguments as in :func:`model_parameter_randomisation`; validated before the first
    step.
    """
    if order not in ORDERS:
        raise ValueError(f"MPRT order must be one of {ORDERS}, got {order!r}")
    network = network_of(explainer)
    indexed = list(enumerate(parse_blocks(blocks, explainer.backbone).items()))
    for _, (label, names) in indexed:  # fail on a bad block before any work
        if not block_parameters(network, names):
            raise ValueError(f"MPRT block {label!r} ({names}) has no parameters to randomise")
    if order == "top_down":
        indexed.reverse()

    def steps() -> Iterator[tuple[str, Explainer]]:
        randomised = copy.deepcopy(explainer).eval()
        network = network_of(randomised)
        for index, (label, names) in indexed:
            randomise_block(network, names, block_seed(seed, index))
            yield label, randomised

    return steps()


def plot_mprt(results: Mapping[str, MPRTResult], path: str | Path) -> Path:
    """SSIM against the randomised blocks, one colour per explainer (solid: each randomised
    model's prediction; dashed: the original prediction), with the pass threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    threshold = math.nan
    for position, (name, result) in enumerate(results.items()):
        steps = range(len(result.blocks))
        for mode, values in result.ssim.items():
            # one colour per explainer; dashed and hollow for the original targets, so that
            # overlapping lines (e.g. several at SSIM 1) stay visible
            original = mode == "original"
            width = 1.2 + 1.0 * (len(results) - 1 - position)  # earlier explainers drawn wider
            axis.plot(steps, values, "--" if original else "-", color=f"C{position}",
                      linewidth=width, marker="o", markersize=7 if original else 4,
                      markerfacecolor="none" if original else f"C{position}",
                      label=f"{name} ({mode} targets)")
        axis.set_xticks(list(steps), result.blocks, rotation=45, ha="right", fontsize=8)
        threshold = result.threshold
    if not math.isnan(threshold):
        axis.axhline(threshold, color="grey", linewidth=0.8, linestyle=":")
    axis.set_ylim(-0.05, 1.05)
    axis.set_ylabel("SSIM with the original model's maps")
    order = next(iter(results.values())).order.replace("_", "-") if results else ""
    axis.set_xlabel(f"randomised up to block ({order}, cumulative)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


class SobelEdgeExplainer(Explainer):
    """A control that ignores the model: the Sobel gradient magnitude of the grey image,
    min-max normalised per image. Adebayo et al. show that such edge maps resemble some
    saliency maps; it must fail MPRT (its maps do not change when the model is randomised)."""

    name = "sobel"

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        grey = (images * images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        kernel_x = images.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        kernels = torch.stack([kernel_x, kernel_x.t()]).unsqueeze(1)
        gradients = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
        magnitude = gradients.pow(2).sum(1).sqrt()
        flat = magnitude.flatten(1)
        low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
        return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(magnitude)
