"""What the entry points run: :func:`~ptame.pipelines.train.run_training` (``train.py``),
:func:`~ptame.pipelines.evaluate.run_evaluation` (``evaluate.py``),
:func:`~ptame.pipelines.figures.main` (``figures.py``); ``sweep.py`` runs
:func:`ptame.sweep.driver.run_sweep`. Each takes a composed config, so they work without Hydra's
command line too."""
