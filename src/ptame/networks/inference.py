"""Frozen networks in inference form, for the training step.

P-TAME training calls the frozen backbone three times per step (the prediction, the masked
forward and its backward to the input) and the auxiliary once; nothing in them is trained. Their
inference form computes the same function faster:

- BatchNorm of the eval-mode network folded into the preceding convolution (exact up to float
  rounding: ``w' = w gamma / sqrt(var + eps)``, ``b' = (b - mean) gamma / sqrt(var + eps) + beta``),
  removing a memory-bound pass per layer in both directions;
- weights stored in the training dtype (bf16 under ``bf16-mixed``), so that autocast has nothing
  to cast at every step;
- channels_last memory format (faster convolutions on GPUs with cuDNN and on CPUs with oneDNN).

The copy is separate from the network it was made from, which keeps its float32 weights: the
explainer, the metrics and the checkpoint's weight fingerprints use the original.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ptame.networks.frozen import FrozenNetwork

log = logging.getLogger(__name__)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` (eval mode) with every BatchNorm that directly follows a convolution folded into
    it (a ``torch.fx`` GraphModule), or ``model`` itself when it has no BatchNorm or cannot be
    traced (logged)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    model.eval()
    try:
        return fuse(model, inplace=True)
    except Exception as error:  # noqa: BLE001 - an untraceable network keeps its BatchNorm
        log.info("BatchNorm not folded in %s (not traceable: %s)", type(model).__name__, error)
        return model


def inference_copy(
    network: FrozenNetwork,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    fold: bool = True,
) -> FrozenNetwork:
    """A frozen copy of ``network`` in inference form (module docstring): same inputs (float RGB
    in [0, 1]) and outputs, BatchNorm folded when ``fold``, parameters and buffers in ``dtype``
    (run it under autocast to that dtype, or with inputs of that dtype), channels_last when asked.
    """
    fast = copy.deepcopy(network)
    if fold:
        fast.model = fold_batchnorm(fast.model)
    for parameter in fast.parameters():
        parameter.requires_grad_(False)
    fast.to(dtype=dtype)
    if channels_last:
        fast.to(memory_format=torch.channels_last)
    return fast.train(False)
