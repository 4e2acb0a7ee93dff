"""Reparameterization for inference (RMT.reparameterize, timm.utils.reparameterize_model): the
same function with the norms' affines, batch norms, conv biases and layer scales folded away."""

from __future__ import annotations

import warnings

import pytest
import timm
from timm.models import create_feature_extractor
import torch
from timm.layers import LayerScale
from timm.utils import reparameterize_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import rmt
from rmt.errors import CheckpointError
from rmt.models.checkpoint import convert_checkpoint, export_official_state_dict
from rmt.models.config import RMTConfig
from rmt.models import layers
from rmt.models.layers import AffineFreeLayerNorm

# layer scales in the last two stages, a decomposed and a full-attention pass, the token-label head
TINY = RMTConfig(
    embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4), mlp_ratios=(3, 3, 3, 3),
    decomposed_stages=(True, True, False, False), layer_scale_stages=(False, False, True, True),
    head_hidden_size=64, num_classes=10, token_label=True,
)


class Count(TorchDispatchMode):
    """Counts the ATen operators a forward pass dispatches, and its float32 layer norms."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}
        self.float_norms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        # layer_norm as the dispatch mode sees it (native_layer_norm where it is decomposed)
        if name in ("layer_norm", "native_layer_norm") and args[0].dtype == torch.float32:
            self.float_norms += 1
        return func(*args, **(kwargs or {}))


def _tiny(seed: int = 0) -> rmt.RMT:
    """A model in which every folded quantity is far from its initial value, so each fold matters."""
    torch.manual_seed(seed)
    model = rmt.RMT(TINY).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_var", "gamma")) or (".norm" in name and name.endswith("weight")):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.2)
    return model


def test_reparameterized_model_computes_the_same_logits():
    model = _tiny()
    x = torch.randn(2, 3, 96, 128)
    with torch.inference_mode():
        before = model(x)
        folded = reparameterize_model(model)  # a copy: the original stays as it was
        after = folded(x)
        again = model(x)
    assert torch.equal(again, before)
    assert folded is not model and folded.is_reparameterized and not model.is_reparameterized
    assert (after - before).abs().max().item() <= 1e-5
    assert before.abs().max().item() > 0.1  # a non-trivial output


def test_official_logits_after_reparameterize(official_mini):
    """The official reference logits still come out of the folded models (layer scales in mini_b)."""
    for config in ("mini_a", "mini_b"):
        entry = official_mini["models"][config]
        model = rmt.RMT.from_official(**entry["config"]).eval()
        model.load_state_dict(convert_checkpoint(entry["state_dict"], model))
        model.reparameterize()
        for case in entry["cases"]:
            with torch.inference_mode():
                logits = model(case["input"])
            assert (logits - case["logits"]).abs().max().item() <= 1e-4, config


def test_what_is_folded_and_what_stays():
    model = _tiny().reparameterize()
    kinds = {type(m) for m in model.modules()}
    assert nn.LayerNorm not in kinds and nn.BatchNorm2d not in kinds and LayerScale not in kinds
    for block in (b for stage in model.stages for b in stage.blocks):
        assert isinstance(block.norm1, AffineFreeLayerNorm) and isinstance(block.norm2, AffineFreeLayerNorm)
        assert block.attn.lce.bias is None and block.mlp.dwconv.bias is None
        assert block.cpe.bias is not None  # it feeds the residual stream, not a linear
        assert block.cpe.identity_folded and block.mlp.dwconv.identity_folded
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.ndim == 4]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    # eval mode everywhere: the new modules must not switch off eval-only paths (CPU chunks)
    assert not any(m.training for m in model.modules())
    params = sum(p.numel() for p in model.parameters())
    assert params < sum(p.numel() for p in _tiny().parameters())


def test_folded_model_dispatches_fewer_operators():
    """On the CPU (where conv biases are added inside the conv): per block, the two residual adds
    around the depthwise convs and, in layer-scale stages, the two scalings; every batch norm."""
    model = _tiny()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model(x)  # builds the position tables, so that the counts below are forward passes alone
    counts = []
    for _ in range(2):
        with torch.inference_mode(), Count() as count:
            model(x)
        counts.append(count.ops)
        model.reparameterize()
    before, after = counts
    blocks = [b for stage in model.stages for b in stage.blocks]
    scaled = sum(stage_scaled for stage_scaled, stage in zip(TINY.layer_scale_stages, model.stages) for _ in stage.blocks)
    assert before["add_"] - after.get("add_", 0) == 2 * len(blocks)
    assert before.get("mul", 0) - after.get("mul", 0) == 2 * scaled > 0
    batch_norms = lambda ops: sum(n for name, n in ops.items() if "batch_norm" in name)  # noqa: E731
    assert batch_norms(before) == 8 and batch_norms(after) == 0  # stem 4, downsampling 3, head 1


def _linear_ops(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How often a forward pass of ``model`` calls oneDNN's linear and aten's addmm."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = model(x)
    if torch.is_grad_enabled():
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    return {op: counts.get(op, 0) for op in ("mkldnn::_linear_pointwise", "aten::addmm")}


@pytest.mark.skipif(not layers._ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
def test_float32_cpu_inference_runs_onednn_linears_folded_or_not_and_everything_else_runs_f_linear():
    torch.manual_seed(0)
    plain = _tiny()
    folded = _tiny()
    folded.load_state_dict(plain.state_dict())
    folded.reparameterize()
    linears = sum(isinstance(m, nn.Linear) for m in folded.modules())
    assert linears == sum(type(m) is nn.Linear for m in plain.modules()) == 5 * 5 + 3  # five blocks of five; the head's two, the aux head
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        with torch.backends.mkldnn.flags(enabled=False):
            assert _linear_ops(plain, x) == {"mkldnn::_linear_pointwise": 0, "aten::addmm": linears}
            expected = plain(x)
        for model in (plain, folded):
            assert _linear_ops(model, x) == {"mkldnn::_linear_pointwise": linears, "aten::addmm": 0}
            assert (model(x) - expected).abs().max().item() <= 1e-5
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert _linear_ops(model, x)["mkldnn::_linear_pointwise"] == 0
            enabled, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False  # as mkldnn.flags() sets it
            try:
                assert _linear_ops(model, x)["mkldnn::_linear_pointwise"] == 0
            finally:
                torch.backends.mkldnn.enabled = enabled
            with Count():  # a dispatch mode gets the aten operator it knows (FlopCounterMode has no formula for oneDNN's)
                assert _linear_ops(model, x) == {"mkldnn::_linear_pointwise": 0, "aten::addmm": linears}
    for model in (plain, folded):
        model.train()
        assert _linear_ops(model, x)["mkldnn::_linear_pointwise"] == 0  # autograd: F.linear, and a backward pass


@pytest.mark.skipif(not layers._ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao.quantization's move to torchao
def test_unfolded_linears_with_hooks_or_swapped_in_modules_run_as_modules():
    """An unfolded model calls its nn.Linear layers' oneDNN linear only where ``module(x)`` would
    run nothing but ``nn.Linear.forward``: hooks, a replaced forward and swapped-in modules run."""
    model = _tiny()
    linears = sum(type(m) is nn.Linear for m in model.modules())
    block = model.stages[0].blocks[0]
    x = torch.randn(2, 3, 64, 64)
    seen = []
    with torch.inference_mode():
        expected = model(x)
        handle = block.mlp.fc1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        assert _linear_ops(model, x) == {"mkldnn::_linear_pointwise": linears - 1, "aten::addmm": 1}
        assert len(seen) == 1
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: seen.append(module))
        assert _linear_ops(model, x)["mkldnn::_linear_pointwise"] == 0
        handle.remove()
        block.attn.proj.forward = lambda t: torch.zeros(*t.shape[:-1], 32)  # replaced on the instance
        assert torch.equal(block.attn(torch.randn(1, 8, 8, 16), model.stages[0].position), torch.zeros(1, 8, 8, 32))
        del block.attn.proj.forward
        assert (model(x) - expected).abs().max().item() == 0
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    with torch.inference_mode():
        ops = {e.key: e.count for e in _profile(quantized, x).key_averages()}
        assert ops.get("quantized::linear_dynamic") == linears and "mkldnn::_linear_pointwise" not in ops
        assert (quantized(x) - expected).abs().max().item() < 0.1 * expected.abs().max().item()


@pytest.mark.skipif(not layers._ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
def test_unfolded_linears_with_backward_hooks_a_parametrization_or_a_patched_class_run_as_modules(monkeypatch):
    model = _tiny()
    linears = sum(type(m) is nn.Linear for m in model.modules())
    mlp = model.stages[0].blocks[0].mlp
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        handle = mlp.fc1.register_full_backward_pre_hook(lambda module, grad: None)
        assert _linear_ops(model, x) == {"mkldnn::_linear_pointwise": linears - 1, "aten::addmm": 1}
        handle.remove()
        monkeypatch.setattr(nn.Linear, "forward", lambda self, t: torch.zeros(*t.shape[:-1], self.out_features))
        assert torch.equal(layers.call_linear(mlp.fc1, torch.randn(3, 16)), torch.zeros(3, 48))
        monkeypatch.undo()
        monkeypatch.setattr(torch.nn.functional, "linear", lambda t, w, b=None: torch.ones(*t.shape[:-1], w.shape[0]))
        assert torch.equal(layers.call_linear(mlp.fc1, torch.randn(3, 16)), torch.ones(3, 48))  # nn.Linear.forward calls it
        monkeypatch.undo()
    torch.nn.utils.parametrize.register_parametrization(mlp.fc2, "weight", _Double())
    with torch.inference_mode():
        assert _linear_ops(model, x) == {"mkldnn::_linear_pointwise": linears - 1, "aten::addmm": 1}
        x2 = torch.randn(3, 48)
        assert torch.allclose(layers.call_linear(mlp.fc2, x2), x2 @ (2 * mlp.fc2.parametrizations.weight.original).T + mlp.fc2.bias)


class _Double(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


@pytest.mark.skipif(not layers._ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script, which torch's own jvp decompositions call
def test_forward_mode_derivatives_and_vmap_get_f_linear_folded_or_not():
    """oneDNN's linear has no forward-mode derivative (the tangent would be dropped) and no
    batching rule: jvp and vmap run F.linear, without autograd recording too."""
    torch.manual_seed(0)
    plain = _tiny()
    folded = _tiny().reparameterize()
    x, t = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    for model in (plain, folded):
        with torch.no_grad():
            with torch.backends.mkldnn.flags(enabled=False):
                expected, expected_tangent = torch.func.jvp(model, (x,), (t,))
            out, tangent = torch.func.jvp(model, (x,), (t,))
        assert (out - expected).abs().max().item() <= 1e-5
        assert (tangent - expected_tangent).abs().max().item() <= 1e-4 * expected_tangent.abs().max().item()
    layer = nn.Linear(16, 8)
    xs = torch.randn(3, 5, 16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # oneDNN's linear would warn of its missing batching rule
        batched = torch.func.vmap(lambda v: layers.call_linear(layer, v))(xs)
    assert torch.allclose(batched, layer(xs), atol=1e-6)


def test_a_weight_off_the_cpu_gets_f_linear_s_error():
    layer = nn.Linear(4, 4, device="meta")
    with torch.inference_mode():
        for call in (lambda x: layers.call_linear(layer, x), lambda x: layers.linear(x, layer.weight, layer.bias)):
            with pytest.raises(RuntimeError):
                call(torch.randn(2, 4))


def _profile(model: nn.Module, x: torch.Tensor) -> torch.profiler.profile:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    return prof


def test_the_linear_of_folded_models_computes_f_linear_for_strided_parameters_too():
    x = torch.randn(3, 7, 32)
    weight, bias = torch.randn(32, 64).t(), torch.randn(128)[::2]  # oneDNN's reads the bias as dense
    with torch.inference_mode():
        for w, b in ((weight, bias), (weight.contiguous(), bias.contiguous()), (weight, None)):
            assert torch.allclose(layers.linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5)


def test_folded_modules_keep_each_module_s_own_mode():
    """A replacement takes the mode of the module it replaces; the others keep theirs (a model
    may mix modes, say one norm re-estimating statistics in an otherwise frozen model)."""
    model = _tiny()
    block = model.stages[0].blocks[0]
    block.norm1.train()
    model.stem[1].train()
    model.reparameterize()
    assert block.norm1.training and model.stem[1].training
    assert not block.attn.training and not block.norm2.training and not model.stem[4].training


def test_reparameterize_twice_changes_nothing():
    model = _tiny().reparameterize()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.reparameterize()
    reparameterize_model(model, inplace=True)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# the token-labelling model's training graph has its aux head's outputs too, which torchvision notes
@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing the model in train mode")
def test_features_and_intermediates_after_reparameterize():
    model = _tiny()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        before = model.forward_intermediates(x, intermediates_only=True)
        after = model.reparameterize().forward_intermediates(x, intermediates_only=True)
    assert [t.shape for t in before] == [t.shape for t in after]
    assert all((a - b).abs().max().item() <= 1e-5 for a, b in zip(after, before))
    backbone = timm.create_model("rmt_t", features_only=True).eval()
    reparameterize_model(backbone, inplace=True)
    with torch.inference_mode():
        assert [f.shape[1] for f in backbone(torch.randn(1, 3, 64, 64))] == [64, 128, 256, 512]
    # timm's FX feature extraction of a folded model: the folded layers are leaves
    nodes = ["stages.1", "stages.3"]
    unfolded, folded = (create_feature_extractor(m, return_nodes=nodes) for m in (_tiny(), model))
    with torch.inference_mode():
        pairs = [(unfolded(x)[n], folded(x)[n]) for n in nodes]
    assert all(a.shape == b.shape and (a - b).abs().max().item() <= 1e-5 for a, b in pairs)


def test_bfloat16_autocast_after_reparameterize_close_to_float32():
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        reference = model(x)
        model.reparameterize()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    error = ((low.float() - reference).norm() / reference.norm()).item()
    assert error <= 3e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_compiled_reparameterized_model_has_no_graph_break_under_autocast(device, monkeypatch):
    # as on torch 2.11, whose dynamo cannot trace this check (it broke the graph at every block)
    monkeypatch.setattr(torch.amp, "is_autocast_available", torch._dynamo.disable(torch.amp.is_autocast_available))
    model = _tiny().reparameterize().to(device)
    x = torch.randn(2, 3, 64, 64, device=device)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)  # the norms' autocast switch must trace
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
        eager, traced = model(x), compiled(x)
    assert traced.dtype == torch.bfloat16
    assert ((traced.float() - eager.float()).norm() / eager.float().norm()).item() <= 1e-2


def test_affine_free_norm_runs_in_its_input_dtype_under_autocast():
    norm = AffineFreeLayerNorm(32, eps=1e-6)
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    expected = torch.nn.functional.layer_norm(x.float(), (32,), eps=1e-6)
    assert (y.float() - expected).abs().max().item() <= 2e-2
    assert torch.equal(norm(x.float()), expected)


def test_affine_free_norm_switches_autocast_off_for_its_operator_alone(monkeypatch):
    """Eagerly the norm turns autocast off and on again around its operator (cheaper than a
    ``torch.autocast(enabled=False)`` region): off inside, on after, also when the operator raises."""
    seen = []
    layer_norm = torch.nn.functional.layer_norm

    def spy(x, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return layer_norm(x, *args, **kwargs)

    monkeypatch.setattr(layers.F, "layer_norm", spy)
    norm = AffineFreeLayerNorm(32, eps=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        norm(torch.randn(2, 32, dtype=torch.bfloat16))
        assert torch.is_autocast_enabled("cpu")
        with pytest.raises(RuntimeError):
            norm(torch.randn(2, 31, dtype=torch.bfloat16))  # not 32 features
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    norm(torch.randn(2, 32))
    assert seen == [False, False, False] and not torch.is_autocast_enabled("cpu")
    with torch.device("meta"):  # a device type without autocast
        assert norm(torch.empty(2, 32)).shape == (2, 32)


def test_affine_free_norm_gives_float32_cpu_inference_the_vectorised_kernel(monkeypatch):
    calls = []
    layer_norm = torch.nn.functional.layer_norm

    def spy(x, shape, weight=None, bias=None, eps=1e-5):
        calls.append((x.dtype, weight is not None and bias is not None))
        return layer_norm(x, shape, weight, bias, eps)

    monkeypatch.setattr(layers.F, "layer_norm", spy)
    norm = AffineFreeLayerNorm(32, eps=1e-6)
    x = torch.randn(4, 7, 32) * 3 + 1
    plain = layer_norm(x, (32,), eps=1e-6)
    with torch.inference_mode():
        assert torch.equal(norm(x), plain)  # a scale of ones and a shift of zeros change no bit
        norm(x.to(torch.bfloat16))
    with torch.no_grad():
        norm(x)
    trained = x.clone().requires_grad_()
    norm(trained).sum().backward()
    assert calls == [(torch.float32, True), (torch.bfloat16, False), (torch.float32, True), (torch.float32, False)]
    assert trained.grad is not None
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fake, torch.inference_mode():  # (as memory and FLOP estimators run it)
        assert norm(fake.from_tensor(x)).shape == x.shape
    with torch.inference_mode():
        assert torch.equal(norm(x), plain)  # nothing fake was kept for later calls


def test_training_after_reparameterize_takes_gradients():
    model = _tiny()
    with torch.inference_mode():  # folded parameters must still be normal, trainable tensors
        model.reparameterize()
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    logits, aux = model(torch.randn(2, 3, 64, 64))
    logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("aux_head"))


def test_checkpoints_and_export_refuse_a_folded_model_clearly():
    plain = _tiny()
    folded = _tiny().reparameterize()
    with pytest.raises(CheckpointError, match="load checkpoints before calling reparameterize"):
        convert_checkpoint(plain.state_dict(), folded)
    with pytest.raises(CheckpointError, match="load checkpoints before calling reparameterize"):
        convert_checkpoint(export_official_state_dict(plain), folded)
    with pytest.raises(CheckpointError, match="export it before calling reparameterize"):
        export_official_state_dict(folded)
    # a folded model's own state dict fits another folded model of the same configuration
    other = _tiny(seed=1).reparameterize()
    other.load_state_dict(convert_checkpoint(folded.state_dict(), other))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(other(x), folded(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reparameterize_removes_the_float32_norm_copies_on_cuda(exact_fp32):
    """Under CUDA bf16 autocast the folded model dispatches fewer copies and adds, and no float32
    layer norm (the counts the GPU benefit comes from; docs/performance.md)."""
    model = rmt.create_model("rmt_t").eval().cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")

    def run() -> tuple[torch.Tensor, Count]:
        # autocast's cache off: the folded model's weight cache (tests/test_autocast_weight_cache.py)
        # would take its weight casts away too; these counts are the folds' own
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False), Count() as count:
            return model(x).float(), count

    reference, before = run()
    model.reparameterize()
    folded, after = run()
    blocks = sum(len(s.blocks) for s in model.stages)
    assert before.float_norms == 2 * blocks and after.float_norms == 0
    # autocast's casts reach the dispatch mode as aten.to (the first GPU run of this test counted
    # only _to_copy and copy_, and saw 14 copies instead of the casts)
    copies = lambda c: c.ops.get("to", 0) + c.ops.get("_to_copy", 0) + c.ops.get("copy_", 0)  # noqa: E731
    # per block: the norms' two float32 input copies and three bf16 output casts, and the two
    # folded conv biases' casts; the two residual adds folded into the depthwise convs
    assert copies(after) <= copies(before) - 5 * blocks
    assert after.ops["add_"] <= before.ops["add_"] - 2 * blocks
    assert ((folded - reference).norm() / reference.norm()).item() <= 3e-2
