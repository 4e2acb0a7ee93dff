"""The autocast weight cache (rmt.models.layers.AutocastWeightCache): in autocast inference a
folded RMT's linears and convs keep their bf16 weights from one forward pass to the next, with
outputs bitwise those of autocast's own per-pass casts, and fresh copies whenever a parameter
changes."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import rmt
from rmt.bench.runner import BenchSettings, precision, run_benchmark
from rmt.models.layers import AutocastWeightCache, CachedLinear, DepthwiseConvNHWC, keep_autocast_weights


class Casts(TorchDispatchMode):
    """Counts the float32 tensors cast to another dtype (autocast's casts)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("to", "_to_copy") and args[0].dtype == torch.float32 and out.dtype != torch.float32:
            self.count += 1
        return out


def _bf16(cache: bool = True) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache)


@pytest.fixture(scope="module")
def model() -> rmt.RMT:
    torch.manual_seed(0)
    return rmt.create_model("rmt_t", num_classes=10).eval().reparameterize()


def _folded(layer: nn.Module) -> nn.Module:
    keep_autocast_weights(layer)
    return layer


def test_cached_weights_give_bitwise_the_logits_of_per_pass_casts(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        with _bf16(cache=False):
            reference = model(x)
        with _bf16():
            first, second = model(x), model(x)  # the first pass fills the cache, the second reads it
    assert torch.equal(first, reference) and torch.equal(second, reference)
    layers = [m for m in model.modules() if isinstance(m, AutocastWeightCache)]
    assert len(layers) > 50 and all(m._autocast_copies is not None for m in layers)


def _casts_in_a_second_pass(model: nn.Module, x: torch.Tensor, cache: bool = True) -> int:
    # each pass in an autocast region of its own, as separate calls run: autocast's own cache lives
    # for one region (torch 2.8 kept the weights' casts there from one pass to the next)
    with torch.inference_mode():
        with _bf16(cache):
            model(x)
        with _bf16(cache), Casts() as casts:
            model(x)
    return casts.count


def test_a_cached_pass_casts_only_its_input(model):
    x = torch.randn(1, 3, 64, 64)
    layers = [m for m in model.modules() if isinstance(m, AutocastWeightCache)]
    assert _casts_in_a_second_pass(model, x) == 1  # the image, for the stem's first conv
    # without: every weight and every bias (folding removed some), on every pass
    parameters = sum(1 + (m.bias is not None) for m in layers)
    assert _casts_in_a_second_pass(model, x, cache=False) == 1 + parameters


def test_an_unfolded_model_casts_its_weights_on_every_pass():
    """The cache is opt-in: an in-place change through ``.data`` bumps no version, so a model
    that may still be trained that way keeps autocast's per-pass casts."""
    torch.manual_seed(0)
    model = rmt.create_model("rmt_t", num_classes=10).eval()
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert _casts_in_a_second_pass(model, torch.randn(1, 3, 64, 64)) == 1 + 2 * len(layers)
    assert not any(isinstance(m, AutocastWeightCache) for m in layers)


def test_a_new_classifier_of_a_folded_model_caches_too():
    model = rmt.create_model("rmt_s_tl", num_classes=10).eval()
    model.reset_classifier(4)
    assert type(model.head.fc) is nn.Linear  # not folded: plain layers
    model.reparameterize().reset_classifier(3)
    assert type(model.head.fc) is CachedLinear and type(model.aux_head) is CachedLinear
    assert _casts_in_a_second_pass(model, torch.randn(1, 3, 64, 64)) == 1


def _check(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The layer's output in cached autocast inference is what per-pass casts give; returns it."""
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=dtype):
            cached = layer(x)
        with torch.autocast("cpu", dtype=dtype, cache_enabled=False):
            expected = layer(x)
    assert torch.equal(cached, expected)
    return cached


def test_another_autocast_dtype_gets_its_own_copies():
    layer = _folded(nn.Linear(16, 8))
    x = torch.randn(2, 16)
    with torch.inference_mode(), _bf16():
        layer(x)  # fills the cache with bf16 copies
    assert _check(layer, x, torch.float16).dtype == torch.float16


def test_a_parameter_swapped_for_an_inference_tensor_is_used_as_it_is():
    layer = _folded(nn.Linear(16, 8))
    x = torch.randn(2, 16)
    with torch.no_grad(), _bf16():
        layer(x)  # fills the cache
    with torch.inference_mode():
        replacement = torch.randn(8, 16)
    torch.utils.swap_tensors(layer.weight, nn.Parameter(replacement, requires_grad=False))  # same object, new data
    _check(layer, x)


@pytest.mark.parametrize("make", [lambda: nn.Linear(16, 8), lambda: nn.Conv2d(4, 8, 3, padding=1)], ids=["linear", "conv"])
def test_copies_follow_every_change_of_the_parameters(make):
    torch.manual_seed(0)
    layer = _folded(make())
    x = torch.randn(2, 16) if isinstance(layer, nn.Linear) else torch.randn(2, 4, 6, 6)
    _check(layer, x)

    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)  # an in-place update: a new version
    layer(x).square().sum().backward()
    optimizer.step()
    _check(layer, x)

    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
    _check(layer, x)

    layer.weight.data = torch.randn_like(layer.weight)  # a new storage under the same parameter
    _check(layer, x)

    layer.bias = nn.Parameter(torch.randn_like(layer.bias))  # a new parameter, as folds set them
    _check(layer, x)

    layer.double()  # .to() drops the copies; float64 is not cast by autocast
    assert layer._autocast_copies is None
    _check(layer, x.double())
    layer.float()
    _check(layer, x)


class _Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


@pytest.mark.parametrize("make", [lambda: nn.Linear(16, 8), lambda: DepthwiseConvNHWC(8, 3)], ids=["linear", "nhwc-conv"])
def test_a_parametrized_weight_is_read_through_its_parametrization(make):
    """The layers read their weights from the parameter dict (registered_weights, cheaper than
    ``module.weight``); a parametrization's weight is not there but a property of the module."""
    torch.manual_seed(0)
    layer = _folded(make())
    x = torch.randn(2, 16) if isinstance(layer, nn.Linear) else torch.randn(2, 5, 5, 8)
    doubled = copy.deepcopy(layer)
    with torch.no_grad():
        doubled.weight.mul_(2)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", _Doubled())
    with torch.inference_mode():
        assert torch.equal(layer(x), doubled(x))
    assert torch.equal(_check(layer, x), _check(doubled, x))


def test_a_conv_given_other_weights_computes_with_them():
    """LoRA-style callers pass merged weights to ``_conv_forward``: only the parameters themselves
    are swapped for their cached copies."""
    torch.manual_seed(0)
    layer = _folded(nn.Conv2d(4, 8, 3, padding=1))
    x, other = torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3)
    with torch.inference_mode(), _bf16():
        layer(x)  # fills the cache
        expected = torch.nn.functional.conv2d(x, other, layer.bias, padding=1)
        assert torch.equal(layer._conv_forward(x, other, layer.bias), expected)


def test_a_fused_optimizer_step_is_seen():
    """Fused optimizers update parameters without bumping their version: the training pass before
    the step drops the copies, and so do .train() and .eval()."""
    torch.manual_seed(0)
    layer = _folded(nn.Linear(16, 8))
    x = torch.randn(2, 16)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    _check(layer, x)
    versions = layer.weight._version
    layer(x).square().sum().backward()
    optimizer.step()
    assert layer.weight._version == versions  # what the version counter cannot see
    _check(layer, x)
    _check(layer, x)  # the copies were made again after the step
    with torch.inference_mode(), _bf16():
        layer(x)
    assert layer._autocast_copies is not None
    layer.eval()
    assert layer._autocast_copies is None


def test_the_same_storage_in_another_layout_is_a_change():
    """``.data = weight.t()`` keeps the parameter, its version and its storage address."""
    layer = _folded(nn.Linear(8, 8))
    x = torch.randn(2, 8)
    _check(layer, x)
    layer.weight.data = layer.weight.data.t()
    _check(layer, x)


def test_parameters_made_under_inference_mode_are_cast_every_pass():
    """Inference tensors have no version to check, so they are left to autocast."""
    torch.manual_seed(0)
    with torch.inference_mode():
        model = rmt.create_model("rmt_t", num_classes=10).eval().reparameterize()
    _check(model, torch.randn(1, 3, 64, 64))


def test_vmap_over_stacked_parameters_is_left_to_autocast():
    """Model ensembling: torch.func.vmap over parameters stacked from several layers."""
    layers = [_folded(nn.Linear(16, 8)) for _ in range(3)]
    params = {name: torch.stack([dict(m.named_parameters())[name].detach() for m in layers]) for name in ("weight", "bias")}
    x = torch.randn(2, 16)
    ensemble = torch.func.vmap(lambda p: torch.func.functional_call(layers[0], p, (x,)))
    with torch.no_grad():
        with _bf16():
            cached = ensemble(params)  # before the guard: an error (a wrapped tensor has no data pointer)
        with _bf16(cache=False):
            expected = ensemble(params)
    assert torch.equal(cached, expected)


def test_unfolded_models_keep_plain_torch_layers():
    """Tools matching exact layer types (dynamic quantization, FX leaf modules) see nn.Linear and
    nn.Conv2d until the model is folded."""
    model = rmt.create_model("rmt_t", num_classes=10).eval()
    attention = model.stages[0].blocks[0].attn
    assert type(attention.qk) is nn.Linear and type(model.stem[0]) is nn.Conv2d
    # timm's reparameterize_model (what rmt bench --reparam runs) reaches every layer too
    for folded in (timm.utils.reparameterize_model(model), model.reparameterize()):
        layers = [m for m in folded.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert all(isinstance(m, AutocastWeightCache) for m in layers)
    assert type(attention.qk) is CachedLinear and isinstance(attention.qk, nn.Linear)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # torch.jit.trace
def test_compiled_and_traced_models_do_not_read_the_cache():
    layer = _folded(nn.Linear(16, 8))
    x = torch.randn(2, 16)
    with torch.inference_mode(), _bf16():
        expected = layer(x)  # fills the cache
        copies = layer._autocast_copies
        layer._autocast_copies = copies._replace(weight=torch.zeros_like(copies.weight), bias=torch.zeros_like(copies.bias))  # poisoned
        assert not torch.equal(layer(x), expected)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        traced = torch.jit.trace(layer, x, check_trace=False)(x)
    assert torch.equal(compiled, expected) and torch.equal(traced, expected)


def test_not_used_while_autograd_records():
    layer = _folded(nn.Linear(16, 8))
    with _bf16():
        layer(torch.randn(2, 16)).float().sum().backward()
    assert layer.weight.grad is not None and layer._autocast_copies is None


def test_copies_stay_behind_when_pickled_or_deep_copied():
    layer = _folded(nn.Linear(16, 8))
    with torch.inference_mode(), _bf16():
        layer(torch.randn(2, 16))
    assert layer._autocast_copies is not None
    assert copy.deepcopy(layer)._autocast_copies is None
    assert pickle.loads(pickle.dumps(layer))._autocast_copies is None
    assert layer._autocast_copies is not None  # the original keeps its own


def test_bench_can_turn_the_cache_off():
    with precision(torch.device("cpu"), "bf16", autocast_cache=False):
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()
    settings = BenchSettings(models=["rmt_t"], batches=[1], img_sizes=[(64, 64)], device="cpu", dtype="bf16",
                             warmup=1, iters=1, reparameterize=True, autocast_cache=False)
    report = run_benchmark(settings)
    assert report["settings"]["autocast_cache"] is False and report["results"][0]["status"] == "ok"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_cached_pass_is_bitwise_the_same_with_one_cast():
    torch.manual_seed(0)
    model = rmt.create_model("rmt_t").eval().cuda().reparameterize()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    outputs, casts = {}, {}
    for cache in (False, True):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache):
            model(x)
            with Casts() as counter:
                outputs[cache] = model(x)
        casts[cache] = counter.count
    assert torch.equal(outputs[True], outputs[False])
    assert casts[True] == 1 and casts[False] > 100
