"""LOTS visualisation: Layerwise Origin-Target Synthesis (Rozsa et al. 2017) turned into a
saliency map as in the thesis "Visualization of Deep Features with Grad-CAM and LOTS" (its
Algorithm 1 for the synthesis and Algorithm 2 for the map)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn

from ptame.explainers.base import Explainer
from ptame.io import safe_torch_load
from ptame.maps import minmax_maps, to_grey
from ptame.networks.frozen import Backbone

#: The thesis' Gaussian filter: 49 x 49 px on 224 px ImageNet images.
REFERENCE_BLUR_FRACTION = 49 / 224
TARGETS = ("zero", "class")
DISTANCES = ("euclidean", "cosine")


def opencv_sigma(kernel_size: int) -> float:
    """The standard deviation OpenCV (and torchvision) derive from a kernel size when none is
    given: 0.3 ((k - 1) / 2 - 1) + 0.8 (7.7 px for the thesis' 49 px filter)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def lots_activation_map(
    images: Tensor, adversarial: Tensor, blur_size: int, blur_sigma: float | None = None
) -> Tensor:
    """The thesis' Algorithm 2: |grey(adv) - grey(x)| -> min-max -> Gaussian blur -> min-max.

    Args:
        images, adversarial: (B, 3, H, W) original and synthesised images in [0, 1].
        blur_size: odd side of the square Gaussian filter in pixels (reduced to the largest odd
            size below twice the shorter image side, the most reflect padding allows).
        blur_sigma: the filter's standard deviation in pixels; None derives it from the size
            as OpenCV does (:func:`opencv_sigma`).

    Returns:
        (B, H, W) maps in [0, 1] (all zeros where the image was not perturbed at all).
    """
    perturbation = minmax_maps((to_grey(adversarial) - to_grey(images)).abs())
    size = min(int(blur_size), 2 * min(images.shape[-2:]) - 1)
    size -= 1 - size % 2  # odd
    if size < 3:
        return perturbation
    sigma = opencv_sigma(size) if blur_sigma is None else float(blur_sigma)
    blurred = TF.gaussian_blur(perturbation[:, None], [size, size], [sigma, sigma])[:, 0]
    return minmax_maps(blurred)


class _FeatureHook:
    """Keeps the output of one module during a forward pass."""

    def __init__(self, module: nn.Module) -> None:
        self.output: Tensor | None = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.output = output

    def close(self) -> None:
        self.handle.remove()


class LOTSExplainer(Explainer):
    """LOTS perturbations of the image towards a target deep-feature representation, shown as
    a blurred map (the thesis' Algorithms 1 and 2).

    Synthesis (Algorithm 1), per image, on a detached copy inside ``torch.enable_grad()``:
    repeat at most ``max_iterations`` times: F_s = features of x_adv; stop when
    distance(F_s, F_t) <= ``tau``; else g = d/dx_adv 1/2 ||F_t - F_s||^2 and
    x_adv = clamp(x_adv - g * alpha / max|g|, 0, 1) (max over the image's pixels; the clamp
    keeps the [0, 1] intensity range). Map (Algorithm 2): grey conversion of both images
    (BT.601 luma), then |difference| (grey before the difference, as its lines 2-4 do), min-max,
    Gaussian blur of ``blur_size`` px, min-max.

    The target F_t. The thesis compares three targets (Sec. 4.2): the zero vector, the features
    of one training image of the image's class, and the mean feature of that class over the
    training set; the zero vector scored best on all five of its metrics (Table 5.1) and is the
    one it adopts. ``target="zero"`` (default) is that choice: the map shows every feature that
    drives the prediction and is the same whichever class is requested (the zero target
    ignores ``targets``). ``target="class"`` explains class c by moving the image towards
    ``class_features[c]`` (the thesis' class/mean targets: give per-class mean features, e.g.
    from :func:`class_mean_features` on training images, or one image's features per class).

    Distances: Euclidean (the loss is always the Euclidean one) or cosine distance, as in the
    thesis; cosine distance to the zero vector is undefined and refused.

    The thesis' settings (Sec. 5.1): tau 0.1, at most 500 iterations, alpha 1/255, a 49 x 49
    filter on 224 px images, features of "the last layer" of each CNN. It does not say whether
    that is the logits or the pooled features before the classifier; ``layer=None`` takes the
    backbone's output (its last layer, the logits, where the zero vector means "no class
    preferred", the thesis' reading of the zero target); otherwise a module name of
    ``backbone.model`` (e.g. ``avgpool`` of a torchvision ResNet, ``pool`` of the generated
    small VGG). Costs one forward and one backward pass per iteration for the images not yet
    converged (up to ``max_iterations`` of each).

    Args:
        backbone: the classifier.
        layer: module name of ``backbone.model`` whose output is the deep feature; None: logits.
        target: ``"zero"`` or ``"class"``.
        class_features: (C, ...) per-class target features (a tensor or a ``.pt`` file of one),
            needed for ``target="class"``.
        distance: ``"euclidean"`` or ``"cosine"`` (the stopping criterion).
        tau: stop when the distance is <= tau (>= 0).
        alpha: the largest pixel change per iteration, in [0, 1] intensity units (> 0).
        max_iterations: at most this many updates (>= 1).
        blur_size: odd filter side in px; None scales the thesis' 49/224 to the image size.
        blur_sigma: filter std in px; None derives it from the size (OpenCV's rule).
    """

    name = "lots"

    def __init__(
        self,
        backbone: Backbone,
        layer: str | None = None,
        target: str = "zero",
        class_features: Tensor | str | Path | None = None,
        distance: str = "euclidean",
        tau: float = 0.1,
        alpha: float = 1 / 255,
        max_iterations: int = 500,
        blur_size: int | None = None,
        blur_sigma: float | None = None,
    ) -> None:
        super().__init__(backbone)
        if backbone is None:
            raise ValueError("LOTS needs a backbone")
        self.layer = layer
        self._check_layer()
        if target not in TARGETS:
            raise ValueError(f"unknown LOTS target {target!r}; choose one of {list(TARGETS)}")
        if distance not in DISTANCES:
            raise ValueError(f"unknown LOTS distance {distance!r}; choose one of {list(DISTANCES)}")
        if target == "zero" and distance == "cosine":
            raise ValueError("LOTS: the cosine distance to the zero target is undefined; "
                             "use distance=euclidean with target=zero")
        if not tau >= 0 or not alpha > 0 or int(max_iterations) < 1:
            raise ValueError(f"LOTS needs tau >= 0, alpha > 0 and max_iterations >= 1, got "
                             f"tau={tau}, alpha={alpha}, max_iterations={max_iterations}")
        if blur_size is not None and (int(blur_size) < 1 or int(blur_size) % 2 == 0):
            raise ValueError(f"LOTS blur_size must be a positive odd number of pixels, got {blur_size}")
        if blur_sigma is not None and not blur_sigma > 0:
            raise ValueError(f"LOTS blur_sigma must be positive, got {blur_sigma}")
        self.target, self.distance = target, distance
        self.tau, self.alpha, self.max_iterations = float(tau), float(alpha), int(max_iterations)
        self.blur_size, self.blur_sigma = blur_size, blur_sigma
        self.class_features: Tensor | None = None
        if target == "class":
            if class_features is None:
                raise ValueError("LOTS target=class needs class_features: a (C, ...) tensor or "
                                 "a .pt file of per-class target features")
            if not isinstance(class_features, Tensor):
                class_features = safe_torch_load(class_features, "LOTS class_features")
            self.class_features = torch.as_tensor(class_features).float().flatten(1)
        #: iterations each image of the last batch used (B,), for inspection
        self.last_iterations: Tensor | None = None

    def _check_layer(self) -> None:
        if self.layer is None:
            return
        names = [name for name, _ in self.backbone.model.named_modules() if name]
        if self.layer not in names:
            raise ValueError(f"LOTS: backbone {self.backbone.name!r} has no module {self.layer!r}; "
                             f"module names of backbone.model: {names[:40]}")

    def features(self, images: Tensor) -> Tensor:
        """Deep features (B, D) of the configured layer (flattened) for [0, 1] images; keeps
        the autograd graph when called with gradients enabled."""
        if self.layer is None:
            return self.backbone(images).flatten(1)
        hook = _FeatureHook(self.backbone.model.get_submodule(self.layer))
        try:
            self.backbone(images)
        finally:
            hook.close()
        if not isinstance(hook.output, Tensor):
            raise ValueError(f"LOTS layer {self.layer!r} did not return a tensor")
        return hook.output.flatten(1)

    def target_features(self, images: Tensor, targets: Tensor | None) -> Tensor | None:
        """F_t (B, D) for the requested classes; None for the zero target."""
        if self.target == "zero":
            return None
        assert self.class_features is not None
        if targets is None:
            raise ValueError("LOTS target=class needs targets (or a backbone to predict them)")
        classes = self.class_features.shape[0]
        if int(targets.min()) < 0 or int(targets.max()) >= classes:
            raise ValueError(f"LOTS: target classes {targets.tolist()} outside the {classes} "
                             "classes of class_features")
        return self.class_features.to(images.device, images.dtype)[targets]

    def _distance(self, source: Tensor, target: Tensor | None) -> Tensor:
        if target is None:
            return source.norm(dim=1)
        if source.shape[1] != target.shape[1]:
            raise ValueError(f"LOTS: layer features have {source.shape[1]} values but "
                             f"class_features have {target.shape[1]}")
        if self.distance == "euclidean":
            return (source - target).norm(dim=1)
        return 1 - torch.nn.functional.cosine_similarity(source, target, dim=1)

    def synthesise(self, images: Tensor, target: Tensor | None) -> Tensor:
        """Algorithm 1 for a batch: the adversarial images (B, 3, H, W) in [0, 1].

        Images stop moving once their distance is <= tau; ``last_iterations`` records how many
        updates each received."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("LOTS needs gradients: call it outside torch.inference_mode() "
                               "(torch.no_grad() is fine)")
        adversarial = images.detach().clone()
        iterations = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        active = torch.arange(images.shape[0], device=images.device)
        with torch.enable_grad():
            for _ in range(self.max_iterations):
                current = adversarial[active].clone().requires_grad_(True)
                source = self.features(current)
                goal = None if target is None else target[active]
                far = self._distance(source.detach(), goal) > self.tau
                if not bool(far.any()):
                    break
                difference = source if goal is None else source - goal
                loss = 0.5 * (difference[far] ** 2).sum()  # per image 1/2 ||F_t - F_s||^2
                # backward() rather than autograd.grad: the latter fails under FlopCounterMode's
                # module hooks (cost measurement); the frozen backbone accumulates no gradients
                loss.backward()
                gradient = current.grad
                peak = gradient.flatten(1).abs().amax(dim=1).view(-1, 1, 1, 1)
                step = gradient * (self.alpha / torch.where(peak > 0, peak, torch.ones_like(peak)))
                moved = (current.detach() - step).clamp(0, 1)
                adversarial[active[far]] = moved[far]
                iterations[active[far]] += 1
                active = active[far]
        self.last_iterations = iterations
        return adversarial

    def blur_size_for(self, height: int, width: int) -> int:
        """The filter size used for (H, W) images: ``blur_size`` or the thesis' 49/224 of the
        shorter side, rounded to an odd number."""
        if self.blur_size is not None:
            return int(self.blur_size)
        size = max(1, round(REFERENCE_BLUR_FRACTION * min(height, width)))
        return size if size % 2 else size + 1

    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        adversarial = self.synthesise(images, self.target_features(images, targets))
        size = self.blur_size_for(*images.shape[-2:])
        return lots_activation_map(images.detach(), adversarial, size, self.blur_sigma)


def class_mean_features(
    explainer: LOTSExplainer, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int
) -> Tensor:
    """The mean deep feature of each class (C, D) at ``explainer``'s layer, the thesis' "mean
    F_t", from an iterable of ``(images (B,3,H,W) in [0,1], labels (B,))`` batches.

    Raises a ValueError naming the classes that got no image."""
    sums: Tensor | None = None
    counts = torch.zeros(num_classes)
    with torch.no_grad():
        for images, labels in batches:
            features = explainer.features(images).float().cpu()
            labels = torch.as_tensor(labels).long().cpu()
            if sums is None:
                sums = torch.zeros(num_classes, features.shape[1])
            sums.index_add_(0, labels, features)
            counts += torch.bincount(labels, minlength=num_classes).float()
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if sums is None or missing:
        raise ValueError(f"class_mean_features: no images of class(es) {missing or 'any'}")
    return sums / counts[:, None]
