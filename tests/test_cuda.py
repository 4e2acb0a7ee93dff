"""CUDA checks: same numbers on the GPU, bf16 within mixed-precision tolerance, FlexAttention,
compile, and a benchmark smoke run. Skipped without a CUDA device (run by scripts/gpu_check.sh)."""

from __future__ import annotations

import pytest
import timm
import torch

import rmt
from rmt.models.checkpoint import convert_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("exact_fp32"),
]


@pytest.mark.parametrize("kernel", ["auto", "sdpa", "reference", "flex", "triton"])
def test_official_logits_on_cuda(official_mini, kernel):
    for config in ("mini_a", "mini_b"):
        entry = official_mini["models"][config]
        model = rmt.RMT.from_official(attn_kernel=kernel, **entry["config"]).eval()
        model.load_state_dict(convert_checkpoint(entry["state_dict"], model))
        model.cuda()
        for case in entry["cases"]:
            with torch.inference_mode():
                logits = model(case["input"].cuda()).cpu()
            assert (logits - case["logits"]).abs().max().item() <= 1e-4, (config, kernel)


def test_fast_path_equals_reference_on_cuda():
    torch.manual_seed(0)
    model = rmt.create_model("rmt_s").eval().cuda()
    x = torch.randn(4, 3, 224, 160, device="cuda")
    with torch.inference_mode():
        fast = model(x)
        model.set_attn_kernel("reference")
        reference = model(x)
    assert (fast - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_close_to_fp32(dtype):
    torch.manual_seed(0)
    model = rmt.create_model("rmt_t").eval().cuda()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        full = model(x).float()
        with torch.autocast("cuda", dtype=dtype):
            mixed = model(x).float()
    relative = (mixed - full).norm() / full.norm()
    assert relative.item() < (3e-2 if dtype == torch.bfloat16 else 1e-2)
    assert torch.isfinite(mixed).all()


def test_compile_and_flex_on_cuda(official_mini):
    # a small configuration with both attention forms: two compiles of rmt_t took over 80 s on an H100
    torch.manual_seed(0)
    model = rmt.RMT.from_official(**official_mini["models"]["mini_a"]["config"]).eval().cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
        assert (compiled - eager).abs().max().item() <= 1e-4
        model.set_attn_kernel("flex")
        flex = torch.compile(model, fullgraph=True)(x)
        assert (flex - eager).abs().max().item() <= 1e-4


@pytest.mark.parametrize("inductor_launches", [False, True])
def test_compiled_triton_kernels_give_the_official_logits(official_mini, monkeypatch, inductor_launches):
    """The Triton kernels in a compiled graph, as custom operators or launched by inductor itself
    (fused_attention.INDUCTOR_LAUNCHES): the official logits, and the kernels really ran."""
    from rmt.models import fused_attention

    monkeypatch.setattr(fused_attention, "INDUCTOR_LAUNCHES", inductor_launches)
    torch._dynamo.reset()
    entry = official_mini["models"]["mini_a"]  # head_dim 16 in stages 2 and 4
    model = rmt.RMT.from_official(attn_kernel="triton", **entry["config"]).eval()
    model.load_state_dict(convert_checkpoint(entry["state_dict"], model))
    compiled = torch.compile(model.cuda(), fullgraph=True, dynamic=False)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for case in entry["cases"]:
        x = case["input"].cuda()
        with torch.inference_mode():
            compiled(x)  # compiles
            with torch.profiler.profile(activities=activities) as prof:
                logits = compiled(x).cpu()
        assert (logits - case["logits"]).abs().max().item() <= 1e-4
        names = {e.key for e in prof.key_averages()}
        assert any("_decayed_attention_kernel" in n for n in names)
        # an operator's dispatch: the custom operator's, or the other's if inductor failed to trace into it
        assert any(n.startswith("rmt::decayed_attention") for n in names) != inductor_launches


def test_bench_smoke_on_cuda():
    from rmt.bench.runner import BenchSettings, run_benchmark

    builders = {
        "rmt_t": lambda size: rmt.create_model("rmt_t"),
        "swin_t": lambda size: timm.create_model("swin_tiny_patch4_window7_224"),
    }
    report = run_benchmark(
        BenchSettings(models=["rmt_t", "swin_t"], batches=[4], device="cuda", dtype="bf16", warmup=2, iters=5),
        builders=builders,
    )
    for row in report["results"]:
        assert row["status"] == "ok", row["error"]
        assert row["peak_memory_mb"] > 0 and row["memory_kind"] == "cuda_model_peak"
        assert row["tflops"] > 0 and row["latency_ms"]["median"] > 0
    assert report["env"]["device_type"] == "cuda" and report["env"]["device_name"]


def test_bench_cuda_graph_replays_the_eager_pass():
    """--cuda-graph: each warm model captured once, its replays timed; the replay computes the
    eager pass's numbers, folded RMT (Triton kernels, weight cache) and timm's Swin-T alike."""
    from rmt.bench.runner import BenchSettings, CUDAGraphed, capture_stream, precision, run_benchmark
    from rmt.errors import RMTError
    from rmt.models.layers import AutocastWeightCache

    torch.manual_seed(0)
    model = rmt.create_model("rmt_t").eval().cuda()
    model.reparameterize()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.inference_mode(), precision(torch.device("cuda"), "bf16"):
        eager = model(x).clone()
        graphed = CUDAGraphed(model, torch.randn_like(x))  # captured on other values: x is copied in
        replayed = graphed(x)
        assert (replayed.float() - eager.float()).abs().max().item() <= 1e-2 * eager.float().abs().max().item()
        with pytest.raises(RMTError, match="captured for a"):
            graphed(x[:2])
    # the graph reads the weight cache's copies made on the capture's stream: no cast in the graph
    caches = [m for m in model.modules() if isinstance(m, AutocastWeightCache)]
    assert caches and {m._autocast_copies.stream for m in caches} == {capture_stream(x.device).cuda_stream}
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    builders = {
        "rmt_t": lambda size: rmt.create_model("rmt_t"),
        "swin_t": lambda size: timm.create_model("swin_tiny_patch4_window7_224"),
    }
    report = run_benchmark(
        BenchSettings(models=["rmt_t", "swin_t"], batches=[8], device="cuda", dtype="bf16", warmup=2, iters=5,
                      reparameterize=True, cuda_graph=True),
        builders=builders,
    )
    for row in report["results"]:
        assert row["status"] == "ok", row["error"]
        assert row["cuda_graph"] is True and row["peak_memory_mb"] > 0 and row["tflops"] > 0


def test_a_failed_capture_is_one_error_and_leaves_the_stream_as_it_was():
    from rmt.bench.runner import CUDAGraphed
    from rmt.errors import RMTError

    class Syncs(torch.nn.Module):
        def forward(self, x):
            return x * x.sum().item()  # a synchronisation with the CPU, which a capture cannot hold

    x = torch.randn(4, device="cuda")
    with pytest.raises(RMTError, match="capturing a CUDA graph failed"):
        CUDAGraphed(Syncs(), x)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert (x * 2).sum().item() == pytest.approx(2 * x.sum().item())  # the device still works


def test_bench_peak_memory_counts_only_the_model_itself():
    """The other models of an interleaved run stay resident; one model's peak must not grow with them."""
    from rmt.bench.runner import BenchSettings, run_benchmark

    def peak(models):
        builders = {
            "rmt_t": lambda size: rmt.create_model("rmt_t"),
            "swin_b": lambda size: timm.create_model("swin_base_patch4_window7_224"),
        }
        settings = BenchSettings(models=models, batches=[8], device="cuda", dtype="bf16", warmup=1, iters=2)
        rows = run_benchmark(settings, builders={m: builders[m] for m in models})["results"]
        return next(r["peak_memory_mb"] for r in rows if r["model"] == "rmt_t")

    alone, beside_swin_b = peak(["rmt_t"]), peak(["rmt_t", "swin_b"])  # swin_b: 88 M fp32 weights, 350 MB
    assert abs(beside_swin_b - alone) < 0.05 * alone
