"""Checkpoints written by earlier layouts of ptame keep loading and give the same maps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra._internal.utils import _locate

from ptame.checkpoint import LEGACY_TARGETS, current_recipe, read_checkpoint
from ptame.data.generated_classifiers import generated_auxiliary, generated_backbone
from ptame.explainers import load_explainer
from ptame.networks import backbone_auxiliary, torchvision_auxiliary, torchvision_backbone

LEGACY = Path(__file__).parent / "fixtures" / "legacy_checkpoints"


@pytest.fixture
def legacy_cache(tmp_path) -> Path:
    """A copy of the fixture's generated-data and classifier cache (loading writes lock files)."""
    return Path(shutil.copytree(LEGACY / "cache", tmp_path / "cache"))


def test_every_target_stored_in_checkpoints_resolves_to_its_current_function():
    stored = {
        "ptame.networks.torchvision_backbone": torchvision_backbone,
        "ptame.networks.torchvision_auxiliary": torchvision_auxiliary,
        "ptame.generated_models.generated_backbone": generated_backbone,
        "ptame.generated_models.generated_auxiliary": generated_auxiliary,
        "ptame.explainers.target_layers.backbone_auxiliary": backbone_auxiliary,
    }
    for target, function in stored.items():
        assert _locate(LEGACY_TARGETS.get(target, target)) is function, target


def test_nested_recipes_are_mapped_and_given_this_machines_cache():
    saved = read_checkpoint(LEGACY / "ttame.ckpt")["ptame"]["auxiliary"]["config"]
    assert saved["_target_"] == "ptame.explainers.target_layers.backbone_auxiliary"
    recipe = current_recipe(saved, cache_dir="/elsewhere")
    assert recipe["_target_"] == "ptame.networks.backbone_auxiliary"
    assert recipe["backbone"]["_target_"] == "ptame.data.generated_classifiers.generated_backbone"
    assert recipe["backbone"]["cache_dir"] == "/elsewhere" and recipe["layers"] == saved["layers"]
    assert saved["backbone"]["cache_dir"] != "/elsewhere"  # the stored recipe is left alone


@pytest.mark.parametrize("name", ["generated", "ttame"])
def test_legacy_checkpoint_rebuilds_its_networks_and_gives_the_same_maps(name, legacy_cache):
    expected = torch.load(LEGACY / "expected_maps.pt", weights_only=True)[name]
    models = sorted(p.name for p in (legacy_cache / "models").glob("*.pt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the expected maps were computed with one thread
    try:
        # strict weights: the rebuilt classifiers are the cached ones, fingerprint for fingerprint
        explainer = load_explainer(LEGACY / f"{name}.ckpt", cache_dir=legacy_cache)
        with torch.no_grad():
            maps = explainer(expected["images"])
    finally:
        torch.set_num_threads(threads)
    assert explainer.name == ("ttame" if name == "ttame" else "ptame")
    # the cache keys are those of the old layout: nothing was trained or added
    assert sorted(p.name for p in (legacy_cache / "models").glob("*.pt")) == models
    torch.testing.assert_close(maps, expected["maps"], rtol=0, atol=1e-6)
    assert maps.std() > 0.01  # real maps, not a constant
