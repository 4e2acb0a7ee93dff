"""Comparing two benchmark reports: the CI regression gate behind ``rmt compare``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from rmt.errors import RMTError

METRICS = ("throughput", "latency", "memory")
# environment fields that make two reports incomparable when they differ (a warning, not a failure)
_ENV_FIELDS = ("device_name", "device_count", "torch", "timm", "cuda", "driver", "dtype", "threads")


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
            row.get("compile"), bool(row.get("channels_last")), bool(row.get("reparameterized")))


def _setting(key: tuple) -> str:
    _, batch, (h, w), dtype, compiled, channels_last, reparameterized = key
    text = f"b{batch} {h}x{w} {dtype}"
    if compiled:
        text += f" compile={compiled}"
    if channels_last:
        text += " channels_last"
    if reparameterized:
        text += " reparam"
    return text


def _value(row: dict[str, Any], metric: str) -> Optional[float]:
    if metric == "throughput":
        return row.get("throughput")
    if metric == "latency":
        return (row.get("latency_ms") or {}).get("median")
    return row.get("peak_memory_mb")


def compare_reports(
    base: dict[str, Any], new: dict[str, Any], threshold: float = 5.0, metrics: Sequence[str] = METRICS
) -> Comparison:
    """Per-model changes from ``base`` to ``new``; a regression is a throughput drop, or a latency or
    peak-memory growth, of more than ``threshold`` percent, or a model missing or failed in ``new``."""
    if threshold < 0:
        raise RMTError(f"--threshold must be >= 0, got {threshold}")
    metrics = tuple(metrics)
    new_rows = {_key(r): r for r in new["results"]}
    base_keys = set()
    deltas = []
    for row in base["results"]:
        key = _key(row)
        base_keys.add(key)
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
            for metric in metrics:
                before, after = _value(row, metric), _value(other, metric)
                delta.values[metric] = (before, after)
                if before is None or after is None or before == 0:
                    delta.changes[metric] = None
                    continue
                change = (after - before) / before * 100
                delta.changes[metric] = round(change, 2)
                worse = -change if metric == "throughput" else change
                if worse > threshold:
                    delta.status = "regressed"
                    delta.reasons.append(f"{metric} {change:+.1f}%")
        deltas.append(delta)
    for key, row in new_rows.items():
        if key not in base_keys:
            deltas.append(Delta(row["model"], _setting(key), "new", reasons=["not in the base report"]))
    warnings = []
    for field_name in _ENV_FIELDS:
        a, b = base.get("env", {}).get(field_name), new.get("env", {}).get(field_name)
        if a != b:
            warnings.append(f"environments differ: {field_name} {a!r} vs {b!r}")
    return Comparison(deltas, warnings, threshold, metrics)
