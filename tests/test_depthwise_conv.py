"""The Triton depthwise conv on (B, H, W, C) tokens (rmt.models.depthwise_conv).

Without a GPU the kernel runs in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which truncates float32 to bfloat16 where a GPU rounds to nearest: the
half-precision checks take values that the half dtype holds exactly, and a tolerance of one
rounding either way. On a GPU these run the compiled kernel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

import rmt  # noqa: E402
from rmt.bench.flops import count_flops  # noqa: E402
from rmt.models import depthwise_conv  # noqa: E402
from rmt.models.config import RMTConfig  # noqa: E402
from rmt.models.layers import DepthwiseConvNHWC, ResidualDepthwiseConvNHWC, keep_autocast_weights  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 means fp32: cuDNN's convs, the library path these tests compare with, may use TF32 otherwise
pytestmark = pytest.mark.usefixtures("exact_fp32")
TINY = RMTConfig(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), mlp_ratios=(2, 2, 2, 2),
                 decomposed_stages=(True, True, False, False), head_hidden_size=32, num_classes=10)


def _by_definition(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """The conv in float64, on (B, H, W, C) tokens."""
    k = weight.shape[-1]
    out = F.conv2d(x.double().permute(0, 3, 1, 2), weight.double(), None if bias is None else bias.double(),
                   padding=k // 2, groups=x.shape[-1])
    return out.permute(0, 2, 3, 1)


@pytest.fixture
def launches(monkeypatch) -> list[tuple]:
    """The kernel's launches: (input shape, output dtype) each."""
    calls, launch = [], depthwise_conv._launch
    monkeypatch.setattr(depthwise_conv, "_launch",
                        lambda x, weight, bias, dtype: calls.append((tuple(x.shape), dtype)) or launch(x, weight, bias, dtype))
    return calls


# (batch, height, width, channels, kernel size): RMT's 3 x 3 and 5 x 5, a 7 x 7, and shapes whose
# tiles are partly masked (channels without a power-of-two factor of 16, grids of one token, more
# tokens than a tile)
SHAPES = [(2, 7, 7, 64, 3), (1, 9, 11, 80, 5), (2, 5, 3, 7, 3), (1, 1, 1, 24, 3), (1, 6, 4, 16, 7), (3, 13, 11, 48, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_float32_matches_the_conv_by_definition(shape, with_bias):
    torch.manual_seed(0)
    b, h, w, c, k = shape
    x = torch.randn(b, h, w, c, device=DEVICE)
    weight = torch.randn(c, 1, k, k, device=DEVICE)
    bias = torch.randn(c, device=DEVICE) if with_bias else None
    out = depthwise_conv.depthwise_conv_nhwc(x, weight, bias)
    assert out.shape == x.shape and out.dtype == torch.float32 and out.is_contiguous()
    expected = _by_definition(x, weight, bias)
    assert (out.double() - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())


def test_strided_inputs_weights_and_biases():
    # channels contiguous, everything else strided: a slice of channels, a transposed grid; a
    # transposed kernel and a channels-last one (the layout folding keeps), a bias of every other value
    torch.manual_seed(0)
    wide = torch.randn(2, 6, 9, 40, device=DEVICE)
    weights = (torch.randn(16, 1, 3, 3, device=DEVICE).transpose(2, 3),
               torch.randn(16, 1, 5, 5, device=DEVICE).to(memory_format=torch.channels_last))
    bias = torch.randn(32, device=DEVICE)[::2]
    assert not weights[0].is_contiguous()
    for x in (wide[..., 8:24], wide[..., :16].transpose(1, 2)):
        assert not x.is_contiguous()
        for weight in weights:
            out = depthwise_conv.depthwise_conv_nhwc(x, weight, bias)
            assert (out.double() - _by_definition(x, weight, bias)).abs().max().item() < 1e-4


def _held_by(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """float32 values that ``dtype`` holds exactly."""
    return torch.randn(*shape, device=DEVICE).to(dtype).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_sums_in_float32_and_rounds_once(dtype):
    torch.manual_seed(0)
    x, weight, bias = _held_by(dtype, 2, 7, 9, 32), _held_by(dtype, 32, 1, 5, 5), _held_by(dtype, 32)
    out = depthwise_conv.depthwise_conv_nhwc(x.to(dtype), weight.to(dtype), bias.to(dtype))
    assert out.dtype == dtype
    expected = _by_definition(x, weight, bias)
    # one rounding of the float32 sum to the half dtype (bf16 keeps 8 bits, fp16 11)
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    assert ((out.double() - expected).abs() <= ulp * expected.abs() + 1e-6).all()


def test_under_autocast_inputs_and_weights_are_rounded_to_its_dtype_as_they_load():
    # x at one token, 1 + 3 * 2**-9 (bf16 holds 1 and 1 + 2**-7: to nearest, 1 + 2**-7; truncated,
    # 1), and -1 at its right; a kernel adding the two (centre and right taps of 1): rounded as
    # loaded, the sum is 2**-7 (truncated, 0); summed in float32 and rounded once, 3 * 2**-9
    x = torch.zeros(1, 1, 2, 16, device=DEVICE)
    x[..., 0, :], x[..., 1, :] = 1 + 3 * 2**-9, -1.0
    weight = torch.zeros(16, 1, 3, 3, device=DEVICE)
    weight[:, 0, 1, 1] = weight[:, 0, 1, 2] = 1.0
    # the weight's turn: a centre tap of 1 + 3 * 2**-9 on x = 1, and a right tap of -1
    x2 = torch.zeros(1, 1, 2, 16, device=DEVICE)
    x2[..., 0, :] = x2[..., 1, :] = 1.0
    weight2 = torch.zeros(16, 1, 3, 3, device=DEVICE)
    weight2[:, 0, 1, 1], weight2[:, 0, 1, 2] = 1 + 3 * 2**-9, -1.0
    interpreted = depthwise_conv._INTERPRETED
    for inputs in ((x, weight), (x2, weight2)):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = depthwise_conv.depthwise_conv_nhwc(*inputs, None)
            library = F.conv2d(inputs[0].permute(0, 3, 1, 2), inputs[1], None, padding=1, groups=16).permute(0, 2, 3, 1)
        assert out.dtype == library.dtype == torch.bfloat16
        first = out[0, 0, 0].float()
        assert library[0, 0, 0].float().eq(2**-7).all()
        # Triton's interpreter truncates float32 to bfloat16 where a GPU rounds to nearest as torch does
        assert first.eq(0.0 if interpreted else 2**-7).all(), first
        if not interpreted:
            assert torch.equal(out, library)


def test_inputs_beyond_32_bit_offsets_are_left_to_the_library():
    # sizes and strides only (meta tensors, no memory): a view whose farthest element lies 2**31
    # elements from its start, and a tensor of more elements than that
    assert depthwise_conv._offsets_fit(torch.empty_strided((2, 4, 4, 16), (2**20, 64, 16, 1), device="meta"))
    assert not depthwise_conv._offsets_fit(torch.empty_strided((2, 4, 4, 16), (2**31, 64, 16, 1), device="meta"))
    assert not depthwise_conv._offsets_fit(torch.empty((2**17, 128, 128, 1), device="meta"))
    assert depthwise_conv._offsets_fit(torch.empty((2**17 - 1, 128, 128, 1), device="meta"))


def test_bad_inputs_raise_one_clear_error():
    x = torch.randn(1, 4, 4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="one dtype, or autocast"):
        depthwise_conv.depthwise_conv_nhwc(x.bfloat16(), torch.randn(8, 1, 3, 3, device=DEVICE), None)
    with pytest.raises(ValueError, match="k odd"):
        depthwise_conv.depthwise_conv_nhwc(x, torch.randn(8, 1, 4, 4, device=DEVICE), None)
    with pytest.raises(ValueError, match="float64"):
        depthwise_conv.depthwise_conv_nhwc(x.double(), torch.randn(8, 1, 3, 3, device=DEVICE).double(), None)
    with pytest.raises(ValueError, match="channels contiguous"):
        depthwise_conv.depthwise_conv_nhwc(x.permute(0, 3, 1, 2), torch.randn(4, 1, 3, 3, device=DEVICE), None)


@pytest.mark.parametrize("cls", [DepthwiseConvNHWC, ResidualDepthwiseConvNHWC])
def test_rmts_convs_run_the_kernel_only_when_enabled_and_without_autograd(monkeypatch, launches, cls):
    torch.manual_seed(0)
    conv = cls(16, 3).to(DEVICE)
    x = torch.randn(2, 5, 7, 16, device=DEVICE)
    with torch.no_grad():
        library = conv(x)
        assert launches == []  # off by default: not yet measured on a GPU
        monkeypatch.setattr(depthwise_conv, "ENABLED", True)
        out = conv(x)
    assert launches == [((2, 5, 7, 16), torch.float32)]
    assert (out - library).abs().max().item() < 1e-5
    # recording autograd: the library conv, which has a backward pass
    conv(x).sum().backward()
    assert len(launches) == 1 and conv.weight.grad is not None
    # other convs: a stride, a padding mode, a padding other than 'same'
    with torch.no_grad():
        for changed in ({"stride": (2, 2)}, {"padding_mode": "reflect"}, {"padding": (0, 0)}):
            other = DepthwiseConvNHWC(16, 3).to(DEVICE)
            for name, value in changed.items():
                setattr(other, name, value)
            other(x)
    assert len(launches) == 1


def test_a_trainable_bias_alone_gets_the_library_conv_and_its_gradient(monkeypatch, launches):
    monkeypatch.setattr(depthwise_conv, "ENABLED", True)
    conv = DepthwiseConvNHWC(16, 3).to(DEVICE)
    conv.weight.requires_grad_(False)  # bias-only fine-tuning
    conv(torch.randn(1, 4, 4, 16, device=DEVICE)).sum().backward()
    assert launches == [] and conv.bias.grad is not None


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation
def test_whatever_watches_the_conv_gets_the_library_conv(monkeypatch, launches):
    """Forward-mode derivatives, torch.func transforms, tensor subclasses, torch-function and
    dispatch modes (FLOP counting, fake tensors), jit and FX tracing see F.conv2d, as without the kernel."""
    from torch.overrides import TorchFunctionMode
    from torch.utils.flop_counter import FlopCounterMode
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(depthwise_conv, "ENABLED", True)
    torch.manual_seed(0)
    conv = DepthwiseConvNHWC(16, 3).to(DEVICE).requires_grad_(False)
    x, tangent = torch.randn(2, 4, 5, 16, device=DEVICE), torch.randn(2, 4, 5, 16, device=DEVICE)
    with torch.no_grad():
        expected = conv(x)
        expected_tangent = conv(tangent) - conv.bias  # the conv is affine: its derivative, the bias-free conv
    assert len(launches) == 2
    del launches[:]
    with torch.no_grad():
        with torch.autograd.forward_ad.dual_level():
            out, out_tangent = torch.autograd.forward_ad.unpack_dual(conv(torch.autograd.forward_ad.make_dual(x, tangent)))
        assert out_tangent is not None and (out_tangent - expected_tangent).abs().max().item() < 1e-5
        _, jvp_tangent = torch.func.jvp(conv, (x,), (tangent,))
        assert (jvp_tangent - expected_tangent).abs().max().item() < 1e-5
        assert (torch.func.vmap(conv)(x[:, None]) [:, 0] - expected).abs().max().item() < 1e-5

        class Watched(torch.Tensor):
            pass

        assert type(conv(x.as_subclass(Watched))) is Watched

        class Records(TorchFunctionMode):
            def __init__(self):
                super().__init__()
                self.names = []

            def __torch_function__(self, func, types, args=(), kwargs=None):
                self.names.append(getattr(func, "__name__", ""))
                return func(*args, **(kwargs or {}))

        with Records() as mode:
            conv(x)
        assert "conv2d" in mode.names
        with FlopCounterMode(display=False) as flops:
            conv(x)
        assert flops.get_total_flops() == 2 * x.numel() * 9
        with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:  # the parameters stay real
            assert conv(fake_mode.from_tensor(x)).shape == x.shape
        traced = torch.jit.trace(conv, x, check_trace=False)  # (the check would call the module eagerly)
        assert "aten::_convolution" in str(traced.inlined_graph)
        assert (traced(x) - expected).abs().max().item() < 1e-5
        fx_traced = torch.fx.symbolic_trace(conv)  # FX proxies, as timm's feature extraction traces
        assert "conv2d" in fx_traced.code and (fx_traced(x) - expected).abs().max().item() < 1e-5
    assert launches == []


def test_tensors_the_kernel_cannot_take_are_left_to_the_library():
    x, weight = torch.randn(1, 4, 4, 16, device=DEVICE), torch.randn(16, 1, 3, 3, device=DEVICE)
    assert depthwise_conv.supports(x, weight, torch.randn(16, device=DEVICE))
    # a weight or bias on another device, meta tensors, a bias of another size
    assert not depthwise_conv.supports(x, weight.to("meta"))
    assert not depthwise_conv.supports(x, weight, torch.randn(16, device="meta"))
    assert not depthwise_conv.supports(x.to("meta"), weight.to("meta"))
    assert not depthwise_conv.supports(x, weight, torch.randn(8, device=DEVICE))
    # under autocast a float64 weight is not cast, and F.conv2d refuses it
    conv = DepthwiseConvNHWC(16, 3).to(DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert depthwise_conv.kernel_dtype(conv, x, weight, None) == torch.bfloat16
        assert depthwise_conv.kernel_dtype(conv, x, weight.double(), None) is None


def test_a_models_logits_are_unchanged_built_folded_and_cached(monkeypatch, launches):
    torch.manual_seed(0)
    model = rmt.RMT(TINY).eval().to(DEVICE)
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    flops_without_kernel = count_flops(model, (32, 32)).macs
    with torch.no_grad():
        library = model(x)
        monkeypatch.setattr(depthwise_conv, "ENABLED", True)
        out = model(x)
        assert len(launches) == 3 * sum(TINY.depths)  # the CPE's, the LCE's and the FFN's in each block
        assert (out - library).abs().max().item() < 1e-5
        # a FLOP count sees F.conv2d (rmt.bench.flops watches the dispatcher): the same count
        assert count_flops(model, (32, 32)).macs == flops_without_kernel
        model.reparameterize()  # identities folded into the CPE and FFN kernels, the weight cache
        assert isinstance(model.stages[0].blocks[0].cpe, ResidualDepthwiseConvNHWC)
        folded = model(x)
        assert len(launches) == 6 * sum(TINY.depths)
        assert (folded - library).abs().max().item() < 1e-4


def test_under_autocast_a_folded_model_launches_no_cast_and_keeps_its_dtype(monkeypatch, launches):
    torch.manual_seed(0)
    conv = ResidualDepthwiseConvNHWC(16, 3).to(DEVICE)
    conv.reparameterize()
    keep_autocast_weights(conv)  # the weight cache: bf16 copies of the weight and bias
    x = _held_by(torch.bfloat16, 1, 4, 4, 16).bfloat16()
    monkeypatch.setattr(depthwise_conv, "ENABLED", True)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16 and launches == [((1, 4, 4, 16), torch.bfloat16)]


def test_inside_a_compiled_graph_as_a_custom_operator(monkeypatch, launches):
    monkeypatch.setattr(depthwise_conv, "ENABLED", True)
    torch.manual_seed(0)
    conv = ResidualDepthwiseConvNHWC(16, 5).to(DEVICE)
    x = torch.randn(2, 6, 5, 16, device=DEVICE)
    with torch.no_grad():
        expected = conv(x)
        # fullgraph: a graph break on the way to the kernel raises
        compiled = torch.compile(conv, backend="aot_eager", fullgraph=True, dynamic=False)
        out = compiled(x)
        assert len(launches) == 2  # eager, then the compiled graph's rmt::depthwise_conv_nhwc
        assert (out - expected).abs().max().item() < 1e-5
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            assert compiled(x).dtype == torch.bfloat16  # the casts in the graph, before the operator
        assert launches[-1][1] == torch.bfloat16
        # and through inductor, which calls the operator from its generated code
        by_inductor = torch.compile(conv, fullgraph=True, dynamic=False)
        calls = len(launches)
        assert (by_inductor(x) - expected).abs().max().item() < 1e-5 and len(launches) == calls + 1


def test_a_whole_model_compiles_to_one_graph_with_the_kernel(monkeypatch, launches):
    monkeypatch.setattr(depthwise_conv, "ENABLED", True)
    torch.manual_seed(0)
    model = rmt.RMT(TINY).eval().to(DEVICE)
    model.reparameterize()
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        expected = model(x)
        del launches[:]
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)  # a graph break raises
        out = compiled(x)
    assert len(launches) == 3 * sum(TINY.depths)  # every conv as rmt::depthwise_conv_nhwc
    assert (out - expected).abs().max().item() < 1e-5


def test_the_custom_operator_passes_torch_librarys_checks():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 16, device=DEVICE)
    torch.library.opcheck(depthwise_conv._depthwise_conv_op, (x, torch.randn(16, 1, 3, 3, device=DEVICE), torch.randn(16, device=DEVICE)))
    torch.library.opcheck(depthwise_conv._depthwise_conv_op, (x[..., 2:10], torch.randn(8, 1, 5, 5, device=DEVICE), None))


def test_tiles_leave_no_channel_lane_idle_at_rmts_widths():
    for width in (64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 1536, 1920, 2560):
        tokens, channels = depthwise_conv._tile(3, width)
        assert width % channels == 0 and channels >= 16 and tokens * channels == 1024
    assert depthwise_conv._tile(5, 64) == (8, 64) and depthwise_conv._tile(7, 7) == (32, 8)
