"""Explain image files with a trained P-TAME checkpoint (and any explainer of conf/explainer/).

    python explain.py ckpt_path=outputs/default/<date>/checkpoints/last.ckpt images=[cat.jpg]
    python explain.py ckpt_path=... images=[a.jpg,b.png] explainers=[ptame,gradcam,rise] top_k=3

Writes <image stem>.png (overlays), <image stem>_<method>.npy (raw maps) and predictions.json
into the run directory (outputs/explain/<date>/).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ptame.pipelines.explain import run_explain


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    run_explain(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
