"""BoTorch sweep of P-TAME's loss weights: Sobol trials, then Bayesian optimisation; every trial
is a train.py run (one epoch) scored by ROAD MoRF/LeRF on the validation subset. Examples:

    python sweep.py experiment=smoke                        # paper space, 20 trials (5 Sobol)
    python sweep.py sweep=release experiment=table1_resnet50 sweep.parallel=4
    python sweep.py sweep.mode=pareto sweep.n_trials=30     # Pareto search on (MoRF, LeRF)
    python sweep.py resume=outputs/sweep/smoke/<date_time>  # continue from the journal

Every train.py override applies to every trial; sweep.* settings are in conf/sweep.yaml.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ptame.sweep.driver import expand_resume, run_sweep


@hydra.main(version_base="1.3", config_path="conf", config_name="sweep")
def main(cfg: DictConfig) -> None:
    run_sweep(cfg)


if __name__ == "__main__":
    sys.argv = expand_resume(sys.argv)
    main()
