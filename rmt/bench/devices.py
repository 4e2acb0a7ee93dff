"""Peak dense tensor throughput of common accelerators, for model FLOP utilisation (MFU).

Figures are the vendors' datasheet peaks for dense math (no 2:4 sparsity), in TFLOP/s, where a
multiply-add counts as 2 FLOPs. ``fp32`` is plain IEEE fp32 on the CUDA cores; ``tf32`` the
tensor-core TF32 rate that PyTorch uses for fp32 matmuls when TF32 is allowed.
MFU = achieved FLOP/s (2 x MACs x images/s) / peak: how much of the card the model uses.
"""

from __future__ import annotations

from typing import Optional

# device-name substring (lower case, most specific first) -> {dtype: peak dense TFLOP/s}
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("h200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("h100 pcie", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("h100 nvl", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0, "fp16": 835.0}),
    ("h100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),  # SXM
    ("gh200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("b200", {"fp32": 80.0, "tf32": 1100.0, "bf16": 2250.0, "fp16": 2250.0}),
    ("a100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    ("a10g", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    ("a10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    ("l40s", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0}),
    ("l4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    ("rtx 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}),
    ("rtx 3090", {"fp32": 35.6, "tf32": 35.6, "bf16": 71.0, "fp16": 71.0}),
    ("v100", {"fp32": 15.7, "tf32": 15.7, "bf16": 0.0, "fp16": 125.0}),  # no bf16 tensor cores
    ("t4", {"fp32": 8.1, "tf32": 8.1, "bf16": 0.0, "fp16": 65.0}),
]


def peak_tflops(device_name: str, dtype: str) -> Optional[float]:
    """The datasheet peak for a device name and a dtype label, or None when unknown."""
    name = device_name.lower()
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            value = peaks.get(dtype)
            return value if value else None
    return None
