"""torch.compile over an encoder's repeated blocks (`speed.compile`).

What is left of a graphed training step on a GPU is mostly memory-bound work between the matrix
products: layer norms, GELU, dropout, residual adds and autocast's casts, each a kernel of its own.
Inductor fuses them. Compiling the repeated block rather than the whole model is PyTorch's
"regional compilation": every layer runs the same compiled code, so it is compiled once, not once
per layer, and dynamic shapes make one compilation serve every batch length. On a GPU the
compiled epoch is shorter, but compiling takes longer than a short run's whole training
(bench/RESULTS.md): it pays on long runs only, so it is off unless asked for. Evaluation runs the
blocks op by op: compiling its inference graph would cost as much again for a pass that is fast already.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from peftlab.speed import compat

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
    with compat.run_eagerly():
        yield
