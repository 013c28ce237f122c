"""Where a peftlab training step spends its time on a GPU: host wall time against GPU kernel time.

Builds the IMDB-shaped workload (bench/imdb_shaped.py) at a small size, trains once to warm up
(kernel selection, allocator), then trains again under torch.profiler and prints the kernels by
GPU time; the full tables (also by host time) go to --out:

    python bench/gpu_profile.py --arch distilbert --method lora --n-train 3000 --out /tmp

A step whose GPU kernel time is well under its wall time is bound by the host (Python, dispatch,
launches, waits), not by the GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import train_vs_trainer as bench

from peftlab.config_loading import apply_overrides, parse_overrides, validate_config
from peftlab.runs import load_run
from peftlab.training.run import train


def run(raw: dict) -> dict:
    return load_run(train(validate_config(raw))).summary


# Kernel families by name (cuBLAS's Hopper GEMMs are "nvjet" kernels; casts are copy kernels).
# Attention first: flash kernels' names hold cutlass types too.
KERNEL_FAMILIES = (("attention", ("flash", "fmha")), ("matrix products", ("gemm", "nvjet", "cutlass", "xmma", "splitk")),
                   ("dtype casts and copies", ("copy",)), ("layer norm", ("layer_norm",)),
                   ("dropout", ("dropout", "bernoulli", "philox")), ("reductions", ("reduce",)),
                   ("optimizer", ("adam", "multi_tensor", "foreach")))


def kernel_family(name: str) -> str:
    lowered = name.lower()
    return next((family for family, marks in KERNEL_FAMILIES if any(m in lowered for m in marks)), "other element-wise")


def family_shares(events) -> dict[str, float]:
    """GPU seconds by kernel family, from the profiler's kernels."""
    from torch.autograd import DeviceType

    seconds: dict[str, float] = {}
    for event in events:
        if event.device_type == DeviceType.CUDA:
            family = kernel_family(event.key)
            seconds[family] = seconds.get(family, 0.0) + event.self_device_time_total / 1e6
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def main(argv: list[str] | None = None) -> int:
    from torch.profiler import ProfilerActivity, profile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="distilbert", choices=["distilbert", "roberta"])
    parser.add_argument("--method", default="lora", choices=sorted(bench.RECIPES))
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--overrides", default="", help="config overrides, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the full tables")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workload = argparse.Namespace(workload="imdb-shaped", arch=args.arch, n_train=args.n_train, n_eval=256,
                                      epochs=1, max_length=512, batch_size=32)
        model = bench.models(workload, Path(tmp))[0]
        raw = bench.workload(workload, model, args.method, Path(tmp), seed=42)
        raw = apply_overrides(raw, parse_overrides([o for o in args.overrides.split(",") if o]))
        cold = run(raw)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            warm = run(raw)
    events = prof.key_averages()
    gpu_seconds = sum(e.self_device_time_total for e in events) / 1e6
    print(f"cold run: {cold['train_seconds']:.2f} s training; profiled warm run: {warm['train_seconds']:.2f} s "
          f"training over {warm['steps']} steps, {gpu_seconds:.2f} s of GPU kernels (evaluation included)")
    families = family_shares(events)
    total = sum(families.values()) or 1.0
    print("GPU time by kernel family: " + "; ".join(f"{name} {sec:.2f} s ({sec / total:.0%})"
                                                   for name, sec in families.items()))
    by_gpu = events.table(sort_by="self_cuda_time_total", row_limit=30)
    by_host = events.table(sort_by="self_cpu_time_total", row_limit=30)
    path = args.out / f"profile-{args.arch}-{args.method}.txt"
    path.write_text(by_gpu + "\n\n" + by_host + "\n", encoding="utf-8")
    from torch.autograd import DeviceType

    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA), key=lambda e: -e.self_device_time_total)
    for event in kernels[:25]:
        print(f"{event.self_device_time_total / 1e6:8.3f} s {event.count:7d}x  {event.key[:110]}")
    print(f"full tables: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
