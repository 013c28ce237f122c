"""What a run needs to record about where it ran: versions, hardware, code revision, memory."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

LIBRARIES = ("peftlab", "torch", "transformers", "peft", "accelerate", "datasets", "scikit-learn", "numpy")


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def hardware() -> dict[str, object]:
    info: dict[str, object] = {"platform": platform.platform(), "processor": platform.machine(),
                               "cpu": cpu_model(), "cpu_bf16": cpu_bf16_matmul(),
                               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count()}
    return info


def _cpu_field(name: str) -> str:
    """The first value of `name` in /proc/cpuinfo (Linux), or ''."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return _cpu_field("model name") or platform.processor() or platform.machine()


BF16_MATMUL_NAMES = {"amx": "Intel AMX", "avx512_bf16": "AVX-512 BF16"}  # cpu_bf16_matmul()'s answers, for people


def cpu_bf16_matmul() -> str | None:
    """How the CPU multiplies bf16 matrices natively, where bf16 autocast pays: "amx" (Intel AMX
    tiles), "avx512_bf16" (AVX-512 BF16 dot products, as on AMD EPYC Zen 4), or None."""
    flags = set(_cpu_field("flags").split())
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else None


def release_freed_memory() -> bool:
    """Hand the heap's free memory back to the kernel (glibc's malloc_trim), so that the resident
    size is what live objects use: a run started after others in one process then measures its own
    peak, not the free memory the earlier runs left kept by `keep_freed_memory`. False off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    ctypes.CDLL(None).malloc_trim(0)
    return True


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def reset_peak_memory() -> None:
    """Start a new peak: runs of a study share one process, and each must report its own peak.
    Linux resets the resident high-water mark (VmHWM) on writing 5 to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere the peak stays process-wide, which only overstates later runs
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory since the last reset (and peak GPU memory allocated, on a GPU)."""
    peak = {"peak_rss_mb": _resident_high_water_kb() / 1024}
    if torch.cuda.is_available():
        peak["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def _resident_high_water_kb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
