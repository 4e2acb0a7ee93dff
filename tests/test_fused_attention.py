"""The Triton kernels for short decayed attention (rmt.models.fused_attention).

Without a GPU these run through Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which cannot multiply bfloat16 tiles; on a GPU they run the compiled kernel,
bfloat16 included.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import rmt  # noqa: E402
import rmt.models.attention as attention  # noqa: E402
from rmt.models import fused_attention  # noqa: E402
from rmt.models.attention import (  # noqa: E402
    ManhattanPosition, _fused_manhattan_attention, _runs_fused, manhattan_attention,
)
from rmt.models.checkpoint import convert_checkpoint  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("exact_fp32")


def _by_definition(q, k, v, decay, grid_width):
    """softmax(q k^T + decay * distance) v in float64 over dim 2 of (B, G, L, heads, d)."""
    q, k, v, decay = q.double(), k.double(), v.double(), decay.double()
    index = torch.arange(q.shape[2], device=q.device, dtype=torch.float64)
    if grid_width:
        row, col = index // grid_width, index % grid_width
        distance = (row[:, None] - row[None]).abs() + (col[:, None] - col[None]).abs()
    else:
        distance = (index[:, None] - index[None]).abs()
    scores = torch.einsum("bgind,bgjnd->bgnij", q, k) + decay[:, None, None] * distance
    return torch.einsum("bgnij,bgjnd->bgind", torch.softmax(scores, dim=-1), v)


def _stage_inputs(h, w, heads, head_dim, decomposed, batch=2, dtype=torch.float32):
    """A stage's rotary tables and decay, and random projections as manhattan_attention takes
    them: qk (B, H, W, 2, heads, head_dim), not yet rotated, and v (B, H, W, heads, head_dim)."""
    position = ManhattanPosition(heads * head_dim, heads, 2.0, 4.0, decomposed=decomposed).to(DEVICE)
    tables = position.tables(h, w, dtype, with_masks=True)
    qk = torch.randn(batch, h, w, 2, heads, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, h, w, heads, head_dim, device=DEVICE, dtype=dtype)
    return tables, qk, v


def _strided_inputs(batch, groups, length, heads, head_dim, dtype=torch.float32):
    """q and k as the model has them (unbound from one stacked, transposed projection), v dense."""
    stacked = torch.randn(batch, length, groups, 2, heads, head_dim, device=DEVICE, dtype=dtype)
    q, k = stacked.transpose(1, 2).unbind(3)
    v = torch.randn(batch, groups, length, heads, head_dim, device=DEVICE, dtype=dtype)
    decay = torch.log(1 - 2 ** (-2 - 4 * torch.arange(heads, device=DEVICE) / heads))
    return q, k, v, decay


@pytest.mark.parametrize(
    "length, heads, head_dim, grid_width",
    # RMT's 224-px passes (14/28/56 tokens along a line, 7x7 full) plus padded and extreme cases
    [(14, 2, 16, 0), (28, 2, 32, 0), (56, 4, 16, 0), (20, 3, 16, 0), (64, 1, 64, 0), (49, 2, 32, 7), (35, 2, 16, 7)],
)
@pytest.mark.parametrize("transpose_out", [False, True])
def test_kernel_by_definition(length, heads, head_dim, grid_width, transpose_out):
    torch.manual_seed(0)
    q, k, v, decay = _strided_inputs(2, 3, length, heads, head_dim)
    out = fused_attention.decayed_attention(q, k, v, decay, grid_width, transpose_out)
    if transpose_out:
        assert out.shape == (2, length, 3, heads, head_dim)
        out = out.transpose(1, 2)
    assert out.is_contiguous() or transpose_out
    assert (out.double() - _by_definition(q, k, v, decay, grid_width)).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "length, heads, heads_per_program, head_dim, grid_width",
    # rmt_s's passes with a token's heads in one program (up to 128 rows), six heads in pairs,
    # padded tokens, the 7x7 full pass
    [(14, 8, 8, 32, 0), (28, 4, 4, 16, 0), (56, 4, 2, 16, 0), (20, 6, 2, 16, 0), (49, 4, 2, 32, 7)],
)
@pytest.mark.parametrize("transpose_out", [False, True])
def test_kernel_with_heads_grouped_by_definition(length, heads, heads_per_program, head_dim, grid_width, transpose_out):
    torch.manual_seed(0)
    q, k, v, decay = _strided_inputs(2, 3, length, heads, head_dim)
    out = fused_attention.decayed_attention(q, k, v, decay, grid_width, transpose_out, heads_per_program=heads_per_program)
    if transpose_out:
        out = out.transpose(1, 2)
    assert (out.double() - _by_definition(q, k, v, decay, grid_width)).abs().max().item() < 1e-5


@pytest.mark.parametrize("num_warps", [4, 8])
def test_kernel_with_other_warp_counts_by_definition(num_warps):
    # stage 1's shape, with the warp counts scripts/gpu_attention_variants.py compares (the
    # interpreter ignores warps: on a GPU this compiles and checks each count)
    torch.manual_seed(0)
    q, k, v, decay = _strided_inputs(2, 3, 56, 4, 16)
    out = fused_attention.decayed_attention(q, k, v, decay, 0, False, num_warps=num_warps)
    assert (out.double() - _by_definition(q, k, v, decay, 0)).abs().max().item() < 1e-5


@pytest.mark.parametrize("decomposed, size, groupings", [(True, (12, 20), (2, 4)), (False, (7, 7), (2,))])
def test_grouped_heads_rotate_and_attend_like_the_reference(decomposed, size, groupings):
    torch.manual_seed(0)
    h, w = size
    tables, qk, v = _stage_inputs(h, w, 4, 16, decomposed)
    reference = manhattan_attention(qk.clone(), v, tables, "reference", decomposed)
    for heads_per_program in groupings:  # 49 tokens: 64 rows a head, two heads at most
        fused = _fused_manhattan_attention(qk.clone(), v, tables, decomposed, heads_per_program)
        assert (fused - reference).abs().max().item() < 1e-5, heads_per_program


def _rotated_by_pairs(x, cos, sin):
    """x (B, G, L, heads, d) rotated pair by pair by cos (G, L, d) at each pair's even entry and
    sin at its odd entry, in float32: what the kernels' rotary reads of the tables."""
    c, s = cos[..., 0::2][None, :, :, None].float(), sin[..., 1::2][None, :, :, None].float()
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack((even * c - odd * s, odd * c + even * s), -1).flatten(-2).to(x.dtype)


@pytest.mark.parametrize(
    "layout, heads_per_program",
    # the full pass's 60 tokens take 64 rows a head: two heads a program at most
    [("rows", 1), ("rows", 4), ("columns", 1), ("columns", 2), ("full", 1), ("full", 2)],
)
def test_the_rotary_reads_each_pairs_table_entries(layout, heads_per_program):
    # random tables, without RMT's structure (a pair's two cos entries equal, its sin entries
    # equal but for the sign), under which reading the wrong entry would go unseen
    torch.manual_seed(0)
    b, h, w, n, d = 2, 6, 10, 4, 16
    cos, sin = torch.randn(h, w, 2, d, device=DEVICE), torch.randn(h, w, 2, d, device=DEVICE)
    q, k, v = torch.randn(b, h, w, 3, n, d, device=DEVICE).unbind(3)
    decay = torch.log(1 - 2 ** (-2 - 4 * torch.arange(n, device=DEVICE) / n))
    grid_width = 0
    if layout == "columns":
        cos, sin, q, k, v = cos.transpose(0, 1), sin.transpose(0, 1), *(t.transpose(1, 2) for t in (q, k, v))
    elif layout == "full":
        cos, sin, grid_width = cos.reshape(1, h * w, 2, d), sin.reshape(1, h * w, 2, d), w
        q, k, v = (t.reshape(b, 1, h * w, n, d) for t in (q, k, v))
    out = fused_attention.decayed_attention(q, k, v, decay, grid_width, False, cos, sin, heads_per_program)
    expected = fused_attention.decayed_attention(
        _rotated_by_pairs(q, cos[:, :, 0], sin[:, :, 0]), _rotated_by_pairs(k, cos[:, :, 1], sin[:, :, 1]), v, decay,
        grid_width, False, heads_per_program=heads_per_program,
    )
    assert (out - expected).abs().max().item() < 1e-5


def test_the_kernel_refuses_a_head_grouping_it_cannot_run():
    q, k, v, decay = _strided_inputs(1, 2, 56, 6, 16)
    for heads_per_program in (4, 3, 8):  # not dividing 6, not a power of two, 64 x 8 rows
        with pytest.raises(ValueError, match="cannot give"):
            fused_attention.decayed_attention(q, k, v, decay, 0, False, heads_per_program=heads_per_program)


@pytest.mark.parametrize("heads_per_program", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_in_half_precision(dtype, heads_per_program):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter cannot multiply bfloat16 tiles")
    torch.manual_seed(0)
    q, k, v, decay = _strided_inputs(4, 5, 56, 4, 16)
    expected = _by_definition(q, k, v, decay, 0)
    out = fused_attention.decayed_attention(*(t.to(dtype) for t in (q, k, v)), decay, 0, False,
                                            heads_per_program=heads_per_program)
    assert out.dtype == dtype
    # bf16 keeps 8 significant bits: inputs alone are off by up to 2 ** -9 relative
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < 2e-2


@pytest.mark.parametrize("decomposed, size", [(True, (12, 20)), (True, (56, 40)), (False, (7, 7)), (False, (5, 9))])
def test_manhattan_attention_with_the_triton_kernel_rotates_and_attends_like_the_reference(decomposed, size):
    torch.manual_seed(0)
    h, w = size
    tables, qk, v = _stage_inputs(h, w, 2, 16, decomposed)
    assert _runs_fused("triton", qk, v, *((h, w) if decomposed else (h * w,)))
    fused = manhattan_attention(qk.clone(), v, tables, "triton", decomposed)
    reference = manhattan_attention(qk.clone(), v, tables, "reference", decomposed)
    assert fused.shape == reference.shape == (2, h, w, 2, 16)
    assert (fused - reference).abs().max().item() < 1e-5


def _decomposed_by_definition(q, k, v, decay):
    """Attention along each row of (B, H, W, heads, d) inputs, then along each column of its output."""
    rows = _by_definition(q, k, v, decay, 0)
    return _by_definition(q.transpose(1, 2), k.transpose(1, 2), rows.transpose(1, 2), decay, 0).transpose(1, 2)


@pytest.mark.parametrize(
    "size, heads, head_dim",
    # stage 3 at 224 px (14 x 14), a non-square grid padded both ways, the 16-token limit
    [((14, 14), 2, 32), ((7, 12), 3, 16), ((16, 5), 1, 64), ((1, 16), 2, 16)],
)
def test_both_passes_in_one_program_by_definition(size, heads, head_dim):
    torch.manual_seed(0)
    h, w = size
    stacked = torch.randn(2, w, h, 2, heads, head_dim, device=DEVICE)
    q, k = stacked.transpose(1, 2).unbind(3)  # strided, as the model's
    k = k.contiguous()  # and k with strides of its own
    v = torch.randn(2, h, w, heads, head_dim, device=DEVICE)
    decay = torch.log(1 - 2 ** (-2 - 4 * torch.arange(heads, device=DEVICE) / heads))
    out = fused_attention.decomposed_decayed_attention(q, k, v, decay)
    assert out.shape == (2, h, w, heads, head_dim) and out.is_contiguous()
    assert (out.double() - _decomposed_by_definition(q, k, v, decay)).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_both_passes_in_one_program_in_half_precision(dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter cannot multiply bfloat16 tiles")
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 14, 14, 8, 32, device=DEVICE) for _ in range(3))
    decay = torch.log(1 - 2 ** (-2 - 4 * torch.arange(8, device=DEVICE) / 8))
    expected = _decomposed_by_definition(q, k, v, decay)
    out = fused_attention.decomposed_decayed_attention(*(t.to(dtype) for t in (q, k, v)), decay)
    assert out.dtype == dtype
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < 2e-2


def test_one_program_rounds_as_the_two_passes_in_half_precision():
    # the rotated q and k, and the row pass's output, rounded to float16 as the two-pass form
    # stores them: bit for bit through the interpreter; on a GPU the products' summation order
    # may differ, which can move a rounding by an ulp (2 ** -10 relative)
    torch.manual_seed(0)
    tables, qk, v = _stage_inputs(14, 14, 2, 32, True, batch=4, dtype=torch.float16)
    one = _fused_manhattan_attention(qk.clone(), v, tables, True)
    two = _fused_manhattan_attention(qk.clone(), v, tables, True, passes_in_one_program=False)
    assert ((one.float() - two.float()).abs().max() / two.float().abs().max()).item() <= (0 if DEVICE == "cpu" else 4e-3)


@pytest.mark.parametrize("size, passes_in_one_program, one_program",
                         # a grid over 16 tokens a side, or the flag off, takes the two passes
                         [((14, 14), True, True), ((12, 16), True, True), ((20, 12), True, False), ((14, 14), False, False)])
def test_one_program_rotates_and_attends_like_the_reference(monkeypatch, size, passes_in_one_program, one_program):
    launches = {"one program": 0, "a pass": 0}
    for name, key in (("_launch_decomposed", "one program"), ("_launch", "a pass")):
        launch = getattr(fused_attention, name)
        monkeypatch.setattr(fused_attention, name, lambda *args, launch=launch, key=key, **kwargs: launches.update(
            {key: launches[key] + 1}) or launch(*args, **kwargs))
    torch.manual_seed(0)
    h, w = size
    tables, qk, v = _stage_inputs(h, w, 2, 32, True)
    fused = _fused_manhattan_attention(qk.clone(), v, tables, True, passes_in_one_program=passes_in_one_program)
    reference = manhattan_attention(qk.clone(), v, tables, "reference", True)
    assert (fused - reference).abs().max().item() < 1e-5
    assert launches == ({"one program": 1, "a pass": 0} if one_program else {"one program": 0, "a pass": 2})


class _Adds(TorchDispatchMode):
    """Counts the add operators run (what the kernels' own add replaces)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in ("add", "add_")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("decomposed, size, passes_in_one_program",
                         [(True, (14, 12), True), (True, (14, 12), False), (False, (7, 7), True)],
                         ids=["one-program", "two-passes", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "strided"])
def test_the_kernels_add_into_a_given_output_as_torch_adds(decomposed, size, passes_in_one_program, dtype, dense):
    """RMT adds the attention into its LCE conv's output: the kernels add as they store, through
    the output's strides, with the numbers of ``add_to.add_(attention)`` and no add operator of
    their own."""
    torch.manual_seed(0)
    h, w = size
    tables, qk, v = _stage_inputs(h, w, 2, 16, decomposed, dtype=dtype)
    if dense:
        base = torch.randn(2, h, w, 2, 16, device=DEVICE, dtype=dtype)
    else:  # every head a token apart, the batch strided too (rows stay one axis for full attention)
        base = torch.randn(4, h, w, 3, 16, device=DEVICE, dtype=dtype)[::2, :, :, :2]
    attend = functools.partial(_fused_manhattan_attention, passes_in_one_program=passes_in_one_program)
    with torch.no_grad():
        expected = base.clone().add_(attend(qk.clone(), v, tables, decomposed))
        added = base.clone()
        with _Adds() as adds:
            result = attend(qk.clone(), v, tables, decomposed, add_to=added)
    assert result is added and adds.count == 0
    assert torch.equal(added, expected)


def test_an_output_the_kernels_cannot_write_is_added_into_after():
    """head_dim not contiguous, for full attention H and W not one axis, another dtype: a fresh
    output, then an add."""
    torch.manual_seed(0)
    tables, qk, v = _stage_inputs(7, 7, 2, 16, False)
    attention = _fused_manhattan_attention(qk.clone(), v, tables, False)
    for base in (torch.randn(2, 16, 2, 7, 7, device=DEVICE).permute(0, 3, 4, 2, 1),  # head_dim strided
                 torch.randn(2, 7, 8, 2, 16, device=DEVICE)[:, :, :7],  # rows of 8 tokens, 7 used
                 torch.randn(2, 7, 7, 2, 16, device=DEVICE, dtype=torch.float64)):
        expected = base + attention
        with torch.no_grad():
            result = manhattan_attention(qk.clone(), v, tables, "triton", False, add_to=base)
        assert result is base and torch.equal(base, expected)
    with pytest.raises(ValueError, match=r"adds into a \(2, 1, 49, 2, 16\) tensor of q's dtype and device, got"):
        fused_attention.decayed_attention(*(t.reshape(2, 1, 49, 2, 16) for t in (qk[:, :, :, 0], qk[:, :, :, 1], v)),
                                          tables.full.decay, 7, False, add_to=torch.zeros(2, 1, 49, 2, 16).double())


def test_one_program_refuses_a_larger_grid():
    q = torch.randn(1, 17, 8, 2, 16, device=DEVICE)
    assert not fused_attention.fits_one_program(q, 17, 8)
    assert fused_attention.fits_one_program(q, 16, 8)
    assert not fused_attention.fits_one_program(q[..., :8], 8, 8)  # head_dim 8
    with pytest.raises(ValueError, match="at most 16 tokens a side, got 17 x 8"):
        fused_attention.decomposed_decayed_attention(q, q, q, torch.zeros(2))


def test_a_model_with_both_passes_in_one_program_matches_the_reference_path(official_mini, monkeypatch):
    calls = []
    kernel = fused_attention.decomposed_decayed_attention
    monkeypatch.setattr(fused_attention, "decomposed_decayed_attention", lambda *args: calls.append(1) or kernel(*args))
    entry = official_mini["models"]["mini_a"]
    model = rmt.RMT.from_official(attn_kernel="triton", **entry["config"]).eval().to(DEVICE)
    model.load_state_dict(convert_checkpoint(entry["state_dict"], model))
    # at 64 x 96 px stage 2 (decomposed, head_dim 16) is 8 x 12 tokens: one program an image and head
    x = torch.randn(2, 3, 64, 96, device=DEVICE)
    with torch.inference_mode():
        fused = model(x)
        model.set_attn_kernel("reference")
        reference = model(x)
    assert len(calls) == 2  # stage 2's two blocks
    assert (fused - reference).abs().max().item() < 1e-5


@pytest.mark.parametrize("passes_in_one_program, size, launcher, launches",
                         [(False, (14, 12), "_launch", 2), (True, (14, 12), "_launch_decomposed", 1)])
@pytest.mark.parametrize("add", [False, True], ids=["fresh", "added-into"])
def test_inside_a_compiled_graph_as_a_custom_operator(monkeypatch, passes_in_one_program, size, launcher, launches, add):
    calls = []
    launch = getattr(fused_attention, launcher)
    monkeypatch.setattr(fused_attention, launcher, lambda *args, **kwargs: calls.append(1) or launch(*args, **kwargs))
    monkeypatch.setattr(attention, "_fused_manhattan_attention", functools.partial(
        attention._fused_manhattan_attention, passes_in_one_program=passes_in_one_program))
    torch.manual_seed(0)
    h, w = size
    tables, qk, v = _stage_inputs(h, w, 2, 16, True)
    with torch.no_grad():
        # fullgraph: a graph break (an untraceable call on the way to the kernel) raises
        compiled = torch.compile(manhattan_attention, backend="aot_eager", fullgraph=True, dynamic=False)
        # added into: in the graph, the operator's fresh output and an add (an operator that wrote
        # into its input would be functionalised into a copy of it)
        base = torch.randn(2, h, w, 2, 16, device=DEVICE)
        out = compiled(qk.clone(), v, tables, "triton", True, base.clone() if add else None)
        # from the compiled graph, as rmt::decayed_attention (the row and the column pass) or
        # rmt::decomposed_decayed_attention (both)
        assert len(calls) == launches
        reference = manhattan_attention(qk.clone(), v, tables, "reference", True, base.clone() if add else None)
    assert (out - reference).abs().max().item() < 1e-5


def test_the_custom_operators_pass_torch_librarys_checks():
    # their fake implementations (the shapes and strides a compiled graph plans for) against the
    # real outputs, their schemas, and their registration
    torch.manual_seed(0)
    tables, qk, v = _stage_inputs(14, 12, 2, 16, True)
    q, k = qk.unbind(3)
    cos, sin = tables.cos[:, :, :, 0], tables.sin[:, :, :, 0]
    decay = tables.rows.decay
    torch.library.opcheck(fused_attention._decomposed_attention_op, (q, k, v, decay, cos, sin))
    for transpose_out in (False, True):
        torch.library.opcheck(fused_attention._decayed_attention_op, (q, k, v, decay, 0, transpose_out, cos, sin))
    torch.library.opcheck(fused_attention._decayed_attention_op, (q, k, v, decay, 0, False, cos, sin, 2, 4))


def _run_with_tritons_compiler(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Python with ``args`` in a process of its own, Triton compiling the kernels rather than
    interpreting them (the interpreter is chosen when the kernels are defined)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_the_kernels_compile_for_a_gpu_with_the_installed_triton(tmp_path):
    """The other tests run Triton's interpreter, which is not its compiler: compile each kernel for
    sm_90 (no GPU needed) in every configuration rmt_s runs at 224 px, and check that the default
    warps do not spill (the depthwise conv's kernel too). Triton 3.2's compiler refused what the interpreters ran (a tile's shape +
    (2,), its shapes being lists)."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton ships no ptxas")
    root = Path(__file__).resolve().parents[1]
    result = _run_with_tritons_compiler([str(root / "scripts" / "triton_kernel_registers.py"), "--json", str(tmp_path / "r.json")], 600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    defaults = [row for row in rows if row["default_warps"]]
    # each default configuration storing a fresh output and adding into the LCE conv's
    assert len(defaults) == 2 * 9 and all(row["spill_store_bytes"] == 0 for row in defaults), defaults
    # the depthwise conv kernel (rmt.models.depthwise_conv) in each tile RMT's convs launch
    convs = json.loads((tmp_path / "r.json").read_text())["depthwise_conv_rows"]
    assert len(convs) == 5 and all(row["spill_store_bytes"] == 0 for row in convs), convs


def test_the_eager_overhead_script_times_the_kernels_path(tmp_path):
    """scripts/eager_overhead.py replaces the kernels' launches with no-ops: each counted stage
    must have taken the Triton path (the plain math's compute would be counted otherwise)."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "scripts" / "eager_overhead.py"), "--model", "rmt_t", "--rounds", "1",
                          "--calls", "3", "--json", str(tmp_path / "o.json")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "o.json").read_text())
    rows = report["rows"]
    assert rows["CachedLinear"]["calls_per_pass"] == 5 * 14 + 2  # five a block, and the head's two
    assert rows["AffineFreeLayerNorm"]["calls_per_pass"] == 2 * 14
    # rmt_t's stage 3 attends over all 196 tokens, too many for the kernels
    assert [name for name in rows if name.startswith("manhattan_attention")] == [
        "manhattan_attention, stage 1 (56x56)", "manhattan_attention, stage 2 (28x28)", "manhattan_attention, stage 4 (7x7)"]
    assert report["not_counted"] == ["stage 3 (14x14): its attention does not run the Triton kernels"]
    assert report["added_ms_per_pass"] == pytest.approx(sum(row["added_ms_per_pass"] for row in rows.values()), abs=1e-2)
    # apart: the depthwise convs through the Triton kernel (the script asserts each took that path)
    convs = report["triton_depthwise_conv_rows"]
    assert {name: row["calls_per_pass"] for name, row in convs.items()} == {
        "CachedResidualDepthwiseConvNHWC": 2 * 14, "CachedDepthwiseConvNHWC": 14}


# Traced for a compiled graph (AOT autograd, as inductor receives it), on fake tensors of an sm_90
# GPU: Triton's own analysis of what each kernel writes needs a compiled kernel, not the
# interpreter the other tests run, and its compiler can target a GPU this machine lacks.
_TRACE_FOR_A_GPU = """
import json, torch, triton
from functorch.compile import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget
from rmt.models import fused_attention as fa

class Sm90:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(Sm90())
torch.cuda.current_device = lambda: 0
calls = []

def record(gm, example_inputs):
    for node in gm.graph.nodes:
        if node.op == "call_function" and "rmt" in str(node.target):
            calls.append({"op": str(node.target)})
        if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            calls.append({
                "kernel": kernel.fn.__name__, "num_warps": [c.num_warps for c in kernel.configs],
                "grid": [list(g) for g in node.kwargs["grid"]], "clones": node.kwargs["tensors_to_clone"],
            })
    return gm

with FakeTensorMode(allow_non_fake_inputs=True):
    b, h, w, n, d = 2, 14, 12, 8, 32
    q, k = torch.empty(b, h, w, 2, n, d, device="cuda", dtype=torch.bfloat16).unbind(3)
    v = torch.empty(b, h, w, n, d, device="cuda", dtype=torch.bfloat16)
    decay = torch.empty(n, device="cuda")
    cos = torch.empty(h, w, 2, d, device="cuda", dtype=torch.bfloat16)
    aot_function(lambda q, k, v, decay, cos: fa._decomposed_attention_traceable_op(q, k, v, decay, cos, cos) * 2,
                 fw_compiler=record)(q, k, v, decay, cos)
    aot_function(lambda q, k, v, decay, cos: fa._decayed_attention_traceable_op(q, k, v, decay, 0, True, cos, cos, 2) * 2,
                 fw_compiler=record)(q, k, v, decay, cos)
print(json.dumps(calls))
"""


def test_a_compiled_graph_launches_the_kernels_itself_with_inductor_launches():
    """What fused_attention.INDUCTOR_LAUNCHES gives inductor: a call of each kernel, grid and warps
    as the eager launch has them, cloning none of its inputs (a clone would copy q, k, v or the
    tables on every pass): only the output, a fresh tensor, is written."""
    run = _run_with_tritons_compiler(["-c", _TRACE_FOR_A_GPU], 300)
    assert run.returncode == 0, run.stderr[-2000:]
    one_program, two_heads_a_program = json.loads(run.stdout.splitlines()[-1])
    assert one_program == {"kernel": "_decomposed_attention_kernel", "num_warps": [fused_attention.ONE_PROGRAM_WARPS],
                           "grid": [[2 * 8, 1, 1]], "clones": ["out_ptr"]}
    assert two_heads_a_program == {"kernel": "_decayed_attention_kernel", "num_warps": [fused_attention._warps(2 * 16, 32)],  # 2 heads of 12 tokens, padded
                                   "grid": [[2 * 14 * 8 // 2, 1, 1]], "clones": ["out_ptr"]}


def test_the_kernel_refuses_half_a_rotary_table():
    q = torch.randn(1, 2, 14, 2, 16, device=DEVICE)
    cos = torch.ones(2, 14, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="both cos and sin"):
        fused_attention.decayed_attention(q, q, q, torch.zeros(2), 0, False, cos, None)


def test_official_logits_with_the_triton_kernel(official_mini, monkeypatch):
    calls = []
    kernel = fused_attention.decayed_attention
    monkeypatch.setattr(fused_attention, "decayed_attention", lambda *args: calls.append(1) or kernel(*args))
    entry = official_mini["models"]["mini_a"]  # head_dim 16 in stages 2 and 4 (8 and 12 fall back)
    model = rmt.RMT.from_official(attn_kernel="triton", **entry["config"]).eval().to(DEVICE)
    model.load_state_dict(convert_checkpoint(entry["state_dict"], model))
    for case in entry["cases"]:
        with torch.inference_mode():
            logits = model(case["input"].to(DEVICE)).cpu()
        assert (logits - case["logits"]).abs().max().item() <= 1e-4
    # stage 2: two blocks, a row and a column pass each; stage 4: one full pass; per case
    assert len(calls) == 2 * (2 * 2 + 1)


def test_the_kernel_runs_only_without_autograd_and_where_it_can():
    q = torch.randn(1, 14, 14, 2, 16, device=DEVICE)
    assert fused_attention.supports(q, 64)
    assert not fused_attention.supports(q, 65)
    assert not fused_attention.supports(q[..., :8], 14)  # head_dim 8
    assert not fused_attention.supports(q.double(), 14)
    assert _runs_fused("triton", q, q, 14, 14)
    # auto: CUDA only, on the GPU generations it was measured on
    assert _runs_fused("auto", q, q, 14) == (DEVICE == "cuda" and fused_attention.measured_gpu(q.device))
    assert not _runs_fused("reference", q, q, 14)
    weights = torch.randn(1, device=DEVICE, requires_grad=True)
    assert not _runs_fused("triton", q * weights, q, 14)  # it has no backward pass
    with torch.no_grad():
        assert _runs_fused("triton", q * weights, q, 14)


def test_training_with_the_triton_kernel_falls_back_and_gets_gradients(official_mini):
    entry = official_mini["models"]["mini_a"]
    torch.manual_seed(0)
    model = rmt.RMT.from_official(attn_kernel="triton", **entry["config"]).to(DEVICE)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    model(x).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.set_attn_kernel("reference")
    model(x).square().sum().backward()
    # the conv biases before training-mode batch norms have a zero gradient in exact arithmetic:
    # theirs is rounding noise (about 1e-6 here) that differs between kernels
    before_batch_norm = {f"stem.{i}.bias" for i in range(0, len(model.stem), 3)}
    before_batch_norm |= {name for name, _ in model.named_parameters() if name.endswith("downsample.conv.bias")}
    for name, p in model.named_parameters():
        atol = 5e-6 if name in before_batch_norm else 1e-6
        assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=atol), name


def test_bench_names_the_triton_kernel_among_the_attention_ops(official_mini):
    from rmt.bench.runner import attention_ops

    entry = official_mini["models"]["mini_a"]
    model = rmt.RMT.from_official(attn_kernel="triton", **entry["config"]).eval().to(DEVICE)
    with torch.inference_mode():
        ops = attention_ops(model, torch.randn(1, 3, 64, 64, device=DEVICE))
    assert "rmt::decayed_attention" in ops
