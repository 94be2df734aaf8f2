"""What a training run measures: the device's peak FLOP/s (for MFU) and means over ranks. The step
log they feed is written and read by ``model.steplog``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

# Dense bf16 peak FLOP/s of known accelerators (vendor datasheets, no sparsity).
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "4090": 165e12,
}


def _cpu_ghz() -> tuple[float, str, bool]:
    """The CPU's clock, where it was read, and whether it is the highest the cores reach:
    cpufreq's maximum, else the clock /proc/cpuinfo reports (a base clock on many VMs)."""
    try:
        path = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
        return int(path.read_text()) / 1e6, "cpufreq max", True
    except (OSError, ValueError):
        pass
    try:
        mhz = [
            float(line.split(":")[1])
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("cpu MHz")
        ]
        if mhz:
            return max(mhz) / 1e3, "/proc/cpuinfo", False
    except (OSError, ValueError):
        pass
    return 3.0, "assumed 3 GHz", False


def timed_matmul_flops(repeats: int = 10, n: int = 1024) -> float:
    """The best fp32 FLOP/s of ``repeats`` timed n x n matrix products (~5 ms each at n = 1024)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


# A large fp32 matmul reaches about 85% of a core's peak, and one timing does not catch the top
# clock: the roof is set this much above the clock the timing implies.
TURBO_HEADROOM = 1.2


def cpu_peak(threads: int | None = None) -> tuple[float, str]:
    """Theoretical fp32 peak of the cores torch uses: cores x clock x FLOPs per cycle, with two FMA
    units per core (2 FLOPs each per vector lane), a roof that measured throughput cannot pass.

    The clock is cpufreq's maximum where the kernel exposes it. A virtual machine often does not,
    and its /proc/cpuinfo gives the base clock while the cores turbo above it (a 2.6 GHz VM here
    timed 384 GFLOP/s against a 333 GFLOP/s roof). There the clock is at least what a matmul timed
    now implies (~50 ms, once per run, never cached: a timing from a slower moment would put the
    roof under a later one), times TURBO_HEADROOM."""
    cores = min(threads or torch.get_num_threads(), os.cpu_count() or 1)
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    lanes, isa = (
        (16, "AVX-512")
        if "avx512f" in flags
        else (8, "AVX2+FMA")
        if {"avx2", "fma"} <= flags
        else (4, "128-bit SIMD")
    )
    flop_per_cycle = 2 * 2 * lanes
    ghz, clock, is_max = _cpu_ghz()
    if not is_max:
        timed = TURBO_HEADROOM * timed_matmul_flops() / (cores * flop_per_cycle * 1e9)
        if timed > ghz:
            ghz, clock = timed, f"turbo above the reported {ghz:.2f} GHz, from a timed matmul"
    peak = cores * ghz * 1e9 * flop_per_cycle
    return (
        peak,
        f"fp32 theoretical: {cores} cores x {ghz:.2f} GHz ({clock}) x {flop_per_cycle} FLOP/cycle ({isa})",
    )


def device_peak(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} bf16 datasheet"
        return float("nan"), f"{name} (unknown peak)"
    return cpu_peak()


def all_mean(x: torch.Tensor) -> float | list[float]:
    """The mean over ranks of a scalar (a float) or a vector (a list), in one all-reduce. Reading
    the result is a host sync: call it at log steps only."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.AVG if x.is_cuda else dist.ReduceOp.SUM)
        if not x.is_cuda:
            x /= dist.get_world_size()
    return float(x) if x.dim() == 0 else x.tolist()
