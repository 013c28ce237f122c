"""Attention over each text's own tokens (flash attention's variable-length kernel): the function of
SDPA with a padding mask, on a GPU; SDPA itself elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftlab.errors import TrainingSetupError
from peftlab.models import load_classifier
from peftlab.runs import load_run
from peftlab.speed.unpadded_attention import (
    ATTENTION,
    segment_bounds,
    unpadded_attention,
    use_unpadded_attention,
)
from peftlab.training.run import train

needs_flash = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                                 reason="flash attention needs an Ampere or newer CUDA GPU")


def _padding_mask(lengths: list[int], width: int, device="cpu") -> torch.Tensor:
    return torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def test_each_row_is_its_tokens_then_its_padding():
    bounds = segment_bounds(_padding_mask([3, 4, 1], 4))
    assert bounds.dtype == torch.int32
    assert bounds.tolist() == [0, 3, 4, 8, 8, 9, 12]  # the full row's padding segment is empty


def test_without_flash_it_is_sdpa_with_the_padding_mask():
    torch.manual_seed(0)
    query, key, value = (torch.randn(3, 2, 8, 16) for _ in range(3))
    mask = _padding_mask([8, 5, 2], 8)
    output, _ = unpadded_attention(torch.nn.Module(), query, key, value, mask, scaling=0.25)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None, None, :], scale=0.25)
    assert torch.allclose(output, expected.transpose(1, 2), atol=1e-6)


def test_the_encoders_get_it_and_train_the_same_function_without_flash(tiny_models):
    model = load_classifier(str(tiny_models["distilbert"]), {0: "neg", 1: "pos"})
    model.eval()
    ids = torch.randint(5, model.config.vocab_size, (3, 12))
    mask = _padding_mask([12, 7, 3], 12).long()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        assert use_unpadded_attention(model) and model.config._attn_implementation == ATTENTION
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(before, after, atol=1e-5)


def test_asking_for_it_without_a_flash_gpu_fails_before_any_work(make_config, tmp_path):
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        pytest.skip("this machine runs flash attention")
    with pytest.raises(TrainingSetupError, match="speed.unpadded_attention=true: it needs a CUDA GPU"):
        train(make_config(speed={"unpadded_attention": True}))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _attention_and_grads(attend, query, key, value, mask, real):
    """Outputs and q/k/v gradients with a loss that reads the real tokens' outputs only."""
    inputs = [x.detach().clone().requires_grad_(True) for x in (query, key, value)]
    output = attend(*inputs, mask)
    (output.float() * real[:, :, None, None]).square().sum().backward()
    return output.detach() * real[:, :, None, None], [x.grad for x in inputs]


@needs_flash
def test_flash_segments_give_what_the_padding_mask_gives_and_record_in_a_cuda_graph():
    torch.manual_seed(0)
    rows, heads, width, head_dim = 4, 3, 64, 32
    query, key, value = (torch.randn(rows, width, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                         .transpose(1, 2) for _ in range(3))  # the [rows, heads, width, dim] views models pass
    lengths = [64, 40, 1, 17]  # a full row: an empty padding segment
    mask = _padding_mask(lengths, width, "cuda")
    real = mask.to(torch.float32)

    def unpadded(q, k, v, m):
        return unpadded_attention(torch.nn.Module(), q, k, v, m, scaling=head_dim ** -0.5)[0]

    def masked(q, k, v, m):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m[:, None, None, :],
                                              scale=head_dim ** -0.5).transpose(1, 2)

    output, grads = _attention_and_grads(unpadded, query, key, value, mask, real)
    expected, expected_grads = _attention_and_grads(masked, query, key, value, mask, real)
    assert torch.allclose(output.float(), expected, atol=2e-2)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.isfinite(grad).all()
        assert torch.allclose(grad.float(), expected_grad.float(), atol=5e-2, rtol=2e-2)

    # Recorded once, replayed on other lengths: the segments are computed on the GPU.
    static = [x.detach().clone().requires_grad_(True) for x in (query, key, value)]
    static_mask = mask.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        unpadded(*static, static_mask).float().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = unpadded(*static, static_mask)
    other = _padding_mask([5, 64, 33, 2], width, "cuda")
    static_mask.copy_(other)
    graph.replay()
    replayed = static_output * other[:, :, None, None]
    again, _ = _attention_and_grads(unpadded, query, key, value, other, other.float())
    assert torch.equal(replayed, again)


@needs_flash
def test_training_with_it_reaches_the_losses_of_sdpa(make_config, tiny_models, tmp_path):
    from test_cuda_graphs import _dropout_free_model

    model = _dropout_free_model(tiny_models, "distilbert", tmp_path / "model")  # the same numbers but rounding
    runs = {}
    for unpadded in (False, True):
        config = make_config("distilbert", model={"name": str(model), "max_length": 32},
                             method={"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
                             train={"precision": "bf16", "epochs": 4, "lr": 5e-3}, speed={"unpadded_attention": unpadded},
                             output={"name": f"unpadded-{unpadded}"})
        runs[unpadded] = load_run(train(config))
    assert runs[True].summary["unpadded_attention"] is True and runs[False].summary["unpadded_attention"] is False
    masked, unpadded = (runs[key].summary["final"] for key in (False, True))
    assert unpadded["eval_loss"] == pytest.approx(masked["eval_loss"], abs=0.03)
