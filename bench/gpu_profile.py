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

from peftlab.config import apply_overrides, parse_overrides, validate_config
from peftlab.runs import load_run
from peftlab.train import train


def run(raw: dict) -> dict:
    return load_run(train(validate_config(raw))).summary


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
    by_gpu = events.table(sort_by="self_cuda_time_total", row_limit=30)
    by_host = events.table(sort_by="self_cpu_time_total", row_limit=30)
    path = args.out / f"profile-{args.arch}-{args.method}.txt"
    path.write_text(by_gpu + "\n\n" + by_host + "\n", encoding="utf-8")
    print(by_gpu)
    print(f"full tables: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
