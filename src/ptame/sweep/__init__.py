"""The BoTorch sweep of P-TAME's loss weights (``sweep.py``).

- :mod:`ptame.sweep.space`: search spaces from YAML (float/int/log/choice parameters, derived
  values, linear constraints) and their encoding for the GP.
- :mod:`ptame.sweep.optimiser`: Sobol initial points and BoTorch proposals (qLogNEI / qLogNEHVI).
- :mod:`ptame.sweep.journal`: the append-only JSON-lines journal.
- :mod:`ptame.sweep.runner`: one trial (train.py as a subprocess, or in-process) per launcher job.
- :mod:`ptame.sweep.driver`: the loop, launching batches through Hydra's launcher plugins.
- :mod:`ptame.sweep.report`: trials.csv, report.md, plots, best.yaml.
"""
