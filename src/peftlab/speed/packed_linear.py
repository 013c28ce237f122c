"""Frozen bf16 linear layers whose weights are packed once for the CPU's matrix units.

Under bf16 autocast on a CPU, oneDNN copies a linear layer's weight into its blocked (AMX / VNNI)
layout at every call, in the forward pass and again for the input gradient. An adapter run's base
weights never change, so here they are packed once: the weight for the forward pass and its
transpose for the input gradient. It is the weight prepacking that IPEX and inductor's freezing do
for inference, kept differentiable in the input; the numbers are those of the same bf16 matmuls
(tested against autocast). On MiniLM with tweets these matmuls, and with them a LoRA step, ran
faster (bench/RESULTS.md).

During an evaluation no weight changes, so the trained layers (all of them in full fine-tuning) are
packed too, for the evaluation only (`packed_for_inference`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from peftlab.speed import compat


def packing_available() -> bool:
    """Whether this torch build has oneDNN's bf16 ops on this CPU (other builds take nn.Linear's path)."""
    return compat.onednn_bf16() is None


_packed_matmul = compat.onednn_linear


class _PackedLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W and b frozen: the backward pass gives only the input's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: PackedFrozenLinear) -> torch.Tensor:
        ctx.layer = layer
        return _packed_matmul(x, layer.packed_weight, layer.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return _packed_matmul(grad, ctx.layer.packed_weight_t, None), None


class PackedFrozenLinear(nn.Linear):
    """nn.Linear with frozen bf16 weights, multiplied from packed copies under CPU bf16 autocast. The
    parameters stay as they are (state dicts, merging and export see an ordinary nn.Linear); any
    other input (another dtype or device, no autocast) takes nn.Linear's own path."""

    packed_weight: torch.Tensor
    packed_weight_t: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu") and x.device.type == "cpu" \
                and torch.get_autocast_dtype("cpu") == self.weight.dtype == torch.bfloat16:
            return _PackedLinearFunction.apply(x.to(torch.bfloat16), self)
        return super().forward(x)


def pack_frozen_linears(model: nn.Module) -> int:
    """Pack every frozen bf16 nn.Linear of `model` on a CPU (see the module's docstring); returns how
    many (none where this torch build lacks oneDNN's bf16 ops)."""
    if not packing_available():
        return 0
    packed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu" \
                and not any(p.requires_grad for p in module.parameters()):
            weight = module.weight.detach()
            module.packed_weight = compat.onednn_pack(weight)
            module.packed_weight_t = compat.onednn_pack(weight.t().contiguous())
            module.__class__ = PackedFrozenLinear  # same parameters, another forward
            packed += 1
    return packed


class PackedInferenceLinear(nn.Linear):
    """An fp32 nn.Linear, for one evaluation: under CPU bf16 autocast without gradients it multiplies
    bf16 copies of its weight (packed) and bias, the copies autocast would make at every call; any
    other call takes nn.Linear's own path."""

    packed_weight: torch.Tensor
    packed_bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and torch.is_autocast_enabled("cpu") and x.device.type == "cpu" \
                and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            return _packed_matmul(x.to(torch.bfloat16), self.packed_weight, self.packed_bias)
        return super().forward(x)


@contextmanager
def packed_for_inference(model: nn.Module) -> Iterator[int]:
    """Within the block, every fp32 nn.Linear of `model` on a CPU multiplies a bf16 copy of
    its weight packed once, instead of autocast casting and oneDNN re-laying it out at every call:
    an evaluation of full fine-tuning's 36 encoder matrices over 8 batches did that 288 times. The
    layers are as they were after the block. Yields how many were packed (none where this torch
    build lacks oneDNN's bf16 ops)."""
    layers = [m for m in model.modules() if type(m) is nn.Linear and type(m.weight.data) is torch.Tensor  # not sharded
              and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"] if packing_available() else []
    for layer in layers:
        layer.packed_weight = compat.onednn_pack(layer.weight.detach().to(torch.bfloat16))
        layer.packed_bias = None if layer.bias is None else layer.bias.detach().to(torch.bfloat16)
        layer.__class__ = PackedInferenceLinear
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.__class__ = nn.Linear
            del layer.packed_weight, layer.packed_bias
