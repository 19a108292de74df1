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

Which explainer is compared (``protocol``):

- ``"fixed_head"``: the explainer as trained, its backbone randomised (Adebayo et al.'s test,
  for a trained explainer: its head stays the one trained on the original backbone).
- ``"retrain"``: an explainer with a trained head (P-TAME) gets its head retrained on each
  cumulatively randomised backbone with the recipe and budget of the original training (a
  ``retrain`` function, e.g. :func:`ptame.pipelines.evaluate.head_retrainer`), and the retrained
  head's maps are compared with the original ones: this tests whether what P-TAME learns depends
  on the model it explains. Explainers without a head (Grad-CAM, Sobel, ...) are compared as in
  ``"fixed_head"``, where their maps already follow the randomised model.

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
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image import StructuralSimilarityIndexMeasure

from ptame.explainers.base import Explainer, batched_maps
from ptame.io import save_figure_atomic
from ptame.networks.architectures import default_mprt_blocks
from ptame.networks.frozen import Backbone, named_network

log = logging.getLogger(__name__)

ORDERS = ("bottom_up", "top_down")
TARGET_MODES = ("original", "randomised")
PROTOCOLS = ("fixed_head", "retrain")
#: (randomised explainer) -> an explainer whose head is retrained on its randomised backbone
Retrainer = Callable[[Explainer], Explainer]
#: std of the normal draw for parameters without a module reset method (ViT's own init).
BARE_PARAMETER_STD = 0.02


def parse_blocks(
    blocks: Mapping[str, Sequence[str]] | Sequence[str] | None, backbone: Backbone
) -> dict[str, list[str]]:
    """``{label: [names]}`` from a config value: None (the preset), a list of names (each its
    own block) or a mapping label -> name or list of names."""
    if blocks is None:
        return default_mprt_blocks(backbone)
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
    return batched_maps(explainer, images, targets, resolution == "explanation", batch_size).clamp(0, 1)


@dataclass
class MPRTResult:
    """SSIM after each cumulative randomisation step of one explainer.

    ``blocks`` are the labels in randomisation order; ``ssim[mode]`` / ``ssim_std[mode]`` the mean /
    std over images after each step per target mode; ``prediction_agreement`` the share of images
    whose randomised model still predicts the original class; ``ssim_per_image[mode][step]``
    the SSIM of every image; ``passes[mode]``: the mean SSIM after the first step is below
    ``threshold``; ``protocol``: ``"fixed_head"`` or ``"retrain"`` (module doc), with the
    seconds each retraining took in ``retrain_seconds``. ``map_mean[mode][step]`` is the mean map
    value and ``blank_map_ssim`` the SSIM an all-zero map scores against the reference maps
    (mean over images): sparse maps (mostly near 0, as P-TAME's) are "similar" to a map that
    shows nothing, so an SSIM near ``blank_map_ssim`` with a ``map_mean`` near 0 means the maps
    went blank, not that they stayed the same.
    """

    explainer: str
    order: str
    blocks: list[str]
    protocol: str = "fixed_head"
    retrain_seconds: list[float] = field(default_factory=list)
    map_mean: dict[str, list[float]] = field(default_factory=dict)
    reference_map_mean: float = math.nan
    blank_map_ssim: float = math.nan
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
    protocol: str = "fixed_head",
    retrain: Retrainer | None = None,
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
        protocol: ``"fixed_head"`` or ``"retrain"`` (module doc).
        retrain: for ``"retrain"`` and an explainer with a trained head: returns the explainer
            with its head retrained on the randomised explainer's backbone.

    Returns:
        the :class:`MPRTResult` (SSIM after each step, mean over images).
    """
    targets = [str(mode) for mode in targets]
    if not targets or any(mode not in TARGET_MODES for mode in targets):
        raise ValueError(f"MPRT targets must be a non-empty subset of {TARGET_MODES}, got {targets}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"MPRT protocol must be one of {PROTOCOLS}, got {protocol!r}")
    retrains = protocol == "retrain" and bool(getattr(explainer, "has_trained_head", False))
    if retrains and retrain is None:
        raise ValueError(f"MPRT protocol 'retrain' needs a function that retrains the head of "
                         f"{getattr(explainer, 'name', type(explainer).__name__)!r}")
    steps = cumulative_randomisations(explainer, blocks, order, seed)
    with torch.no_grad():
        original_targets = explainer.backbone(images).argmax(dim=1)
    reference = explanation_maps(explainer, images, original_targets, resolution, batch_size)
    result = MPRTResult(
        explainer=str(getattr(explainer, "name", type(explainer).__name__)), order=order,
        blocks=[], threshold=float(threshold), images=int(images.shape[0]),
        map_size=[int(s) for s in reference.shape[-2:]],
        ssim={mode: [] for mode in targets}, ssim_std={mode: [] for mode in targets},
        ssim_per_image={mode: [] for mode in targets}, protocol=protocol,
        map_mean={mode: [] for mode in targets}, reference_map_mean=float(reference.mean()),
        blank_map_ssim=float(map_ssim(torch.zeros_like(reference), reference).mean()),
    )
    for label, randomised in steps:
        result.blocks.append(label)
        with torch.no_grad():
            predictions = randomised.backbone(images).argmax(dim=1)
        result.prediction_agreement.append(float((predictions == original_targets).float().mean()))
        explained = randomised
        if retrains:
            start = time.perf_counter()
            explained = retrain(randomised).eval()  # type: ignore[misc]
            result.retrain_seconds.append(round(time.perf_counter() - start, 2))
            log.info("MPRT: head of %s retrained on the backbone randomised up to %s in %.1f s",
                     result.explainer, label, result.retrain_seconds[-1])
        for mode in targets:
            wanted = original_targets if mode == "original" else predictions
            maps = explanation_maps(explained, images, wanted, resolution, batch_size)
            scores = map_ssim(maps, reference)
            result.map_mean[mode].append(float(maps.mean()))
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
    network = named_network(getattr(explainer, "backbone", None), "MPRT")
    indexed = list(enumerate(parse_blocks(blocks, explainer.backbone).items()))
    for _, (label, names) in indexed:  # fail on a bad block before any work
        if not block_parameters(network, names):
            raise ValueError(f"MPRT block {label!r} ({names}) has no parameters to randomise")
    if order == "top_down":
        indexed.reverse()

    def steps() -> Iterator[tuple[str, Explainer]]:
        randomised = copy.deepcopy(explainer).eval()
        network = randomised.backbone.model
        for index, (label, names) in indexed:
            randomise_block(network, names, block_seed(seed, index))
            yield label, randomised

    return steps()


def plot_mprt(results: Mapping[str, MPRTResult], path: str | Path) -> Path:
    """SSIM against the randomised blocks, one colour per explainer (solid: each randomised
    model's prediction; dashed: the original prediction) with the spread over images as a band,
    the labelled pass threshold, and the legend beside the plot so that it covers no line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9.5, 4))  # room for the legend beside the plot
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
                      label=f"{name} ({mode} targets{', head retrained' if result.retrain_seconds else ''})")
            spread = result.ssim_std.get(mode)
            if spread is not None and len(spread) == len(values):  # the spread over images (+- 1 std)
                low = [v - d for v, d in zip(values, spread, strict=True)]
                high = [v + d for v, d in zip(values, spread, strict=True)]
                axis.fill_between(list(steps), low, high, color=f"C{position}", alpha=0.08, linewidth=0)
        if math.isfinite(result.blank_map_ssim):  # where maps that went blank end up
            axis.axhline(result.blank_map_ssim, color=f"C{position}", linewidth=0.8, linestyle=(0, (1, 3)),
                         label=f"{name}: an all-zero map")
        axis.set_xticks(list(steps), result.blocks, rotation=45, ha="right", fontsize=8)
        threshold = result.threshold
    if not math.isnan(threshold):
        axis.axhline(threshold, color="grey", linewidth=0.8, linestyle=":",
                     label=f"pass threshold (SSIM < {threshold:g} after the first block)")
    axis.set_ylim(-0.05, 1.05)
    axis.set_ylabel("SSIM with the original model's maps\n(mean; band: +- 1 std over images)", fontsize=9)
    order = next(iter(results.values())).order.replace("_", "-") if results else ""
    axis.set_xlabel(f"randomised up to block ({order}, cumulative)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)  # beside the plot
    figure.tight_layout()
    try:
        return save_figure_atomic(figure, path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(figure)


def run_mprt(
    explainers: Mapping[str, Explainer], images: Tensor, options: Mapping[str, Any],
    retrainers: Mapping[str, Retrainer] | None = None,
) -> dict[str, MPRTResult]:
    """MPRT for every explainer with ``options`` (keys of ``analysis.mprt_options``: protocol,
    blocks, order, targets, resolution, threshold, seed, batch_size); ``retrainers``: name ->
    retrain function of the explainers with a trained head (protocol ``"retrain"``)."""
    results = {}
    for name, explainer in explainers.items():
        results[name] = model_parameter_randomisation(
            explainer, images,
            blocks=options.get("blocks"),
            order=str(options.get("order", "bottom_up")),
            targets=list(options.get("targets") or ("original", "randomised")),
            seed=int(options.get("seed", 0)),
            resolution=str(options.get("resolution", "explanation")),
            threshold=float(options.get("threshold", 0.5)),
            batch_size=int(options.get("batch_size", 32)),
            protocol=str(options.get("protocol", "fixed_head")),
            retrain=(retrainers or {}).get(name),
        )
    return results


def format_mprt(results: Mapping[str, MPRTResult]) -> str:
    """One line per explainer and target mode: SSIM after each block, and the verdict."""
    lines = []
    for name, result in results.items():
        protocol = ("head retrained on each randomised backbone" if result.retrain_seconds
                    else "trained head kept")
        lines.append(f"MPRT {name} ({protocol}; {result.order.replace('_', '-')}, {result.images} images, "
                     f"maps {result.map_size[0]}x{result.map_size[1]}); "
                     f"blocks: {', '.join(result.blocks)}")
        for mode, values in result.ssim.items():
            verdict = "passes" if result.passes[mode] else "fails"
            lines.append(f"  {mode:<10} targets: SSIM " + " ".join(f"{v:.3f}" for v in values)
                         + f"  -> {verdict} (first step {'<' if result.passes[mode] else '>='} "
                         f"{result.threshold})")
        lines.append("  prediction kept: " + " ".join(f"{v:.2f}" for v in result.prediction_agreement))
        lines.append("  mean map value: " + "; ".join(
            f"{mode} " + " ".join(f"{v:.3f}" for v in values) for mode, values in result.map_mean.items())
            + f" (original maps {result.reference_map_mean:.3f}; an all-zero map scores SSIM "
            f"{result.blank_map_ssim:.3f} against them)")
    return "\n".join(lines)
