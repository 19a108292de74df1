"""Export a trained P-TAME explainer for deployment: ONNX (onnxruntime, TensorRT, edge runtimes)
or TorchScript.

What is exported is the explainer without the backbone: the frozen auxiliary network and the
trained attention, in inference form (BatchNorm in eval mode), with the map normalisation and the
upsampling to image size. Input contract:

* ``images``: float32 (B, 3, H, W), RGB in [0, 1] (no mean/std normalisation: the auxiliary
  normalises inside), H x W = the checkpoint's input size (e.g. 224 x 224); B is dynamic;
* ``classes`` (``outputs="selected"`` only): int64 (B,), the class to explain per image.

Outputs: ``"selected"`` -> ``maps`` (B, H, W) in [0, 1] for ``classes``; ``"all"`` -> ``maps``
(B, C, h, w) in [0, 1], every class at the explanation resolution (upsample the one you need).
What stays outside: the backbone. To explain the backbone's own prediction, run the backbone,
take its argmax c* and pass it as ``classes`` (P-TAME is model-agnostic: the backbone may be
any classifier, deployed as it is).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ptame.explainers.ptame import PTAMEExplainer
from ptame.maps import upsample_maps
from ptame.model import normalise_scores

EXPORT_FORMATS = ("onnx", "torchscript")
EXPORT_OUTPUTS = ("selected", "all")


class ExportedExplainer(nn.Module):
    """The auxiliary + attention of a :class:`~ptame.explainers.PTAMEExplainer` as one module:
    ``(images, classes) -> (B, H, W) maps`` (``outputs="selected"``) or ``images -> (B, C, h, w)
    maps`` (``outputs="all"``), in [0, 1] (see the module's docstring)."""

    def __init__(self, explainer: PTAMEExplainer, outputs: str = "selected") -> None:
        super().__init__()
        if outputs not in EXPORT_OUTPUTS:
            raise ValueError(f"outputs must be one of {EXPORT_OUTPUTS}, got {outputs!r}")
        self.auxiliary = explainer.model.auxiliary
        self.attention = explainer.model.attention
        self.normalisation = explainer.map_normalisation
        self.outputs = outputs
        self.image_size = tuple(explainer.model.input_size)
        self.eval()

    def forward(self, images: Tensor, classes: Tensor | None = None) -> Tensor:
        features = self.auxiliary(images)
        if self.outputs == "all":
            return normalise_scores(self.attention(features, None), self.normalisation)
        scores = self.attention(features, classes.view(-1, 1))[:, 0]
        return upsample_maps(normalise_scores(scores, self.normalisation), self.image_size).clamp(0, 1)


def export_explainer(explainer: PTAMEExplainer, path: str | Path, format: str = "onnx",
                     outputs: str = "selected", opset: int = 17) -> Path:
    """Write ``explainer`` (auxiliary + attention, see :class:`ExportedExplainer`) to ``path`` as
    ONNX (dynamic batch; inputs ``images`` and ``classes``, output ``maps``) or TorchScript
    (traced). Returns the path."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")
    module = ExportedExplainer(explainer, outputs).cpu().float().eval()
    images = torch.rand(2, 3, *module.image_size)
    inputs: tuple[Tensor, ...] = (images,) if outputs == "all" else (images, torch.tensor([0, 1]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # sizes read from tensors (the maps' and the fixed input size) are constants of the exported
        # graph, which the tracer warns about at every such read; the batch stays dynamic, which
        # verify_export checks on another batch size. torch's deprecation notice of its own tracer
        # is not the user's to act on.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        if format == "torchscript":
            traced = torch.jit.trace(module, inputs, check_trace=False)
            traced.save(str(path))
            return path
        names = ["images"] if outputs == "all" else ["images", "classes"]
        torch.onnx.export(
            module, inputs, str(path), dynamo=False, opset_version=opset, input_names=names,
            output_names=["maps"], dynamic_axes={**{name: {0: "batch"} for name in names}, "maps": {0: "batch"}},
        )
    return path
