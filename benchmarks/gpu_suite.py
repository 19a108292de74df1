"""Every GPU benchmark of ptame in one call, with one summary table (``make benchmark-gpu``).

Runs, each as its own process with a time limit, and keeps the figures each prints:

1. ``pytest -m gpu``: the checks that need a GPU (fused kernel, imputation, metrics on CPU vs GPU,
   no host synchronisation in a training step, nvJPEG crops);
2. ``benchmarks/train_step.py``: the training step in backbone forwards, batch 32 / 64 / 256, both
   class-subset modes, host synchronisations checked;
3. ``benchmarks/imputation.py``: noisy linear imputation, calls of 112 images (eager and CUDA
   graphs), then calls of 896 (the imputations of one ROAD batch of 64 images, one call on a GPU);
4. ``benchmarks/evaluation.py``: ROAD, the faithfulness callback and the Table 1 suite, extrapolated
   to 2000 images; P-TAME's cost in backbone forwards; bf16 against float32 figures;
5. ``benchmarks/input_pipeline.py``: the ImageNet loader, CPU and GPU decoding, per worker count;
6. ``train.py`` end to end on a synthetic ImageFolder (ResNet-50 / ResNet-18, random weights saved
   as state-dict files), batch 64 and 256: images/s and the estimated epoch time;
7. ``evaluate.py`` end to end on the 2000 test images with the checkpoint of step 6;
8. ``benchmarks/train_step.py --compile`` at batch 64 (``model.compile=true``) for each of
   ``--compile-modes`` (default: ``default`` and ``reduce-overhead``, i.e. with CUDA graphs);
9. ``train.py`` end to end at batch 64 with ``model.compile=true`` and the last of
   ``--compile-modes``. Compiling takes minutes, so these come last.

Budget: under 8 minutes on a 16-core one-GPU machine. Logs go to ``--out`` (default
``benchmark-gpu/``).

    python benchmarks/gpu_suite.py [--out DIR] [--root /tmp/ptame-synthetic-imagenet] [--skip ...]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(name: str, command: list[str], out: Path, timeout: float, summary: list) -> str:
    """Run ``command`` in the repository root; log to ``out/<name>.log``; return its output."""
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        output, status = result.stdout + result.stderr, f"exit {result.returncode}"
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        output += (error.stderr or b"").decode() if isinstance(error.stderr, bytes) else (error.stderr or "")
        status = f"timeout {timeout:.0f} s"
    seconds = time.perf_counter() - start
    (out / f"{name}.log").write_text(output)
    summary.append((name, status, seconds))
    print(f"--- {name}: {status} in {seconds:.0f} s", flush=True)
    return output


def lines(output: str, *patterns: str) -> list[str]:
    """The lines of ``output`` matching any of the regular expressions."""
    return [line.strip() for line in output.splitlines() if any(re.search(p, line) for p in patterns)]


def save_random_weights(folder: Path) -> dict[str, Path]:
    """State-dict files of randomly initialised ResNet-50 and ResNet-18 (offline stand-ins for the
    ImageNet weights: timing does not depend on the values; seeded)."""
    import torchvision

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for arch in ("resnet50", "resnet18"):
        path = folder / f"{arch}.pth"
        if not path.is_file():
            torch.manual_seed(0)
            torch.save(torchvision.models.get_model(arch).state_dict(), path)
        files[arch] = path
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmark-gpu")
    parser.add_argument("--root", default="/tmp/ptame-synthetic-imagenet")
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    parser.add_argument("--skip", nargs="*", default=[], help="step names to leave out")
    parser.add_argument("--device", default="cuda", help="cpu: rehearse the suite's commands on CPU")
    parser.add_argument("--decode", nargs="+", default=["cpu"],
                        help="data.decode of the end-to-end runs (several: one training run each)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256],
                        help="batch sizes of the end-to-end training runs")
    parser.add_argument("--profile", action="store_true",
                        help="also print the top kernels of one training step and one imputation call")
    parser.add_argument("--imputation-against", default=None, metavar="REV_OR_FILE",
                        help="time the calls of 896 imputations against this solver too (a git "
                             "revision, or a copy of its noisy_linear.py where the history is absent)")
    parser.add_argument("--compile-modes", nargs="+", default=["default", "reduce-overhead"],
                        help="model.compile_mode values of the compiled steps (the last: end to end)")
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="extra Hydra overrides of the end-to-end runs (e.g. to rehearse on CPU: "
                             "trainer=cpu +trainer.limit_train_batches=2 data.test_size=16)")
    parser.add_argument("--evaluate-overrides", nargs="*", default=[],
                        help="extra Hydra overrides of evaluate.py only (e.g. max_images=8)")
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds for the whole suite: each step's limit is cut to what is left, "
                             "so the summary is written before an outer time limit ends the call")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    summary: list[tuple[str, str, float]] = []
    figures: list[str] = []
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"ptame GPU suite on {name}, torch {torch.__version__}, {os.cpu_count()} CPU cores", flush=True)
    started = time.perf_counter()

    def step(name: str, command: list[str], timeout: float, *patterns: str) -> str:
        left = args.budget - (time.perf_counter() - started)
        if name in args.skip or left < 20:
            summary.append((name, "skipped" if name in args.skip else "no time left", 0.0))
            write_summary(out, summary, figures)
            return ""
        output = run(name, command, out, min(timeout, left), summary)
        found = lines(output, *patterns)
        figures.extend(f"[{name}] {line}" for line in found)
        for line in found:
            print("   ", line, flush=True)
        write_summary(out, summary, figures)
        return output

    step("gpu-tests", [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                       "tests/test_gpu.py", "tests/test_data_gpu_decoding.py"], 240,
         r"passed|failed|error", r"^FAILED", r"^E ")
    profile = ["--profile"] if args.profile else []
    step("train-step", [python, "benchmarks/train_step.py", "--check-syncs", "--device", args.device, *profile], 240,
         r"^\s+\d+\s+(batch|random)", r"device=", r"synchronisation")
    step("imputation", [python, "benchmarks/imputation.py", "--device", args.device, "--images", "16",
                        "--images-per-call", "8", "--scipy-images", "0", "--repeats", "3", "--cuda-graphs",
                        *profile], 180,
         r"ptame", r"images .* RGB", r"CUDA graphs")
    against = ["--against", args.imputation_against] if args.imputation_against else []
    per_call = "64" if args.device != "cpu" else "2"  # a CPU rehearsal: the command, not the size
    step("imputation-896", [python, "benchmarks/imputation.py", "--device", args.device, "--images", per_call,
                            "--images-per-call", per_call, "--scipy-images", "0", "--repeats", "2", *against],
         120, r"ptame", r"images .* RGB", r"against")
    step("evaluation", [python, "benchmarks/evaluation.py", "--device", args.device], 300,
         r"P-TAME explanation|ROAD \(|faithfulness|Table 1|float32|bf16|device=")
    from synthetic_imagefolder import make_imagefolder

    start = time.perf_counter()
    make_imagefolder(args.root, 1000, args.train_per_class, 4)
    print(f"synthetic ImageFolder ready in {time.perf_counter() - start:.0f} s", flush=True)
    step("input-pipeline", [python, "benchmarks/input_pipeline.py", "--root", args.root,
                            "--per-class", str(args.train_per_class), "--workers", "8", str(args.workers)],
         240, r"^\s+(cpu|gpu)\s+\d+", r"GPU vs CPU")
    weights = save_random_weights(Path(args.root) / "weights")  # beside the folder: kept out of --out
    common = [
        "experiment=table1_resnet50", f"paths.imagenet_root={args.root}", "backbone.weights=null",
        f"backbone.checkpoint_path={weights['resnet50']}", "auxiliary.weights=null",
        f"auxiliary.checkpoint_path={weights['resnet18']}", f"data.num_workers={args.workers}",
        *args.overrides,
    ]
    checkpoint = None
    for decode in args.decode:
        for batch in args.batch_sizes:
            name = f"train-b{batch}" + (f"-{decode}" if len(args.decode) > 1 else "")
            run_dir = out / name.replace("-", "_")
            step(name, [python, "train.py", *common, f"data.decode={decode}", f"data.batch_size={batch}",
                        "callbacks=default", "final_evaluation.overlay_images=0",
                        f"hydra.run.dir={run_dir}"], 420,
                 r"throughput .* images/s", r"Error|error:")
            if (run_dir / "checkpoints" / "last.ckpt").is_file():
                checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if checkpoint is not None:
        start = time.perf_counter()
        step("evaluate-2000", [python, "evaluate.py", *common, f"data.decode={args.decode[0]}",
                               f"ckpt_path={checkpoint}",
                               "explainers=[ptame]", *args.evaluate_overrides,
                                 f"hydra.run.dir={out / 'evaluate'}"], 420,
             r"Results on", r"^\| ptame", r"cost of", r"Error|error:")
        figures.append(f"[evaluate-2000] wall time {time.perf_counter() - start:.1f} s (process start included)")

    # last: compilation takes minutes; one batch size, the paper's class-subset mode
    step("train-step-compile", [python, "benchmarks/train_step.py", "--compile", "--device", args.device,
                                "--compile-modes", *args.compile_modes,
                                "--batch-sizes", "64", "--modes", "random", "--repeats", "10"], 360,
         r"^\s+\d+\s+(batch|random)", r"device=")
    run_dir = out / "train_b64_compile"
    step("train-b64-compile", [python, "train.py", *common, f"data.decode={args.decode[0]}", "data.batch_size=64",
                               "model.compile=true", f"model.compile_mode={args.compile_modes[-1]}",
                               "callbacks=default", "final_evaluation.overlay_images=0",
                               f"hydra.run.dir={run_dir}"], 420,
         r"throughput .* images/s", r"Error|error:")

    print("\n==================== summary ====================")
    print(f"{'step':<16} {'status':<14} {'seconds':>8}")
    for name, status, seconds in summary:
        print(f"{name:<16} {status:<14} {seconds:>8.0f}")
    print(f"total {time.perf_counter() - started:.0f} s\n")
    print("\n".join(figures))
    write_summary(out, summary, figures)


def write_summary(out: Path, summary: list[tuple[str, str, float]], figures: list[str]) -> None:
    """Write ``out/summary.txt`` (after every step, so a run cut short keeps what it measured)."""
    rows = [f"{name:<16} {status:<14} {seconds:>8.0f}" for name, status, seconds in summary]
    (out / "summary.txt").write_text("\n".join(rows + [""] + figures) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
