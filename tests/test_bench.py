"""Benchmarking and profiling on the CPU: flops, the runner's JSON, failures, compare, profile."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import rmt
from rmt.bench.compare import compare_reports
from rmt.bench.flops import count_flops
from rmt.bench.report import plot, read_report, to_csv
from rmt.io import write_json_atomic
from rmt.bench.runner import BenchSettings, compile_model, latency_stats, parse_img_size, run_benchmark
from rmt.errors import RMTError
from rmt.models.config import RMTConfig

NAMES = ["rmt_t", "rmt_s", "rmt_b", "rmt_l", "rmt_s_tl", "rmt_b_tl", "rmt_l_tl"]
TINY = RMTConfig(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), mlp_ratios=(2, 2, 2, 2),
                 decomposed_stages=(True, True, False, False), head_hidden_size=32, num_classes=10)


@pytest.mark.parametrize("name", NAMES)
def test_flops_match_official_fvcore(schema, name):
    report = count_flops(rmt.create_model(name), 224, name)
    official = schema[name]["fvcore_flops_224"]
    assert abs(report.macs - official) / official < 0.01
    # in fact exact, operator by operator
    assert report.by_operator == {k: v for k, v in schema[name]["fvcore_flops_224_by_operator"].items()}
    assert report.params == schema[name]["params"]
    assert [m for m, _ in report.by_module][:2] == ["stem", "stem.0"]


def test_flops_of_a_model_whose_cpu_linears_run_onednn_count_them():
    """RMT's float32 CPU inference calls oneDNN's linear, which torch's counter has no formula
    for: under the counter it calls the aten operator instead, folded or not."""
    model = rmt.create_model("rmt_t")
    unfolded = count_flops(model).by_operator
    folded = count_flops(model.reparameterize()).by_operator
    assert unfolded["linear"] == folded["linear"] > 1e9 and unfolded["conv"] == folded["conv"]


def test_flops_swin_t():
    report = count_flops(timm.create_model("swin_tiny_patch4_window7_224"), 224, "swin_t")
    assert abs(report.gmacs - 4.509) / 4.509 < 0.01


def test_flops_count_fused_cpu_attention():
    """torch counts 0 for the CPU fused SDPA op; our formula counts q k^T and attn v."""

    class Attention(nn.Module):
        def forward(self, x):
            mask = torch.zeros(1, 2, 64, 64)
            return F.scaled_dot_product_attention(x, x, x, attn_mask=mask)

    model = Attention()
    model.dummy = nn.Parameter(torch.zeros(1))
    x_shape = (1, 2, 64, 32)
    report = count_flops(_Wrap(model, x_shape), (8, 8))
    assert report.by_operator.get("matmul") == 2 * 2 * 64 * 64 * 32


class _Wrap(nn.Module):
    """Feed a fixed-shape tensor to ``inner`` whatever image count_flops passes."""

    def __init__(self, inner: nn.Module, shape: tuple):
        super().__init__()
        self.inner, self.shape = inner, shape

    def forward(self, image):
        return self.inner(torch.randn(self.shape))


def test_flops_any_resolution_scales():
    small = count_flops(rmt.RMT(TINY), (64, 64)).macs
    large = count_flops(rmt.RMT(TINY), (128, 96)).macs
    assert large > small * 2


def _builders():
    return {
        "rmt_t": lambda size: rmt.create_model("rmt_t"),
        "tiny": lambda size: rmt.RMT(TINY),
        "swin_t": lambda size: timm.create_model("swin_tiny_patch4_window7_224", img_size=size),
    }


def _validate_schema(report: dict) -> None:
    assert report["schema"] == 1
    for key in ("device_name", "torch", "timm", "rmt", "threads", "dtype", "device_type"):
        assert key in report["env"], key
    for row in report["results"]:
        for key in ("model", "batch", "img_size", "device", "dtype", "params", "gmacs", "throughput",
                    "latency_ms", "peak_memory_mb", "status", "attention_ops", "ratio_to_baseline"):
            assert key in row, key
        if row["status"] == "ok":
            assert set(row["latency_ms"]) >= {"median", "p90", "p99", "iqr"}
            assert row["throughput"] == pytest.approx(row["batch"] / row["latency_ms"]["median"] * 1000, rel=1e-3)


def test_tiny_bench_rmt_t_and_swin_t_json(tmp_path):
    settings = BenchSettings(models=["rmt_t", "swin_t"], batches=[1], device="cpu", warmup=1, iters=2, baseline="swin_t")
    report = run_benchmark(settings, builders=_builders())
    _validate_schema(report)
    rows = {r["model"]: r for r in report["results"]}
    assert rows["rmt_t"]["status"] == rows["swin_t"]["status"] == "ok"
    assert rows["rmt_t"]["gmacs"] == pytest.approx(2.6506, abs=1e-3)
    assert rows["swin_t"]["ratio_to_baseline"] == 1.0
    assert rows["rmt_t"]["attn_kernel"] == "auto"
    assert "rmt::deferred_normalisation_attention" in rows["rmt_t"]["attention_ops"]
    assert rows["rmt_t"]["memory_kind"] == "cpu_peak_rss_growth" and rows["rmt_t"]["iters"] == 2
    assert report["env"]["dtype"] == "fp32"  # CPU default
    path = tmp_path / "bench.json"
    write_json_atomic(path, report)
    assert read_report(path) == json.loads(path.read_text())
    csv_text = to_csv(report)
    assert csv_text.splitlines()[0].startswith("model,batch,requested_batch,img_h,img_w")
    assert len(csv_text.strip().splitlines()) == 3
    # every field of a row has its column: the latency's and the image size's split up
    columns = set(csv_text.splitlines()[0].split(","))
    expected = {k for k in rows["rmt_t"] if k not in ("latency_ms", "img_size")}
    expected |= {f"latency_{k}_ms" for k in rows["rmt_t"]["latency_ms"]} | {"img_h", "img_w"}
    assert columns == expected


def test_bench_reparam_folds_rmt_and_keeps_the_published_counts(tmp_path):
    settings = BenchSettings(models=["tiny", "swin_t"], batches=[1], img_sizes=[(64, 64)], device="cpu",
                             warmup=0, iters=1, reparameterize=True)
    report = run_benchmark(settings, builders=_builders())
    _validate_schema(report)
    rows = {r["model"]: r for r in report["results"]}
    assert rows["tiny"]["status"] == rows["swin_t"]["status"] == "ok"
    assert rows["tiny"]["reparameterized"] is True and rows["swin_t"]["reparameterized"] is False
    assert report["settings"]["reparameterize"] is True
    # params and GMACs are the published model's, not the folded one's
    assert rows["tiny"]["params"] == sum(p.numel() for p in rmt.RMT(TINY).parameters())
    assert not [n for n in report["notes"] if "--reparam" in n]
    plain = run_benchmark(replace(settings, reparameterize=False), builders=_builders())
    assert [n for n in plain["notes"] if "--reparam" in n] == [  # swin_t has nothing to fold
        "tiny ran as built: --reparam folds it for inference first (the same outputs within float32 rounding, "
        "fewer operators; docs/models.md)"]
    plain = run_benchmark(replace(settings, models=["tiny"], reparameterize=False), builders=_builders())
    assert plain["results"][0]["reparameterized"] is False
    assert plain["results"][0]["gmacs"] == rows["tiny"]["gmacs"]
    # a folded run is another setting for compare, never a like-for-like regression check
    verdict = compare_reports(plain, {**report, "results": [rows["tiny"]]})
    assert {d.status for d in verdict.deltas} == {"missing", "new"}
    assert "reparameterized" in to_csv(report).splitlines()[0].split(",")


def test_slow_throughputs_keep_their_precision():
    from rmt.bench.runner import _Candidate, _finish_row

    c = _Candidate("slow", row={"batch": 1, "gmacs": 10.0}, times_ms=[1897.3])
    _finish_row(c, BenchSettings(device="cpu"), torch.device("cpu"))
    assert c.row["throughput"] == pytest.approx(1000 / 1897.3, rel=1e-5)  # not 0.53
    assert c.row["tflops"] == pytest.approx(2 * 10.0 * 1000 / 1897.3 / 1000, rel=1e-3)


def test_sweep_over_sizes_and_batches():
    settings = BenchSettings(models=["tiny"], batches=[1, 2], img_sizes=[(64, 64), (96, 128)], device="cpu",
                             warmup=0, iters=2)
    report = run_benchmark(settings, builders=_builders())
    keys = [(tuple(r["img_size"]), r["batch"]) for r in report["results"]]
    assert keys == [((64, 64), 1), ((64, 64), 2), ((96, 128), 1), ((96, 128), 2)]
    macs = {tuple(r["img_size"]): r["gmacs"] for r in report["results"]}
    assert macs[(96, 128)] > macs[(64, 64)]


def test_cpu_time_budget_sets_iterations():
    settings = BenchSettings(models=["tiny"], batches=[1], img_sizes=[(64, 64)], device="cpu", time_budget_s=0.001)
    report = run_benchmark(settings, builders=_builders())
    assert report["results"][0]["iters"] == 1  # a tiny budget still gives one timed iteration
    assert any("budget" in note for note in report["notes"])


class _OOMAbove(nn.Module):
    """Raises the CUDA out-of-memory error for batches larger than ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return x.mean((1, 2, 3)) * self.w


class _Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        raise ValueError("shape mismatch in layer 3")


def test_failures_mark_rows_and_the_run_goes_on():
    builders = {**_builders(), "oom": lambda size: _OOMAbove(0), "broken": lambda size: _Broken()}
    settings = BenchSettings(models=["oom", "tiny", "broken"], batches=[4], img_sizes=[(64, 64)], device="cpu",
                             warmup=1, iters=2, baseline="tiny")
    report = run_benchmark(settings, builders=builders)
    rows = {r["model"]: r for r in report["results"]}
    assert rows["oom"]["status"] == "oom" and "out of memory" in rows["oom"]["error"]
    assert rows["broken"]["status"] == "error" and "shape mismatch" in rows["broken"]["error"]
    assert rows["tiny"]["status"] == "ok" and rows["tiny"]["throughput"] > 0


class _FailsAfter(nn.Module):
    """Runs ``calls`` forward passes, then raises: a failure in the timed loop, after the warmup measured memory."""

    def __init__(self, calls: int):
        super().__init__()
        self.calls = calls
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("device lost [/x]")
        return x.mean((1, 2, 3)) * self.w


def test_a_failed_row_has_no_measurements_whichever_pass_failed():
    settings = BenchSettings(models=["late"], batches=[2], img_sizes=[(64, 64)], device="cpu", warmup=1, iters=3)
    row = run_benchmark(settings, builders={"late": lambda size: _FailsAfter(2)})["results"][0]
    assert row["status"] == "error" and row["error"] == "RuntimeError: device lost [/x]"
    assert all(row[k] is None for k in ("throughput", "latency_ms", "peak_memory_mb", "tflops", "mfu"))


def test_oom_retry_halves_the_batch():
    builders = {"oom": lambda size: _OOMAbove(2)}
    settings = BenchSettings(models=["oom"], batches=[8], img_sizes=[(64, 64)], device="cpu", warmup=1, iters=2,
                             retry_oom=True)
    row = run_benchmark(settings, builders=builders)["results"][0]
    assert row["status"] == "ok" and row["batch"] == 2 and row["requested_batch"] == 8


def test_settings_errors():
    for bad in (dict(dtype="int8"), dict(batches=[0]), dict(img_sizes=[(16, 16)]), dict(iters=0),
                dict(compile_mode="fastest"), dict(baseline="nope"), dict(compile_workers=2),
                dict(compile_mode="default", compile_workers=0), dict(compile_mode="max-autotune", compile_workers=2)):
        with pytest.raises(RMTError):
            BenchSettings(models=["tiny"], **bad).validate()
    with pytest.raises(RMTError, match="rmt_t listed more than once"):
        BenchSettings(models=["rmt_t", "tiny", "rmt_t"]).validate()
    for budget in (-5, float("inf"), float("nan")):
        with pytest.raises(RMTError, match="time budget must be a positive number of seconds"):
            BenchSettings(models=["tiny"], time_budget_s=budget).validate()
    for repeated, message in ((dict(batches=[8, 1, 8]), "batch size 8 listed more than once"),
                              (dict(img_sizes=[(64, 64), (64, 64)]), "image size 64x64 listed more than once"),
                              (dict(batches=[]), "no batch sizes"), (dict(img_sizes=[]), "no image sizes"),
                              (dict(batches=[0]), "batch size 0 is out of range: 1 to 1,048,576"),
                              (dict(batches=[10**20]), "batch size 100000000000000000000 is out of range"),
                              (dict(img_sizes=[(224, 70000)]), "image size 224x70000 is too large: at most 65536 a side")):
        with pytest.raises(RMTError, match=message):
            BenchSettings(models=["tiny"], **repeated).validate()
    assert parse_img_size("512x768") == (512, 768) and parse_img_size("224") == (224, 224)
    with pytest.raises(RMTError, match="not N or HxW"):
        parse_img_size("big")


def test_a_cpu_run_reports_the_warmup_pass_it_always_makes():
    settings = BenchSettings(models=["tiny"], batches=[1], img_sizes=[(64, 64)], device="cpu", warmup=0, time_budget_s=5)
    report = run_benchmark(settings, builders=_builders())
    assert report["settings"]["warmup"] == 1 and report["results"][0]["warmup"] == 1
    assert any(note.startswith("CPU run: 1 warmup") for note in report["notes"])


def test_latency_stats():
    stats = latency_stats([10.0, 20.0, 30.0, 40.0, 50.0])
    assert stats["median"] == 30.0 and stats["iqr"] == 20.0 and stats["p90"] == 46.0 and stats["min"] == 10.0


def _report(rows, **env):
    base_env = {"device_name": "NVIDIA H100", "torch": "2.14.1", "timm": "1.0.31", "dtype": "bf16", "threads": 8}
    return {"schema": 1, "env": {**base_env, **env}, "results": rows}


def _row(model, throughput, latency, memory, status="ok"):
    return {"model": model, "batch": 64, "requested_batch": 64, "img_size": [224, 224], "dtype": "bf16",
            "compile": None, "channels_last": False, "throughput": throughput,
            "latency_ms": {"median": latency}, "peak_memory_mb": memory, "status": status, "error": None}


def test_compare_verdicts():
    base = _report([_row("rmt_s", 1000, 64, 2000), _row("swin_t", 1100, 58, 1800)])
    same = compare_reports(base, base)
    assert not same.regressed and not same.env_warnings
    slower = compare_reports(base, _report([_row("rmt_s", 900, 71, 2000), _row("swin_t", 1100, 58, 1800)]))
    assert slower.regressed and slower.deltas[0].status == "regressed"
    assert slower.deltas[0].changes["throughput"] == -10.0
    within = compare_reports(base, _report([_row("rmt_s", 960, 66, 2050), _row("swin_t", 1100, 58, 1800)]))
    assert not within.regressed
    hungrier = compare_reports(base, _report([_row("rmt_s", 1000, 64, 2500), _row("swin_t", 1100, 58, 1800)]))
    assert hungrier.regressed and "memory" in hungrier.deltas[0].reasons[0]
    assert not compare_reports(base, _report([_row("rmt_s", 1000, 64, 2500), _row("swin_t", 1100, 58, 1800)]),
                               metrics=("throughput", "latency")).regressed
    missing = compare_reports(base, _report([_row("rmt_s", 1000, 64, 2000)]))
    assert missing.regressed and missing.deltas[1].status == "missing"
    failed = compare_reports(base, _report([_row("rmt_s", None, None, None, "oom"), _row("swin_t", 1100, 58, 1800)]))
    assert failed.regressed and failed.deltas[0].status == "failed"
    other_env = compare_reports(base, _report(base["results"], device_name="NVIDIA A100", torch="2.9.0"))
    assert not other_env.regressed and len(other_env.env_warnings) == 2


def test_compare_gates_what_it_cannot_take_a_percentage_of():
    base = _report([_row("rmt_s", 1000, 64, 2000)])
    for row, reason in (({"peak_memory_mb": None}, "memory missing in the new report"),
                        ({"throughput": float("nan")}, "throughput missing in the new report"),
                        ({"latency_ms": {}}, "latency missing in the new report"),
                        ({"batch": 32}, "ran at batch 32 after running out of memory (base: 64)")):
        result = compare_reports(base, _report([{**_row("rmt_s", 1000, 64, 2000), **row}]))
        assert result.regressed and result.deltas[0].reasons == [reason]
    zero = _report([_row("rmt_s", 1000, 64, 0.0)])
    result = compare_reports(zero, _report([_row("rmt_s", 1000, 64, 500.0)]))
    assert not result.regressed and result.deltas[0].reasons == ["memory not compared: 0 in the base report, 500 now"]
    result = compare_reports(base, _report([{**_row("rmt_s", 1000, 64, 900), "memory_kind": "cuda_model_peak"}]))
    assert not result.regressed and result.deltas[0].reasons == ["memory not compared: measured as None vs cuda_model_peak"]
    result = compare_reports(_report([{**_row("rmt_s", 1000, 64, 2000), "attn_kernel": "auto"}]),
                             _report([{**_row("rmt_s", 100, 640, 2000), "attn_kernel": "reference"}]), threshold=1000)
    assert not result.regressed and result.env_warnings == ["settings differ: attn_kernel 'auto' vs 'reference'"]


def test_compare_refuses_what_it_cannot_gate():
    base = _report([_row("rmt_s", 1000, 64, 2000)])
    for threshold in (float("nan"), float("inf"), -1):
        with pytest.raises(RMTError, match="--threshold must be a number >= 0"):
            compare_reports(base, base, threshold=threshold)
    twice = _report([_row("rmt_s", 1000, 64, 2000), _row("rmt_s", 10, 64, 2000)])
    with pytest.raises(RMTError, match="the new report has two results for rmt_s b64 224x224 bf16"):
        compare_reports(base, twice)
    with pytest.raises(RMTError, match="the base report has no results"):
        compare_reports(_report([]), base)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rmt_cli.main", *args], capture_output=True, text=True)


def test_compare_cli_exit_codes(tmp_path):
    base = _report([_row("rmt_s", 1000, 64, 2000)])
    paths = {}
    for name, report in {
        "base": base,
        "same": base,
        "regressed": _report([_row("rmt_s", 800, 80, 2000)]),
        "missing": _report([_row("swin_t", 1000, 64, 2000)]),
        "other_env": _report([_row("rmt_s", 1000, 64, 2000)], device_name="NVIDIA L4"),
    }.items():
        paths[name] = tmp_path / f"{name}.json"
        write_json_atomic(paths[name], report)
    assert _cli("compare", str(paths["base"]), str(paths["same"])).returncode == 0
    result = _cli("compare", str(paths["base"]), str(paths["regressed"]), "--threshold", "5")
    assert result.returncode == 1 and "regressed" in result.stdout
    assert _cli("compare", str(paths["base"]), str(paths["regressed"]), "--threshold", "30").returncode == 0
    assert _cli("compare", str(paths["base"]), str(paths["missing"])).returncode == 1
    result = _cli("compare", str(paths["base"]), str(paths["other_env"]))
    assert result.returncode == 0 and "environments differ: device_name" in result.stderr
    for args, which in (([" ", str(paths["same"])], "the baseline report"), ([str(paths["base"]), ""], "the new report")):
        result = _cli("compare", *args)  # not read as the current folder
        assert result.returncode == 2 and result.stderr == f"error: {which} was given an empty path\n"
    (tmp_path / "junk.json").write_text("{not json")
    result = _cli("compare", str(paths["base"]), str(tmp_path / "junk.json"))
    assert result.returncode == 2 and "is not JSON" in result.stderr and "Traceback" not in result.stderr
    before = paths["base"].read_bytes()
    result = _cli("compare", str(paths["base"]), str(paths["same"]), "--json", str(paths["base"]))
    assert result.returncode == 2 and "--json" in result.stderr and "is the baseline file: write it elsewhere" in result.stderr
    assert paths["base"].read_bytes() == before  # the baseline is not replaced by the comparison
    huge = _report([_row("rmt_s", 1000, 64, 2000)])
    huge["results"][0]["throughput"] = 10**400  # JSON integers have no bound
    write_json_atomic(tmp_path / "huge.json", huge)
    result = _cli("compare", str(paths["base"]), str(tmp_path / "huge.json"))
    assert result.returncode == 2 and "results[0] has a throughput beyond any float" in result.stderr
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    result = _cli("compare", str(paths["base"]), str(tmp_path / "deep.json"))
    assert result.returncode == 2 and "is not an rmt bench report (nested too deeply)" in result.stderr
    markup = _report([_row("rmt_s", 1000, 64, 2000)])
    markup["results"][0]["dtype"] = "[/]"  # rich markup in a setting is shown, not parsed
    write_json_atomic(tmp_path / "markup.json", markup)
    result = _cli("compare", str(paths["base"]), str(tmp_path / "markup.json"))
    assert result.returncode == 1 and "[/]" in result.stdout and "Traceback" not in result.stderr
    result = _cli("compare", str(paths["base"]), str(paths["same"]), "--metric", "speed")
    assert result.returncode == 2 and "unknown metric" in result.stderr


def test_profile_writes_a_trace_with_aten_ops(tmp_path):
    from rmt.bench.profile import profile_model

    summary = profile_model("tiny", tmp_path / "prof", batch=1, img_size=(64, 64), device="cpu",
                            model=rmt.RMT(TINY), memory=True, active=2)
    assert summary["trace_files"], "no trace written"
    trace = json.loads(open(summary["trace_files"][0]).read())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names)
    assert summary["top_ops"] and all("self_memory_mb" in op for op in summary["top_ops"])
    assert "tensorboard --logdir" in summary["open"]["tensorboard"]


def test_profile_reparam_shows_the_folded_ops_gone(tmp_path):
    from rmt.bench.profile import profile_model

    ops = {}
    for folded in (False, True):
        summary = profile_model("tiny", tmp_path / str(folded), batch=1, img_size=(64, 64), device="cpu",
                                model=rmt.RMT(TINY), active=1, top=1000, reparameterize=folded)
        assert summary["reparameterized"] is folded
        ops[folded] = {op["op"]: op["calls_per_step"] for op in summary["top_ops"]}
    assert ops[False].get("aten::native_batch_norm", 0) > 0 and "aten::native_batch_norm" not in ops[True]


def test_profile_of_a_compiled_model_lists_its_compiled_graph(tmp_path):
    from rmt.bench.profile import profile_model

    summary = profile_model("tiny", tmp_path / "prof", batch=1, img_size=(64, 64), device="cpu",
                            model=rmt.RMT(TINY), active=1, top=1000, reparameterize=True, compile_mode="default")
    assert summary["compile"] == "default" and summary["reparameterized"]
    # the profiled step ran the compiled graph, not the eager model (compiled on the wait step)
    ops = {op["op"] for op in summary["top_ops"]}
    assert any("Compiled" in op for op in ops) and "aten::native_layer_norm" not in ops
    assert (summary["compiled_graphs"], summary["graph_breaks"]) == (1, 0)
    for _ in range(2):  # the second starts afresh too, instead of reusing the first one's graphs uncounted
        broken = profile_model("broken", tmp_path / "prof", batch=1, img_size=(64, 64), device="cpu",
                               model=_GraphBreak(), active=1, compile_mode="default")
        assert (broken["compiled_graphs"], broken["graph_breaks"]) == (2, 1)


def test_profile_rejects_an_unknown_compile_mode_before_writing(tmp_path):
    from rmt.bench.profile import profile_model

    with pytest.raises(RMTError, match="unknown compile mode 'fastest'"):
        profile_model("rmt_t", tmp_path / "prof", device="cpu", compile_mode="fastest")
    with pytest.raises(RMTError, match="wait \\+ warmup >= 2"):
        profile_model("rmt_t", tmp_path / "prof", device="cpu", compile_mode="default", warmup=0)
    with pytest.raises(RMTError, match="batch size 0 is out of range: 1 to 1,048,576"):
        profile_model("rmt_t", tmp_path / "prof", device="cpu", batch=0)
    with pytest.raises(RMTError, match="batch size 99999999999999999999 is out of range"):  # not torch's overflow
        profile_model("rmt_t", tmp_path / "prof", device="cpu", batch=99999999999999999999)
    with pytest.raises(RMTError, match="image size 224x100000 is too large: at most 65536 a side"):
        profile_model("rmt_t", tmp_path / "prof", device="cpu", img_size=(224, 100000))
    with pytest.raises(RMTError, match="top must be at least 1, got -1"):
        profile_model("rmt_t", tmp_path / "prof", device="cpu", top=-1)
    with pytest.raises(RMTError, match="--freeze needs --compile"):
        profile_model("rmt_t", tmp_path / "prof", device="cpu", freeze=True)
    assert not (tmp_path / "prof").exists()


@pytest.mark.parametrize("command", [["profile", "rmt_t", "--device", "cpu"], ["flops", "rmt_t"], ["compare", "a.json", "b.json"]],
                         ids=["profile", "flops", "compare"])
def test_an_unwritable_json_path_fails_before_the_work(capsys, monkeypatch, tmp_path, command):
    from conftest import run_rmt

    monkeypatch.chdir(tmp_path)
    code, _, err = run_rmt(capsys, monkeypatch, *command, "--json", tmp_path / "missing" / "out.json")
    assert code == 2 and err.strip() == f"error: cannot write {tmp_path / 'missing' / 'out.json'}: folder {tmp_path / 'missing'} does not exist"
    assert list(tmp_path.iterdir()) == []  # no trace folder, nothing measured


@pytest.mark.parametrize("command", [["bench", "rmt_t", "--device", "cpu"], ["profile", "rmt_t", "--device", "cpu"],
                                     ["flops", "rmt_t"], ["compare", "a.json", "b.json"], ["eval", "rmt_t", "--data", "val"]],
                         ids=["bench", "profile", "flops", "compare", "eval"])
@pytest.mark.parametrize("path", ["reports/", "reports/.", ""], ids=["trailing-slash", "trailing-dot", "empty"])
def test_a_json_path_naming_no_file_fails_before_the_work(capsys, monkeypatch, tmp_path, command, path):
    """Typer's Path would drop the slash of 'reports/' and write a file named reports."""
    from conftest import run_rmt

    monkeypatch.chdir(tmp_path)
    code, _, err = run_rmt(capsys, monkeypatch, *command, "--json", path)
    message = f"cannot write {path}: it names a folder; give a file name" if path else "cannot write to an empty path: give a file name"
    assert code == 2 and err.strip() == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_the_atomic_writers_refuse_a_path_naming_a_folder(monkeypatch, tmp_path):
    from rmt.io import write_json_atomic

    monkeypatch.chdir(tmp_path)
    for path in ("reports/", "reports/.", "."):
        with pytest.raises(RMTError, match=f"cannot write {re.escape(path)}: "):
            write_json_atomic(path, {})
    assert list(tmp_path.iterdir()) == []


def test_bench_outputs_that_are_one_file_through_a_link_are_refused(capsys, monkeypatch, tmp_path):
    from conftest import run_rmt

    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "link.csv").symlink_to(tmp_path / "run.json")
    os.link(tmp_path / "run.json", tmp_path / "hard.csv")
    for other in ("link.csv", "hard.csv"):
        code, _, err = run_rmt(capsys, monkeypatch, "bench", "rmt_t", "--device", "cpu",
                               "--json", tmp_path / "run.json", "--csv", tmp_path / other)
        assert code == 2 and err.strip() == "error: --json, --csv and --plot must name different files"
    assert (tmp_path / "run.json").read_text() == "{}"


def test_profile_out_naming_a_file_or_nothing_says_so_before_the_model_is_built(capsys, monkeypatch, tmp_path):
    from conftest import run_rmt

    from rmt.bench.profile import profile_model

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr("rmt.bench.profile.build_model", no_model)
    traces = tmp_path / "traces"
    traces.write_text("mine")
    for out, message in ((traces, f"cannot write traces to {traces}: {traces} is a file, not a folder"),
                         (traces / "run1", f"cannot write traces to {traces / 'run1'}: {traces} is a file, not a folder"),
                         ("", "cannot write traces to an empty path: give a folder")):
        with pytest.raises(RMTError) as e:
            profile_model("rmt_t", out, device="cpu")
        assert str(e.value) == message
    assert traces.read_text() == "mine"
    code, _, err = run_rmt(capsys, monkeypatch, "profile", "rmt_t", "--out", tmp_path / "p", "--json", tmp_path / "p")
    assert code == 2 and err.strip() == f"error: --json {tmp_path / 'p'} is the --out folder: write it elsewhere"
    assert not (tmp_path / "p").exists()


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs procfs")
def test_a_folder_that_takes_no_files_is_not_writable():
    from rmt.io import check_writable

    with pytest.raises(RMTError, match="cannot write /proc/x.json: folder /proc is not writable"):
        check_writable("/proc/x.json")


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    settings = BenchSettings(models=["tiny", "rmt_t"], batches=[1], img_sizes=[(64, 64)], device="cpu", warmup=0, iters=1)
    report = run_benchmark(settings, builders=_builders())
    drawn = plot(report, tmp_path / "pareto.png", top1={"tiny": 70.0, "rmt_t": 82.4}.get)
    assert drawn == 2 and (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_compile_takes_an_optional_mode():
    from rmt_cli.bench import optional_compile_mode

    assert optional_compile_mode(["bench", "--compile"]) == ["bench", "--compile", "default"]
    assert optional_compile_mode(["bench", "--compile", "rmt_t"]) == ["bench", "--compile", "default", "rmt_t"]
    assert optional_compile_mode(["bench", "--compile", "--iters", "2"]) == ["bench", "--compile", "default", "--iters", "2"]
    kept = ["bench", "rmt_t", "--compile", "reduce-overhead"]
    assert optional_compile_mode(kept) == kept


def test_compiled_settings_are_static_and_start_from_fresh_caches(monkeypatch):
    """Each (size, batch) setting compiles with static shapes after a reset, so a sweep neither
    turns on dynamic shapes nor runs past dynamo's recompile limit into silent eager fallback."""
    calls = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: calls.append("reset"))

    def fake_compile(model, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    settings = BenchSettings(models=["tiny"], batches=[1], img_sizes=[(64, 64), (96, 96)], device="cpu",
                             warmup=0, iters=1, compile_mode="max-autotune")
    report = run_benchmark(settings, builders=_builders())
    assert [r["status"] for r in report["results"]] == ["ok", "ok"]
    compiled = {"mode": "max-autotune", "dynamic": False}
    assert calls == ["reset", compiled, "reset", compiled]


class _RecordsFreezing(nn.Module):
    """Records, on each call, whether inductor's freezing is on and autograd off."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        self.calls.append((inductor_config.freezing, torch.is_grad_enabled()))
        return self.conv(x).mean((2, 3))


def test_compile_workers_compile_ahead_and_the_run_loads_what_they_compiled(monkeypatch, tmp_path):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # empty: nothing compiled before
    settings = BenchSettings(models=["test_resnet", "test_convnext"], batches=[1], img_sizes=[(64, 64)],
                             device="cpu", warmup=0, iters=1, compile_mode="default", compile_workers=2)
    hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    report = run_benchmark(settings)
    assert [r["status"] for r in report["results"]] == ["ok", "ok"]
    # both graphs came from what the other processes compiled; none was compiled here
    assert counters["inductor"]["fxgraph_cache_hit"] - hits == 2
    assert counters["inductor"]["fxgraph_cache_miss"] - misses == 0
    assert all(r["first_call_s"] > 0 for r in report["results"])
    assert not [n for n in report["notes"] if "compile" in n]


def test_compile_workers_note_what_failed_or_ran_too_long(monkeypatch):
    from rmt.bench import precompile

    settings = BenchSettings(models=["rmt_t", "swin_t"], batches=[1], img_sizes=[(64, 64)], device="cpu",
                             compile_mode="default", compile_workers=2)
    monkeypatch.setattr(precompile, "_child_command", lambda job: [sys.executable, "-c", "import sys; sys.exit('no GPU left')"])
    assert precompile.warm_compile_caches([settings], 2) == [
        f"precompiling {name} 64x64 b1 failed (no GPU left); it was compiled in the run" for name in ("rmt_t", "swin_t")]
    monkeypatch.setattr(precompile, "_child_command", lambda job: [sys.executable, "-c", "import time; time.sleep(60)"])
    begin = time.monotonic()
    notes = precompile.warm_compile_caches([settings], 1, timeout_s=1)
    assert time.monotonic() - begin < 20  # the process was ended at the limit
    assert notes == [
        "precompiling rmt_t 64x64 b1 was still running when the 1 s for all of them ran out; it was compiled in the run",
        "precompiling swin_t 64x64 b1 had not started when the 1 s ran out; it was compiled in the run"]
    # each model and setting once, whatever runs name it; eager runs compile nothing
    calls = []
    monkeypatch.setattr(precompile, "_child_command", lambda job: calls.append(job.models) or [sys.executable, "-c", ""])
    assert precompile.warm_compile_caches([settings, settings, replace(settings, compile_mode=None, compile_workers=1)], 4) == []
    assert sorted(calls) == [["rmt_t"], ["swin_t"]]
    # TORCHINDUCTOR_FORCE_DISABLE_CACHES=1; config.patch, since on torch 2.11 monkeypatch's restore
    # left the option unreadable to inductor ("force_disable_caches does not exist") for later tests
    with torch._inductor.config.patch(force_disable_caches=True):
        assert "caches are off" in precompile.warm_compile_caches([settings], 2)[0]


def test_compile_workers_end_their_processes_when_the_run_is_terminated(tmp_path):
    # a CI job's time limit sends SIGTERM to the run: the compiling processes must not outlive it
    pids = tmp_path / "pids"
    script = f"""
import sys
from rmt.bench import precompile
from rmt.bench.runner import BenchSettings
precompile._child_command = lambda job: [sys.executable, "-c",
    "import os, time; open({str(pids)!r}, 'a').write(str(os.getpid()) + chr(10)); time.sleep(120)"]
settings = BenchSettings(models=["rmt_t", "swin_t"], device="cpu", compile_mode="default", compile_workers=2)
precompile.warm_compile_caches([settings], 2)
"""
    run = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    children = [int(pid) for pid in pids.read_text().split()]
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 128 + signal.SIGTERM, run.stderr.read()
    for pid in children:
        with pytest.raises(ProcessLookupError):  # ended and reaped by the run
            os.kill(pid, 0)


def test_bench_freeze_compiles_with_freezing_as_a_setting_of_its_own(monkeypatch):
    with pytest.raises(RMTError, match="--freeze needs --compile"):
        BenchSettings(models=["tiny"], device="cpu", freeze=True).validate()
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # what reaches the compiled graph
    recorder = _RecordsFreezing()
    settings = BenchSettings(models=["recorder"], batches=[1], img_sizes=[(64, 64)], device="cpu", warmup=0,
                             iters=1, compile_mode="default", freeze=True)
    frozen = run_benchmark(settings, builders={"recorder": lambda size: recorder})
    # the first call counts FLOPs, before compiling; dynamo and inductor read the flag while
    # tracing and compiling, so every call of the compiled model has it, with autograd off
    assert recorder.calls[0] == (False, False)
    assert len(recorder.calls) >= 3 and set(recorder.calls[1:]) == {(True, False)}
    assert frozen["settings"]["freeze"] is True and frozen["results"][0]["frozen"] is True
    assert frozen["results"][0]["status"] == "ok"
    assert next(csv.DictReader(io.StringIO(to_csv(frozen))))["frozen"] == "True"
    plain = run_benchmark(replace(settings, freeze=False), builders={"recorder": lambda size: _RecordsFreezing()})
    assert plain["results"][0]["frozen"] is False
    # a frozen run is another setting for compare, never a like-for-like regression check
    verdict = compare_reports(plain, frozen)
    assert {d.status for d in verdict.deltas} == {"missing", "new"}
    # reports from before the field are unfrozen runs
    older = {**plain, "results": [{k: v for k, v in r.items() if k != "frozen"} for r in plain["results"]]}
    assert {d.status for d in compare_reports(older, plain).deltas} == {"ok"}
    # called from Python with autograd on, the compiled model still compiles frozen
    recorder.calls.clear()
    with torch.enable_grad():
        compile_model(recorder, "default", freeze=True)(torch.randn(1, 3, 8, 8))
    assert recorder.calls == [(True, False)]


def test_bench_cuda_graph_is_a_cuda_eager_setting_of_its_own():
    with pytest.raises(RMTError, match="--cuda-graph needs a CUDA device; this run's is cpu"):
        BenchSettings(models=["tiny"], device="cpu", cuda_graph=True).validate()
    with pytest.raises(RMTError, match="--compile reduce-overhead records CUDA graphs"):
        BenchSettings(models=["tiny"], device="cpu", cuda_graph=True, compile_mode="default").validate()
    for args in (["--cuda-graph", "--device", "cpu"], ["--cuda-graph", "--compile"]):
        result = _cli("bench", "rmt_t", *args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "--cuda-graph" in result.stderr and "Traceback" not in result.stderr
    settings = BenchSettings(models=["tiny"], batches=[1], img_sizes=[(64, 64)], device="cpu", warmup=0, iters=1)
    plain = run_benchmark(settings, builders={"tiny": lambda size: rmt.RMT(TINY)})
    assert plain["settings"]["cuda_graph"] is False and plain["results"][0]["cuda_graph"] is False
    assert next(csv.DictReader(io.StringIO(to_csv(plain))))["cuda_graph"] == "False"
    # replayed from CUDA graphs is another setting for compare, never a like-for-like regression check
    graphed = {**plain, "results": [{**r, "cuda_graph": True} for r in plain["results"]]}
    verdict = compare_reports(plain, graphed)
    assert {d.status for d in verdict.deltas} == {"missing", "new"}
    assert any("cuda_graph" in d.setting for d in verdict.deltas)
    # reports from before the field are runs without graphs
    older = {**plain, "results": [{k: v for k, v in r.items() if k != "cuda_graph"} for r in plain["results"]]}
    assert {d.status for d in compare_reports(older, plain).deltas} == {"ok"}


def test_a_failed_capture_says_its_cause_and_an_out_of_memory_one_stays_one():
    from rmt.bench.runner import capture_failure
    from rmt.errors import is_out_of_memory

    def ended_by_capture_end(first: Exception) -> Exception:
        try:
            try:
                raise first
            except Exception:
                raise RuntimeError("operation failed due to a previous error during capture")
        except RuntimeError as error:
            return error

    out_of_memory = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    failure = capture_failure(ended_by_capture_end(out_of_memory))
    assert failure is out_of_memory and is_out_of_memory(failure)  # so --retry-oom halves the batch
    synced = RuntimeError("operation not permitted when stream is capturing")
    failure = capture_failure(ended_by_capture_end(synced))
    assert isinstance(failure, RMTError) and not is_out_of_memory(failure)
    assert str(failure) == "capturing a CUDA graph failed: RuntimeError: operation not permitted when stream is capturing"
    alone = ValueError("bad")
    assert str(capture_failure(alone)) == "capturing a CUDA graph failed: ValueError: bad"


def test_profile_freeze_compiles_with_freezing(tmp_path, monkeypatch):
    from rmt.bench.profile import profile_model

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # what reaches the compiled graph
    recorder = _RecordsFreezing()
    summary = profile_model("recorder", tmp_path / "prof", img_size=(16, 16), device="cpu", active=1,
                            model=recorder, compile_mode="default", freeze=True)
    assert summary["frozen"] is True and set(recorder.calls) == {(True, False)}


def test_frozen_compiled_model_keeps_the_weights_it_was_compiled_with():
    """--freeze really freezes (weights as constants of the graph: a parameter changed in place
    after compiling does not reach it), with eager's outputs; folded RMT, whose CPU attention is a
    custom operator in the graph."""
    torch.manual_seed(0)
    model = rmt.RMT(TINY).eval().reparameterize()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        eager = model(x)
        frozen = compile_model(model, "default", freeze=True)
        first = frozen(x)
    torch.testing.assert_close(first, eager, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model.head.fc.weight.mul_(2)
    with torch.inference_mode():
        assert not torch.allclose(model(x), eager)
        assert torch.equal(frozen(x), first)


class _GraphBreak(nn.Module):
    """Two convs with a graph break between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        torch._dynamo.graph_break()
        return self.b(x).mean((2, 3))


def test_compiled_rows_count_graphs_and_breaks_and_list_the_graphs_attention_ops():
    builders = {"tiny": lambda size: rmt.RMT(TINY), "broken": lambda size: _GraphBreak(),
                "broken_again": lambda size: _GraphBreak()}
    settings = BenchSettings(models=["tiny", "broken", "broken_again"], batches=[1], img_sizes=[(64, 64)],
                             device="cpu", warmup=0, iters=1, compile_mode="default", reparameterize=True)
    report = run_benchmark(settings, builders=builders)
    rows = {r["model"]: r for r in report["results"]}
    assert [r["status"] for r in rows.values()] == ["ok", "ok", "ok"]
    assert (rows["tiny"]["compiled_graphs"], rows["tiny"]["graph_breaks"]) == (1, 0)
    assert (rows["broken"]["compiled_graphs"], rows["broken"]["graph_breaks"]) == (2, 1)
    # the same code and guards: dynamo reuses the graphs, and no count is better than a false 0
    assert (rows["broken_again"]["compiled_graphs"], rows["broken_again"]["graph_breaks"]) == (None, None)
    assert report["settings"]["warmup"] == 2  # one pass compiles, one lists the ops; neither is timed
    broken_csv = list(csv.DictReader(io.StringIO(to_csv(report))))[1]
    assert (broken_csv["compiled_graphs"], broken_csv["graph_breaks"]) == ("2", "1")
    notes = [n for n in report["notes"] if n.startswith("broken")]
    assert notes == ["broken 64x64 b1: torch.compile made 2 graphs with 1 graph break; the code between them ran eager",
                     "broken_again 64x64 b1: torch.compile reused the graphs of an earlier model of this setting; "
                     "that model's row counts them"]
    # what the compiled graph runs (on the CPU, the operator that calls the eager kernels), not the eager model's ops
    assert "rmt::cpu_manhattan_attention" in rows["tiny"]["attention_ops"]
    eager = run_benchmark(replace(settings, models=["tiny"], compile_mode=None), builders=builders)["results"][0]
    assert eager["compiled_graphs"] is None and "rmt::deferred_normalisation_attention" in eager["attention_ops"]
    assert "rmt::cpu_manhattan_attention" not in eager["attention_ops"]


def test_bench_cli_rejects_bad_input_in_one_line():
    for args, message in ((["bench", "rmt_ss"], "did you mean"), (["bench", "rmt_t", "--dtype", "int8"], "unknown dtype"),
                          (["bench", "rmt_t", "--img-size", "big"], "not N or HxW"),
                          (["bench", "rmt_t", "--attn-kernel", "fast"], "unknown attention kernel"),
                          (["bench", "rmt_t", "--freeze"], "--freeze needs --compile"),
                          (["bench", "rmt_t", "--compile-workers", "2"], "--compile-workers needs --compile"),
                          (["bench", "rmt_t", "--compile", "--compile-workers", "0"], "--compile-workers must be >= 1")):
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr


def test_bench_and_flops_cli(tmp_path):
    out = tmp_path / "run.json"
    result = _cli("bench", "rmt_t", "--batch", "1", "--img-size", "64", "--iters", "1", "--warmup", "0",
                  "--reparam", "--json", str(out), "--csv", str(tmp_path / "run.csv"))
    assert result.returncode == 0, result.stderr
    report = read_report(out)
    _validate_schema(report)
    assert report["results"][0]["status"] == "ok" and "rmt_t" in result.stdout
    assert report["results"][0]["reparameterized"]
    flops_json = tmp_path / "flops.json"
    result = _cli("flops", "rmt_s", "--json", str(flops_json))
    assert result.returncode == 0 and "4.800 GMACs" in result.stdout
    assert "official code measured with fvcore: 4.800 GMACs (equal)" in result.stdout
    data = json.loads(flops_json.read_text())
    assert {"model", "img_size", "gmacs", "params"} <= set(data) and data["params"] == 26967240


def test_compare_failed_in_both_is_a_regression():
    base = _report([_row("rmt_s", None, None, None, "oom")])
    result = compare_reports(base, base)
    assert result.regressed and result.deltas[0].status == "failed"


def test_malformed_reports_are_one_line_errors(tmp_path):
    for name, payload, message in (
        ("rows.json", {"schema": 1, "results": [{"model": "rmt_s"}]}, r"results\[0\] has no 'batch'"),
        ("nondict.json", {"schema": 1, "results": ["rmt_s"]}, r"results\[0\] is a str"),
        ("text.json", {"schema": 1, "results": [dict(_row("rmt_s", "fast", 1, 1))]}, "non-numeric throughput"),
        ("old.json", {"schema": 0, "results": []}, "schema 0"),
        ("env.json", {"schema": 1, "env": None, "results": []}, "'env' is not an object"),
        ("model.json", {"schema": 1, "results": [{**_row("rmt_s", 1, 1, 1), "model": 7}]}, "'model' or 'status' that is not a string"),
        ("size.json", {"schema": 1, "results": [{**_row("rmt_s", 1, 1, 1), "img_size": [[64], [64]]}]}, "img_size that is not"),
        ("batch.json", {"schema": 1, "results": [{**_row("rmt_s", 1, 1, 1), "batch": "64"}]}, "non-integer batch"),
        ("dtype.json", {"schema": 1, "results": [{**_row("rmt_s", 1, 1, 1), "dtype": ["bf16"]}]}, "dtype that is not a string"),
    ):
        path = tmp_path / name
        path.write_text(json.dumps(payload))
        with pytest.raises(RMTError, match=message):
            read_report(path)


def test_flops_and_profile_build_timm_models_for_the_size(tmp_path):
    from rmt.bench.runner import build_model

    swin = build_model("swin_t", (512, 512))
    assert count_flops(swin, (512, 512)).gmacs > 4 * 4.5  # the Swin grid was built for 512
    convnext = build_model("convnext_t", (288, 288))  # no img_size argument: size-agnostic
    assert count_flops(convnext, (288, 288)).gmacs > 4.47
    result = _cli("flops", "rmt_t", "--img-size", "0")
    assert result.returncode == 2 and "too small" in result.stderr


def test_bench_checks_output_paths_before_running(tmp_path):
    result = _cli("bench", "rmt_t", "--batch", "1", "--iters", "1", "--json", str(tmp_path / "no" / "such" / "run.json"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert "rmt_t" not in result.stdout  # nothing ran


def test_device_strings():
    from rmt.bench.env import resolve_device

    assert resolve_device("cpu").type == "cpu"
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(RMTError, match="unknown device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(RMTError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_bench_cli_sweep_table(tmp_path):
    result = _cli("bench", "rmt_t", "--batch", "1", "--img-size", "64,96x128", "--iters", "1", "--warmup", "0")
    assert result.returncode == 0, result.stderr
    assert "resolution sweep" in result.stdout and "96x128" in result.stdout


@pytest.mark.parametrize("width, left_out", [(200, None), (80, "p99, p90, IQR, params M, GMACs, TFLOP/s")])
def test_bench_table_leaves_out_secondary_columns_rather_than_truncate_numbers(monkeypatch, width, left_out):
    from rich.console import Console

    import rmt_cli.bench as bench_cli

    console = Console(width=width, record=True)
    monkeypatch.setattr(bench_cli, "out", console)
    row = {**_row("rmt_s", 2105.96, 30.39, 1605.8), "params": 26967240, "gmacs": 4.7995,
           "tflops": 20.2, "mfu": 0.0204, "ratio_to_baseline": 0.4, "reparameterized": True}
    row["latency_ms"] = {"median": 30.39, "p90": 30.6, "p99": 30.9, "iqr": 0.2}
    report = _report([row], device_type="cuda")
    report.update(settings={"dtype": "bf16", "baseline": "swin_t", "models": ["rmt_s"]}, notes=[])
    bench_cli._print_bench(report)
    text = console.export_text()
    assert "…" not in text and "2,106.0" in text and "30.39" in text and "rmt_s (folded)" in text
    assert max(len(line) for line in text.splitlines()) <= width
    if left_out:
        assert f"left out for {width} columns: {left_out}\n" in text and "4.800" not in text
        assert "| 224x224 | batch 64" in text  # shared by every row: moved into the title
    else:
        assert "left out" not in text and "4.800" in text and "30.90" in text


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_bench_writes_its_files_before_printing(tmp_path):
    """A full or closed standard output must not lose the report of a long run."""
    out = tmp_path / "run.json"
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "rmt_cli.main", "bench", "rmt_t", "--batch", "1", "--img-size", "64",
                                 "--iters", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)],
                                stdout=full, stderr=subprocess.PIPE, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert read_report(out)["results"][0]["status"] == "ok"


def test_bench_cli_input_errors_are_one_line_before_any_work(tmp_path):
    same = tmp_path / "run.out"
    for args, message in ((["--json", str(same), "--csv", str(same)], "must name different files"),
                          (["--compile", "max_autotune"], "unknown compile mode 'max_autotune'"),
                          (["--batch", ","], "no batch sizes"), (["--batch", "1,1"], "batch size 1 listed more than once"),
                          (["--time-budget", "inf"], "time budget must be a positive number")):
        result = _cli("bench", "rmt_t", "--device", "cpu", *args)
        assert result.returncode == 2 and result.stderr.startswith("error: "), (args, result.stderr)
        assert message in result.stderr and result.stderr.count("\n") == 1
    assert not same.exists()
    result = _cli("profile", "rmt_x", "--out", str(tmp_path / "prof"))
    assert result.returncode == 2 and not (tmp_path / "prof").exists()


def test_ctrl_c_says_interrupted_and_exits_130(tmp_path):
    # Ctrl-C's default action in the child even where the tests run in a background job, whose
    # processes inherit an ignored SIGINT (Python then installs no KeyboardInterrupt handler)
    process = subprocess.Popen([sys.executable, "-m", "rmt_cli.main", "bench", "rmt_t", "--batch", "1", "--img-size", "64",
                                "--iters", "1000000", "--device", "cpu", "--json", str(tmp_path / "run.json")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        time.sleep(10)  # started, and timing
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()  # a million iterations must not outlive a failed test
    assert process.returncode == 130 and err.strip() == "interrupted"
    assert not (tmp_path / "run.json").exists()


def test_error_text_is_printed_as_it_is(monkeypatch):
    from rich.console import Console

    import rmt_cli.bench as bench_cli

    console = Console(width=200, record=True)
    monkeypatch.setattr(bench_cli, "out", console)
    row = {**_row("rmt_s", None, None, None, "error"), "error": "RuntimeError: [enforce fail] bad [/x] [bold]",
           "latency_ms": None, "params": None, "gmacs": None, "ratio_to_baseline": None}
    report = _report([row], device_type="cpu")
    report.update(settings={"dtype": "fp32", "baseline": "rmt_s", "models": ["rmt_s"]}, notes=[])
    bench_cli._print_bench(report)
    assert "RuntimeError: [enforce fail] bad [/x] [bold]" in console.export_text()


def test_error_lines_keep_square_brackets(tmp_path):
    """Rich markup must not eat text such as 'rmt[plot]' or a path with brackets."""
    missing = tmp_path / "run[1].json"
    result = _cli("compare", str(missing), str(missing))
    assert result.returncode == 2 and f"benchmark report not found: {missing}" in result.stderr


@pytest.mark.parametrize("name", ["swin_t", "swin_s", "swin_b", "convnext_t", "deit_s"])
def test_zoo_baseline_gmacs_are_what_rmt_flops_counts(name):
    from rmt import zoo

    entry = zoo.get_entry(name)
    counted = count_flops(zoo.create_model(name), 224, name).gmacs
    assert abs(counted - entry.measured["gmacs"]) < 1e-3
    assert abs(counted - entry.published["gflops"]) / entry.published["gflops"] < 0.01
