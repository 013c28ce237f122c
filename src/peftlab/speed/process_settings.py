"""Process-wide settings that speed CPU training (`speed.process_settings`): freed memory kept in
the heap, a larger oneDNN kernel cache. Like torch.set_num_threads, they hold for the whole process."""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


def keep_freed_memory(top_limit_mb: int = 512) -> bool:
    """Have glibc keep freed blocks for reuse instead of handing them back to the kernel. It serves
    blocks over 32 MB (the gradient of a BERT vocabulary's embeddings: 47 MB for MiniLM) with mmap
    and unmaps them when freed, so every CPU training step faulted that many fresh, kernel-zeroed
    pages back in; from the heap they are reused (full fine-tuning faster; bench/RESULTS.md). Up to
    `top_limit_mb` of free memory stays at the heap's top. Process-wide, like torch.set_num_threads;
    False (nothing changed) off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, top_limit_mb << 20))


def cache_more_cpu_kernels(capacity: int = 8192) -> bool:
    """Let oneDNN keep `capacity` compiled CPU kernels (its default 1,024). Each batch length brings
    kernels of its own, and a LoRA epoch on tweets (about 80 lengths) made about 1,100: the cache
    evicted the earlier ones, so every epoch and evaluation compiled them again (a noticeable part of
    the second epoch; far less with a larger cache, for a little more memory; bench/RESULTS.md). oneDNN
    reads the setting when it first compiles a kernel, so it holds only where nothing in this process
    ran a bf16 matmul before; a value the user set is kept. Returns whether it was set here."""
    if "ONEDNN_PRIMITIVE_CACHE_CAPACITY" in os.environ:
        return False
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(capacity)
    return True


def apply() -> None:
    keep_freed_memory()
    cache_more_cpu_kernels()
