"""Writing benchmark reports: JSON (schema 1), CSV, and the accuracy-throughput plot."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from rmt.errors import RMTError, first_line
from rmt.io import atomic_write

CSV_COLUMNS = (
    "model", "batch", "requested_batch", "img_h", "img_w", "device", "dtype", "compile", "channels_last",
    "attn_kernel", "params", "gmacs", "throughput", "latency_median_ms", "latency_p90_ms", "latency_p99_ms",
    "latency_iqr_ms", "peak_memory_mb", "memory_kind", "tflops", "mfu", "ratio_to_baseline", "iters",
    "status", "error", "reparameterized", "compiled_graphs", "graph_breaks", "latency_mean_ms", "latency_min_ms",
    "warmup", "attention_ops", "frozen", "first_call_s", "cuda_graph",
)


def read_report(path: os.PathLike | str) -> dict[str, Any]:
    """Load a benchmark JSON and check it is a schema-1 report."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RMTError(f"benchmark report not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RMTError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise RMTError(f"{path} is not JSON ({e.msg} at line {e.lineno})") from None
    except (RecursionError, ValueError) as e:  # nested too deeply; an integer of over 4,300 digits
        reason = "nested too deeply" if isinstance(e, RecursionError) else first_line(e)
        raise RMTError(f"{path} is not an rmt bench report ({reason})") from None
    if not isinstance(data, dict) or "results" not in data or not isinstance(data["results"], list):
        raise RMTError(f"{path} is not an rmt bench report (no 'results' list)")
    if data.get("schema") != 1:
        raise RMTError(f"{path} has schema {data.get('schema')!r}; this rmt reads schema 1")
    if not isinstance(data.get("env", {}), dict):
        raise RMTError(f"{path}: 'env' is not an object")
    for i, row in enumerate(data["results"]):
        problem = _row_problem(row)
        if problem:
            raise RMTError(f"{path}: results[{i}] {problem}")
    return data


def _row_problem(row: Any) -> Optional[str]:
    """What makes a result row unusable, or None."""
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object"
    for key in ("model", "batch", "img_size", "status"):
        if key not in row:
            return f"has no '{key}'"
    if not isinstance(row["model"], str) or not isinstance(row["status"], str):
        return "has a 'model' or 'status' that is not a string"
    if not isinstance(row["img_size"], list) or len(row["img_size"]) != 2 or not all(map(_is_int, row["img_size"])):
        return "has an img_size that is not [height, width]"
    for key in ("batch", "requested_batch"):
        if key in row and not _is_int(row[key]):
            return f"has a non-integer {key}: {row[key]!r}"
    for key in ("dtype", "compile", "attn_kernel", "memory_kind"):
        if row.get(key) is not None and not isinstance(row[key], str):
            return f"has a {key} that is not a string: {row[key]!r}"
    latency = row.get("latency_ms")
    numbers = {"throughput": row.get("throughput"), "peak_memory_mb": row.get("peak_memory_mb"),
               "latency_ms.median": latency.get("median") if isinstance(latency, dict) else None}
    if latency is not None and not isinstance(latency, dict):
        return "has a latency_ms that is not an object"
    for key, value in numbers.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"has a non-numeric {key}: {value!r}"
        if isinstance(value, int) and abs(value) > sys.float_info.max:  # JSON integers have no bound
            return f"has a {key} beyond any float"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def to_csv(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for r in report["results"]:
        latency = r.get("latency_ms") or {}
        writer.writerow({
            **{k: r.get(k) for k in CSV_COLUMNS if k in r},
            "img_h": r["img_size"][0],
            "img_w": r["img_size"][1],
            "latency_median_ms": latency.get("median"),
            "latency_p90_ms": latency.get("p90"),
            "latency_p99_ms": latency.get("p99"),
            "latency_iqr_ms": latency.get("iqr"),
            "latency_mean_ms": latency.get("mean"),
            "latency_min_ms": latency.get("min"),
            "attention_ops": " ".join(r.get("attention_ops") or []),
        })
    return buffer.getvalue()


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RMTError("--plot needs matplotlib: pip install 'rmt[plot]'") from None


def plot(report: dict[str, Any], path: os.PathLike | str, top1: Callable[[str], Optional[float]]) -> int:
    """Accuracy (published top-1) against throughput, bubble area ~ parameters, Pareto front drawn.

    Returns the number of models drawn (models without a published top-1 are left out).
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r["status"] == "ok" and r["throughput"]]
    if not ok:
        raise RMTError("nothing to plot: no model finished")
    first = (tuple(ok[0]["img_size"]), ok[0]["requested_batch"])
    points = []
    for r in ok:
        if (tuple(r["img_size"]), r["requested_batch"]) != first:
            continue  # one setting per picture: the first image size and batch
        accuracy = top1(r["model"])
        if accuracy is not None:
            points.append((r["throughput"], accuracy, r["params"] / 1e6, r["model"]))
    if not points:
        raise RMTError("nothing to plot: none of the models has a published top-1 in the zoo")
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for x, y, params, name in points:
        family = "RMT" if name.startswith("rmt_") else "other"
        ax.scatter(x, y, s=params * 12, alpha=0.55, color="tab:red" if family == "RMT" else "tab:blue",
                   edgecolors="black", linewidths=0.5)
        ax.annotate(f"{name}\n{params:.0f}M", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    front, best = [], -1.0
    for x, y, *_ in sorted(points, key=lambda p: -p[0]):  # fastest first: keep strictly more accurate
        if y > best:
            front.append((x, y))
            best = y
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", linewidth=1, label="Pareto front")
    env = report["env"]
    ax.set_xlabel(f"throughput (images/s), batch {first[1]}, {first[0][0]}x{first[0][1]}, {report['settings']['dtype']}")
    ax.set_ylabel("ImageNet top-1 (%, published)")
    ax.set_title(f"Accuracy vs throughput on {env.get('device_name', '?')}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return len(points)
