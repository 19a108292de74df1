"""Evaluate explainers (AD/IC, ROAD, insertion/deletion, localisation, cost) on the test subset.

    python evaluate.py ckpt_path=outputs/default/<date>/checkpoints/last.ckpt
    python evaluate.py experiment=table1_resnet50 ckpt_path=... trainer=gpu
    python evaluate.py ckpt_path=... explainers=[ptame,random] metrics.road.auc=padded
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ptame.pipelines.evaluate import run_evaluation


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_evaluation(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
