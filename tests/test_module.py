import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ptame.checkpoint import CheckpointMismatchError, read_checkpoint
from ptame.explainers import load_explainer
from ptame.module import PTAMEModule
from ptame.losses import PTAMELoss

from .helpers.networks import make_auxiliary, make_backbone


class RandomImages(Dataset):
    def __init__(self, count: int = 16, size: int = 20) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(count, 3, size, size, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": torch.tensor(0), "index": torch.tensor(index)}


def make_module(backbone=None, auxiliary=None, **kwargs) -> PTAMEModule:
    return PTAMEModule(
        backbone or make_backbone(),
        auxiliary or make_auxiliary(),
        PTAMELoss(ce_weight=1.0, area_weight=1.0, variation_weight=0.1, class_subset="random", subset_size=2),
        lr=1e-2,
        input_size=(20, 20),
        **kwargs,
    )


def fit(module: PTAMEModule, tmp_path, steps: int = 3) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(RandomImages(), batch_size=4))
    return trainer


def frozen_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if not k.startswith("ptame.attention.")}


def test_inferred_shapes():
    module = make_module()
    assert module.ptame.feature_channels == [4, 6, 8]
    assert module.ptame.feature_sizes == [[10, 10], [5, 5], [3, 3]]
    assert module.ptame.map_size == [10, 10] and module.ptame.resolution == 100
    assert module.ptame.num_classes == 5


def test_training_changes_only_the_attention_and_frozen_networks_stay_in_eval(tmp_path):
    module = make_module()
    before_frozen = frozen_state(module)
    before_attention = {k: v.clone() for k, v in module.ptame.attention.state_dict().items()}
    fit(module, tmp_path)
    assert not module.ptame.backbone.training and not module.ptame.auxiliary.training
    assert all(not m.training for m in module.ptame.backbone.modules())
    assert all(not m.training for m in module.ptame.auxiliary.modules())
    for key, value in frozen_state(module).items():
        assert torch.equal(value, before_frozen[key]), f"frozen tensor {key} changed"
    changed = [k for k, v in module.ptame.attention.state_dict().items() if not torch.equal(v, before_attention[k])]
    assert "fusion.weight" in changed
    assert all(not p.requires_grad for p in module.ptame.backbone.parameters())
    assert all(not p.requires_grad for p in module.ptame.auxiliary.parameters())


def test_backbone_gets_no_weight_gradients_only_the_masked_image_does():
    module = make_module()
    terms = module.compute_loss(torch.rand(4, 3, 20, 20))
    terms["loss"].backward()
    assert all(p.grad is None for p in module.ptame.backbone.parameters())
    assert all(p.grad is None for p in module.ptame.auxiliary.parameters())
    assert module.ptame.attention.fusion.weight.grad is not None
    assert module.ptame.attention.fusion.weight.grad.abs().sum() > 0


def test_channels_last_reaches_the_training_copies_only_so_maps_do_not_depend_on_it(tmp_path):
    """model.channels_last converts the frozen networks' training copies; the original networks
    and the attention (used by the explainer and the metrics) keep their memory format, so the
    maps of a trained module are bit for bit those of the same weights with channels_last off."""
    module = make_module(channels_last=True)
    fit(module, tmp_path)
    backbone_copy, auxiliary_copy = module.frozen_networks()
    copies = [p for network in (backbone_copy, auxiliary_copy) for p in network.parameters() if p.ndim == 4]
    assert copies and all(p.is_contiguous(memory_format=torch.channels_last) for p in copies)
    originals = [p for p in module.ptame.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert originals and all(p.is_contiguous() and not p.is_contiguous(memory_format=torch.channels_last)
                             for p in originals)

    contiguous = make_module(channels_last=False)
    contiguous.ptame.attention.load_state_dict(module.ptame.attention.state_dict())
    images = torch.rand(3, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    module.eval(), contiguous.eval()
    expected = contiguous.explainer()(images)
    assert torch.equal(module.explainer()(images), expected)
    assert expected.std() > 0


def test_checkpoint_holds_only_the_head_and_round_trips_to_identical_maps(tmp_path):
    module = make_module()
    trainer = fit(module, tmp_path)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code
    assert all(k.startswith("ptame.attention.") for k in checkpoint["state_dict"])
    meta = checkpoint["ptame"]
    assert meta["backbone"]["name"] == "tiny-classifier"
    assert meta["auxiliary"]["layers"] == ["level1", "level2", "level3"]
    assert meta["num_classes"] == 5 and meta["map_size"] == [10, 10]

    images = torch.rand(3, 3, 20, 20)
    module.eval()
    expected = module.explainer()(images)
    explainer = load_explainer(path, make_backbone(), make_auxiliary())
    assert torch.equal(explainer(images), expected)
    assert expected.shape == (3, 20, 20) and 0 <= expected.min() and expected.max() <= 1


def test_resuming_training_from_a_checkpoint_restores_the_head(tmp_path):
    module = make_module()
    trainer = fit(module, tmp_path, steps=2)
    path = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(path)
    resumed = make_module()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(resumed, DataLoader(RandomImages(), batch_size=4), ckpt_path=path)
    for key, value in module.ptame.attention.state_dict().items():
        assert torch.equal(resumed.ptame.attention.state_dict()[key], value)


@pytest.mark.parametrize(
    "backbone, auxiliary, message",
    [
        (lambda: make_backbone(name="other-classifier"), make_auxiliary, "trained with backbone 'tiny-classifier' but the backbone given is 'other-classifier'"),
        (lambda: make_backbone(seed=7), make_auxiliary, "backbone 'tiny-classifier' had other weights"),
        (make_backbone, lambda: make_auxiliary(seed=9), "auxiliary 'tiny-pyramid' had other weights"),
    ],
)
def test_checkpoint_for_other_networks_is_refused(tmp_path, backbone, auxiliary, message):
    module = make_module()
    trainer = fit(module, tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(CheckpointMismatchError, match=message):
        load_explainer(tmp_path / "a.ckpt", backbone(), auxiliary())


def test_checkpoint_with_another_class_count_is_refused(tmp_path):
    module = make_module()
    trainer = fit(module, tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(CheckpointMismatchError):
        load_explainer(tmp_path / "a.ckpt", make_backbone(num_classes=7, name="tiny-7"), make_auxiliary())


def test_unreadable_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.ckpt"):
        read_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_non_finite_loss_stops_training_with_a_clear_error(tmp_path):
    module = make_module()
    with torch.no_grad():
        module.ptame.attention.fusion.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="not finite"):
        fit(module, tmp_path, steps=1)


class RecordLoss(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def train_losses(tmp_path, steps: int, **kwargs) -> tuple[PTAMEModule, list[float]]:
    """Loss per step over ``steps`` steps on one repeated batch of 8 images (lr 0.05)."""
    torch.manual_seed(0)
    module = make_module(make_backbone(), make_auxiliary(), **kwargs)
    module.hparams.lr = 5e-2
    record = RecordLoss()
    images = RandomImages(8)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False,
        callbacks=[record], num_sanity_val_steps=0, limit_val_batches=0,
    )
    loader = DataLoader(torch.utils.data.Subset(images, [0] * 8 * steps), batch_size=8)
    trainer.fit(module, train_dataloaders=loader)
    return module, record.losses


@pytest.mark.parametrize("compile_mode", ["default", "reduce-overhead"])
def test_compiled_frozen_networks_train_and_give_the_eager_losses(tmp_path, compile_mode):
    """``model.compile=true`` on CPU (torch.compile of the frozen networks' training copies):
    a few steps train, the loss falls, and each step's loss is the eager run's. On CPU
    ``reduce-overhead`` has no CUDA graphs to replay; it must still compile and train."""
    compiled, compiled_losses = train_losses(tmp_path / "compiled", 6, compile=True,
                                             compile_mode=compile_mode)
    _, eager_losses = train_losses(tmp_path / "eager", 6, compile=False)
    backbone, auxiliary = compiled.frozen_networks()
    assert isinstance(backbone, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(auxiliary, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled_losses[-1] < 0.9 * compiled_losses[0], compiled_losses
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)


def test_unknown_compile_mode_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="model.compile_mode must be one of .*reduce-overhead"):
        make_module(compile=True, compile_mode="fast")


def test_attention_optimiser_is_fused_adamw_with_the_per_tensor_loops_updates():
    """The fused kernel is the same AdamW (amsgrad, decoupled weight decay): three steps on the
    same gradients move the weights as the per-tensor loop does, to float rounding."""
    module = make_module()
    optimizer = module.make_optimizer()
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW) and group["fused"] is True
    assert group["amsgrad"] is True and group["weight_decay"] == 0.01 and group["lr"] == 1e-2
    parameters = list(module.ptame.attention.parameters())
    assert [id(p) for p in group["params"]] == [id(p) for p in parameters]
    starts = [p.detach().clone() for p in parameters]
    copies = [p.detach().clone().requires_grad_(True) for p in parameters]
    loop = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.01, amsgrad=True, foreach=False)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        for fused_parameter, loop_parameter in zip(parameters, copies):
            gradient = torch.randn(fused_parameter.shape, generator=generator)
            fused_parameter.grad, loop_parameter.grad = gradient.clone(), gradient.clone()
        optimizer.step()
        loop.step()
    for fused_parameter, loop_parameter, start in zip(parameters, copies, starts, strict=True):
        assert (fused_parameter.detach() - start).abs().max() > 1e-3  # the steps moved it
        torch.testing.assert_close(fused_parameter.detach(), loop_parameter.detach(), rtol=1e-6, atol=1e-7)


def test_training_terms_are_logged_on_logging_steps_and_the_last_step_only(tmp_path):
    """Lightning writes a training step's logs every ``log_every_n_steps`` steps; the terms are
    logged on those steps and the last one (whose values are the final ones), not on the others."""
    torch.manual_seed(0)
    module = make_module()
    record = RecordLoss()
    logged_at: list[int] = []
    log = module.log

    def recording_log(name, value, *args, **kwargs):
        if name == "train/loss":
            logged_at.append(module.global_step)
            assert module.trainer._logger_connector.should_update_logs or module.global_step == 4
        return log(name, value, *args, **kwargs)

    module.log = recording_log
    trainer = L.Trainer(
        accelerator="cpu", max_steps=5, log_every_n_steps=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False,
        callbacks=[record],
    )
    trainer.fit(module, DataLoader(RandomImages(), batch_size=4))
    assert logged_at == [1, 3, 4]
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(record.losses[-1])
