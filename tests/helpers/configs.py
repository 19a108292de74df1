"""Composing the repository's configs in-process, as the entry points do."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from .entry_points import CONF_DIR


@contextmanager
def hydra_search_path(conf_dir: str | Path = CONF_DIR) -> Iterator[None]:
    """Hydra initialised on ``conf_dir`` (default: the repository's conf/) for the ``with``
    body: composing, and reading config groups as ``build_explainer`` does."""
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        yield


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``name`` (train, evaluate, sweep) composed with ``overrides``."""
    with hydra_search_path():
        return compose(config_name=name, overrides=list(overrides))
