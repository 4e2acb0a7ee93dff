"""Our model reproduces the official model's logits (../shared/reference/official_mini.pt)."""

from __future__ import annotations

import pytest
import torch

import rmt
from rmt.models.checkpoint import convert_checkpoint


@pytest.mark.parametrize("config", ["mini_a", "mini_b"])
@pytest.mark.parametrize("kernel", ["auto", "sdpa", "reference"])
def test_official_logits(official_mini, config, kernel):
    entry = official_mini["models"][config]
    model = rmt.RMT.from_official(attn_kernel=kernel, **entry["config"]).eval()
    assert sum(p.numel() for p in model.parameters()) == entry["params"]
    model.load_state_dict(convert_checkpoint(entry["state_dict"], model))
    sizes = set()
    for case in entry["cases"]:
        sizes.add(tuple(case["input"].shape[-2:]))
        with torch.inference_mode():
            logits = model(case["input"])
        assert logits.shape == case["logits"].shape
        assert (logits - case["logits"]).abs().max().item() <= 1e-4
    assert (160, 224) in sizes  # the non-square case is covered


def test_official_logits_through_a_saved_checkpoint(official_mini, tmp_path):
    """The whole path a user takes: official state dict on disk -> load_checkpoint -> logits."""
    entry = official_mini["models"]["mini_b"]
    path = tmp_path / "mini_b.pth"
    torch.save({"model": entry["state_dict"]}, path)
    model = rmt.RMT.from_official(**entry["config"]).eval()
    rmt.load_checkpoint(model, path)
    with torch.inference_mode():
        logits = model(entry["cases"][1]["input"])
    assert (logits - entry["cases"][1]["logits"]).abs().max().item() <= 1e-4
