"""Full fine-tuning that updates only the embedding rows of tokens the training data contains.

A token absent from the training split gets an exactly zero gradient at every step, so AdamW leaves
its row unchanged: its moments stay zero and the update is 0 / (0 + eps). Only weight decay scales
it. Yet a dense embedding gradient makes every step zero-fill, clip and update the whole vocabulary.
For MiniLM that is a 30,522 x 384 matrix, half of the model's parameters, and that work was a
sizeable share of a CPU step on tweets, which use 6,279 distinct tokens (bench/RESULTS.md). Here the
rows of seen tokens are the trained parameter (`seen_rows`). The full matrix stays in `weight`,
frozen: each step scales it by the step's weight decay (when there is one; one pass instead of the
dense gradient's zero-fill, clip and update), and the trained rows are copied in before anything
reads it (evaluation, `state_dict`, checkpoints). The optimizer does the same arithmetic; only the
gradient norm is summed in another order. The decay is applied at every step, not deferred, so a
resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class SeenRowsEmbedding(nn.Embedding):
    """An nn.Embedding (same `weight`, same state-dict keys) whose trained rows live in `seen_rows`."""

    def __init__(self, embedding: nn.Embedding, seen_ids: torch.Tensor):
        weight = embedding.weight
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                         _weight=weight.detach(), _freeze=True, device=weight.device, dtype=weight.dtype)
        seen_ids = torch.unique(seen_ids.to(device=weight.device, dtype=torch.long))
        position = torch.full((self.num_embeddings,), -1, dtype=torch.long, device=weight.device)
        position[seen_ids] = torch.arange(len(seen_ids), device=weight.device)
        self.register_buffer("seen_ids", seen_ids, persistent=False)
        self.register_buffer("seen_position", position, persistent=False)
        self.seen_rows = nn.Parameter(weight.detach()[seen_ids].clone())
        self.seen_padding_idx = None if self.padding_idx is None else int(position[self.padding_idx])
        self._stale = False
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.refresh_weight())
        self.register_state_dict_post_hook(_drop_seen_rows)
        self.register_load_state_dict_pre_hook(_seen_rows_from_weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            self.refresh_weight()
            return super().forward(input_ids)
        position = self.seen_position[input_ids]
        if bool((position < 0).any()):
            unseen = input_ids[position < 0].unique()[:5].tolist()
            raise ValueError(f"token ids {unseen} are not among the embedding rows this run trains (those of its "
                             "training data); set speed.seen_embedding_rows=false to train every row")
        return nn.functional.embedding(position, self.seen_rows, self.seen_padding_idx)

    @torch.no_grad()
    def after_step(self, decay: float) -> None:
        """The optimizer changed `seen_rows` and scaled every row by `decay` (1 - lr * weight decay)."""
        if decay != 1.0:
            self.weight.mul_(decay)
        self._stale = True

    @torch.no_grad()
    def refresh_weight(self) -> None:
        """Copy the trained rows into `weight`."""
        if self._stale:
            self.weight.index_copy_(0, self.seen_ids, self.seen_rows.detach())
            self._stale = False


def _drop_seen_rows(module, state_dict, prefix, local_metadata) -> None:
    state_dict.pop(prefix + "seen_rows", None)  # `weight` holds them: the saved model is a plain encoder


def _seen_rows_from_weight(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs) -> None:
    if prefix + "weight" in state_dict and prefix + "seen_rows" not in state_dict:
        state_dict[prefix + "seen_rows"] = state_dict[prefix + "weight"][module.seen_ids.to(
            state_dict[prefix + "weight"].device)]
    module._stale = False


def train_seen_rows_only(model: nn.Module, token_ids: Iterable) -> SeenRowsEmbedding | None:
    """Swap the model's trained input embedding for one that trains only the rows of `token_ids` (the
    token id arrays of the training split). None, and nothing changed, where that would not be exact:
    a frozen or tied matrix, or an embedding that renormalises or scales its gradient."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding or not embedding.weight.requires_grad:
        return None
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        return None
    shared = sum(p is embedding.weight for _, p in model.named_parameters(remove_duplicate=False))
    if shared > 1 or model.get_output_embeddings() is not None:
        return None
    ids = [torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in token_ids]
    if embedding.padding_idx is not None:
        ids.append(torch.tensor([embedding.padding_idx]))  # the padding of every batch
    seen = SeenRowsEmbedding(embedding, torch.cat(ids))
    model.set_input_embeddings(seen)
    return seen


def follow_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """After each optimizer step, tell every SeenRowsEmbedding which decay its group applied."""
    modules = [m for m in model.modules() if isinstance(m, SeenRowsEmbedding)]
    if not modules:
        return
    groups = {id(m): next(g for g in optimizer.param_groups if any(p is m.seen_rows for p in g["params"]))
              for m in modules}

    def after_step(opt, args, kwargs) -> None:
        for m in modules:
            group = groups[id(m)]
            m.after_step(1.0 - float(group["lr"]) * float(group["weight_decay"]))

    optimizer.register_step_post_hook(after_step)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The up-to-date `weight` of every SeenRowsEmbedding, by parameter name: a checkpoint needs it
    besides the trained parameters (weight decay changes the rows no batch trains)."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, SeenRowsEmbedding):
            module.refresh_weight()
            weights[f"{name}.weight" if name else "weight"] = module.weight
    return weights
