"""Shared fixtures: tiny frozen networks (tests/helpers/), a module-scoped cache, in-process configs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra import compose
from omegaconf import DictConfig

from ptame.networks import AuxiliaryFeatureExtractor, Backbone

from .helpers.configs import hydra_search_path
from .helpers.networks import make_auxiliary, make_backbone

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def backbone() -> Backbone:
    return make_backbone()


@pytest.fixture
def auxiliary() -> AuxiliaryFeatureExtractor:
    return make_auxiliary()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A fresh ``paths.cache_dir`` shared by the tests of one module (generated data, classifiers)."""
    return tmp_path_factory.mktemp("ptame-cache")


@pytest.fixture
def configs() -> Iterator[Callable[..., DictConfig]]:
    """``configs(name, overrides)`` composes the repository's configs; Hydra stays initialised on
    conf/ for the whole test (``build_explainer`` reads explainer configs through it)."""
    with hydra_search_path():
        yield lambda name, overrides=(): compose(config_name=name, overrides=list(overrides))
