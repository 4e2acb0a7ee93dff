"""zoo.yaml: its figures match the official measurements and timm, and a bad file is one clear line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

import rmt
from rmt import zoo
from rmt.errors import UnknownModelError, ZooError
from rmt.models.checkpoint import _param_count, official_shapes
from rmt.zoo.registry import PACKAGED_ZOO_FILE

ROOT = Path(__file__).resolve().parents[1]
RMT_NAMES = ["rmt_t", "rmt_s", "rmt_b", "rmt_l", "rmt_s_tl", "rmt_b_tl", "rmt_l_tl"]


def test_the_packaged_zoo_file_is_the_repository_root_one():
    assert (ROOT / "zoo.yaml").is_file()
    assert PACKAGED_ZOO_FILE.resolve() == (ROOT / "zoo.yaml").resolve()
    assert [e.name for e in zoo.list_entries()] == RMT_NAMES + ["swin_t", "swin_s", "swin_b", "convnext_t", "deit_s"]


def test_rmt_figures_match_the_official_measurements(schema):
    published = {
        "rmt_t": (14, 2.5, 82.4), "rmt_s": (27, 4.5, 84.1), "rmt_b": (54, 9.7, 85.0), "rmt_l": (95, 18.2, 85.5),
        "rmt_s_tl": (27, 4.5, 84.8), "rmt_b_tl": (55, 9.7, 85.6), "rmt_l_tl": (96, 18.2, 86.1),
    }
    for name in RMT_NAMES:
        entry = zoo.get_entry(name)
        assert entry.family == "rmt" and entry.timm_name == name
        assert (entry.published["params_m"], entry.published["gflops"], entry.published_top1) == published[name]
        assert entry.measured["params"] == schema[name]["params"] == _param_count(official_shapes(name))
        assert entry.measured["gmacs"] == round(schema[name]["fvcore_flops_224"] / 1e9, 3)
        # the README's GFLOPs are 5.7-7.1% below fvcore's count on the released code: both are kept
        assert 0.05 < 1 - entry.published["gflops"] / entry.measured["gmacs"] < 0.08
        assert entry.weights["source"] == "baidu" and entry.weights["sha256"] is None
        assert entry.weights["url"].startswith("https://pan.baidu.com/s/")
        assert entry.weights["url"].endswith(f"?pwd={entry.weights['code']}")
        # the official logs: EMA accuracy for S, B, L and TL, the plain model's for T
        assert entry.weights["state_dict"] == ("model" if name == "rmt_t" else "model_ema")


def test_rmt_preprocessing_matches_the_models_pretrained_cfg():
    for name in RMT_NAMES:
        entry = zoo.get_entry(name)
        cfg = timm.models.get_pretrained_cfg(name)
        assert entry.preprocessing == {
            "input_size": cfg.input_size, "interpolation": cfg.interpolation, "crop_pct": cfg.crop_pct,
            "mean": tuple(cfg.mean), "std": tuple(cfg.std),
        }
        assert entry.preprocessing["crop_pct"] == (0.96 if name.endswith("_tl") else 0.875)


def test_baselines_are_pinned_to_the_published_imagenet_1k_weights():
    expected = {
        "swin_t": ("swin_tiny_patch4_window7_224.ms_in1k", 28.3, 4.51, 81.3),
        "swin_s": ("swin_small_patch4_window7_224.ms_in1k", 49.6, 8.77, 83.0),
        "swin_b": ("swin_base_patch4_window7_224.ms_in1k", 87.8, 15.47, 83.5),
        "convnext_t": ("convnext_tiny.fb_in1k", 28.6, 4.47, 82.1),
        "deit_s": ("deit_small_patch16_224.fb_in1k", 22.1, 4.6, 79.8),
    }
    for name, (timm_name, params_m, gflops, top1) in expected.items():
        entry = zoo.get_entry(name)
        assert entry.family == "baseline" and entry.timm_name == timm_name
        assert (entry.published["params_m"], entry.published["gflops"], entry.published_top1) == (params_m, gflops, top1)
        with torch.device("meta"):
            model = timm.create_model(timm_name)
        assert entry.measured["params"] == sum(p.numel() for p in model.parameters())
        assert round(entry.measured["params"] / 1e6, 1) == params_m
        cfg = model.pretrained_cfg
        assert entry.preprocessing == {
            "input_size": tuple(cfg["input_size"]), "interpolation": cfg["interpolation"], "crop_pct": cfg["crop_pct"],
            "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
        }
        assert entry.weights["hf_hub_id"] == cfg["hf_hub_id"] == f"timm/{timm_name}"


def test_any_timm_model_is_an_entry_with_timms_preprocessing():
    entry = zoo.get_entry("test_vit")
    assert entry.family == "timm" and entry.timm_name == "test_vit"
    assert entry.published == {} and entry.published_top1 is None
    assert entry.preprocessing["input_size"] == (3, 160, 160)
    assert entry.preprocessing["mean"] == (0.5, 0.5, 0.5)
    assert entry.weights == {
        "source": "hf-hub", "hf_hub_id": "timm/test_vit.r160_in1k", "filename": "model.safetensors", "sha256": None,
    }
    assert zoo.get_entry("convnext_tiny.fb_in22k").weights["hf_hub_id"] == "timm/convnext_tiny.fb_in22k"


@pytest.mark.parametrize(
    "name, suggestion",
    [("rmt_ss", "rmt_s"), ("RMT-S", "rmt_s"), ("swin-t", "swin_t"), ("resnet_5O", "resnet50")],
)
def test_unknown_names_suggest_close_ones(name, suggestion):
    with pytest.raises(UnknownModelError) as e:
        zoo.get_entry(name)
    assert "\n" not in str(e.value) and f"unknown model '{name}'" in str(e.value)
    assert suggestion in str(e.value).split("did you mean", 1)[1]


def test_an_unknown_pretrained_tag_of_a_timm_model_lists_the_tags():
    """timm.is_model accepts any tag after the architecture; timm's pretrained_cfg lookup then raised."""
    with pytest.raises(UnknownModelError) as e:
        zoo.get_entry("resnet18.nonexistent_tag")
    text = str(e.value)
    assert "\n" not in text and text.startswith("unknown model 'resnet18.nonexistent_tag': timm's resnet18 has no pretrained tag")
    assert "a1_in1k" in text and "tv_in1k" in text
    many = str(pytest.raises(UnknownModelError, zoo.get_entry, "vit_base_patch16_224.nope").value)
    assert "more (timm.list_pretrained('vit_base_patch16_224.*'))" in many


def test_timm_entries_keep_the_crop_mode():
    """73 of timm's ImageNet-1k configs resize without a center crop (squash) or pad (border)."""
    entry = zoo.get_entry("convnext_base.fb_in22k_ft_in1k_384")
    assert entry.preprocessing["crop_mode"] == timm.models.get_pretrained_cfg(entry.timm_name).crop_mode == "squash"
    assert zoo.get_entry("resnet18").preprocessing["crop_mode"] == "center"
    assert "crop_mode" not in zoo.get_entry("rmt_s").preprocessing  # zoo.yaml entries: center, unsaid


def test_rmt_home_and_xdg_choose_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("RMT_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_dir() == tmp_path / "home" / ".cache" / "rmt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "rmt"
    monkeypatch.setenv("RMT_HOME", str(tmp_path / "mine"))
    assert zoo.cache_dir() == tmp_path / "mine"
    assert zoo.WeightsCache().file_path(zoo.get_entry("rmt_s")) == tmp_path / "mine" / "weights" / "rmt_s" / "RMT_S.pth"


# ----------------------------------------------------------------------------- hand-edited zoo.yaml

GOOD_ENTRY = """
version: 1
models:
  rmt_t:
    family: rmt
    timm_name: rmt_t
    published: {params_m: 14, gflops: 2.5, top1: 82.4}
    preprocessing: {input_size: [3, 224, 224], interpolation: bicubic, crop_pct: 0.875, mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0.2]}
    weights: {source: baidu, url: "https://pan.baidu.com/s/x?pwd=abcd", code: abcd, filename: RMT_T.pth, state_dict: model, sha256: null}
"""

BAD_FILES = {
    "not yaml": ("models:\n  rmt_t: [unclosed\n", "is not valid YAML", "line"),
    "tab indent": ("models:\n\trmt_t: {}\n", "is not valid YAML", "line 2"),
    "duplicate entry": (GOOD_ENTRY + GOOD_ENTRY.split("models:\n", 1)[1], "key 'rmt_t' appears twice", "line"),
    "a list": ("- rmt_t\n- rmt_s\n", "expected a mapping with 'version' and 'models'", ""),
    "empty": ("", "expected a mapping", ""),
    "wrong version": (GOOD_ENTRY.replace("version: 1", "version: 2"), "version must be 1", ""),
    "typo in a field": (GOOD_ENTRY.replace("published:", "publised:"), "models.rmt_t: unknown field(s) publised", ""),
    "top-1 not a number": (GOOD_ENTRY.replace("top1: 82.4", "top1: eighty"), "models.rmt_t.published.top1: expected a number", ""),
    "negative params": (GOOD_ENTRY.replace("params_m: 14", "params_m: -14"), "published.params_m: expected a positive number", ""),
    "missing field": (GOOD_ENTRY.replace("    timm_name: rmt_t\n", ""), "models.rmt_t: missing field(s) timm_name", ""),
    "unknown family": (GOOD_ENTRY.replace("family: rmt", "family: cnn"), "models.rmt_t.family: must be one of rmt, baseline", ""),
    "bad sha256": (GOOD_ENTRY.replace("sha256: null", "sha256: abc123"), "models.rmt_t.weights.sha256: expected 64 hexadecimal", ""),
    "bad state dict": (GOOD_ENTRY.replace("state_dict: model,", "state_dict: ema,"), "weights.state_dict: must be one of", ""),
    "no filename": (GOOD_ENTRY.replace("filename: RMT_T.pth, ", ""), "models.rmt_t.weights: missing field(s) filename", ""),
    "path in filename": (GOOD_ENTRY.replace("filename: RMT_T.pth", "filename: ../../etc/passwd"), "weights.filename: a plain file name", ""),
    "not a variant": (GOOD_ENTRY.replace("  rmt_t:\n", "  rmt_x:\n"), "models.rmt_x: an rmt entry must be one of the variants", ""),
    "unknown timm model": (
        GOOD_ENTRY.replace("family: rmt", "family: baseline").replace("timm_name: rmt_t", "timm_name: no_such_net"),
        "models.rmt_t.timm_name: timm has no model 'no_such_net'", "",
    ),
    "crop above one": (GOOD_ENTRY.replace("crop_pct: 0.875", "crop_pct: 1.5"), "preprocessing.crop_pct: must be in (0, 1]", ""),
    "mean of two channels": (GOOD_ENTRY.replace("mean: [0.5, 0.5, 0.5]", "mean: [0.5, 0.5]"), "preprocessing.mean: expected one number per channel", ""),
    "ftp url": (GOOD_ENTRY.replace('"https://pan.baidu.com/s/x?pwd=abcd"', "ftp://x"), "weights.url: expected an http(s)", ""),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_zoo_file_is_one_line_naming_entry_and_field(case, tmp_path, monkeypatch):
    text, message, extra = BAD_FILES[case]
    path = tmp_path / "zoo.yaml"
    path.write_text(text)
    monkeypatch.setenv("RMT_ZOO_FILE", str(path))
    with pytest.raises(ZooError) as e:
        zoo.list_entries()
    line = str(e.value)
    assert "\n" not in line and line.startswith(str(path))
    assert message in line and extra in line


def test_a_good_custom_zoo_file_is_used_and_reread_after_an_edit(tmp_path, monkeypatch):
    path = tmp_path / "zoo.yaml"
    path.write_text(GOOD_ENTRY)
    monkeypatch.setenv("RMT_ZOO_FILE", str(path))
    assert [e.name for e in zoo.list_entries()] == ["rmt_t"]
    assert zoo.get_entry("rmt_t").preprocessing["mean"] == (0.5, 0.5, 0.5)
    path.write_text(GOOD_ENTRY.replace("top1: 82.4", "top1: 82.5"))
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse file-system clocks
    assert zoo.get_entry("rmt_t").published_top1 == 82.5
    missing = tmp_path / "gone.yaml"
    monkeypatch.setenv("RMT_ZOO_FILE", str(missing))
    with pytest.raises(ZooError, match="cannot read the zoo file"):
        zoo.list_entries()


def test_the_rmt_factory_still_rejects_unknown_names():
    with pytest.raises(UnknownModelError):
        rmt.create_model("rmt_q", pretrained=True)



def test_a_checkout_without_symlinks_still_finds_the_root_zoo_file(tmp_path, monkeypatch):
    import rmt.zoo.registry as registry

    package = tmp_path / "rmt" / "zoo"
    package.mkdir(parents=True)
    (tmp_path / "zoo.yaml").write_text(GOOD_ENTRY)
    placeholder = package / "zoo.yaml"
    placeholder.write_text("../../zoo.yaml")  # what git writes for a link where it cannot make one
    monkeypatch.delenv("RMT_ZOO_FILE", raising=False)
    monkeypatch.setattr(registry, "PACKAGED_ZOO_FILE", placeholder)
    assert registry.zoo_file() == (tmp_path / "zoo.yaml").resolve()
    assert [e.name for e in zoo.list_entries()] == ["rmt_t"]
