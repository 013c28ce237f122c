"""A training step replayed from CUDA graphs (`speed.cuda_graphs`).

On a GPU a step of a base-size encoder launches about 540 kernels, and the host takes longer to
launch them through Python than the GPU takes to run them: the GPU sat idle for much of each LoRA
step (bench/RESULTS.md). A CUDA graph records the kernels of both passes once per batch shape and
replays them with one launch. Shapes must repeat for that, so with graphs the batches are padded
to lengths in steps of GRAPH_LENGTH_STEP tokens (masked padding: the same loss up to rounding).
A shape beyond the first MAX_GRAPHS runs op by op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftlab.batching import model_inputs
from peftlab.errors import TrainingSetupError

GRAPH_LENGTH_STEP = 64  # about 30 more pad tokens per text; 8 shapes up to 512 tokens
MAX_GRAPHS = 16  # each holds its inputs; they share one pool of activation memory


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the graph reads its batch from these
    loss: torch.Tensor  # and writes its loss here


class GraphedStep:
    """A micro-batch's forward and backward passes, replayed from the CUDA graph recorded for its
    shape (`step(batch) -> loss`, as training.step.EagerStep); a non-finite loss leaves its gradients
    in place for the loop to zero. The gradient tensors stay allocated between steps, because the
    graphs add into them."""

    def __init__(self, model, optimizer, accelerator, params: list[torch.Tensor], warm_every_shape: bool = False,
                 loss_function=None) -> None:
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.loss_function = loss_function  # (logits, labels) -> loss, where not the model's own
        self.params = params
        self.warm_every_shape = warm_every_shape  # compiled blocks may compile for a new shape: never while recording
        self.recorded: dict[tuple, _Recorded] = {}
        self.pool = None
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = model_inputs(batch) | {"labels": batch["labels"]}
        key = tuple((name, tuple(tensor.shape)) for name, tensor in inputs.items())
        recorded = self.recorded.get(key)
        if recorded is None and len(self.recorded) < MAX_GRAPHS:
            warmups = 2 if not self.recorded else 1 if self.warm_every_shape else 0
            recorded = self.recorded[key] = self._record(inputs, warmups)
        if recorded is None:  # past MAX_GRAPHS shapes: op by op
            return self._passes(inputs)
        for name, tensor in inputs.items():
            recorded.inputs[name].copy_(tensor, non_blocking=True)
        recorded.graph.replay()
        return recorded.loss.clone()  # the next replay overwrites it

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)

    def _passes(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.loss_function is None:
            loss = self.model(**inputs).loss
        else:
            logits = self.model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
            loss = self.loss_function(logits, inputs["labels"])
        self.accelerator.backward(loss)
        return loss.detach()

    def _record(self, batch: dict[str, torch.Tensor], warmups: int) -> _Recorded:
        """Warm up on a side stream (lazy initialisations cannot be recorded), then record. Only the
        first shape needs warm-up passes: later ones find everything initialised, and a pass per
        shape made recording measurably slower in a fresh process (bench/RESULTS.md); compiled
        blocks get one, in case a shape makes them compile. The warm-up passes add to the gradients,
        which are put back as they were (mid-accumulation), and so is the random generator their dropout
        drew from: a run's random stream is then its steps' alone, and a run resumed from a checkpoint
        (whose first step records again) draws what the uninterrupted run drew. A recording draws
        nothing; each replay advances the generator as the same step run op by op would."""
        inputs = {name: tensor.clone() for name, tensor in batch.items()}
        grads = [param.grad.clone() for param in self.params]
        random_state = torch.cuda.get_rng_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmups):
                self._passes(inputs)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.set_rng_state(random_state)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the loader's pinning may allocate host memory from another thread meanwhile
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                loss = self._passes(inputs)
        except RuntimeError as error:
            raise TrainingSetupError(f"this model's training step could not be recorded as a CUDA graph ({error}); "
                                     "set speed.cuda_graphs=false") from error
        self.pool = self.pool or graph.pool()
        for param, grad in zip(self.params, grads):
            param.grad.copy_(grad)
        return _Recorded(graph, inputs, loss)


# Recorded on a GPU and checked against op-by-op steps (tests/test_cuda_graphs.py, bench/RESULTS.md),
# with the families whose `cuda_graphs_verified` is set (families.py). Other encoders may synchronise
# with the host inside their forward pass (ModernBERT unpads its batches), which a recording refuses;
# `speed.cuda_graphs: true` tries them anyway.
VERIFIED_METHODS = {"full", "lora", "loraplus", "ia3", "head"}
