"""Evaluating explainers: the metric suite and its one loop (:mod:`~ptame.evaluation.suite`),
result tables (:mod:`~ptame.evaluation.tables`), figures (:mod:`~ptame.evaluation.figures`),
Table 2's layer contributions (:mod:`~ptame.evaluation.contributions`) and the model parameter
randomisation test (:mod:`~ptame.evaluation.mprt`)."""
