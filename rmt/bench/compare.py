"""Comparing two benchmark reports: the CI regression gate behind ``rmt compare``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from rmt.errors import RMTError

METRICS = ("throughput", "latency", "memory")
# environment fields that make two reports incomparable when they differ (a warning, not a failure)
_ENV_FIELDS = ("device_name", "device_count", "torch", "timm", "cuda", "driver", "dtype", "threads")
# row fields that change what a matched row measured (a warning too)
_ROW_FIELDS = ("attn_kernel",)


@dataclass
class Delta:
    model: str
    setting: str
    status: str  # ok | regressed | missing | failed | new | fixed
    changes: dict[str, Optional[float]] = field(default_factory=dict)  # metric -> % change (new vs base)
    values: dict[str, tuple[Optional[float], Optional[float]]] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    deltas: list[Delta]
    env_warnings: list[str]
    threshold: float
    metrics: tuple[str, ...]

    @property
    def regressed(self) -> bool:
        return any(d.status in ("regressed", "missing", "failed") for d in self.deltas)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold_pct": self.threshold,
            "metrics": list(self.metrics),
            "regressed": self.regressed,
            "env_warnings": self.env_warnings,
            "rows": [
                {"model": d.model, "setting": d.setting, "status": d.status, "change_pct": d.changes,
                 "values": {k: list(v) for k, v in d.values.items()}, "reasons": d.reasons}
                for d in self.deltas
            ],
        }


def parse_metrics(text: str) -> tuple[str, ...]:
    metrics = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise RMTError(f"unknown metric(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(METRICS)}")
    return metrics


def _key(row: dict[str, Any]) -> tuple:
    return (row["model"], row.get("requested_batch", row["batch"]), tuple(row["img_size"]), row.get("dtype"),
            row.get("compile"), bool(row.get("frozen")), bool(row.get("cuda_graph")), bool(row.get("channels_last")),
            bool(row.get("reparameterized")))


def _setting(key: tuple) -> str:
    _, batch, (h, w), dtype, compiled, frozen, cuda_graph, channels_last, reparameterized = key
    text = f"b{batch} {h}x{w} {dtype}"
    if compiled:
        text += f" compile={compiled}"
    if frozen:
        text += " frozen"
    if cuda_graph:
        text += " cuda_graph"
    if channels_last:
        text += " channels_last"
    if reparameterized:
        text += " reparam"
    return text


def _value(row: dict[str, Any], metric: str) -> Optional[float]:
    """A metric of a row; None when absent, null or not a finite number."""
    if metric == "throughput":
        value = row.get("throughput")
    elif metric == "latency":
        value = (row.get("latency_ms") or {}).get("median")
    else:
        value = row.get("peak_memory_mb")
    return value if value is not None and math.isfinite(value) else None


def _rows_by_key(report: dict[str, Any], which: str) -> dict[tuple, dict[str, Any]]:
    rows: dict[tuple, dict[str, Any]] = {}
    for row in report["results"]:
        key = _key(row)
        if key in rows:  # one would silently stand in for the other
            raise RMTError(f"the {which} report has two results for {row['model']} {_setting(key)}")
        rows[key] = row
    return rows


def compare_reports(
    base: dict[str, Any], new: dict[str, Any], threshold: float = 5.0, metrics: Sequence[str] = METRICS
) -> Comparison:
    """Per-model changes from ``base`` to ``new``; a regression is a throughput drop, or a latency or
    peak-memory growth, of more than ``threshold`` percent, a gated metric the new report lacks, a
    model that ran at a smaller batch after running out of memory, or a model missing or failed in
    ``new``."""
    if not (math.isfinite(threshold) and threshold >= 0):
        raise RMTError(f"--threshold must be a number >= 0, got {threshold}")
    metrics = tuple(metrics)
    base_rows, new_rows = _rows_by_key(base, "base"), _rows_by_key(new, "new")
    if not base_rows:
        raise RMTError("the base report has no results: there is nothing to compare against")
    deltas = []
    differing: dict[str, set[tuple[Any, Any]]] = {}
    for key, row in base_rows.items():
        other = new_rows.get(key)
        delta = Delta(row["model"], _setting(key), "ok")
        if other is None:
            delta.status, delta.reasons = "missing", ["not in the new report"]
        elif other.get("status") != "ok":
            delta.status = "failed"
            if row.get("status") == "ok":
                delta.reasons = [f"{other.get('status')}: {other.get('error') or ''}".strip()]
            else:
                delta.reasons = [f"failed in both reports ({other.get('status')}: {other.get('error') or ''})"]
        elif row.get("status") != "ok":
            delta.status, delta.reasons = "fixed", [f"was {row.get('status')} in the base report"]
        else:
            for name in _ROW_FIELDS:
                if row.get(name) != other.get(name):
                    differing.setdefault(name, set()).add((row.get(name), other.get(name)))
            _gate(delta, row, other, metrics, threshold)
        deltas.append(delta)
    for key, row in new_rows.items():
        if key not in base_rows:
            deltas.append(Delta(row["model"], _setting(key), "new", reasons=["not in the base report"]))
    warnings = []
    base_env, new_env = base.get("env") or {}, new.get("env") or {}
    for name in _ENV_FIELDS:
        a, b = base_env.get(name), new_env.get(name)
        if a != b:
            warnings.append(f"environments differ: {name} {a!r} vs {b!r}")
    for name, pairs in differing.items():
        warnings.append(f"settings differ: {name} " + ", ".join(f"{a!r} vs {b!r}" for a, b in sorted(pairs, key=repr)))
    return Comparison(deltas, warnings, threshold, metrics)


def _gate(delta: Delta, row: dict[str, Any], other: dict[str, Any], metrics: tuple[str, ...], threshold: float) -> None:
    """Compare two ok rows of one setting metric by metric, marking ``delta`` regressed if need be."""
    batch, ran_at = row.get("batch"), other.get("batch")
    if isinstance(batch, int) and isinstance(ran_at, int) and ran_at < batch:  # --retry-oom halved it
        delta.status = "regressed"
        delta.reasons.append(f"ran at batch {ran_at} after running out of memory (base: {batch})")
    for metric in metrics:
        before, after = _value(row, metric), _value(other, metric)
        delta.values[metric] = (before, after)
        delta.changes[metric] = None
        if before is None:
            continue  # nothing to gate on
        if after is None:
            delta.status = "regressed"
            delta.reasons.append(f"{metric} missing in the new report")
            continue
        if metric == "memory" and row.get("memory_kind") != other.get("memory_kind"):
            delta.reasons.append(f"memory not compared: measured as {row.get('memory_kind')} vs {other.get('memory_kind')}")
            continue
        if before == 0:  # a CPU run's RSS growth can be 0: no percentage to take
            if after != 0:
                delta.reasons.append(f"{metric} not compared: {before:g} in the base report, {after:g} now")
            continue
        change = (after - before) / before * 100
        delta.changes[metric] = round(change, 2)
        worse = -change if metric == "throughput" else change
        if worse > threshold:
            delta.status = "regressed"
            delta.reasons.append(f"{metric} {change:+.1f}%")
