"""Shared fixtures: the official reference data copied from ../shared/reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def schema() -> dict:
    """Official constructor config, parameter count and state-dict layout of all seven variants."""
    return json.loads((DATA / "official_schema.json").read_text())


@pytest.fixture(scope="session")
def official_mini() -> dict:
    """Two small official configurations with weights, inputs and the official logits."""
    return torch.load(DATA / "official_mini.pt", weights_only=False)


def official_state_dict(schema_entry: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the official layout of one variant (every key and shape, random values)."""
    g = torch.Generator().manual_seed(seed)
    cfg = schema_entry["config"]
    out = {}
    for key, shape in schema_entry["state_dict"]:
        if ".Relpos." in key:  # buffers the official code derives from its configuration
            stage = int(key.split(".")[1])
            heads = cfg["num_heads"][stage]
            if key.endswith("angle"):
                angle = 1.0 / (10000 ** torch.linspace(0, 1, cfg["embed_dims"][stage] // heads // 2))
                out[key] = angle.unsqueeze(-1).repeat(1, 2).flatten()
            else:
                init, spread = cfg["init_values"][stage], cfg["heads_ranges"][stage]
                out[key] = torch.log(1 - 2 ** (-init - spread * torch.arange(heads, dtype=torch.float) / heads))
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.02
    return out


def cuda_available() -> bool:
    return torch.cuda.is_available()
