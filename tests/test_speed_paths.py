"""CPU speed paths that must not change the task: fast dropout masks, frozen weights stored in bf16 and
packed for oneDNN, freed memory kept for reuse, clipping folded into the optimizer step."""

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftlab import environment
from peftlab.config_loading import validate_config
from peftlab.errors import TrainingSetupError
from peftlab.methods import apply_method, store_frozen_linears_in
from peftlab.models import load_classifier
from peftlab.speed import process_settings
from peftlab.speed.fast_dropout import (
    ATTENTION,
    FastDropout,
    keep_mask,
    use_fast_dropout,
)
from peftlab.speed.folded_clipping import gradient_clipper
from peftlab.speed.packed_linear import (
    PackedFrozenLinear,
    PackedInferenceLinear,
    pack_frozen_linears,
    packed_for_inference,
    packing_available,
)
from peftlab.training.accelerator import make_accelerator
from peftlab.training.console import bf16_hint

LABELS = {0: "neg", 1: "pos"}


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_drops_at_the_rate_and_rescales(p):
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([1000, 1000]), p, torch.float32)
    kept = mask != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.003  # 1e6 draws: std of the rate is 3e-4
    assert torch.allclose(mask[kept], torch.tensor(1 / (1 - p)))
    # rows are not copies of each other (the 64-bit draws are split, not repeated)
    assert not torch.equal(kept[0], kept[1])


def test_masks_follow_torchs_seed():
    torch.manual_seed(3)
    first = keep_mask(torch.Size([64, 33]), 0.1, torch.float32)
    torch.manual_seed(3)
    assert torch.equal(first, keep_mask(torch.Size([64, 33]), 0.1, torch.float32))


def test_fast_dropout_is_identity_in_eval_and_scales_in_training():
    layer = FastDropout(0.25)
    x = torch.randn(50, 40)
    assert layer.eval()(x) is x
    out = layer.train()(x)
    assert torch.allclose(out[out != 0], (x * 4 / 3)[out != 0])
    assert 0.15 < (out == 0).float().mean().item() < 0.35


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(5, 50, (6, 10))
    mask = torch.ones(6, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[4, 3:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta", "deberta-v2"])
def test_fast_dropout_model_trains_the_same_function(tiny_models, arch):
    """Every dropout is swapped; the training attention (explicit softmax, for its dropout) gives the
    same outputs as SDPA when nothing is dropped, padding included."""
    torch.manual_seed(0)
    reference = load_classifier(str(tiny_models[arch]), LABELS)
    torch.manual_seed(0)
    fast = load_classifier(str(tiny_models[arch]), LABELS)
    dropouts = sum(type(m) is nn.Dropout for m in fast.modules())
    assert use_fast_dropout(fast) == dropouts > 0
    assert not any(type(m) is nn.Dropout for m in fast.modules())
    assert (fast.config._attn_implementation == ATTENTION) == (arch != "deberta-v2")
    for model in (reference, fast):
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        model.config.attention_probs_dropout_prob = 0.0
    batch = _batch()
    expected = reference.train()(**batch).logits
    got = fast.train()(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(fast.eval()(**batch).logits, reference.eval()(**batch).logits, atol=1e-6)


def test_fast_dropout_reaches_lora_adapters(tiny_models):
    method = validate_config({"data": {"source": "tweets"},
                              "method": {"kind": "lora", "r": 4, "dropout": 0.2, "targets": "attention"}}).method
    model = apply_method(load_classifier(str(tiny_models["bert"]), LABELS), method)
    use_fast_dropout(model)
    lora_dropouts = [m for name, m in model.named_modules() if "lora_dropout" in name and isinstance(m, nn.Dropout)]
    assert lora_dropouts and all(type(m) is FastDropout and m.p == 0.2 for m in lora_dropouts)


@pytest.mark.parametrize("kind", ["lora", "ia3", "head"])
def test_frozen_weights_in_bf16_and_packed_give_what_autocast_gives(tiny_models, kind):
    """Autocast casts each frozen fp32 weight to bf16 at every matmul (and oneDNN re-lays it out);
    stored in bf16 once, and then packed once, the loss and the trained parameters' gradients are
    those of autocast, and the state dict is unchanged."""
    spec = {"kind": kind} if kind != "lora" else {"kind": "lora", "r": 4, "dropout": 0.0, "targets": "all-linear"}
    method = validate_config({"data": {"source": "tweets"}, "method": spec}).method
    models = []
    for _ in range(3):
        torch.manual_seed(0)
        models.append(apply_method(load_classifier(str(tiny_models["bert"]), LABELS), method).train())
    autocast_only, stored, packed = models
    keys = set(packed.state_dict())
    cast = store_frozen_linears_in(stored, torch.bfloat16)
    assert store_frozen_linears_in(packed, torch.bfloat16) == cast > 0
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)
    if packing_available():
        assert pack_frozen_linears(packed) == cast
        assert any(isinstance(m, PackedFrozenLinear) for m in packed.modules())
    assert set(packed.state_dict()) == keys
    losses, grads = [], []
    for model in models:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**_batch(), labels=torch.tensor([0, 1, 0, 1, 1, 0])).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert torch.allclose(losses[2], losses[0], rtol=1e-3)
    assert all(torch.allclose(grads[2][n], grads[0][n], rtol=2e-2, atol=1e-4) for n in grads[0])


def test_packed_linear_falls_back_outside_cpu_bf16_autocast():
    layer = nn.Linear(8, 4).requires_grad_(False).to(torch.bfloat16)
    if not packing_available() or pack_frozen_linears(layer) != 1:
        pytest.skip("no oneDNN bf16 on this CPU")
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))  # no autocast: nn.Linear's path


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_evaluation_with_packed_weights_gives_what_autocast_gives_and_leaves_the_layers_as_they_were(tiny_models, arch):
    """Full fine-tuning's fp32 linear layers packed in bf16 for an evaluation: the logits of autocast's
    bf16 matmuls; afterwards the same layers, parameters and state dict; with gradients on, nn.Linear's path."""
    if not packing_available():
        pytest.skip("no oneDNN bf16 on this CPU")
    torch.manual_seed(0)
    model = load_classifier(str(tiny_models[arch]), LABELS).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    inputs = _batch()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**inputs).logits.float()
        with packed_for_inference(model) as packed:
            assert packed == len(linears) and all(type(m) is PackedInferenceLinear for m in linears)
            got = model(**inputs).logits.float()
    assert torch.allclose(got, expected, rtol=1e-2, atol=1e-3)
    assert all(type(m) is nn.Linear and not hasattr(m, "packed_weight") for m in linears)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with packed_for_inference(model), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs, labels=torch.tensor([0, 1, 0, 1, 1, 0])).loss.backward()
    assert all(m.weight.grad is not None for m in linears)


_FAULTS_PER_REALLOCATION = """
import resource, statistics, sys, torch
from peftlab.speed import process_settings
if sys.argv[1] == "keep":
    assert process_settings.keep_freed_memory()
faults = []
for step in range(20):  # a 64 MB block freed and allocated again, as an embedding gradient is each step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(16 << 20)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median of the later steps: the heap takes a few rounds to grow to hold the block, and one late
# growth (a busy machine) must not count as the steady state.
print(statistics.median(faults[5:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator setting")
def test_freed_memory_is_reused_without_page_faults():
    """By default glibc unmaps a freed 64 MB block, and the next one faults its 16k pages back in."""
    def faults(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _FAULTS_PER_REALLOCATION, mode], capture_output=True, text=True,
                             check=True)
        return float(out.stdout.split()[-1])

    default = faults("default")
    if default <= 10_000:  # the premise: 4 KiB pages faulted back in (not huge pages, not a kept heap)
        pytest.skip(f"here a freed 64 MB block comes back with {default:.0f} page faults: nothing to save")
    assert faults("keep") < 1_000


_KERNELS_COMPILED_AGAIN = """
import os, sys
from peftlab.speed import process_settings
if sys.argv[1] == "more":
    assert process_settings.cache_more_cpu_kernels(2048)
import torch
weight = torch.ones(64, 64, dtype=torch.bfloat16)
for round in range(2):  # 1,200 batch sizes, each a kernel of its own, met twice
    print("round", round, flush=True)
    for rows in range(1, 1201):
        torch.ones(rows, 64, dtype=torch.bfloat16) @ weight
"""


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN's kernel cache")
def test_a_larger_kernel_cache_compiles_each_shape_once():
    """oneDNN's default cache holds 1,024 kernels: meeting 1,200 shapes again compiles them again."""
    def compiled_per_round(mode: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", _KERNELS_COMPILED_AGAIN, mode], capture_output=True, text=True,
                             check=True, env={k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
                             | {"ONEDNN_VERBOSE": "profile_create"})
        return [part.count("create:cache_miss") for part in out.stdout.split("round 1")]

    first, second = compiled_per_round("default")
    if first <= 1024:  # the premise: more kernels than the default cache holds (AVX2-only CPUs create none)
        pytest.skip(f"this CPU created {first} oneDNN kernels for 1,200 bf16 shapes: no kernel cache to overflow")
    assert second > 1000
    assert compiled_per_round("more")[1] == 0


def test_a_kernel_cache_size_the_user_chose_is_kept(monkeypatch):
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    assert not process_settings.cache_more_cpu_kernels()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"


@pytest.mark.parametrize("flags, expected", [("fpu avx512f avx512_bf16 amx_bf16 amx_tile", "amx"),
                                              ("fpu avx512f avx512_bf16 avx512_vnni", "avx512_bf16"),
                                              ("fpu avx2 fma", None), ("", None)])
def test_the_cpus_bf16_matrix_support_is_read_from_its_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(environment, "_cpu_field", lambda name: flags if name == "flags" else "")
    assert environment.cpu_bf16_matmul() == expected
    hint = bf16_hint(expected)
    assert (hint is None) == (expected is None)
    if hint:
        assert "train.precision=bf16" in hint and ("AMX" in hint) == (expected == "amx")


def test_the_run_records_the_cpu_it_ran_on():
    info = environment.hardware()
    assert info["cpu"] and info["cpu_bf16"] in ("amx", "avx512_bf16", None)
    if platform.system() == "Linux":
        with open("/proc/cpuinfo") as cpuinfo:
            assert info["cpu"] in cpuinfo.read()


@pytest.mark.parametrize("max_norm", [0.05, 100.0])  # clips every step; never clips
def test_clipping_folded_into_fused_adamw_updates_as_accelerate_clipping_does(tiny_models, max_norm):
    accelerator = make_accelerator(validate_config({"data": {"source": "tweets"}}).train)
    torch.manual_seed(0)
    initial = load_classifier(str(tiny_models["bert"]), LABELS).state_dict()
    trained = []
    for folded in (False, True):
        torch.manual_seed(0)
        model = load_classifier(str(tiny_models["bert"]), LABELS).eval()  # no dropout: the same function
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        params = list(model.parameters())
        clip = gradient_clipper(accelerator, optimizer, params, max_norm, folded=folded)
        for _ in range(3):
            model(**_batch(), labels=torch.tensor([0, 1, 0, 1, 1, 0])).loss.backward()
            clip()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert not hasattr(optimizer, "grad_scale")  # handed over for one step only
        trained.append(model.state_dict())
    moved = max((trained[0][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3  # it trained
    # the same updates up to rounding (dividing by norm / max_norm instead of multiplying by its inverse)
    assert max((trained[1][k] - trained[0][k]).abs().max().item() for k in initial) < 1e-3 * moved


def test_a_failed_probe_of_a_private_api_turns_its_path_off_visibly(monkeypatch):
    """A torch whose fused AdamW took no grad_scale: clipping unfolded, saying why; `true` refused."""
    from peftlab.config import SpeedConfig
    from peftlab.speed import compat
    from peftlab.speed.plan import Setting, resolve

    assert compat.probe("fused_adamw_scaling") is None  # this torch's does
    monkeypatch.setitem(compat.PROBES, "fused_adamw_scaling", lambda: "this torch's fused AdamW takes no grad_scale")
    plan = resolve(SpeedConfig(), Setting(model_type="bert"))
    assert not plan.folded_clipping and plan.off["folded_clipping"] == "this torch's fused AdamW takes no grad_scale"
    taken, warning = plan.describe().splitlines()
    assert "folded_clipping" not in taken and plan.summary()["speed_paths_off"]["folded_clipping"]
    assert warning == "warning: speed path folded_clipping is off: this torch's fused AdamW takes no grad_scale"
    with pytest.raises(TrainingSetupError, match="speed.folded_clipping=true: this torch's fused AdamW"):
        resolve(SpeedConfig(folded_clipping=True), Setting(model_type="bert"))


def test_unfolded_clipping_clips_with_accelerate():
    accelerator = make_accelerator(validate_config({"data": {"source": "tweets"}}).train)
    layer = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, foreach=False)
    clip = gradient_clipper(accelerator, optimizer, list(layer.parameters()), 0.01, folded=False)
    layer(torch.randn(3, 4)).sum().mul(100).backward()
    clip()
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in layer.parameters()])) <= 0.01 + 1e-6


def test_planless_attention_leaves_out_cudnn_on_cuda_only():
    """cuDNN attention builds a plan per new batch shape; under a CUDA device it is switched off for
    the block and back on after it, and on a CPU nothing changes."""
    from peftlab.speed.attention import planless_attention

    cuda = torch.backends.cuda
    assert cuda.cudnn_sdp_enabled()
    with planless_attention("cuda"):
        assert not cuda.cudnn_sdp_enabled()
        assert cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled()
        query = torch.randn(2, 4, 8, 16)
        expected = torch.softmax(query @ query.transpose(-1, -2) / 4, dim=-1) @ query
        torch.testing.assert_close(F.scaled_dot_product_attention(query, query, query), expected)
    assert cuda.cudnn_sdp_enabled()
    with planless_attention(torch.device("cpu")):
        assert cuda.cudnn_sdp_enabled()


def test_pending_figures_hold_losses_and_tokens_until_read():
    """The loop's per-step loss and token count stay tensors until it logs, evaluates or
    checkpoints; then they land in the progress as floats and counts over all processes."""
    from peftlab.training.loop import PendingFigures, Progress

    unread, state = PendingFigures(processes=2), Progress(tokens=5)
    masks = [torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])]
    for loss, mask in zip([torch.tensor(0.75, requires_grad=True), torch.tensor(0.5)], masks):
        unread.add(loss * 1, mask)
    assert state.window_losses == [] and state.tokens == 5
    assert unread.read_into(state) is state
    assert state.window_losses == [0.75, 0.5]
    assert state.tokens == 5 + (3 + 5) * 2
    unread.read_into(state)
    assert state.window_losses == [0.75, 0.5] and state.tokens == 21


def test_a_lagged_finiteness_check_skips_the_update_in_the_kernel_and_names_the_step():
    """A step with a non-finite loss (on any micro-batch) hands `found_inf` to the fused AdamW, which
    leaves weights, moments and step count as they were; the error comes at the next settle."""
    from peftlab.speed.lagged_check import LaggedCheck
    from peftlab.training.finiteness import NonFiniteLossError

    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    check = LaggedCheck(optimizer)
    weight.grad = torch.ones(4)
    check.add(torch.tensor(0.5))
    check.hand_over(step=1, epoch=1)
    optimizer.step()
    check.settle()  # finite: nothing raised
    after_one = weight.detach().clone()
    moments = optimizer.state[weight]["exp_avg"].clone()
    assert not torch.equal(after_one, torch.ones(4)) and "found_inf" not in optimizer.__dict__

    weight.grad = torch.full((4,), float("nan"))
    check.add(torch.tensor(0.5))
    check.add(torch.tensor(float("inf")))  # the second micro-batch of the same step
    check.hand_over(step=2, epoch=1)
    optimizer.step()
    assert torch.equal(weight.detach(), after_one) and torch.equal(optimizer.state[weight]["exp_avg"], moments)
    assert optimizer.state[weight]["step"].item() == 1
    with pytest.raises(NonFiniteLossError, match="at step 2 \\(epoch 1\\); training stopped before"):
        check.settle()
    check.settle()  # reported once


def test_the_additive_attention_mask_gives_bitwise_the_masked_fill_results():
    """The training attention adds the mask (0 / the dtype's minimum) instead of masked_fill: the
    same outputs and gradients, bit for bit, in bf16 and fp32, with dropout on the probabilities."""
    from peftlab.speed.fast_dropout import attention as fast_attention
    from peftlab.speed.fast_dropout import drop

    def masked_fill_attention(query, key, value, mask):
        scores = torch.matmul(query, key.transpose(2, 3)) * query.size(-1) ** -0.5
        probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=-1,
                              dtype=torch.float32).to(value.dtype)
        return torch.matmul(drop(probs, 0.1), value).transpose(1, 2).contiguous()

    module = nn.Module().train()
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        inputs = [torch.randn(4, 3, 19, 8).to(dtype) * 3 for _ in range(3)]
        mask = torch.ones(4, 1, 19, 19, dtype=torch.bool)
        mask[1, ..., 11:] = mask[3, ..., 5:] = False
        grad = torch.randn(4, 19, 3, 8).to(dtype)
        results = []
        for attention in (lambda q, k, v: fast_attention(module, q, k, v, mask, dropout=0.1)[0],
                          lambda q, k, v: masked_fill_attention(q, k, v, mask)):
            leaves = [t.clone().requires_grad_() for t in inputs]
            torch.manual_seed(1)  # the same dropout masks
            out = attention(*leaves)
            out.backward(grad)
            results.append([out] + [leaf.grad for leaf in leaves])
        assert all(torch.equal(a, b) for a, b in zip(*results))
