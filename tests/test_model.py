"""Model behaviour: attention kernels agree, any input size, timm conventions, compile, training."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable

import pytest
import timm
import torch

import rmt
from rmt.models.attention import ManhattanPosition
from rmt.models.config import RMTConfig

TINY = RMTConfig(
    embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(2, 2, 4, 4), mlp_ratios=(3, 3, 3, 3),
    decomposed_stages=(True, True, False, False), layer_scale_stages=(False, False, True, True),
    head_hidden_size=64, num_classes=10,
)


def _randomize_norms(model: torch.nn.Module) -> None:
    """Non-trivial batch-norm statistics and layer scales, so every branch matters."""
    g = torch.Generator().manual_seed(0)
    for name, tensor in model.state_dict().items():
        if name.endswith("running_var") or name.endswith("gamma"):
            tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
        elif name.endswith("running_mean"):
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.1)


@pytest.mark.parametrize(
    "name, size, deferred_max_bytes",
    # both CPU choices of auto: the deferred normalisation (every pass at these sizes) and, with
    # its size limit at 0, SDPA
    [("rmt_t", (224, 224), None), ("rmt_t", (160, 224), 0), ("rmt_t", (256, 96), None), ("rmt_s", (224, 224), None)],
)
def test_fast_path_equals_reference_path(name, size, deferred_max_bytes, monkeypatch):
    from rmt.models import attention

    if deferred_max_bytes is not None:
        monkeypatch.setattr(attention, "CPU_DEFERRED_MAX_SCORE_BYTES", deferred_max_bytes)
    torch.manual_seed(0)
    model = rmt.create_model(name).eval()
    _randomize_norms(model)
    x = torch.randn(2, 3, *size)
    with torch.inference_mode():
        fast = model(x)
        model.set_attn_kernel("reference")
        reference = model(x)
    assert fast.shape == (2, 1000)
    assert (fast - reference).abs().max().item() <= 1e-5


def test_flex_kernel_matches_on_cpu():
    torch.manual_seed(0)
    model = rmt.RMT(TINY, attn_kernel="reference").eval()
    x = torch.randn(2, 3, 128, 96)
    with torch.inference_mode():
        reference = model(x)
        model.set_attn_kernel("flex")
        flex = model(x)
    assert (flex - reference).abs().max().item() <= 1e-5


def test_bfloat16_autocast_on_cpu_close_to_float32():
    torch.manual_seed(0)
    model = rmt.RMT(TINY).eval()
    _randomize_norms(model)
    x = torch.randn(2, 3, 160, 96)  # stage-1 passes of 24 and 40 tokens, stage-2 of 12 and 20
    with torch.inference_mode():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x)
    assert half.dtype == torch.bfloat16
    relative = (half.float() - full).norm() / full.norm()
    assert relative.item() < 3e-2


def test_unknown_kernel_is_a_clear_error():
    with pytest.raises(rmt.ConfigError, match="unknown attention kernel 'fast'"):
        rmt.create_model("rmt_t", attn_kernel="fast")


def test_rotary_real_and_complex_forms_agree_with_the_official_theta_shift():
    from rmt.models.attention import rotate_queries_and_keys

    position = ManhattanPosition(64, 4, 2.0, 4.0, decomposed=True)
    tables = position.tables(6, 5, torch.float32, with_masks=True)
    qk = torch.randn(2, 6, 5, 2, 4, 16)
    complex_form = rotate_queries_and_keys(qk, tables)
    real_form = rotate_queries_and_keys(qk.double(), position.tables(6, 5, torch.float64, with_masks=True))
    assert (complex_form.double() - real_form).abs().max().item() < 1e-5
    in_place = qk.clone()
    assert rotate_queries_and_keys(in_place, tables, inplace=True) is in_place
    assert torch.equal(in_place, complex_form)

    # the official code (float32 tables): k scaled by head_dim ** -0.5, then
    # x * cos + rotate_every_two(x) * sin
    phase = torch.arange(30, dtype=torch.float32)[:, None] * position.angle
    sin, cos = torch.sin(phase).reshape(6, 5, 1, 16), torch.cos(phase).reshape(6, 5, 1, 16)

    def theta_shift(x):
        rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
        return x * cos + rotated * sin

    q, k = qk.unbind(3)
    official = torch.stack([theta_shift(q), theta_shift(k * 16**-0.5)], dim=3)
    assert (complex_form - official).abs().max().item() < 1e-5


def _attention_inputs(h, w, heads, decomposed):
    position = ManhattanPosition(16 * heads, heads, 2.0, 4.0, decomposed=decomposed)
    q, k, v = (torch.randn(2, h, w, heads, 16) for _ in range(3))
    return position, position.tables(h, w, torch.float32, with_masks=True), q, k, v


def _decayed_attention_by_definition(q, k, v, decay, distance):
    """softmax(q k^T + decay * distance) v in float64, on (groups, L, heads, d); k pre-scaled."""
    scores = torch.einsum("gind,gjnd->gnij", q, k) + decay[:, None, None] * distance
    return torch.einsum("gnij,gjnd->gind", torch.softmax(scores, dim=-1), v)


@pytest.mark.parametrize("kernel", ["auto", "sdpa", "reference"])
@pytest.mark.parametrize("size", [(12, 20), (40, 9), (7, 72)])
def test_decomposed_attention_by_definition(kernel, size):
    from rmt.models.attention import decomposed_attention

    h, w = size
    position, tables, q, k, v = _attention_inputs(h, w, 3, decomposed=True)
    out = decomposed_attention(q, k, v, tables, kernel)

    q64, k64, v64, decay = q.double(), k.double(), v.double(), position.decay.double()
    line = lambda n: (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs().double()  # noqa: E731
    rows = _decayed_attention_by_definition(*(t.reshape(2 * h, w, 3, 16) for t in (q64, k64, v64)), decay, line(w))
    rows = rows.reshape(2, h, w, 3, 16)
    columns = _decayed_attention_by_definition(
        *(t.transpose(1, 2).reshape(2 * w, h, 3, 16) for t in (q64, k64, rows)), decay, line(h)
    )
    expected = columns.reshape(2, w, h, 3, 16).transpose(1, 2)
    assert out.shape == expected.shape
    assert (out.double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("kernel", ["auto", "sdpa", "reference"])
@pytest.mark.parametrize("size", [(3, 4), (5, 6), (9, 9)])
def test_full_attention_by_definition(kernel, size):
    from rmt.models.attention import full_attention

    h, w = size
    position, tables, q, k, v = _attention_inputs(h, w, 4, decomposed=False)
    out = full_attention(q, k, v, tables, kernel)
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
    manhattan = (grid[:, None] - grid[None]).abs().sum(-1).double()
    expected = _decayed_attention_by_definition(
        *(t.double().reshape(2, h * w, 4, 16) for t in (q, k, v)), position.decay.double(), manhattan
    )
    assert (out.double() - expected.reshape(2, h, w, 4, 16)).abs().max().item() < 1e-5


def _deferred_and_reference(q, k, v, mask):
    from rmt.models.attention import DecayBias, _attend_deferred_normalisation, _attend_reference

    bias = DecayBias(mask, torch.zeros(mask.shape[1]), 0)
    return _attend_deferred_normalisation(q, k, v, bias), _attend_reference(q, k, v, bias)


@pytest.mark.parametrize(
    "dtype, scale, shift, v_scale",
    [
        (torch.float32, 1.0, 0.0, 1.0),  # ordinary scores
        (torch.float64, 1.0, 0.0, 1.0),
        # the max-subtracted softmax redoes the call when:
        (torch.float32, 30.0, 0.0, 1.0),  # scores past exp's range
        # every weight finite, their sums past the largest number; small values keep weights @ v
        # finite too, so that only the sums show it (the output would be all zeros)
        (torch.float32, 0.0, 87.0, 0.01),
        (torch.float64, 0.0, 708.0, 0.01),
        (torch.float32, 1.0, -200.0, 1.0),  # every weight of a row subnormal or zero
        # bfloat16 (CPU autocast) has float32's range: the same cases, to its own precision
        (torch.bfloat16, 1.0, 0.0, 1.0),
        (torch.bfloat16, 30.0, 0.0, 1.0),
        (torch.bfloat16, 0.0, 87.0, 0.01),
    ],
)
def test_deferred_normalisation_is_the_softmax_attention(dtype, scale, shift, v_scale):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 14, 16, dtype=dtype) for _ in range(3))
    line = (torch.arange(14)[:, None] - torch.arange(14)[None, :]).abs().to(dtype)
    mask = (line * torch.tensor([-0.3, -0.05], dtype=dtype)[:, None, None]).unsqueeze(0) + shift
    deferred, reference = _deferred_and_reference(q * scale, k, v * v_scale, mask)
    assert torch.isfinite(deferred).all()
    # bfloat16: both round weights and outputs to 8 significant bits, each its own way
    tolerance = 3e-2 * v_scale if dtype == torch.bfloat16 else 1e-5
    assert (deferred - reference).abs().max().item() < tolerance


def test_deferred_normalisation_falls_back_before_flushed_subnormals_matter():
    # one weight of 14 * tiny and thirteen just below tiny: flushed to zero, 13/27 of the row is lost
    tiny = torch.finfo(torch.float32).tiny
    row = torch.full((14,), math.log(0.99 * tiny))
    row[0] = math.log(14 * tiny)
    mask = row.expand(1, 1, 14, 14).contiguous()
    q, k = torch.zeros(1, 1, 14, 16), torch.zeros(1, 1, 14, 16)
    v = torch.randn(1, 1, 14, 16)
    if not torch.set_flush_denormal(True):  # returns whether this CPU can flush
        pytest.skip("this CPU cannot flush subnormals")
    try:
        deferred, reference = _deferred_and_reference(q, k, v, mask)
    finally:
        torch.set_flush_denormal(False)  # torch's default
    assert (deferred - reference).abs().max().item() < 1e-5


def test_deferred_normalisation_passes_nan_through_and_takes_empty_inputs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 16) for _ in range(3))
    q[0, 1, 3, 5] = float("nan")
    deferred, reference = _deferred_and_reference(q, k, v, torch.zeros(1, 2, 9, 9))
    assert torch.equal(deferred.isnan(), reference.isnan()) and deferred.isnan().any()
    empty = torch.zeros(0, 2, 9, 16)
    assert _deferred_and_reference(empty, empty, empty, torch.zeros(1, 2, 9, 9))[0].shape == (0, 2, 9, 16)


def test_deferred_normalisation_backward_matches_the_softmax():
    torch.manual_seed(0)
    inputs = [torch.randn(2, 3, 11, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    mask = -torch.rand(1, 3, 11, 11, dtype=torch.float64)
    grads = []
    for out in _deferred_and_reference(*inputs, mask):
        grads.append(torch.autograd.grad(out.square().sum(), inputs))
    for deferred, reference in zip(*grads):
        assert (deferred - reference).abs().max().item() < 1e-10


def test_cpu_inference_in_chunks_of_images_gives_the_same_numbers(monkeypatch):
    import rmt.models.rmt as rmt_module

    torch.manual_seed(0)
    model = rmt.RMT(TINY).eval()
    _randomize_norms(model)
    x = torch.randn(3, 3, 64, 96)
    calls = []
    model.stages[0].blocks[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.inference_mode():
        monkeypatch.setattr(rmt_module, "CPU_TOKENS_PER_CHUNK", 10**9)
        whole = model(x)
        assert calls == [3]
        monkeypatch.setattr(rmt_module, "CPU_TOKENS_PER_CHUNK", 1)  # one image at a time
        chunked = model(x)
        assert calls[1:] == [1, 1, 1]
        assert model(torch.randn(2, 3, 3, 3)).shape == (2, 10)  # a stem output of 0 tokens per image
    assert (chunked - whole).abs().max().item() <= 1e-6

    # training mode (batch statistics) and autograd always see the whole batch
    calls.clear()
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    assert calls == [3, 3]

    # so do batch norms re-estimating their statistics inside an eval-mode model
    stem_norm = model.stem[1]
    stem_norm.train()
    before = stem_norm.num_batches_tracked.item()
    with torch.no_grad():
        model(x)
    assert stem_norm.num_batches_tracked.item() == before + 1  # one batch, not one per chunk


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # torch.jit.trace
def test_auto_picks_the_kernel_by_device_dtype_and_score_size():
    from rmt.models.attention import _KERNELS, CPU_DEFERRED_MAX_SCORE_BYTES, _resolve

    def q(length, groups=1, dtype=torch.float32, device="cpu"):  # (B, G, L, heads, d), no memory behind it
        return torch.empty(1, dtype=dtype, device=device).expand(1, groups, length, 4, 16)

    largest = CPU_DEFERRED_MAX_SCORE_BYTES // (4 * 4 * 56 * 56)  # groups of 56-token sequences that fit
    assert _resolve("auto", q(14)) is _KERNELS["cpu_deferred_normalisation"]
    assert _resolve("auto", q(56, largest)) is _KERNELS["cpu_deferred_normalisation"]
    assert _resolve("auto", q(56, largest + 1)) is _KERNELS["sdpa"]
    assert _resolve("auto", q(14, dtype=torch.float64)) is _KERNELS["cpu_deferred_normalisation"]
    # bfloat16 by the same limit, its scores counted as float32's, and only up to 64 tokens:
    # rmt_t's 196-token stage 3 stays on SDPA at every batch size
    assert _resolve("auto", q(56, largest, dtype=torch.bfloat16)) is _KERNELS["cpu_deferred_normalisation"]
    assert _resolve("auto", q(56, largest + 1, dtype=torch.bfloat16)) is _KERNELS["sdpa"]
    assert _resolve("auto", q(64, dtype=torch.bfloat16)) is _KERNELS["cpu_deferred_normalisation"]
    assert _resolve("auto", q(65, dtype=torch.bfloat16)) is _KERNELS["sdpa"]
    # float16, whose exp overflows at 11: the plain math on short sequences
    assert _resolve("auto", q(64, dtype=torch.float16)) is _KERNELS["cpu_matmul"]
    assert _resolve("auto", q(65, dtype=torch.float16)) is _KERNELS["sdpa"]
    assert _resolve("auto", q(14, device="meta")) is _KERNELS["sdpa"]
    assert _resolve("reference", q(14)) is _KERNELS["reference"]
    assert _resolve("triton", q(14)) is _KERNELS["cpu_deferred_normalisation"]
    assert _resolve("auto", SimpleNamespace(device=torch.device("cuda"))) is _KERNELS["cuda_sdpa_efficient_first"]

    # a trace would freeze the range check's outcome for its example input: the plain math instead
    chosen = []

    def attend(x):
        chosen.append(_resolve("auto", x.unsqueeze(0).unsqueeze(0).unsqueeze(-2)))
        return x * 2

    torch.jit.trace(attend, torch.zeros(14, 16), check_trace=False)
    assert chosen == [_KERNELS["reference"]]


def test_tables_are_built_once_per_size(monkeypatch):
    model = rmt.RMT(TINY).eval()
    builds = []
    original = ManhattanPosition._build

    def counting(self, *args):
        builds.append(args)
        return original(self, *args)

    monkeypatch.setattr(ManhattanPosition, "_build", counting)
    with torch.inference_mode():
        for _ in range(3):
            model(torch.randn(1, 3, 64, 64))
        assert len(builds) == 4  # one per stage, not per block or per call
        model(torch.randn(1, 3, 96, 64))
        assert len(builds) == 8  # a new size builds its own
        model(torch.randn(1, 3, 64, 64))
        assert len(builds) == 8


def test_features_only_for_dense_prediction():
    model = timm.create_model("rmt_s", features_only=True)
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(torch.randn(1, 3, 256, 320))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 64, 80), (1, 128, 32, 40), (1, 256, 16, 20), (1, 512, 8, 10)]
    some = timm.create_model("rmt_t", features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in some(torch.randn(1, 3, 64, 64))] == [128, 512]


@pytest.mark.parametrize("out_indices", [(7,), (0, 4), 0, 5, (1.5,), "0"])
def test_feature_indices_out_of_range_are_a_clear_error(out_indices):
    with pytest.raises(rmt.ConfigError, match=r"give stage indices 0 to 3 \(or -4 to -1\), or a count of last stages 1 to 4"):
        rmt.create_model("rmt_t", features_only=True, out_indices=out_indices)
    import numpy as np

    numpy_indices = rmt.create_model("rmt_t", features_only=True, out_indices=(np.int64(1), np.int64(3)))  # as timm takes them
    assert numpy_indices.feature_info.channels() == [128, 512]


def test_features_from_create_model_with_checkpoint(tmp_path):
    source = rmt.create_model("rmt_t")
    torch.save(rmt.export_official_state_dict(source), tmp_path / "t.pth")
    model = rmt.create_model("rmt_t", features_only=True, checkpoint=tmp_path / "t.pth")
    assert len(model(torch.randn(1, 3, 64, 64))) == 4


def test_timm_registry_and_pretrained_cfg():
    assert set(rmt.list_models()) <= set(timm.list_models("rmt_*"))
    plain = timm.create_model("rmt_s", pretrained=False)
    tl = timm.create_model("rmt_b_tl")
    for model, crop in ((plain, 0.875), (tl, 0.96)):
        cfg = model.pretrained_cfg
        assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
        assert cfg["crop_pct"] == crop
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    data_cfg = timm.data.resolve_data_config({}, model=plain)
    assert data_cfg["crop_pct"] == 0.875


def test_timm_conventions():
    model = rmt.create_model("rmt_t", num_classes=7).eval()
    assert model.num_features == 512 and model.head_hidden_size == 1024
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        feats = model.forward_features(x)
        assert feats.shape == (2, 2, 2, 512)  # (B, H, W, C)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 1024)
        assert model(x).shape == (2, 7)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model(x).shape == (2, 1024)
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1] for t in inter] == [64, 128, 256, 512] and final.shape == (2, 2, 2, 512)


def test_token_label_head():
    model = rmt.RMT(TINY.replace(token_label=True)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        feats = model.forward_features(x)
        cls = model.head(feats)
        aux = model.aux_head(feats.flatten(1, 2))
        assert torch.allclose(model(x), cls + 0.5 * aux.max(1)[0])
    model.train()
    logits, dense = model(x)
    assert logits.shape == (2, 10) and dense.shape == (2, 4, 10)


def test_training_step_and_grad_checkpointing():
    model = rmt.RMT(TINY.replace(drop_path_rate=0.1)).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model.eval()  # deterministic (no drop path) for the comparison
    model.set_grad_checkpointing(False)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-6), n


def test_gradients_of_the_fast_float32_path_match_float64():
    """The float32 path rotates q/k in place (complex form) and picks CPU kernels by length;
    float64 takes the real-form rotary: their gradients must agree."""
    torch.manual_seed(0)
    model = rmt.RMT(TINY).eval()
    _randomize_norms(model)
    x = torch.randn(2, 3, 64, 288)  # stage-1 rows of 72 tokens take SDPA, the rest the matmul kernels
    model(x).square().sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.double()
    model(x.double()).square().sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(fast[n].double(), p.grad, rtol=1e-3, atol=1e-5), n


def test_moving_the_model_rebuilds_tables():
    model = rmt.RMT(TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        model.double()
        assert torch.allclose(model(x.double()).float(), ref, atol=1e-5)


def test_torch_compile_fullgraph_same_output():
    """torch.compile(rmt_t) without graph breaks (fullgraph=True raises on one) gives the same logits."""
    torch.manual_seed(0)
    model = rmt.create_model("rmt_t").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)(x)
    assert (compiled - eager).abs().max().item() <= 1e-4


def _graph_ops(model: torch.nn.Module, x: torch.Tensor, **compile_kwargs) -> tuple[set[str], torch.Tensor]:
    """The functions the Dynamo graph of ``model`` calls, compiled with no tables cached yet, and
    its output for ``x``."""
    for module in model.modules():
        if isinstance(module, ManhattanPosition):
            module.clear_tables()
    called: set[str] = set()

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        called.update(getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True, **compile_kwargs)(x)
    return called, out


@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_a_compiled_graph_holds_the_tables_as_constants_and_traces_them_for_symbolic_sizes(kernel):
    """Traced, the rotary tables and decay masks were computed again in every pass of a graph
    compiled before any eager pass at its size; at fixed sizes the graph holds them as constants.
    With symbolic sizes they are traced."""
    torch.manual_seed(0)
    model = rmt.RMT(TINY, attn_kernel=kernel).eval()
    _randomize_norms(model)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        eager = model(x)
    table_ops = {"arange", "cos", "sin"}
    fixed, out = _graph_ops(model, x, dynamic=False)
    assert not fixed & table_ops
    assert (out - eager).abs().max().item() <= 1e-5
    torch._dynamo.reset()
    symbolic, out = _graph_ops(model, x, dynamic=True)
    assert table_ops <= symbolic
    assert (out - eager).abs().max().item() <= 1e-5


def test_each_copy_of_a_model_compiles_with_its_own_tables():
    """A compiled graph finds a stage's tables through the stage's key (dynamo of torch 2.11 cannot
    pass the module itself): a copy, deep or pickled, has keys of its own, so its graph is built
    from its own buffers, on its own device."""
    import copy
    import pickle

    from rmt.models import attention

    model = rmt.RMT(TINY).eval()
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    keys = set()
    for m in [model, *copies]:
        for position in (p for p in m.modules() if isinstance(p, ManhattanPosition)):
            assert attention._positions[position._key] is position
            keys.add(position._key)
    assert len(keys) == 3 * sum(isinstance(p, ManhattanPosition) for p in model.modules())
    x = torch.randn(1, 3, 64, 64)
    twice = copies[0].double()
    with torch.no_grad():
        compiled = torch.compile(twice, backend="eager", fullgraph=True, dynamic=False)(x.double())
        assert compiled.dtype == torch.float64
        assert (compiled - twice(x.double())).abs().max().item() <= 1e-12


@pytest.mark.parametrize("deferred_max_bytes", [None, 0])  # the deferred normalisation; SDPA, another output layout
def test_compiled_cpu_inference_runs_the_eager_kernels_through_one_operator(deferred_max_bytes, monkeypatch):
    from rmt.models import attention

    if deferred_max_bytes is not None:
        monkeypatch.setattr(attention, "CPU_DEFERRED_MAX_SCORE_BYTES", deferred_max_bytes)
    torch.manual_seed(0)
    model = rmt.RMT(TINY).eval()
    _randomize_norms(model)
    x = torch.randn(8, 3, 64, 64)  # two chunks of images at the first stage
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        eager = model(x)
        compiled(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = compiled(x)
    calls = {e.key: e.count for e in prof.key_averages()}
    # one call per block and chunk of images (at batch 8 only the first stage's 16x16 tokens come in
    # chunks): 2 + 2 + 1 + 1
    assert calls.get("rmt::cpu_manhattan_attention") == 6
    # inside, the eager kernels: a row and a column pass in each call of the decomposed stages, one pass in the others
    inner = ("aten::_scaled_dot_product_flash_attention_for_cpu" if deferred_max_bytes == 0
             else "rmt::deferred_normalisation_attention")
    assert calls.get(inner) == 10
    assert (out - eager).abs().max().item() <= 1e-5


def test_compiled_cpu_training_keeps_the_differentiable_math():
    torch.manual_seed(0)
    model = rmt.RMT(TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    model(x).square().sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.compile(model, fullgraph=True, dynamic=False)(x).square().sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, eager[n], rtol=1e-4, atol=1e-5), n


@pytest.mark.parametrize("decomposed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_graphs_cpu_attention_operator_passes_opcheck(decomposed, dtype):
    from rmt.models.attention import _cpu_manhattan_attention_op

    position = ManhattanPosition(32, 2, 2.0, 4.0, decomposed)
    tables = position.tables(5, 7, dtype, with_masks=True)
    qk = torch.randn(2, 5, 7, 2, 2, 16, dtype=dtype)
    v = torch.randn(2, 5, 7, 2, 16, dtype=dtype)
    masks = (tables.rows.mask, tables.columns.mask, 0) if decomposed else (tables.full.mask, None, 7)
    torch.library.opcheck(_cpu_manhattan_attention_op, (qk, v, tables.cos, tables.sin, position.decay, *masks))


def test_a_model_built_on_the_meta_device_computes_its_unsaved_buffers_again(tmp_path):
    """timm's way to build big models without allocating: meta, to_empty, load, then the buffers the state dict lacks."""
    from timm.models._manipulate import reinit_non_persistent_buffers

    reference = rmt.RMT(TINY).eval()
    with torch.device("meta"):
        model = rmt.RMT(TINY)
    model = model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    assert len(reinit_non_persistent_buffers(model)) == TINY.num_stages
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference(x))


def test_a_traced_model_takes_other_batch_sizes():
    """Eval-mode CPU inference runs in chunks of images; a trace must not freeze their number."""
    model = rmt.RMT(TINY).eval()
    with torch.no_grad(), pytest.warns(Warning):  # the tracer's own warnings about Python values
        traced = torch.jit.trace(model, torch.randn(2, 3, 224, 224))
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        assert (traced(x) - model(x)).abs().max() < 1e-5


@pytest.mark.parametrize("bad, message", [
    (lambda m: m(torch.randn(3, 64, 64)), r"takes images as a \(batch, 3, height, width\) tensor, got shape \(3, 64, 64\)"),
    (lambda m: m(torch.randn(1, 1, 64, 64)), r"got shape \(1, 1, 64, 64\)"),
    (lambda m: m.reset_classifier(-1), "num_classes must be a whole number >= 0, got -1"),
    (lambda m: m.reset_classifier(5, "max"), "global_pool is 'avg'"),
    (lambda m: m.forward_intermediates(torch.randn(1, 3, 64, 64), output_fmt="NLC"), "output_fmt must be NCHW or NHWC"),
    (lambda m: rmt.RMT(TINY, drop_path_rate=2.0), "drop_path_rate must be a number from 0 to below 1, got 2.0"),
    (lambda m: rmt.RMT(TINY, num_classes="10"), "num_classes must be a whole number >= 0, got '10'"),
    (lambda m: rmt.RMT(TINY, num_classes=10.0), "num_classes must be a whole number >= 0, got 10.0"),
    (lambda m: rmt.RMT(TINY, global_pool="", num_classes=10), "use it with num_classes=0"),
    (lambda m: rmt.create_model(None), "a model name is a string"),
    (lambda m: rmt.create_model(["rmt_t"]), "a model name is a string"),
    (lambda m: rmt.create_model("rmt_t", checkpoint="never-read.pth", global_pool=""), "use it with num_classes=0"),
])
def test_bad_input_is_a_one_line_rmt_error(bad, message):
    with pytest.raises(rmt.RMTError, match=message):
        bad(rmt.RMT(TINY).eval())


def test_timm_model_arguments():
    x = torch.randn(1, 3, 64, 64)
    model = rmt.RMT(TINY).eval()
    with torch.no_grad():
        features = model.forward_features(x)
        headless = rmt.RMT(TINY, num_classes=0, global_pool="")
        headless.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
        assert torch.equal(headless.eval()(x), features)  # no head: the last stage's features
        model.reset_classifier(7)
        assert model(x).shape == (1, 7) and model.cfg.num_classes == 7
        with pytest.raises(rmt.RMTError, match="use it with num_classes=0"):
            model.reset_classifier(10, "")
        assert model.cfg.num_classes == model.num_classes == 7  # a refused call changes nothing
        model.reset_classifier(0, "")
        assert torch.equal(model(x), features)
        model.reset_classifier(0)  # no classifier: nothing to do
        assert isinstance(model.get_classifier(), torch.nn.Identity)
        with pytest.raises(rmt.RMTError, match="head was removed"):
            model.reset_classifier(3)
        pruned = rmt.RMT(TINY).eval()
        pruned.prune_intermediate_layers([0, 1, 2])
        assert pruned(x).shape == (1, 4, 4, TINY.embed_dims[2])  # forward still runs, up to the last kept stage
    assert rmt.RMT(TINY, device="meta").stem[0].weight.is_meta
    assert rmt.RMT(TINY, dtype=torch.bfloat16).stem[0].weight.dtype == torch.bfloat16
    assert timm.create_model("rmt_t", num_classes=0, global_pool="").head.__class__.__name__ == "_NoHead"


def test_timms_fx_feature_extractor_traces_rmt():
    """Stages and the input check are FX leaves (their CPU chunking and shape checks branch on sizes)."""
    x = torch.randn(2, 3, 64, 64)
    fx = timm.create_model("rmt_t", features_only=True, feature_cls="fx").eval()
    getter = timm.create_model("rmt_t", features_only=True).eval()
    getter.load_state_dict({k.replace("graph_module.", "model."): v for k, v in fx.state_dict().items()})
    with torch.no_grad():
        for nhwc, nchw in zip(fx(x), getter(x), strict=True):  # the stages' own (B, H, W, C) layout
            assert torch.equal(nhwc.permute(0, 3, 1, 2), nchw)


def test_timms_hook_features_and_refused_kinds():
    x = torch.randn(1, 3, 64, 64)
    hook = timm.create_model("rmt_t", features_only=True, feature_cls="hook").eval()
    getter = timm.create_model("rmt_t", features_only=True).eval()
    loaded = hook.load_state_dict({"body." + k[len("model."):]: v for k, v in getter.state_dict().items()}, strict=False)
    assert loaded.missing_keys and all(k.startswith("body.head.") for k in loaded.missing_keys)  # hooks keep the head
    with torch.no_grad():
        for nhwc, nchw in zip(hook(x), getter(x), strict=True):  # the stages' own (B, H, W, C) layout
            assert torch.equal(nhwc.permute(0, 3, 1, 2), nchw)
    # they run the network's top-level children in turn: timm would fail on an assertion
    from timm.models._features import FeatureListNet

    for kind, named in (("dict", "'dict'"), ("List", "'List'"), (FeatureListNet, "'FeatureListNet'")):
        for create in (timm.create_model, rmt.create_model):
            with pytest.raises(rmt.ConfigError, match=f"feature_cls={named} is not supported by RMT: use 'getter'"):
                create("rmt_t", features_only=True, feature_cls=kind)
    with pytest.raises(rmt.ConfigError, match="unknown feature_cls 'bogus': choose getter"):
        timm.create_model("rmt_t", features_only=True, feature_cls="bogus")  # timm: a bare assertion


@pytest.mark.parametrize("strict", [False, True])  # strict: through dynamo, as torch.compile
def test_torch_export_with_a_dynamic_batch(strict):
    from torch.export import Dim, export

    model = rmt.RMT(TINY).eval()
    with torch.no_grad():  # an inference export, the case where compiled graphs call the CPU operator
        program = export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}},
                         strict=strict)
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        assert (program.module()(x) - model(x)).abs().max() < 1e-5
    # plain aten operators, which other runtimes can run: not the operator compiled CPU graphs call
    assert not any(str(node.target).startswith("rmt.") for node in program.graph.nodes)
