"""Export a trained P-TAME explainer (auxiliary + attention) as ONNX or TorchScript.

    python export.py ckpt_path=outputs/default/<date>/checkpoints/last.ckpt format=onnx
    python export.py ckpt_path=... format=torchscript outputs=all output=ptame_all.pt
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ptame.pipelines.export import run_export


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_export(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
