"""All seven variants: exact parameter counts, the official state-dict layout, every file layout."""

from __future__ import annotations

import argparse

import pytest
import torch

import rmt
from rmt.models.checkpoint import convert_checkpoint, export_official_state_dict, official_shapes
from rmt.models.config import VARIANTS, RMTConfig

from conftest import official_state_dict

NAMES = ["rmt_t", "rmt_s", "rmt_b", "rmt_l", "rmt_s_tl", "rmt_b_tl", "rmt_l_tl"]


def test_the_seven_names():
    assert rmt.list_models() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_config_matches_official_constructor(schema, name):
    official = RMTConfig.from_official(**schema[name]["config"])
    assert official.replace(drop_path_rate=VARIANTS[name].drop_path_rate) == VARIANTS[name]
    assert RMTConfig.from_official(**VARIANTS[name].to_official()) == VARIANTS[name]


@pytest.mark.parametrize("name", NAMES)
def test_official_layout_exactly(schema, name):
    expected = {key: tuple(shape) for key, shape in schema[name]["state_dict"]}
    assert official_shapes(name) == expected
    n_params = sum(
        torch.Size(s).numel() for k, s in expected.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")) and ".Relpos." not in k
    )
    assert n_params == schema[name]["params"]


@pytest.mark.parametrize("name", NAMES)
def test_params_and_strict_load_of_official_layout(schema, name):
    model = rmt.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == schema[name]["params"]
    state = official_state_dict(schema[name])
    model.load_state_dict(convert_checkpoint(state, model), strict=True)
    # every official tensor arrived, and export gives exactly the file's tensors back
    exported = export_official_state_dict(model)
    assert set(exported) == set(state)
    for key, value in state.items():
        assert torch.equal(exported[key].to(value.dtype), value), key


def _layouts(state: dict) -> dict:
    ns = argparse.Namespace(model="RMT_T3", lr=1e-3, epochs=300)
    other = {k: v + 1 if v.is_floating_point() and ".Relpos." not in k else v for k, v in state.items()}
    return {
        "deit": ({"model": other, "model_ema": state, "optimizer": {"state": {}, "param_groups": []},
                  "lr_scheduler": {"last_epoch": 3}, "epoch": 299, "scaler": {"scale": torch.tensor(65536.0)},
                  "max_accuracy": 82.4, "args": ns}, state),
        "deit_no_ema": ({"model": state, "optimizer": {}, "epoch": 1, "args": ns}, state),
        "timm": ({"state_dict": other, "state_dict_ema": state, "arch": "RMT_T3", "epoch": 10,
                  "version": 2, "args": ns, "metric": 82.1}, state),
        "bare": (state, state),
        "ddp": ({f"module.{k}": v for k, v in state.items()}, state),
        "ddp_in_deit": ({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, state),
    }


@pytest.mark.parametrize("layout", ["deit", "deit_no_ema", "timm", "bare", "ddp", "ddp_in_deit"])
def test_file_layouts(schema, tmp_path, layout):
    state = official_state_dict(schema["rmt_t"], seed=1)
    payload, expected = _layouts(state)[layout]
    path = tmp_path / f"{layout}.pth"
    torch.save(payload, path)
    # the expected weights are the EMA model's where the file has one (rmt_t's default is the plain model's)
    model = rmt.create_model("rmt_t", checkpoint=path, ema=True if layout in ("deit", "timm") else None)
    exported = export_official_state_dict(model)
    for key, value in expected.items():
        assert torch.equal(exported[key].to(value.dtype), value), key


def test_ema_choice_is_the_published_one_at_every_entry_point(schema, tmp_path):
    """rmt_t's published figures are its plain model's, the other variants' their EMA model's:
    create_model, rmt convert, the zoo and rmt eval all take that state dict unless told."""
    from rmt import zoo
    from rmt.models.checkpoint import convert_checkpoint_file, published_prefers_ema

    assert not published_prefers_ema("rmt_t") and published_prefers_ema("rmt_s")
    assert published_prefers_ema("rmt_b_tl") and published_prefers_ema("resnet50")
    state = official_state_dict(schema["rmt_t"], seed=2)
    payload, _ = _layouts(state)["deit"]
    path = tmp_path / "deit.pth"
    torch.save(payload, path)
    key = "head.weight"
    default = rmt.create_model("rmt_t", checkpoint=path)
    ema = rmt.create_model("rmt_t", checkpoint=path, ema=True)
    assert torch.equal(export_official_state_dict(default)[key], payload["model"][key])
    assert torch.equal(export_official_state_dict(ema)[key], payload["model_ema"][key])
    assert torch.equal(export_official_state_dict(zoo.create_model("rmt_t", checkpoint=path))[key], payload["model"][key])
    summary = convert_checkpoint_file("rmt_t", path, tmp_path / "converted.pth", layout="official")
    converted = torch.load(tmp_path / "converted.pth", weights_only=True)["model"]
    assert summary["source_entry"] == "model" and torch.equal(converted[key], payload["model"][key])
    # a preference, not a requirement: a file with EMA weights alone gives those
    torch.save({"model_ema": payload["model_ema"], "epoch": 299}, path)
    assert torch.equal(export_official_state_dict(rmt.create_model("rmt_t", checkpoint=path))[key], payload["model_ema"][key])
    with pytest.raises(rmt.CheckpointError, match="no 'model' entry"):
        rmt.create_model("rmt_t", checkpoint=path, ema=False)


def test_our_layout_round_trip(tmp_path):
    model = rmt.create_model("rmt_t").eval()
    path = tmp_path / "ours.pth"
    torch.save(model.state_dict(), path)
    again = rmt.create_model("rmt_t", checkpoint=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), again(x))


def test_relpos_buffers_are_checked(schema):
    model = rmt.create_model("rmt_t")
    state = official_state_dict(schema["rmt_t"])
    state["layers.0.Relpos.decay"] = state["layers.0.Relpos.decay"] * 0 - 1.0
    with pytest.raises(rmt.CheckpointError, match=r"layers\.0\.Relpos\.decay differs"):
        convert_checkpoint(state, model)
    # and not required
    state = {k: v for k, v in official_state_dict(schema["rmt_t"]).items() if ".Relpos." not in k}
    model.load_state_dict(convert_checkpoint(state, model))
