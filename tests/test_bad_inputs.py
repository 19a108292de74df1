"""A corpus of bad inputs (checkpoints for now) through the API and the real entry points: each
gets a clear error naming the file, what it is and what was expected, and nothing in it runs."""

from __future__ import annotations

import os

import pytest
import torch

from ptame.checkpoint import read_checkpoint
from ptame.io import UnsafeCheckpointError

from .helpers.configs import compose_config

TINY_TRAINING = [
    "experiment=smoke", "run_name=test", "data.num_train=128", "data.num_val=32", "data.num_test=32",
    "data.batch_size=32", "data.eval_batch_size=16", "backbone.epochs=1", "auxiliary.epochs=1",
    "backbone.min_accuracy_above_chance=null", "auxiliary.min_accuracy_above_chance=null",  # plumbing only
    "final_evaluation.max_images=8", "final_evaluation.overlay_images=0", "trainer.max_epochs=1",
]


class _RunsCode:
    """Pickles to a call of os.system that creates a marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_bad_checkpoints(folder, good=None) -> dict[str, tuple]:
    """{kind: (path, expected message pattern)}; ``good`` (a real checkpoint) gives a truncated copy."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = {}
    (folder / "empty.ckpt").write_bytes(b"")
    corpus["empty"] = (folder / "empty.ckpt", "the file is empty \\(0 bytes\\)")
    (folder / "notes.ckpt").write_text("epoch=3 loss=0.2\n")
    corpus["text"] = (folder / "notes.ckpt", "it is a text file \\(it starts with b'epoch=3")
    data = (good.read_bytes() if good is not None else _saved_bytes(folder))
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    corpus["truncated"] = (folder / "truncated.ckpt", "the file is truncated or corrupt")
    torch.save({"state_dict": {}, "payload": _RunsCode(folder / "marker")}, folder / "unsafe.ckpt")
    corpus["unsafe"] = (folder / "unsafe.ckpt", "refusing checkpoint .* pickled objects")
    return corpus


def _saved_bytes(folder) -> bytes:
    torch.save({"weights": torch.ones(1000)}, folder / "whole.ckpt")
    return (folder / "whole.ckpt").read_bytes()


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "unsafe"])
def test_bad_checkpoints_are_refused_clearly_and_run_nothing(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a user's environment may say so
    path, message = write_bad_checkpoints(tmp_path)[kind]
    with pytest.raises(ValueError, match=message) as error:
        read_checkpoint(path)
    assert str(path) in str(error.value)
    assert "will likely succeed" not in str(error.value)  # never the advice to load unsafely
    assert isinstance(error.value, UnsafeCheckpointError) == (kind == "unsafe")
    assert not (tmp_path / "marker").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from ptame.pipelines.train import run_training

    cache, run_dir = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("run")
    run_training(compose_config("train", [*TINY_TRAINING, f"paths.cache_dir={cache}", "trainer.max_epochs=2",
                                          "callbacks.checkpoint.save_top_k=-1",
                                          "+callbacks.checkpoint.every_n_epochs=1"]), run_dir)
    (first_epoch,) = (run_dir / "checkpoints").glob("epoch=0-*.ckpt")
    return cache, first_epoch


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "unsafe"])
def test_resume_from_a_bad_checkpoint_is_refused_before_training(tmp_path, monkeypatch, trained, kind):
    from ptame.pipelines.train import run_training

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cache, good = trained
    path, message = write_bad_checkpoints(tmp_path / "bad", good)[kind]
    cfg = compose_config("train", [*TINY_TRAINING, f"paths.cache_dir={cache}", f"resume_from='{path}'"])
    with pytest.raises(ValueError, match=message):
        run_training(cfg, tmp_path / "resumed")
    assert not (tmp_path / "bad" / "marker").exists()
    assert not (tmp_path / "resumed" / "checkpoints").exists()


def test_resume_from_a_good_checkpoint_loads_weights_only_and_trains_on(tmp_path, monkeypatch, trained):
    from ptame.pipelines.train import run_training

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cache, good = trained
    cfg = compose_config("train", [*TINY_TRAINING, f"paths.cache_dir={cache}", f"resume_from='{good}'",
                                   "trainer.max_epochs=2"])  # the interrupted run's own length
    run_training(cfg, tmp_path / "resumed")
    resumed = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    uninterrupted = read_checkpoint(good.parent / "last.ckpt")
    assert resumed["global_step"] == uninterrupted["global_step"]
    assert resumed["global_step"] == 2 * read_checkpoint(good)["global_step"]


# ---- the library API: images, maps, targets and batches -------------------------------------


def _api_objects():
    from ptame.explainers import CentreGaussianExplainer
    from ptame.metrics import ROAD, AverageDropIncrease, InsertionDeletion

    from .helpers.networks import make_backbone

    backbone = make_backbone()
    metrics = {
        "AverageDropIncrease": AverageDropIncrease(backbone, thresholds=[100, 50]),
        "ROAD": ROAD(backbone, percentages=[50]),
        "InsertionDeletion": InsertionDeletion(backbone, steps=4),
    }
    return backbone, CentreGaussianExplainer(backbone), metrics


BAD_IMAGES = {
    "nan": (lambda x: x.masked_fill(x > 0.9, float("nan")), "NaN or infinite"),
    "infinite": (lambda x: x.masked_fill(x > 0.9, float("inf")), "NaN or infinite"),
    "0-255": (lambda x: x * 255, "divide them by 255"),
    "[-1, 1]": (lambda x: x * 2 - 1, r"pass \(images \+ 1\) / 2"),
    "normalised": (lambda x: (x - 0.45) / 0.05, "look normalised"),
}


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_images_that_are_not_finite_values_in_0_1_are_refused_by_explainers_and_metrics(kind):
    _, explainer, metrics = _api_objects()
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    spoil, message = BAD_IMAGES[kind]
    with pytest.raises(ValueError, match=f"explainer 'centre_gaussian': .*{message}"):
        explainer(spoil(images))
    maps = explainer(images)
    for who, metric in metrics.items():
        with pytest.raises(ValueError, match=f"{who}: .*{message}"):
            metric.update(spoil(images), maps, torch.arange(2))


def test_soft_ad_ic_maps_outside_0_1_are_refused():
    from ptame.metrics import AverageDropIncrease

    from .helpers.networks import make_backbone

    metric = AverageDropIncrease(make_backbone(), thresholds=[100], soft=True)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]; got values in \[0, 100\]: normalise"):
        metric.update(torch.rand(2, 3, 8, 8), torch.linspace(0, 100, 128).view(2, 8, 8), torch.arange(2))


@pytest.mark.parametrize("targets, error, message", [
    (torch.tensor([-1, 0]), ValueError, r"target class -1 is not a class of the backbone \(valid: \[0, 4\]"),
    (torch.tensor([0, 5]), ValueError, r"target class 5 is not a class of the backbone \(valid: \[0, 4\]"),
    (torch.tensor([1.0, 2.0]), TypeError, "targets must be integer class ids, got dtype torch.float32"),
    (torch.tensor([True, False]), TypeError, "targets must be integer class ids, got dtype torch.bool"),
    (torch.tensor([1, 2, 3]), ValueError, "got 3 targets for 2 images"),
])
def test_targets_that_are_not_class_ids_of_the_backbone_are_refused(targets, error, message):
    _, explainer, _ = _api_objects()
    with pytest.raises(error, match=message):
        explainer(torch.rand(2, 3, 16, 16), targets)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_half_and_double_images_just_work(dtype):
    from ptame.explainers.cam import CAMExplainer
    from ptame.metrics import AverageDropIncrease

    from .helpers.networks import make_backbone

    backbone = make_backbone()
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16)
    explainer = CAMExplainer(backbone, "gradcam", target_layer="features")
    expected = explainer(images)
    assert torch.allclose(explainer(images.to(dtype)), expected, atol=2e-3)
    reference, other = AverageDropIncrease(backbone, thresholds=[50]), AverageDropIncrease(backbone, thresholds=[50])
    reference.update(images, expected, torch.arange(3))
    other.update(images.to(dtype), expected.to(dtype), torch.arange(3))
    assert other.compute()["AD@50"] == pytest.approx(float(reference.compute()["AD@50"]), abs=0.5)


def test_an_empty_batch_leaves_every_metric_unchanged():
    _, explainer, metrics = _api_objects()
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    maps = explainer(images)
    for who, metric in metrics.items():
        metric.update(images, maps, torch.arange(2))
        before = metric.compute()
        metric.update(images[:0], maps[:0], torch.arange(0))
        after = metric.compute()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), who


# ---- image files -----------------------------------------------------------------------------


def test_16_bit_greyscale_pngs_keep_their_dynamic_range(tmp_path):
    import numpy as np
    from PIL import Image

    from ptame.data.imagefolder import load_rgb_image

    ramp = np.linspace(0, 65535, 32 * 64).reshape(32, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "I;16"
    loaded = np.asarray(load_rgb_image(tmp_path / "depth.png")).astype(np.float64)
    assert loaded.shape == (32, 64, 3) and (loaded[..., 0] == loaded[..., 2]).all()
    assert np.abs(loaded[..., 0] - ramp / 257).max() <= 0.5  # not clipped to white above 255
    assert loaded.min() == 0 and loaded.max() == 255 and np.median(loaded) == pytest.approx(127.5, abs=1)
    floats = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(floats, mode="F").save(tmp_path / "float.tiff")
    assert np.asarray(load_rgb_image(tmp_path / "float.tiff"))[..., 1].max() == 255


def test_photos_are_turned_upright_by_their_exif_orientation_but_dataset_images_are_not(tmp_path):
    import numpy as np
    from PIL import Image

    from ptame.data.imagefolder import load_rgb_image

    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :30] = (250, 10, 10)  # left half red, as stored
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    stored = np.asarray(load_rgb_image(tmp_path / "phone.jpg"))
    upright = np.asarray(load_rgb_image(tmp_path / "phone.jpg", exif_orientation=True))
    assert stored.shape == (40, 60, 3) and upright.shape == (60, 40, 3)
    assert upright[:30, :, 0].mean() > 200 and upright[30:, :, 0].mean() < 50  # red on top once upright


# ---- unreadable files in a dataset: data.bad_images ------------------------------------------


def _folder_with_bad_files(root, bad: int = 2):
    """train/ and val/ with classes a and b, 6 good JPEGs each, plus ``bad`` corrupt files in
    train/a and val/a (a truncated JPEG, a zero-byte file, ...)."""
    import io

    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(6):
                pixels = np.full((40, 50, 3), 60 + 120 * (label == "b") + index, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.JPEG")
        encoded = io.BytesIO()
        Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(encoded, format="JPEG")
        kinds = [encoded.getvalue()[:60], b"", b"not an image at all"]
        for number in range(bad):
            (root / split / "a" / f"bad{number}.JPEG").write_bytes(kinds[number % len(kinds)])
    return root


def _module(root, **kwargs):
    from ptame.data.imagefolder import ImageFolderDataModule

    defaults = dict(val_size=4, test_size=10, resize_size=32, crop_size=28, batch_size=4, eval_batch_size=4,
                    num_workers=0, pin_memory=False)
    return ImageFolderDataModule(root, **{**defaults, **kwargs})


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_skip_leaves_unreadable_files_out_and_records_each_once(tmp_path, caplog, decode):
    from ptame.data.imagefolder import ImageReadError

    root = _folder_with_bad_files(tmp_path / "data")
    module = _module(root, decode=decode, max_bad_share=0.5)
    assert module.use_bad_image_policy("skip", tmp_path / "run" / "skipped_images.txt") == "skip"
    module.setup("fit")
    seen = []
    for _ in range(2):  # two epochs: each bad file is logged and written once
        for batch in module.train_dataloader():
            batch = module.on_before_batch_transfer(batch, 0)
            assert "skipped" not in batch
            seen += batch["path"]
    # 3 batches of 4 slots per epoch (drop_last), minus the slots the bad files drew
    assert not any("bad" in path for path in seen) and 2 * 12 - 4 <= len(seen) <= 2 * 12
    listed = (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()
    assert sorted(line.split(": ")[0].rsplit("/", 1)[1] for line in listed) == ["bad0.JPEG", "bad1.JPEG"]
    assert caplog.text.count("skipped an unreadable image") == 2 and len(module.skipped_images) == 2
    strict = _module(root, decode=decode)
    strict.use_bad_image_policy("error")
    strict.setup("fit")
    with pytest.raises(ImageReadError, match="bad[01].JPEG"):
        for batch in strict.train_dataloader():
            pass


def test_a_batch_of_unreadable_files_only_comes_out_empty():
    from ptame.data.bad_images import SkippingCollate

    batch = SkippingCollate(28, torch.uint8)([{"skipped": "x.JPEG: broken", "index": 3}])
    assert batch["image"].shape == (0, 3, 28, 28) and batch["image"].dtype == torch.uint8
    assert batch["label"].numel() == batch["index"].numel() == 0 and batch["skipped"] == ["x.JPEG: broken"]


def test_too_many_unreadable_files_end_the_run_naming_the_share(tmp_path):
    from ptame.data.bad_images import TooManyBadImagesError

    root = _folder_with_bad_files(tmp_path / "data", bad=3)
    module = _module(root, max_bad_share=0.1)  # 3 of 15 training images is 20 %
    module.use_bad_image_policy("skip", tmp_path / "skipped_images.txt")
    module.setup("fit")
    with pytest.raises(TooManyBadImagesError, match=r"2 of 15 images could not be read, more than "
                                                    r"data.max_bad_share=0.1 allows; the list is in"):
        for batch in module.train_dataloader():
            module.on_before_batch_transfer(batch, 0)
    configured = _module(root, bad_images="error")  # the configured policy wins over the entry point's
    assert configured.use_bad_image_policy("skip") == "error"


def test_an_evaluation_with_skip_reports_the_images_it_covered(tmp_path):
    import lightning as L

    from ptame.evaluation.suite import ExplainerEvaluation
    from ptame.explainers import CentreGaussianExplainer

    from .helpers.networks import make_backbone

    root = _folder_with_bad_files(tmp_path / "data")
    module = _module(root, val_size=2, test_size=12, max_bad_share=0.5)
    module.use_bad_image_policy("skip")
    module.setup("test")
    backbone = make_backbone()
    evaluation = ExplainerEvaluation({"centre": CentreGaussianExplainer(backbone)}, backbone,
                                     {"adic": {"thresholds": [50]}, "localisation": False}, has_masks=False,
                                     skipped_images=module.skipped_images)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.test(evaluation, dataloaders=module.test_dataloader(), verbose=False)
    bad_in_test = sum("bad" in path for path, _ in module.test_dataset.samples)
    assert bad_in_test >= 1
    assert evaluation.results["centre"]["images_evaluated"] == 12 - bad_in_test
    assert len(module.skipped_images) == bad_in_test


def test_results_json_lists_the_skipped_files_beside_the_methods(tmp_path):
    import json

    from ptame.evaluation.tables import write_tables

    results = {"ptame": {"AD@50": 10.0, "images_evaluated": 1998.0, "images_skipped": 2.0}}
    write_tables(tmp_path, results, {"skipped_images": ["a.JPEG: truncated", "b.JPEG: empty"]})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["skipped_images"] == ["a.JPEG: truncated", "b.JPEG: empty"] and saved["ptame"] == results["ptame"]
    assert "skipped_images" not in (tmp_path / "results.md").read_text()


# ---- through the entry point -----------------------------------------------------------------


def test_train_py_refuses_bad_resumes_empty_trainings_and_gpu_presets_without_a_gpu(tmp_path):
    from .helpers.entry_points import failure_output, run_entry_point

    (tmp_path / "notes.ckpt").write_text("epoch=3 loss=0.2\n")
    cases = [
        ("experiment=smoke", f"resume_from='{tmp_path / 'notes.ckpt'}'", "it is a text file"),
        ("experiment=smoke", "trainer.max_epochs=0", "trainer.max_epochs=0 trains nothing"),
    ]
    if not torch.cuda.is_available():
        cases.append(("experiment=table1_resnet50", "paths.imagenet_root=/nowhere",
                      "this preset expects a GPU (trainer.accelerator=gpu) and none is available here; "
                      "add trainer=cpu"))
    for experiment, override, message in cases:
        result = run_entry_point("train.py", experiment, f"paths.cache_dir={tmp_path / 'cache'}",
                                 f"hydra.run.dir={tmp_path / 'run'}", override, timeout=300)
        assert result.returncode != 0 and message in failure_output(result), failure_output(result)


@pytest.mark.parametrize("entry_point", ["train.py", "evaluate.py", "sweep.py", "explain.py", "export.py"])
def test_help_starts_with_what_the_entry_point_does_and_examples(entry_point):
    from .helpers.entry_points import run_entry_point

    result = run_entry_point(entry_point, "--help", timeout=120)
    assert result.returncode == 0
    head = result.stdout.split("== Configuration groups ==")[0]
    assert head.startswith(f"{entry_point}: ") and f"python {entry_point} " in head and "Examples:" in head


def test_an_evaluation_stops_between_explainers_when_a_sigterm_arrives():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ptame.evaluation.suite import build_metrics, evaluate_batch
    from ptame.explainers import CentreGaussianExplainer, RandomExplainer

    from .helpers.networks import make_backbone

    backbone = make_backbone()
    calls = []

    class Counting(CentreGaussianExplainer):
        def explain(self, images, targets):
            calls.append(1)
            return super().explain(images, targets)

    explainers = {"first": Counting(backbone), "second": RandomExplainer(backbone)}
    suites = {name: build_metrics(backbone, {"adic": {"thresholds": [50]}, "localisation": False}, False)
              for name in explainers}
    batch = {"image": torch.rand(2, 3, 16, 16), "index": torch.arange(2)}
    signals = iter([False, False, True])  # a SIGTERM arrives after the first explainer's metric
    with pytest.raises(SIGTERMException):
        evaluate_batch(explainers, suites, batch, should_stop=lambda: next(signals))
    assert calls == [1]  # the second explainer never ran
