"""Every experiment config composes to the values of the run it reproduces and builds its models
(weights=None: nothing is downloaded); the trainer presets and the metrics group."""

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from ptame.module import PTAMEModule

from .helpers.configs import compose_config
from .helpers.entry_points import CONF_DIR

# files starting with "_" are bases of other presets
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("_"))
IMAGENET_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith(("table1_", "table2_"))]


def compose_train(overrides):
    return compose_config("train", overrides)


def test_every_paper_run_has_a_preset():
    expected = {
        "table1_vgg16", "table1_resnet50", "table1_vit_b_16", "table2_resnet18",
        "table2_mobilenet_v3", "table2_mnasnet", "table2_resnet50", "table2_resnet18_imagenette",
    }
    assert expected <= set(IMAGENET_EXPERIMENTS)


RELEASED = {  # ce / area / smoothness, weight decay of the authors' released runs
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


# What each ImageNet preset resolves to: backbone, auxiliary (architecture, layers), loss
# (ce, area, smoothness, border penalty, area power), weight decay. Every preset also has lr 1e-4,
# batch 32, one epoch, bf16 on one GPU, minmax maps, a checkpoint every 2000 steps, the
# faithfulness callback and the released loss with the batch's predicted classes as S.
PRESETS = {
    "table1_resnet50": ("resnet50", "resnet18", ["layer1", "layer2", "layer3", "layer4"],
                        (0.16143, 0.83857, 0.0, 0.3, 0.3), 2.4267e-4),
    "table1_vgg16": ("vgg16", "resnet18", ["layer1", "layer2", "layer3", "layer4"],
                     (0.07278, 0.977712, 1e-4, 0.3, 0.3), 0.13324),
    "table1_vit_b_16": ("vit_b_16", "resnet18", ["layer1", "layer2", "layer3", "layer4"],
                        (0.13129, 0.83857, 0.0, 0.0, 0.5), 1.3309e-4),
    "table2_resnet18": ("resnet50", "resnet18", ["layer1", "layer2", "layer3", "layer4"],
                        (0.16143, 0.83857, 0.0, 0.3, 0.3), 2.4267e-4),
    "table2_mobilenet_v3": ("resnet50", "mobilenet_v3_small",
                            ["features.9", "features.10", "features.11", "features.12"],
                            (0.16143, 0.83857, 0.0, 0.3, 0.3), 2.4267e-4),
    "table2_mnasnet": ("resnet50", "mnasnet0_5", ["layers.13", "layers.14", "layers.15", "layers.16"],
                       (0.16143, 0.83857, 0.0, 0.3, 0.3), 2.4267e-4),
    "table2_resnet50": ("resnet50", "resnet50", ["layer2", "layer3", "layer4"],
                        (0.16143, 0.83857, 0.0, 0.3, 0.3), 2.4267e-4),
    "table2_resnet18_imagenette": ("resnet50", "resnet18", ["layer1", "layer2", "layer3", "layer4"],
                                   (0.16143, 0.83857, 0.0, 0.3, 0.3), 2.4267e-4),
    "table2_ttame_resnet50": ("resnet50", None, ["layer2", "layer3", "layer4"],
                              (0.16143, 0.83857, 0.0, 0.3, 0.3), 2.4267e-4),
}


@pytest.mark.parametrize("experiment", sorted(PRESETS))
def test_each_imagenet_preset_resolves_to_its_run(experiment):
    backbone, auxiliary, layers, loss, weight_decay = PRESETS[experiment]
    cfg = OmegaConf.to_container(compose_train([f"experiment={experiment}", "run_name=test"]), resolve=True)
    assert cfg["backbone"]["arch"] == backbone and cfg["backbone"]["weights"] == "IMAGENET1K_V1"
    if auxiliary is None:  # T-TAME: the backbone's own layers
        assert cfg["auxiliary"]["_target_"] == "ptame.networks.backbone_auxiliary"
        assert cfg["auxiliary"]["backbone"] == cfg["backbone"]
    else:
        assert cfg["auxiliary"]["arch"] == auxiliary
    assert cfg["auxiliary"]["layers"] == layers
    terms = ("ce_weight", "area_weight", "variation_weight", "border_penalty", "area_power")
    assert tuple(cfg["loss"][term] for term in terms) == loss
    assert (cfg["loss"]["class_subset"], cfg["loss"]["area_epsilon"]) == ("batch", 0.0005)
    assert cfg["model"]["weight_decay"] == weight_decay
    assert (cfg["model"]["lr"], cfg["model"]["map_normalisation"], cfg["model"]["input_size"]) == (
        1e-4, "minmax", [224, 224])
    assert cfg["model"]["channels_last"] and cfg["data"]["batch_size"] == 32
    assert cfg["model"]["upsampling"] == "stepwise"  # the release's x2 steps
    assert cfg["trainer"] == {
        "_target_": "lightning.Trainer", "accelerator": "gpu", "devices": 1,
        "precision": "bf16-mixed", "max_epochs": 1, "log_every_n_steps": 50,
        "num_sanity_val_steps": 0, "enable_model_summary": False, "benchmark": True,
    }
    assert cfg["callbacks"]["checkpoint"]["every_n_train_steps"] == 2000
    assert cfg["callbacks"]["faithfulness"]["metrics"]["road"] == cfg["metrics"]["road"]


def test_trainer_presets_inherit_the_shared_keys():
    shared = {"_target_": "lightning.Trainer", "max_epochs": 1, "num_sanity_val_steps": 0,
              "enable_model_summary": False}
    expected = {
        "cpu": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "log_every_n_steps": 10,
                "benchmark": False},
        "gpu": {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed",
                "log_every_n_steps": 50, "benchmark": True},
        "ddp": {"accelerator": "gpu", "devices": -1, "num_nodes": 1, "strategy": "ddp",
                "sync_batchnorm": True, "precision": "bf16-mixed", "log_every_n_steps": 50,
                "benchmark": True},
        "ddp_cpu": {"accelerator": "cpu", "devices": 2, "num_nodes": 1, "sync_batchnorm": False,
                    "precision": "32-true", "log_every_n_steps": 10,
                    "strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy",
                                 "process_group_backend": "gloo"}},
    }
    for name, keys in expected.items():
        cfg = OmegaConf.to_container(compose_train([f"trainer={name}", "~experiment", "run_name=test"]), resolve=True)
        assert cfg["trainer"] == {**shared, **keys}, name
        assert ("ddp_consistency" in cfg["callbacks"]) == name.startswith("ddp")
        assert cfg["model"]["channels_last"]  # every preset: faster on CPUs (oneDNN) and GPUs


def test_one_metrics_group_feeds_evaluation_training_and_the_callback():
    cfg = compose_config("evaluate", ["callbacks=faithfulness", "seed=3", "metrics.road.auc=padded",
                                      "metrics.pointing_tolerance=1.5"])
    callback = OmegaConf.to_container(cfg.callbacks.faithfulness.metrics, resolve=True)
    assert callback == {"adic": {"thresholds": [100, 50, 15], "soft": True, "pixels": "exact", "seed": 3},
                        "road": {"percentages": [10, 20, 30, 40, 50, 70, 90],
                                 "imputer": "noisy_linear", "noise_std": 0.01, "auc": "padded",
                                 "pixels": "exact", "seed": 3},
                        "pointing_tolerance": 1.5, "precision": "float32"}
    assert cfg.final_evaluation.pointing_tolerance == 1.5
    assert cfg.metrics.insertion_deletion.seed == 3 and cfg.metrics.localisation


def test_the_release_metrics_preset_changes_only_what_the_release_does_differently():
    paper = OmegaConf.to_container(compose_config("evaluate", ["run_name=x"]).metrics, resolve=True)
    release = OmegaConf.to_container(compose_config("evaluate", ["run_name=x", "metrics=release"]).metrics,
                                     resolve=True)
    assert release["adic"] == {**paper["adic"], "pixels": "release"}
    assert release["road"] == {**paper["road"], "percentages": [10, 30, 50, 70],
                               "imputer": "telea_release", "auc": "padded", "pixels": "release"}
    for key in ("insertion_deletion", "localisation", "pointing_tolerance", "precision"):
        assert release[key] == paper[key]
