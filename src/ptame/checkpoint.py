"""P-TAME checkpoints: only the trainable head plus what is needed to rebuild and check it.

A checkpoint (Lightning's ``.ckpt`` written by :class:`ptame.module.PTAMEModule`) is a plain dict
of tensors and primitives, loadable with ``torch.load(weights_only=True)``:

- ``state_dict``: the attention mechanism's weights (``ptame.attention.*``) only; the frozen
  backbone and auxiliary weights are never stored.
- ``ptame``: :func:`checkpoint_metadata`: the format version, then
  :meth:`ptame.model.PTAME.metadata`: backbone and auxiliary identity (name, weight
  fingerprint, rebuild recipe), auxiliary layers, number of classes, input size, feature channels
  and sizes, explanation map size.
- Lightning's own entries (optimizer, scheduler, loop state) so that training can resume.

Recipes are Hydra ``_target_`` dicts. Those written before ptame's modules were re-laid out name
functions that have moved; :data:`LEGACY_TARGETS` maps them to their current home, so every
checkpoint ever written keeps loading.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from ptame.io import safe_torch_load
from ptame.model import PTAME
from ptame.networks.frozen import AuxiliaryFeatureExtractor, Backbone

CHECKPOINT_FORMAT_VERSION = 1
FROZEN_PREFIXES = ("ptame.backbone.", "ptame.auxiliary.")
ATTENTION_PREFIX = "ptame.attention."
#: auxiliary names of T-TAME checkpoints (feature maps from the backbone's own layers)
BACKBONE_FEATURES_PREFIX = "backbone-features:"

#: ``_target_`` strings stored in recipes by earlier layouts -> where the function lives now.
LEGACY_TARGETS: dict[str, str] = {
    "ptame.generated_models.generated_backbone": "ptame.data.generated_classifiers.generated_backbone",
    "ptame.generated_models.generated_auxiliary": "ptame.data.generated_classifiers.generated_auxiliary",
    "ptame.explainers.target_layers.backbone_auxiliary": "ptame.networks.backbone_auxiliary",
}


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to the given backbone / auxiliary / configuration."""


def plain_python(value: Any) -> Any:
    """OmegaConf containers, tuples and nested dicts as plain dicts/lists (weights_only-safe)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {key: plain_python(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_python(item) for item in value]
    return value


def checkpoint_metadata(model: PTAME) -> dict[str, Any]:
    """The ``ptame`` entry of a checkpoint of ``model`` (plain Python values)."""
    return plain_python({"format_version": CHECKPOINT_FORMAT_VERSION, **model.metadata()})


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
        trained_with = saved.get("trained_with") or {}
        origin = (f" (the checkpoint was trained with experiment={trained_with['experiment']}"
                  + (f", seed={trained_with['seed']}" if trained_with.get("seed") is not None else "")
                  + "; build the networks of that experiment, or let ptame.load_explainer(ckpt) rebuild "
                  "them from the stored recipes)") if trained_with.get("experiment") else ""
        raise CheckpointMismatchError("checkpoint refused: " + "; ".join(problems) + origin)


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


# --------------------------------------------------------------------------------------------
# Rebuilding the frozen networks from the recipes stored in a checkpoint
# --------------------------------------------------------------------------------------------


def current_recipe(recipe: Mapping[str, Any], cache_dir: str | Path | None = None) -> dict[str, Any]:
    """A deep copy of a stored recipe with every ``_target_`` (nested ones too) mapped through
    :data:`LEGACY_TARGETS` and, when ``cache_dir`` is given, every ``cache_dir`` replaced by it
    (the generated-dataset classifiers' cache on this machine)."""

    def convert(node: Any) -> Any:
        if isinstance(node, Mapping):
            converted = {key: convert(value) for key, value in node.items()}
            if "_target_" in converted:
                converted["_target_"] = LEGACY_TARGETS.get(converted["_target_"], converted["_target_"])
            if cache_dir is not None and "cache_dir" in converted:
                converted["cache_dir"] = str(cache_dir)
            return converted
        if isinstance(node, (list, tuple)):
            return [convert(item) for item in node]
        return copy.deepcopy(node)

    return convert(recipe)


def build_from_recipe(recipe: Mapping[str, Any], cache_dir: str | Path | None = None) -> nn.Module:
    """Instantiate a stored network recipe (see :func:`current_recipe`)."""
    from hydra.utils import instantiate

    return instantiate(current_recipe(recipe, cache_dir))


def _stored_recipe(saved: Mapping[str, Any], role: str, path: str | Path) -> Mapping[str, Any]:
    recipe = (saved.get(role) or {}).get("config")
    if not recipe:
        raise ValueError(
            f"{path} stores no {role} recipe (its {role} was built in Python); pass the {role} "
            "explicitly"
        )
    return recipe


def is_backbone_features_checkpoint(saved: Mapping[str, Any]) -> bool:
    """Whether the checkpoint metadata ``saved`` is of a T-TAME run (auxiliary = the backbone's
    own layers)."""
    return str(saved["auxiliary"].get("name", "")).startswith(BACKBONE_FEATURES_PREFIX)


def rebuild_backbone(
    saved: Mapping[str, Any], path: str | Path, cache_dir: str | Path | None = None
) -> Backbone:
    """The backbone of checkpoint metadata ``saved`` (of the file ``path``), from its recipe."""
    return build_from_recipe(_stored_recipe(saved, "backbone", path), cache_dir)


def rebuild_auxiliary(
    saved: Mapping[str, Any], path: str | Path, backbone: Backbone,
    cache_dir: str | Path | None = None,
) -> AuxiliaryFeatureExtractor:
    """The auxiliary of checkpoint metadata ``saved``: in T-TAME mode over ``backbone``'s own
    layers (sharing its parameters), otherwise rebuilt from its recipe."""
    if is_backbone_features_checkpoint(saved):
        from ptame.networks.backbone_features import backbone_auxiliary

        return backbone_auxiliary(backbone, saved["auxiliary"].get("layers"))
    return build_from_recipe(_stored_recipe(saved, "auxiliary", path), cache_dir)
