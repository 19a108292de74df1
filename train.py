"""Train P-TAME. Examples:

    python train.py                                  # offline default experiment
    python train.py experiment=smoke                 # tiny end-to-end check (< 1 min)
    python train.py experiment=table1_resnet50 paths.imagenet_root=/data/imagenet trainer=ddp
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ptame.pipelines.train import run_training


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_training(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
