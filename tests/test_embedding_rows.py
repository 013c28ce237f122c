"""Full fine-tuning that updates only the embedding rows of the training data's tokens trains the same
model as a dense embedding gradient does: same losses, same weights (weight decay on the other rows
included), same state-dict keys, same evaluation of tokens it never trained."""

import pytest
import torch
from torch import nn

from peftlab.config import SpeedConfig
from peftlab.config_loading import validate_config
from peftlab.errors import TrainingSetupError
from peftlab.methods import apply_method, parameter_groups
from peftlab.models import load_classifier
from peftlab.speed.embedding_rows import (
    SeenRowsEmbedding,
    follow_optimizer,
    full_weights,
    train_seen_rows_only,
)
from peftlab.speed.plan import Setting, resolve
from peftlab.training.run import train

LABELS = {0: "neg", 1: "pos"}
FULL = validate_config({"data": {"source": "tweets"}, "method": {"kind": "full"}}).method
TRAIN_IDS = torch.arange(5, 30)  # the tiny vocabulary has 53 ids: 30-52 never occur in training


def _model(path) -> nn.Module:
    torch.manual_seed(0)
    model = apply_method(load_classifier(str(path), LABELS), FULL)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # the two models must see the same function
    return model.train()


def _batches(ids: torch.Tensor, n: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        tokens = ids[torch.randint(len(ids), (6, 9), generator=generator)]
        mask = torch.ones_like(tokens)
        mask[1, 5:] = 0
        mask[4, 2:] = 0
        batches.append({"input_ids": tokens * mask, "attention_mask": mask,
                        "labels": torch.randint(2, (6,), generator=generator)})
    return batches


def _train(model: nn.Module, batches, weight_decay: float) -> list[float]:
    optimizer = torch.optim.AdamW(parameter_groups(model, FULL, 1e-2, weight_decay), lr=1e-2, fused=True)
    follow_optimizer(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 20)  # decay follows the lr
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta", "deberta-v2"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_seen_rows_train_what_the_dense_embedding_trains(tiny_models, arch, weight_decay):
    dense, seen = _model(tiny_models[arch]), _model(tiny_models[arch])
    initial = dense.get_input_embeddings().weight.detach().clone()
    module = train_seen_rows_only(seen, [TRAIN_IDS.numpy()])
    assert isinstance(module, SeenRowsEmbedding) and seen.get_input_embeddings() is module
    assert module.seen_ids.tolist() == [0, *range(5, 30)]  # padding id 0 included
    batches = _batches(TRAIN_IDS, 8)
    assert _train(seen, batches, weight_decay) == pytest.approx(_train(dense, batches, weight_decay), rel=1e-5)

    evaluation = _batches(torch.arange(5, 53), 1)[0]  # tokens training never saw
    dense.eval(), seen.eval()
    with torch.inference_mode():
        assert torch.allclose(seen(**evaluation).logits, dense(**evaluation).logits, atol=1e-5)
    expected, got = dense.state_dict(), seen.state_dict()
    assert got.keys() == expected.keys()  # `seen_rows` is not saved: the model saves as a plain encoder
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-6), key
    name = next(k for k in expected if k.endswith("word_embeddings.weight"))
    unseen = got[name][30:]
    if weight_decay:  # the rows no batch touched were decayed as AdamW decays them, and nothing else
        assert not torch.equal(unseen, initial[30:])
    else:
        assert torch.equal(unseen, initial[30:])


def test_a_training_batch_with_an_unseen_token_is_refused(tiny_models):
    model = _model(tiny_models["bert"])
    train_seen_rows_only(model, [TRAIN_IDS.numpy()])
    batch = _batches(torch.tensor([7, 41]), 1)[0]
    with pytest.raises(ValueError, match=r"token ids \[41\] are not among the embedding rows"):
        model(**batch)


def test_checkpoints_hold_the_up_to_date_matrix(tiny_models):
    model = _model(tiny_models["bert"])
    module = train_seen_rows_only(model, [TRAIN_IDS.numpy()])
    _train(model, _batches(TRAIN_IDS, 2), 0.1)
    weights = full_weights(model)
    (name, weight), = weights.items()
    assert name.endswith("word_embeddings.weight") and weight is module.weight
    assert torch.equal(weight[module.seen_ids], module.seen_rows.detach())


def test_a_plain_state_dict_loads_into_the_seen_rows(tiny_models):
    trained = _model(tiny_models["bert"])
    train_seen_rows_only(trained, [TRAIN_IDS.numpy()])
    _train(trained, _batches(TRAIN_IDS, 2), 0.1)
    fresh = _model(tiny_models["bert"])
    module = train_seen_rows_only(fresh, [TRAIN_IDS.numpy()])
    fresh.load_state_dict(trained.state_dict())  # no `seen_rows` key: they come from `weight`
    assert torch.equal(module.seen_rows.detach(), trained.get_input_embeddings().seen_rows.detach())


def test_only_a_trained_untied_embedding_is_replaced(tiny_models):
    lora = validate_config({"data": {"source": "tweets"}, "method": {"kind": "lora", "r": 4}}).method
    frozen = apply_method(load_classifier(str(tiny_models["bert"]), LABELS), lora)
    assert train_seen_rows_only(frozen, [TRAIN_IDS.numpy()]) is None
    tied = _model(tiny_models["bert"])
    tied.get_output_embeddings = lambda: tied.get_input_embeddings()
    assert train_seen_rows_only(tied, [TRAIN_IDS.numpy()]) is None
    assert type(tied.get_input_embeddings()) is nn.Embedding


@pytest.mark.parametrize("rows", [True, False])
def test_a_full_run_reports_the_rows_it_trained(make_config, rows):
    import json

    config = make_config("bert", method={"kind": "full"}, train={"epochs": 1}, speed={"seen_embedding_rows": rows},
                         output={"name": f"rows-{rows}"})
    summary = json.loads((train(config) / "summary.json").read_text())
    assert (summary["seen_embedding_rows"] is not None) == rows
    if rows:
        assert 2 < summary["seen_embedding_rows"] < 53


def test_seen_rows_and_cuda_graphs_are_refused_together_before_any_work():
    """The seen rows check each batch's token ids on the host, which no CUDA graph can record."""
    gpu = Setting(device="cuda", precision="bf16", model_type="bert", method="full")
    with pytest.raises(TrainingSetupError, match="speed.seen_embedding_rows=true: CUDA graphs cannot record"):
        resolve(SpeedConfig(cuda_graphs=True, seen_embedding_rows=True), gpu)
    plan = resolve(SpeedConfig(cuda_graphs=True), gpu)
    assert plan.cuda_graphs and not plan.seen_embedding_rows
    plan = resolve(SpeedConfig(seen_embedding_rows=True), gpu)  # graphs at auto give way to the rows
    assert plan.seen_embedding_rows and not plan.cuda_graphs
    assert "seen embedding rows" in plan.off["cuda_graphs"]
