import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ptame.callbacks import DistributedConsistencyCheck, FaithfulnessEvaluation, attention_state_digest

from .test_module import RandomImages, make_module


class TinyData(L.LightningDataModule):
    has_masks = False

    def train_dataloader(self):
        return DataLoader(RandomImages(16), batch_size=4)

    def val_dataloader(self):
        return DataLoader(RandomImages(12), batch_size=4)


def test_faithfulness_callback_logs_ad_ic_and_road_after_validation(tmp_path):
    callback = FaithfulnessEvaluation(
        every_n_epochs=1, max_images=6, batch_size=4,
        metrics={"adic": {"thresholds": [100, 50, 15]}, "road": {"percentages": [20, 60], "imputer": "mean"}},
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[callback, DistributedConsistencyCheck()], num_sanity_val_steps=0,
    )
    module = make_module()
    trainer.fit(module, datamodule=TinyData())
    metrics = trainer.callback_metrics
    for key in ("val/AD@100", "val/AD@50", "val/AD@15", "val/IC@100", "val/ROAD_MoRF_AUC", "val/ROAD_LeRF_AUC"):
        assert key in metrics, key
    assert 0 <= float(metrics["val/AD@15"]) <= 100
    assert float(metrics["val/AD@100"]) == pytest.approx(callback.last_results["AD@100"])
    # the same figures from a fresh metric run on the same six images
    from ptame.evaluation.suite import build_metrics, compute_metrics, update_metrics

    suite = build_metrics(module.ptame.backbone, callback.metrics, has_masks=False)
    images = torch.stack([RandomImages(12)[i]["image"] for i in range(6)])
    update_metrics(suite, images, module.explainer()(images), {"index": torch.arange(6)})
    figures, _ = compute_metrics(suite)
    assert figures["AD@100"] == pytest.approx(callback.last_results["AD@100"], rel=1e-6)
    assert figures["ROAD_MoRF_AUC"] == pytest.approx(callback.last_results["ROAD_MoRF_AUC"])
    consistency = (tmp_path / "ddp_consistency.json").read_text()
    assert attention_state_digest(module) in consistency


def test_callback_settings_are_checked():
    with pytest.raises(ValueError, match="every_n_epochs"):
        FaithfulnessEvaluation(every_n_epochs=0)


def test_faithfulness_callback_refuses_a_bad_pointing_tolerance_at_construction():
    with pytest.raises(ValueError, match="pointing-game tolerance must be a finite number"):
        FaithfulnessEvaluation(metrics={"pointing_tolerance": -2})
    assert FaithfulnessEvaluation(metrics={"pointing_tolerance": 2}).metrics["pointing_tolerance"] == 2


class FakeClock(L.Callback):
    """Advances a fake ``perf_counter`` by a fixed time per training step."""

    def __init__(self, seconds_per_step: float) -> None:
        self.now, self.seconds_per_step = 100.0, seconds_per_step

    def perf_counter(self) -> float:
        return self.now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.now += self.seconds_per_step


def test_training_throughput_logs_images_per_second_and_estimates_the_epoch(tmp_path, monkeypatch, caplog):
    import types

    import ptame.callbacks
    from ptame.callbacks import TrainingThroughput

    clock = FakeClock(0.25)
    monkeypatch.setattr(ptame.callbacks, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    throughput = TrainingThroughput(warmup_steps=1, estimate_steps=2)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, log_every_n_steps=2,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[clock, throughput], num_sanity_val_steps=0, limit_val_batches=0,
    )
    with caplog.at_level("INFO", logger="ptame.callbacks"):
        trainer.fit(make_module(), datamodule=TinyData())
    # four batches of 4 images, 0.25 s each: 16 images/s; the estimate's window is steps 2-3
    assert throughput.estimate == {"images_per_second": 16.0, "seconds_per_step": 0.25, "epoch_seconds": 1.0}
    assert float(trainer.callback_metrics["train/images_per_second"]) == pytest.approx(16.0)
    assert "throughput 16 images/s (250.0 ms per step, steps 2-3); estimated epoch time 0.0 min for 4 steps" in caplog.text


def test_training_throughput_settings_are_checked():
    from ptame.callbacks import TrainingThroughput

    with pytest.raises(ValueError, match="estimate_steps >= 1"):
        TrainingThroughput(estimate_steps=0)


def test_a_batch_classifies_its_unmodified_images_once_for_every_explainer_and_metric():
    """evaluate_batch shares one forward of the unmodified images (SharedLogits) between the
    explainers' targets and the metrics' c*; the figures are those of separate forwards."""
    from ptame.evaluation.suite import build_metrics, evaluate_explainers
    from ptame.explainers import PTAMEExplainer
    from ptame.metrics.base import CPU_IMAGES_PER_FORWARD

    module = make_module()
    backbone = module.ptame.backbone
    explainers = {"a": PTAMEExplainer(module.ptame, "minmax"), "b": PTAMEExplainer(module.ptame, "sigmoid")}
    images = torch.rand(6, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    assert images.shape[0] <= CPU_IMAGES_PER_FORWARD  # one call for the unmodified images
    settings = {"adic": {"thresholds": [50, 15]}, "road": {"percentages": [30, 70], "imputer": "mean"},
                "insertion_deletion": {"steps": 4}}
    suites = {name: build_metrics(backbone, settings, False) for name in explainers}
    originals = []
    hook = backbone.register_forward_hook(
        lambda module, inputs, output: originals.append(torch.equal(inputs[0], images)))
    try:
        figures = evaluate_explainers(explainers, suites, [{"image": images, "index": torch.arange(6)}], "cpu")
    finally:
        hook.remove()
    assert originals.count(True) == 1  # was 2 explainers x (1 + 3 metrics) = 8
    for name, explainer in explainers.items():
        separate = build_metrics(backbone, settings, False)
        with torch.no_grad():
            maps = explainer(images).float()
            for metric in separate.values():
                metric.update(images, maps, torch.arange(6))
        for metric in separate.values():
            for key, value in metric.compute().items():
                assert figures[name][key] == pytest.approx(float(value), rel=1e-6, abs=1e-7), (name, key)
