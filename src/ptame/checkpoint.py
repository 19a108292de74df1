"""P-TAME checkpoints: only the trainable head plus what is needed to rebuild and check it.

A checkpoint (Lightning's ``.ckpt`` written by :class:`ptame.lightning_module.PTAMEModule`) is a
plain dict of tensors and primitives, loadable with ``torch.load(weights_only=True)``:

- ``state_dict``: the attention mechanism's weights (``ptame.attention.*``) only; the frozen
  backbone and auxiliary weights are never stored.
- ``ptame``: :meth:`ptame.model.PTAME.metadata`: backbone and auxiliary identity (name, weight
  fingerprint, rebuild recipe), auxiliary layers, number of classes, input size, feature channels
  and sizes, explanation map size.
- Lightning's own entries (optimizer, scheduler, loop state) so that training can resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from ptame.model import CHECKPOINT_FORMAT_VERSION, PTAME
from ptame.networks import safe_torch_load

FROZEN_PREFIXES = ("ptame.backbone.", "ptame.auxiliary.")
ATTENTION_PREFIX = "ptame.attention."


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to the given backbone / auxiliary / configuration."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a P-TAME checkpoint with ``weights_only=True`` (no pickled code is executed)."""
    checkpoint = safe_torch_load(path, "checkpoint")
    if not isinstance(checkpoint, dict) or "ptame" not in checkpoint:
        raise ValueError(f"{path} is not a P-TAME checkpoint (no 'ptame' metadata)")
    return checkpoint


def _describe(identity: dict[str, Any]) -> str:
    return f"{identity.get('name')!r} (weights fingerprint {identity.get('fingerprint')})"


def verify_metadata(saved: dict[str, Any], model: PTAME, strict_weights: bool = True) -> None:
    """Refuse a checkpoint trained for another backbone, auxiliary or class count.

    Args:
        saved: the checkpoint's ``ptame`` metadata.
        model: the model it is being loaded into.
        strict_weights: also compare weight fingerprints (same architecture, other weights).

    Raises:
        CheckpointMismatchError naming what differs.
    """
    version = saved.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"checkpoint format version {version} is not supported "
            f"(this ptame reads version {CHECKPOINT_FORMAT_VERSION})"
        )
    current = model.metadata()
    problems = []
    for role in ("backbone", "auxiliary"):
        was, now = saved[role], current[role]
        if was["name"] != now["name"]:
            problems.append(
                f"it was trained with {role} {was['name']!r} but the {role} given is {now['name']!r}"
            )
        elif strict_weights and was["fingerprint"] != now["fingerprint"]:
            problems.append(
                f"its {role} {was['name']!r} had other weights: checkpoint {_describe(was)}, "
                f"given {_describe(now)}"
            )
    if saved["auxiliary"].get("layers") != current["auxiliary"].get("layers"):
        problems.append(
            f"it used auxiliary layers {saved['auxiliary'].get('layers')} "
            f"but the auxiliary given has {current['auxiliary'].get('layers')}"
        )
    for key in ("num_classes", "feature_channels"):
        if saved[key] != current[key]:
            problems.append(f"its {key} is {saved[key]} but the model's is {current[key]}")
    if problems:
        raise CheckpointMismatchError("checkpoint refused: " + "; ".join(problems))


def attention_state(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The attention mechanism's state dict (keys without the ``ptame.attention.`` prefix)."""
    state = checkpoint.get("state_dict", {})
    head = {k.removeprefix(ATTENTION_PREFIX): v for k, v in state.items() if k.startswith(ATTENTION_PREFIX)}
    if not head:
        raise ValueError("checkpoint holds no attention weights (no 'ptame.attention.*' keys)")
    return head


def strip_frozen_weights(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the frozen backbone and auxiliary weights from a module state dict."""
    return {k: v for k, v in state_dict.items() if not k.startswith(FROZEN_PREFIXES)}
