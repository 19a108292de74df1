"""Where a GPU (or CPU) call spends its time: the top kernels of one profiled call, for the
benchmarks' ``--profile`` option."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def print_profile(function: Callable[[], object], device: torch.device, label: str, top: int = 12) -> None:
    """Run ``function`` once under torch.profiler and print its ``top`` operators by self device
    time (CUDA) or self CPU time, with the number of kernel launches and host synchronisations
    (``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` / ``aten::item``)."""
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    if on_gpu:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as profiler:
        function()
        if on_gpu:
            torch.cuda.synchronize(device)
    events = profiler.key_averages()
    sort_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    total = sum(getattr(event, sort_key) for event in events) or 1.0
    launches = sum(event.count for event in events if event.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                     "cudaLaunchKernelExC"))
    syncs = sum(event.count for event in events if event.key in (
        "cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item"))
    print(f"  profile {label}: {'device' if on_gpu else 'CPU'} time {total / 1e3:.1f} ms, "
          f"{launches} kernel launches, {syncs} host synchronisations / scalar reads")
    for event in sorted(events, key=lambda e: getattr(e, sort_key), reverse=True)[:top]:
        share = getattr(event, sort_key) / total
        print(f"    {share:6.1%} {getattr(event, sort_key) / 1e3:8.2f} ms x{event.count:<5d} {event.key[:90]}")
