"""The metric suite and the one evaluation loop of ptame.

Every evaluation (``evaluate.py``'s table, the localisation printed after training, the
faithfulness callback after validation epochs) builds one suite of metrics per explainer with
:func:`build_metrics` and feeds it batch by batch with :func:`evaluate_batch`: Lightning's test
loop does so in :class:`ExplainerEvaluation` (1 or N processes), :func:`evaluate_explainers`
everywhere else.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import Metric
from tqdm.auto import tqdm

from ptame.data.bad_images import UNOWNED, SkippedImages
from ptame.data.gpu_decoding import decode_on_device
from ptame.explainers.base import Explainer
from ptame.metrics import (
    ROAD,
    AverageDropIncrease,
    ClassSpecificLocalisation,
    EnergyPointingGame,
    InsertionDeletion,
    PointingGame,
    measure_cost,
)
from ptame.metrics.base import STANDARD_ERROR_SUFFIX, BackboneFn, PerImageMetric, classify
from ptame.networks.frozen import Backbone

log = logging.getLogger(__name__)

# Metrics that compare maps with ground-truth object masks.
LOCALISATION_METRICS = ("pointing_game", "energy_pointing_game", "pointing_game_strict")
# Metrics that explain each object's class of multi-object images (items with object_labels / object_masks).
CLASS_SPECIFIC_METRICS = ("class_localisation",)
PRECISIONS = ("float32", "bf16")


@contextlib.contextmanager
def metric_precision(device: torch.device | str, precision: str = "float32") -> Iterator[None]:
    """The numerics of every forward pass of an evaluation (explainers and metrics).

    ``"float32"`` (default): autocast off and TF32 off for matrix products and convolutions,
    whatever the training precision, so that the same checkpoint gives the same figures on a CPU
    and a GPU. ``"bf16"``: bfloat16 autocast (faster on GPUs; figures move, see the README).
    The previous settings are restored on exit.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"metrics.precision must be one of {PRECISIONS}, got {precision!r}")
    device_type = torch.device(device).type
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def build_metrics(
    backbone: Backbone, settings: Mapping[str, Any], has_masks: bool, has_object_masks: bool = False,
    **metric_kwargs: Any,
) -> dict[str, Metric]:
    """The metric suite for one explainer.

    Args:
        backbone: the frozen classifier the metrics query.
        settings: the ``metrics`` config: ``{"adic": {...} | None, "road": {...} | None,
            "insertion_deletion": {...} | None, "localisation": bool, "pointing_tolerance":
            pixels}``: keyword arguments of :class:`AverageDropIncrease`, :class:`ROAD`,
            :class:`InsertionDeletion`; None (or absent) disables a metric.
        has_masks: whether ground-truth masks exist (localisation metrics need them).
        has_object_masks: whether test items carry ``object_labels`` / ``object_masks`` of
            several objects (adds ``class_localisation``, :class:`ClassSpecificLocalisation`,
            with the localisation switch and tolerance).
        metric_kwargs: passed to every metric (e.g. ``sync_on_compute=False``).
    """
    metrics: dict[str, Metric] = {}
    if settings.get("adic") is not None:
        metrics["adic"] = AverageDropIncrease(backbone, **dict(settings["adic"]), **metric_kwargs)
    if settings.get("road") is not None:
        metrics["road"] = ROAD(backbone, **dict(settings["road"]), **metric_kwargs)
    if settings.get("insertion_deletion") is not None:
        metrics["insertion_deletion"] = InsertionDeletion(
            backbone, **dict(settings["insertion_deletion"]), **metric_kwargs
        )
    if has_masks and settings.get("localisation", True):
        tolerance = float(settings.get("pointing_tolerance") or 0.0)
        metrics.update(localisation_metrics(tolerance, **metric_kwargs))
        if has_object_masks:
            metrics["class_localisation"] = ClassSpecificLocalisation(tolerance=tolerance, **metric_kwargs)
    return metrics


def localisation_metrics(pointing_tolerance: float, **metric_kwargs: Any) -> dict[str, Metric]:
    """``pointing_game`` (with ``pointing_tolerance`` pixels, TorchRay's convention),
    ``energy_pointing_game``, and ``pointing_game_strict`` (zero tolerance) when the tolerance is
    positive; ``metric_kwargs`` go to every metric (e.g. ``sync_on_compute=False``)."""
    metrics: dict[str, Metric] = {
        "pointing_game": PointingGame(tolerance=pointing_tolerance, **metric_kwargs),
        "energy_pointing_game": EnergyPointingGame(**metric_kwargs),
    }
    if pointing_tolerance > 0:
        metrics["pointing_game_strict"] = PointingGame(tolerance=0.0, **metric_kwargs)
    return metrics


class EvaluationProgress:
    """A progress bar over every step of an evaluation: one step per explainer and per metric of
    each batch, so a long batch (ROAD of 12 methods on ImageNet) still moves the bar, which shows
    the step running now and tqdm's ETA.

    Args:
        batches: the number of batches (None or infinite: unknown, no ETA).
        steps_per_batch: explainers + explainers x metrics.
        description: the bar's label.
        disable: no bar (e.g. on every process but rank 0).
    """

    def __init__(self, batches: float | None, steps_per_batch: int, description: str = "evaluation",
                 disable: bool = False) -> None:
        total = batches * steps_per_batch if batches is not None and math.isfinite(batches) else None
        self.bar = tqdm(total=total, desc=description, unit="step", disable=disable, dynamic_ncols=True)

    @contextlib.contextmanager
    def step(self, key: str) -> Iterator[None]:
        """Show ``key`` (``<explainer>`` or ``<explainer>/<metric>``) while the block runs, then
        advance the bar by one step."""
        self.bar.set_postfix_str(key, refresh=False)
        yield
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def steps_per_batch(suites: Mapping[str, Mapping[str, Metric]]) -> int:
    """Progress steps of one batch: each explainer's forward and each of its metrics."""
    return sum(1 + len(metrics) for metrics in suites.values())


@contextlib.contextmanager
def tracked(progress: EvaluationProgress | None, timings: dict[str, float] | None, key: str,
            device: torch.device) -> Iterator[None]:
    """:func:`timed` and, when ``progress`` is given, one step of the progress bar."""
    with progress.step(key) if progress is not None else contextlib.nullcontext(), timed(timings, key, device):
        yield


@contextlib.contextmanager
def timed(timings: dict[str, float] | None, key: str, device: torch.device) -> Iterator[None]:
    """Add the seconds the block takes (device work included: synchronised on CUDA) to
    ``timings[key]``; nothing is timed when ``timings`` is None."""
    if timings is None:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def update_metrics(metrics: Mapping[str, Metric], images: Tensor, maps: Tensor, batch: Mapping[str, Tensor],
                   should_stop: Callable[[], bool] | None = None, timings: dict[str, float] | None = None,
                   prefix: str = "", progress: EvaluationProgress | None = None,
                   explainer: Explainer | None = None,
                   logits: Callable[[BackboneFn], Tensor] | None = None) -> None:
    """Feed one batch of maps (B, H, W) for ``images`` (B, 3, H, W) into every metric;
    :func:`stop_if_asked` before each; seconds per metric added to ``timings`` (keys
    ``<prefix><metric>``) when given; one ``progress`` step per metric. The class-specific
    metrics (:data:`CLASS_SPECIFIC_METRICS`) call ``explainer`` for each object's class.
    ``logits``: backbone -> its logits (B, C) of ``images`` (:class:`SharedLogits`), given to the
    metrics that take them (``takes_logits``) instead of each computing them."""
    indices = batch["index"].to(images.device)
    for name, metric in metrics.items():
        stop_if_asked(should_stop)
        with tracked(progress, timings, f"{prefix}{name}", images.device):
            if name in LOCALISATION_METRICS:
                metric.update(maps, batch["mask"].to(images.device), indices)
            elif name in CLASS_SPECIFIC_METRICS:
                update_class_specific(metric, explainer, images, batch, indices)
            elif logits is not None and getattr(metric, "takes_logits", False):
                metric.update(images, maps, indices, logits=logits(metric.backbone))
            else:
                metric.update(images, maps, indices)


def update_class_specific(metric: Metric, explainer: Explainer | None, images: Tensor,
                          batch: Mapping[str, Tensor], indices: Tensor) -> None:
    """Explain each object's class of ``images`` (B, 3, H, W) with ``explainer`` into a
    :class:`ClassSpecificLocalisation` (the batch holds ``object_labels`` (B, K) and
    ``object_masks`` (B, K, H, W))."""
    if explainer is None or "object_labels" not in batch or "object_masks" not in batch:
        raise ValueError("class-specific localisation needs the explainer and batches with object_labels and "
                         "object_masks (a multi-object dataset such as data=generated_pairs)")
    metric.update(lambda targets: explainer(images, targets).float(), batch["object_labels"].to(images.device),
                  batch["object_masks"].to(images.device), indices)


def stop_if_asked(should_stop: Callable[[], bool] | None) -> None:
    """Raise Lightning's ``SIGTERMException`` when ``should_stop()`` says so (a SIGTERM or SIGINT
    arrived): an evaluation stops between explainers and metrics, not after a whole batch."""
    if should_stop is not None and should_stop():
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        raise SIGTERMException


def evaluate_batch(
    explainers: Mapping[str, Explainer],
    suites: Mapping[str, Mapping[str, Metric]],
    batch: Mapping[str, Tensor],
    device: torch.device | str | None = None,
    precision: str = "float32",
    should_stop: Callable[[], bool] | None = None,
    timings: dict[str, float] | None = None,
    progress: EvaluationProgress | None = None,
) -> None:
    """Explain one batch with every explainer (the backbone's predictions) and feed each map
    stack into that explainer's suite, under :func:`metric_precision`. ``batch`` holds ``image``
    (B, 3, H, W) in [0, 1] (batches of GPU decoding are decoded before, by
    :func:`evaluate_explainers` or the Lightning batch-transfer hook), ``index`` (B,) and, for
    localisation, ``mask`` (B, H, W); it is moved to ``device`` (None: where the images are).
    ``should_stop``: see :func:`stop_if_asked`; ``timings``: seconds per explainer and metric
    are added to it; ``progress``: advanced once per explainer and per metric."""
    images = batch["image"] if device is None else batch["image"].to(device)
    with metric_precision(images.device, precision):
        logits = SharedLogits(images)
        for name, explainer in explainers.items():
            stop_if_asked(should_stop)
            with tracked(progress, timings, name, images.device):
                backbone = getattr(explainer, "backbone", None)
                if backbone is None:  # explains without a backbone (or a plain callable)
                    maps = explainer(images).float()
                else:  # the backbone's predictions, from the batch's shared forward
                    maps = explainer(images, logits(backbone).argmax(dim=1)).float()
            update_metrics(suites[name], images, maps, batch, should_stop, timings, f"{name}/", progress, explainer,
                           logits)


class SharedLogits:
    """``shared(backbone)``: the logits (B, C) of one batch's unmodified images under
    ``backbone``, computed once per backbone object and batch (:func:`classify`), for the
    explainers' targets (the backbone's predictions) and every metric that needs them: one
    forward per batch where each explainer and metric made its own (for the Table 1 suite of
    one explainer: 84 forwards per image instead of 87)."""

    def __init__(self, images: Tensor) -> None:
        self.images = images
        self._logits: dict[int, tuple[BackboneFn, Tensor]] = {}

    def __call__(self, backbone: BackboneFn) -> Tensor:
        key = id(backbone)
        if key not in self._logits:  # the backbone is kept with its logits: its id stays its own
            self._logits[key] = (backbone, classify(backbone, self.images))
        return self._logits[key][1]


def compute_metrics(metrics: Mapping[str, Metric]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(flat figures, ROAD curves) of a metric suite (synchronised across processes); every
    figure of a per-image metric comes with its standard error over images
    (``<figure>_se``), and ``images_evaluated`` counts the images."""
    figures: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    for name, metric in metrics.items():
        value = metric.compute()
        if isinstance(value, dict):
            figures.update({key: float(v) for key, v in value.items()})
        else:
            figures[name] = float(value)
        if not isinstance(metric, PerImageMetric):
            continue
        # over every process, as compute() sees the images
        with metric.sync_context(should_sync=metric.sync_on_compute):
            errors = metric.standard_errors()
            if isinstance(metric, ROAD):
                curves = {key: [float(v) for v in values] for key, values in metric.curves().items()}
                curves["percentages"] = list(metric.percentages)
            figures.setdefault("images_evaluated", float(metric.per_image()[0].numel()))
        if isinstance(errors, dict):
            figures.update({f"{key}{STANDARD_ERROR_SUFFIX}": float(v) for key, v in errors.items()})
        else:
            figures[f"{name}{STANDARD_ERROR_SUFFIX}"] = float(errors)
    return figures, curves


def _first_images(batch: Mapping[str, Any], count: int) -> dict[str, Any]:
    return {key: value[:count] for key, value in batch.items()}


@torch.no_grad()
def evaluate_explainers(
    explainers: Mapping[str, Explainer],
    suites: Mapping[str, Mapping[str, Metric]],
    batches: Iterable[Mapping[str, Tensor]],
    device: torch.device | str,
    max_images: int | None = None,
    description: str = "evaluation",
    precision: str = "float32",
    skipped: SkippedImages | None = None,
) -> dict[str, dict[str, float]]:
    """Run every explainer over ``batches`` (at most ``max_images`` images) into its suite and
    return ``{name: figures}`` (:func:`compute_metrics`).

    Args:
        explainers: name -> explainer; each explains the backbone's prediction.
        suites: name -> metrics (:func:`build_metrics`), already on ``device``.
        batches: dict batches (see :func:`evaluate_batch`).
        device: where explainers and metrics run.
        max_images: stop after this many images (None: all).
        description: the progress bar's label (one step per explainer and metric of a batch).
        precision: see :func:`metric_precision`.
        skipped: records the files a ``bad_images=skip`` loader left out (None: logged once each).
    """
    seen = 0
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    if total is not None and max_images is not None:
        batch_size = getattr(batches, "batch_size", None)
        total = min(total, math.ceil(max_images / batch_size)) if batch_size else total
    progress = EvaluationProgress(total, steps_per_batch(suites), description)
    try:
        for batch in batches:
            batch = decode_on_device((skipped or UNOWNED).record(batch), device)
            if batch["image"].shape[0] == 0:  # every file of the batch was skipped
                continue
            if max_images is not None:
                batch = _first_images(batch, max_images - seen)
            evaluate_batch(explainers, suites, batch, device, precision, progress=progress)
            seen += batch["image"].shape[0]
            if max_images is not None and seen >= max_images:
                break
    finally:
        progress.close()
    return {name: compute_metrics(suite)[0] for name, suite in suites.items()}


class ExplainerEvaluation(L.LightningModule):
    """Runs the metric suite for several explainers over a test dataloader with Lightning, so
    evaluation uses one GPU or many (DDP); duplicates padded by the distributed sampler are
    counted once (metrics keep one value per dataset index).

    After ``trainer.test``, :attr:`results` holds ``{method: {metric: value}}`` and
    :attr:`curves` the ROAD curves per method (identical on every process).
    """

    def __init__(
        self,
        explainers: Mapping[str, Explainer],
        backbone: Backbone,
        settings: Mapping[str, Any],
        has_masks: bool,
        skipped_images: SkippedImages | None = None,
        has_object_masks: bool = False,
    ) -> None:
        super().__init__()
        self.explainers = torch.nn.ModuleDict(dict(explainers))
        self.__dict__["backbone"] = backbone
        self.metric_suites = torch.nn.ModuleDict(
            {name: torch.nn.ModuleDict(build_metrics(backbone, settings, has_masks, has_object_masks))
             for name in explainers}
        )
        self.precision = str(settings.get("precision", "float32"))
        self.skipped_images = skipped_images if skipped_images is not None else UNOWNED
        self.results: dict[str, dict[str, float]] = {}
        self._batch_seconds: list[float] = []
        self._progress: EvaluationProgress | None = None
        self.curves: dict[str, dict[str, list[float]]] = {}

    def on_test_start(self) -> None:
        self.backbone.to(self.device)
        self._progress = EvaluationProgress(self._test_batches(), steps_per_batch(self.metric_suites),
                                            disable=not self.trainer.is_global_zero)

    def on_test_end(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def _test_batches(self) -> float | None:
        total = getattr(self.trainer, "num_test_batches", None)
        return total[0] if total else None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the files ``bad_images=skip`` left out; GPU decoding (``data.decode=gpu``):
        decode and crop on this process's device."""
        return decode_on_device(self.skipped_images.record(batch), self.device)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if batch["image"].shape[0] == 0:  # every file of the batch was skipped
            return
        timings: dict[str, float] = {}
        start = time.perf_counter()
        evaluate_batch(self.explainers, self.metric_suites, batch, precision=self.precision,
                       should_stop=lambda: bool(getattr(self.trainer, "received_sigterm", False)),
                       timings=timings, progress=self._progress)
        self._report_progress(batch_idx, time.perf_counter() - start, timings)

    def _report_progress(self, batch_idx: int, seconds: float, timings: Mapping[str, float]) -> None:
        """One log line per batch: its time per explainer and metric, and the ETA of the loop."""
        self._batch_seconds.append(seconds)
        total = self._test_batches()
        done = batch_idx + 1
        eta = ""
        if isinstance(total, (int, float)) and math.isfinite(total):
            remaining = (total - done) * sum(self._batch_seconds) / len(self._batch_seconds)
            eta = f"; ETA {remaining / 60:.1f} min" if remaining >= 60 else f"; ETA {remaining:.0f} s"
        parts = ", ".join(f"{key} {value:.1f} s" for key, value in timings.items())
        log.info("evaluation batch %d/%s in %.1f s (%s)%s", done, total if total is not None else "?",
                 seconds, parts, eta)

    def on_test_epoch_end(self) -> None:
        for name, suite in self.metric_suites.items():
            figures, curves = compute_metrics(suite)
            self.results[name] = figures
            self.curves[name] = curves


def evaluate_costs(
    explainers: Mapping[str, Explainer], images: Tensor, repeats: int = 5, precision: str = "float32"
) -> dict[str, dict[str, float]]:
    """Measured forward passes, GFLOPs, ms/image and resolution per explainer on ``images`` (a
    batch of the evaluation's size), under :func:`metric_precision`."""
    with metric_precision(images.device, precision):
        return {name: measure_cost(explainer, images, repeats).as_dict() for name, explainer in explainers.items()}
