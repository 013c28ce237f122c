"""torch.compile over an encoder's repeated blocks (`train.compile`).

What is left of a graphed training step on a GPU is mostly memory-bound work between the matrix
products: layer norms, GELU, dropout, residual adds and autocast's casts, each a kernel of its own.
Inductor fuses them. Compiling the repeated block rather than the whole model is PyTorch's
"regional compilation": every layer runs the same compiled code, so it is compiled once, not once
per layer, and dynamic shapes make one compilation serve every batch length. On an H200 the
distilbert LoRA epoch took 6.1 s instead of 7.8 s, after 40-60 s of compiling (bench/RESULTS.md):
it pays on runs longer than about 4 minutes, so it is off unless asked for. Evaluation runs the
blocks op by op: compiling its inference graph would cost as much again for a pass that is fast already.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

BACKEND = "inductor"


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The encoder's layers: the longest ModuleList whose members are all of one class."""
    lists = [children for module in model.modules() if isinstance(module, nn.ModuleList)
             if len(children := list(module)) > 1 and len({type(child) for child in children}) == 1]
    return max(lists, key=len, default=[])


def compile_blocks(model: nn.Module) -> int:
    """Compile each repeated block in place (state-dict keys unchanged); returns how many."""
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile(backend=BACKEND, dynamic=True)
    return len(blocks)


@contextmanager
def run_eagerly() -> Iterator[None]:
    """Compiled modules run their original code op by op meanwhile (nothing is compiled)."""
    with torch.compiler.set_stance("force_eager"):
        yield
