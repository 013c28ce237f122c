"""How high model FLOPs utilisation can go for the IMDB-shaped workload on this GPU: the encoder's
matrix products and attention alone, each timed at the shapes an epoch runs them at.

Training also runs layer norms, GELU, dropout, residual adds, casts, the LoRA branches and the
optimizer; this script leaves all of them out, so the utilisation it prints is a ceiling no
training loop reaches. It builds the epoch's batches as training does (length-grouped, batch 32,
widths rounded up to CUDA graphs' step of 64 tokens, at most 512), times each layer's products
(forward, input gradients, and weight gradients for full fine-tuning) and each attention kernel
(forward and backward, with and without the model's attention dropout) once per width, and sums
them over the epoch's batches. Model FLOPs count real tokens only, as the benchmark's MFU does:

    python bench/gpu_ceiling.py --arch distilbert
    python bench/gpu_ceiling.py --device cpu --n-train 400 --repeats 1   # the code path, on a CPU

Attention kernels: "unpadded" is peftlab's (flash attention's variable-length kernel, each row as
its tokens and its padding, unpadded_attention.py); "masked" is SDPA's memory-efficient kernel with
the padding mask (what runs without it); "flash, no mask" and "cudnn, no mask" attend over the
padded width without a mask: not the same function, only how fast those kernels are at these shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imdb_shaped  # noqa: E402

from peftlab.batching import LengthGroupedBatches
from peftlab.speed.cuda_graphs import GRAPH_LENGTH_STEP  # noqa: E402
from peftlab.speed.unpadded_attention import flash_capable, unpadded_attention  # noqa: E402


def model_shape(arch: str) -> dict:
    """Layers, widths, heads and attention dropout of the workload's architecture (bench/imdb_shaped.py)."""
    config = imdb_shaped.model_config(arch, vocab_size=30522, pad_id=0)
    return dict(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=config.num_attention_heads,
                ffn=getattr(config, "intermediate_size", None) or config.hidden_dim,
                attention_dropout=config.attention_probs_dropout_prob if hasattr(config, "attention_probs_dropout_prob")
                else config.attention_dropout)


def epoch_batches(n_train: int, batch_size: int, seed: int = 0) -> list[tuple[int, np.ndarray]]:
    """(padded width, real lengths) of each training batch of an epoch, as peftlab's loader makes them
    on a GPU with CUDA graphs; lengths drawn as bench/imdb_shaped.py draws them, truncated at 512."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(np.maximum(rng.lognormal(imdb_shaped.MU, imdb_shaped.SIGMA, n_train).round(), 3), 512)
    lengths = lengths.astype(np.int64)
    batches = []
    for rows in LengthGroupedBatches(lengths, batch_size, shuffle=True, group_by_length=True, seed=seed):
        real = lengths[rows]
        width = min(-(-int(real.max()) // GRAPH_LENGTH_STEP) * GRAPH_LENGTH_STEP, 512)
        batches.append((width, real))
    return batches


class Timer:
    """Seconds a callable takes: the mean of `repeats` calls queued back to back after a warm-up
    call, so that, as under CUDA graphs, the GPU does not wait for the host between them."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> float:
        fn()
        self.sync()
        start = time.perf_counter()
        for _ in range(self.repeats):
            fn()
        self.sync()
        return (time.perf_counter() - start) / self.repeats


def product_seconds(timer: Timer, tokens: int, shape: dict, dtype, full: bool) -> float:
    """One layer's matrix products over `tokens` rows: forward and input gradients, plus weight
    gradients for full fine-tuning (q, k, v, out are hidden x hidden; the FFN hidden x ffn and back)."""
    hidden, ffn = shape["hidden"], shape["ffn"]
    total = 0.0
    for n_in, n_out, count in ((hidden, hidden, 4), (hidden, ffn, 1), (ffn, hidden, 1)):
        x = torch.randn(tokens, n_in, device=timer.device, dtype=dtype)
        dy = torch.randn(tokens, n_out, device=timer.device, dtype=dtype)
        w = torch.randn(n_out, n_in, device=timer.device, dtype=dtype)
        seconds = timer(lambda: F.linear(x, w)) + timer(lambda: dy @ w)
        if full:
            seconds += timer(lambda: dy.t() @ x)
        total += count * seconds
    return total


def attention_kernels(device: torch.device) -> dict:
    """name -> attention(q, k, v, padding mask, dropout): q, k, v are [rows, heads, width, head_dim]
    views, as transformers gives them; the output is [rows, width, heads, head_dim]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backends, masked):
        def run(q, k, v, mask, dropout):
            bias = mask[:, None, None, :].bool() if masked else None
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout).transpose(1, 2)
        return run

    kernels = {"masked": sdpa([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], masked=True)}
    if flash_capable(device):
        kernels["unpadded"] = lambda q, k, v, mask, dropout: unpadded_attention(
            None, q, k, v, mask, scaling=q.shape[-1] ** -0.5, dropout=dropout)[0]
        kernels["flash, no mask"] = sdpa([SDPBackend.FLASH_ATTENTION], masked=False)
        kernels["cudnn, no mask"] = sdpa([SDPBackend.CUDNN_ATTENTION], masked=False)
    return kernels


def attention_seconds(timer: Timer, kernel, rows: int, width: int, real: np.ndarray, shape: dict, dtype,
                      dropout: float) -> tuple[float, float]:
    """(forward, forward and backward) seconds of one layer's attention over a batch."""
    heads, head_dim = shape["heads"], shape["hidden"] // shape["heads"]
    qkv = [torch.randn(rows, width, heads, head_dim, device=timer.device, dtype=dtype, requires_grad=True)
           for _ in range(3)]
    mask = (torch.arange(width)[None, :] < torch.as_tensor(real)[:, None]).to(timer.device, torch.int64)
    grad = torch.randn(rows, width, heads, head_dim, device=timer.device, dtype=dtype)

    def forward():
        return kernel(*(x.transpose(1, 2) for x in qkv), mask, dropout)

    def forward_backward():
        forward().backward(grad)

    with torch.no_grad():
        forward_only = timer(forward)
    return forward_only, timer(forward_backward)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="distilbert", choices=imdb_shaped.ARCHITECTURES)
    parser.add_argument("--n-train", type=int, default=25_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the figures here (results kept in the repository: "
                        "bench/results/ceiling-gpu-MACHINE-DATE[-VARIANT].json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16
    shape = model_shape(args.arch)
    timer = Timer(device, args.repeats)
    batches = epoch_batches(args.n_train, args.batch_size)
    widths = Counter(width for width, _ in batches)
    real_tokens = int(sum(real.sum() for _, real in batches))
    padded_tokens = sum(width * len(real) for width, real in batches)
    # One representative batch per width: the real lengths of its first batch.
    sample = {width: real for width, real in reversed(batches)}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = imdb_shaped.bf16_peak(device_name)
    print(f"{device_name}: {args.arch}, {len(batches)} batches of {args.batch_size}, {len(widths)} widths, "
          f"{real_tokens:,} real tokens, {padded_tokens / real_tokens:.3f} padded tokens per real one")

    layers, mean_length = shape["layers"], real_tokens / args.n_train
    report = {"device": device_name, "arch": args.arch, "batches": len(batches), "widths": dict(widths),
              "real_tokens": real_tokens, "padded_tokens": padded_tokens, "methods": {}}
    kernels = attention_kernels(device)
    attention = {}
    for name, kernel in kernels.items():
        for dropout in (shape["attention_dropout"], 0.0):
            try:
                per_width = {w: attention_seconds(timer, kernel, len(sample[w]), w, sample[w], shape, dtype, dropout)
                             for w in widths}
            except RuntimeError as error:  # a kernel this GPU or torch build does not offer at these shapes
                print(f"  attention {name!r}, dropout {dropout}: not run ({str(error).splitlines()[0]})")
                continue
            attention[(name, dropout)] = [layers * sum(widths[w] * per_width[w][i] for w in widths) for i in (0, 1)]
    # Attention's model FLOPs forward: QK^T and AV over each text's own tokens.
    attention_flops = sum(4 * int((real.astype(np.float64) ** 2).sum()) * shape["hidden"] for _, real in batches)
    print(f"\n{'attention kernel':<16} {'dropout':>7} {'forward':>9} {'fwd+bwd':>9} {'TFLOP/s fwd+bwd':>16}")
    for (name, dropout), (forward, both) in attention.items():
        print(f"{name:<16} {dropout:>7} {forward:>8.3f}s {both:>8.3f}s {3 * layers * attention_flops / both / 1e12:>16.2f}")

    for method in ("lora", "full"):
        full = method == "full"
        products = sum(widths[w] * product_seconds(timer, w * args.batch_size, shape, dtype, full) for w in widths)
        products *= layers
        flops = real_tokens * imdb_shaped.flops_per_token(layers, shape["hidden"], shape["ffn"], full, mean_length)
        rows = {}
        for (name, dropout), (forward, both) in attention.items():
            # LoRA needs attention's backward for input gradients only, the same kernel as full's.
            seconds = products + both
            rows[f"{name}, dropout {dropout}"] = {"seconds": seconds, "mfu": flops / seconds / peak if peak else None}
        report["methods"][method] = {"products_seconds": products, "model_flops": flops, "ceilings": rows}
        print(f"\n{method}: matrix products {products:.2f} s ({flops / products / 1e12:.1f} TFLOP/s of model FLOPs"
              f"{f', {flops / products / peak:.0%} of the bf16 peak' if peak else ''}); with attention:")
        for label, row in rows.items():
            mfu = f"MFU ceiling {row['mfu']:.1%}" if row["mfu"] is not None else "no bf16 peak known for this device"
            print(f"  {label:<28} {row['seconds']:.2f} s  {mfu}")
    report["attention"] = {f"{name}, dropout {dropout}": {"forward_s": f, "forward_backward_s": b}
                           for (name, dropout), (f, b) in attention.items()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
