"""Every experiment config composes and builds its models (weights=None: nothing is downloaded)."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate

from ptame.lightning_module import PTAMEModule

from .paths import CONF_DIR

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
IMAGENET_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith(("table1_", "table2_"))]


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_every_paper_run_has_a_preset():
    expected = {
        "table1_vgg16", "table1_resnet50", "table1_vit_b_16", "table2_resnet18",
        "table2_mobilenet_v3", "table2_mnasnet", "table2_resnet50", "table2_resnet18_imagenette",
    }
    assert expected <= set(IMAGENET_EXPERIMENTS)


RELEASED = {  # ce / area / smoothness, weight decay (reference-facts.md)
    "table1_resnet50": (0.16143, 0.83857, 0.0, 2.4267e-4),
    "table1_vgg16": (0.07278, 0.977712, 1e-4, 0.13324),
    "table1_vit_b_16": (0.13129, 0.83857, 0.0, 1.3309e-4),
}


@pytest.mark.parametrize("experiment", IMAGENET_EXPERIMENTS)
def test_imagenet_experiment_composes_and_builds(experiment):
    overrides = [f"experiment={experiment}", "backbone.weights=null"]
    if "ttame" not in experiment:  # T-TAME's auxiliary is the backbone itself
        overrides.append("auxiliary.weights=null")
    if "imagenette" in experiment:
        overrides.append("auxiliary.checkpoint_path=null")
    cfg = compose_train(overrides)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.channels_last
    assert cfg.loss.variation_normalisation == "release" and cfg.loss.class_subset == "batch"
    assert cfg.model.lr == 1e-4 and cfg.trainer.max_epochs == 1 and cfg.data.batch_size == 32
    assert get_class(cfg.data._target_).__name__ == "ImageNetDataModule"
    if experiment in RELEASED:
        ce, area, smooth, wd = RELEASED[experiment]
        assert (cfg.loss.ce_weight, cfg.loss.area_weight, cfg.loss.variation_weight) == (ce, area, smooth)
        assert cfg.model.weight_decay == wd
    if experiment == "table1_vit_b_16":
        assert cfg.loss.border_penalty == 0 and cfg.loss.area_power == 0.5
    torch.manual_seed(0)
    module = instantiate(
        cfg.model,
        backbone=instantiate(cfg.backbone),
        auxiliary=instantiate(cfg.auxiliary),
        loss=instantiate(cfg.loss),
    )
    assert isinstance(module, PTAMEModule)
    expected_resolution = {
        "table2_mobilenet_v3": 49, "table2_mnasnet": 49, "table2_resnet50": 784,
        "table2_ttame_resnet50": 784,
    }.get(experiment, 3136)
    assert module.ptame.resolution == expected_resolution
    assert module.ptame.num_classes == (1000)


def test_command_line_trainer_overrides_the_experiments_choice():
    cfg = compose_train(["experiment=table1_resnet50", "trainer=ddp", "trainer.num_nodes=2"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 2 and cfg.trainer.sync_batchnorm


def test_cpu_trainers_instantiate():
    for trainer in ("cpu", "ddp_cpu"):
        cfg = compose_train([f"trainer={trainer}"])
        assert instantiate(cfg.trainer, logger=False).num_devices == (2 if trainer == "ddp_cpu" else 1)


def test_default_and_smoke_use_the_generated_dataset():
    for experiment in ("default", "smoke"):
        cfg = compose_train([f"experiment={experiment}"])
        assert cfg.data._target_.endswith("GeneratedShapesDataModule")
        assert list(cfg.model.input_size) == [cfg.data.image_size] * 2
