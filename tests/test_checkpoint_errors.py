"""Bad checkpoints: each is refused with one clear line, nothing is loaded partly, nothing runs."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import timm
import torch

import rmt
import rmt.zoo
from rmt.errors import CheckpointError
from rmt.models.checkpoint import convert_checkpoint_file

from conftest import official_state_dict


@pytest.fixture(scope="module")
def rmt_t_state(schema):
    return official_state_dict(schema["rmt_t"])


def _save(tmp_path, name, payload):
    path = tmp_path / name
    torch.save(payload, path)
    return path


def _single_line(error: CheckpointError) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_missing_key(tmp_path, rmt_t_state):
    state = dict(rmt_t_state)
    del state["layers.2.blocks.3.retention.k_proj.weight"]
    with pytest.raises(CheckpointError) as e:
        rmt.create_model("rmt_t", checkpoint=_save(tmp_path, "m.pth", state))
    text = _single_line(e.value)
    assert "1 missing key(s): layers.2.blocks.3.retention.k_proj.weight (256, 256)" in text


def test_unexpected_key(tmp_path, rmt_t_state):
    state = dict(rmt_t_state, **{"extra_head.weight": torch.zeros(10, 512)})
    with pytest.raises(CheckpointError) as e:
        rmt.create_model("rmt_t", checkpoint=_save(tmp_path, "m.pth", state))
    assert "1 unexpected key(s): extra_head.weight (10, 512)" in _single_line(e.value)
    assert "5,120 more" in str(e.value)


def test_wrong_shape(tmp_path, rmt_t_state):
    state = dict(rmt_t_state)
    state["head.weight"] = torch.zeros(100, 1024)
    with pytest.raises(CheckpointError) as e:
        rmt.create_model("rmt_t", checkpoint=_save(tmp_path, "m.pth", state))
    assert "head.weight (100, 1024) in file vs (1000, 1024) in model" in _single_line(e.value)


def test_another_number_of_classes_loads_all_but_the_classifier(tmp_path, schema):
    """As timm's pretrained models: asked for another num_classes, the file's classifiers (the head
    and the token-labelling aux_head) are left out, and every other tensor loads, still checked."""
    state = official_state_dict(schema["rmt_s_tl"])
    path = _save(tmp_path, "s_tl.pth", {"model": state})
    reference = rmt.create_model("rmt_s_tl", checkpoint=path).state_dict()
    backbone = {k: v for k, v in reference.items() if not k.startswith(("head.fc.", "aux_head."))}

    def loads_the_backbone(model, classes):
        assert model.head.fc.weight.shape == (classes, 1024) and model.aux_head.weight.shape == (classes, 512)
        kept = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.fc.", "aux_head."))}
        assert kept.keys() == backbone.keys() and all(torch.equal(v, backbone[k]) for k, v in kept.items())

    for model in (rmt.create_model("rmt_s_tl", checkpoint=path, num_classes=10),
                  timm.create_model("rmt_s_tl", pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=10)):
        loads_the_backbone(model, 10)
        assert not torch.equal(model.aux_head.weight, reference["aux_head.weight"][:10])
    headless = rmt.create_model("rmt_s_tl", checkpoint=path, num_classes=0).eval()
    with torch.no_grad():
        assert headless(torch.randn(1, 3, 64, 64)).shape == (1, 1024)  # the head's pooled features
    # a file without classifiers (saved with num_classes=0) takes new ones
    loads_the_backbone(rmt.create_model("rmt_s_tl", checkpoint=_save(tmp_path, "bare.pth", headless.state_dict()),
                                        num_classes=10), 10)
    cut = dict(state)
    del cut["layers.2.blocks.3.retention.k_proj.weight"]
    with pytest.raises(CheckpointError, match="1 missing key"):
        rmt.create_model("rmt_s_tl", checkpoint=_save(tmp_path, "cut.pth", cut), num_classes=10)


def test_a_fine_tuned_classifier_loads_with_its_number_of_classes(tmp_path, schema):
    tuned = rmt.create_model("rmt_s_tl", num_classes=10)
    path = _save(tmp_path, "tuned.pth", {"model": tuned.state_dict()})
    for model in (rmt.create_model("rmt_s_tl", checkpoint=path, num_classes=10),
                  # through timm's loader the pretrained config must say so: timm drops a head
                  # whose num_classes differs from the config's (1000)
                  timm.create_model("rmt_s_tl", pretrained=True, pretrained_cfg_overlay={"file": str(path), "num_classes": 10})):
        assert torch.equal(model.aux_head.weight, tuned.aux_head.weight)
        assert torch.equal(model.head.fc.weight, tuned.head.fc.weight)
    for not_asked in ({}, {"num_classes": None}):  # no other number of classes asked for: refused, naming the shapes
        with pytest.raises(CheckpointError, match=r"head.fc.weight \(10, 1024\) in file vs \(1000, 1024\) in model"):
            rmt.create_model("rmt_s_tl", checkpoint=path, **not_asked)


def test_a_feature_backbone_loads_a_file_with_another_classifier(tmp_path, schema):
    """A fine-tuned classifier as a detection backbone: the head is pruned anyway, as timm's models do."""
    tuned = rmt.create_model("rmt_t", num_classes=10)
    path = _save(tmp_path, "tuned.pth", tuned.state_dict())
    for backbone in (rmt.create_model("rmt_t", checkpoint=path, features_only=True),
                     timm.create_model("rmt_t", pretrained=True, features_only=True, pretrained_cfg_overlay={"file": str(path)})):
        assert torch.equal(backbone.state_dict()["model.stem.0.weight"], tuned.stem[0].weight)
    with pytest.raises(rmt.RMTError, match="feature_cls='hook': with weights, RMT feature models are timm's 'getter' kind"):
        rmt.create_model("rmt_t", checkpoint=path, features_only=True, feature_cls="hook")
    from timm.models._features import FeatureGetterNet

    for getter in ("Getter", FeatureGetterNet):  # the getter kind, as timm reads these
        assert isinstance(rmt.create_model("rmt_t", checkpoint=path, features_only=True, feature_cls=getter), FeatureGetterNet)
    for kind in ("getter", "hook", "fx"):  # each timm wrapper holds the network under its own name
        feature_model = timm.create_model("rmt_t", features_only=True, feature_cls=kind)
        with pytest.raises(CheckpointError, match=r"a feature model .* build it with its weights: rmt.create_model\(NAME, checkpoint=PATH, features_only=True\)"):
            rmt.load_checkpoint(feature_model, path)
        with pytest.raises(CheckpointError, match="a feature model .* export the full model's weights"):
            rmt.export_official_state_dict(feature_model)
    headless = rmt.create_model("rmt_t", checkpoint=path, num_classes=0, global_pool="").eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert torch.equal(headless(x), tuned.eval().forward_features(x))


def test_the_official_export_saves_as_safetensors_and_loads_back(tmp_path):
    from safetensors.torch import save_file

    reference = rmt.create_model("rmt_t")
    save_file(rmt.export_official_state_dict(reference), tmp_path / "official.safetensors")  # contiguous tensors
    loaded = rmt.create_model("rmt_t", checkpoint=tmp_path / "official.safetensors")
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_other_input_channels_adapt_the_stem_as_timm_does(tmp_path):
    reference = rmt.create_model("rmt_t")
    rgb = reference.stem[0].weight
    for path in (_save(tmp_path, "ours.pth", reference.state_dict()),
                 _save(tmp_path, "official.pth", {"model": rmt.export_official_state_dict(reference)})):
        gray = rmt.create_model("rmt_t", checkpoint=path, in_chans=1)
        assert torch.allclose(gray.stem[0].weight, rgb.sum(1, keepdim=True))  # the RGB filters summed
        assert torch.equal(gray.stem[3].weight, reference.stem[3].weight)  # the rest as it is
        four = timm.create_model("rmt_t", pretrained=True, in_chans=4, pretrained_cfg_overlay={"file": str(path)})
        assert four.stem[0].weight.shape == (32, 4, 3, 3)


def test_another_variants_checkpoint(tmp_path, schema):
    path = _save(tmp_path, "rmt_s.pth", {"model": official_state_dict(schema["rmt_s"])})
    with pytest.raises(CheckpointError) as e:
        rmt.create_model("rmt_t", checkpoint=path)
    text = _single_line(e.value)
    assert "it holds 26,967,240 parameters, rmt_t has 14,334,216" in text
    assert "looks like a rmt_s checkpoint" in text
    ours = _save(tmp_path, "rmt_t_ours.pth", rmt.create_model("rmt_t").state_dict())  # our layout too
    with pytest.raises(CheckpointError, match="looks like a rmt_t checkpoint"):
        rmt.create_model("rmt_s", checkpoint=ours)


def test_token_label_s_star_release_does_not_fit(tmp_path, schema):
    """The released RMT-S* log reports 27,992,240 parameters, 512,000 more than the released code."""
    state = official_state_dict(schema["rmt_s_tl"])
    state["aux_head.weight"] = torch.zeros(1000, 1024)  # a 1024-wide aux head: 512,000 extra weights
    model = rmt.create_model("rmt_s_tl")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        rmt.load_checkpoint(model, _save(tmp_path, "s_star.pth", {"model": state}), model_name="rmt_s_tl")
    text = _single_line(e.value)
    assert "it holds 27,992,240 parameters, rmt_s_tl has 27,480,240 (512,000 more)" in text
    assert "aux_head.weight (1000, 1024) in file vs (1000, 512) in model" in text
    # nothing was loaded partly
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _RunsCode(str(marker))}, f)
    torch_path = tmp_path / "evil_zip.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsCode(str(marker))}, torch_path)
    for p in (path, torch_path):
        with pytest.raises(CheckpointError) as e:
            rmt.create_model("rmt_t", checkpoint=p)
        text = _single_line(e.value)
        assert "refused" in text and "would run code" in text
        assert "system" in text
    assert not marker.exists()


def test_truncated_file(tmp_path, rmt_t_state):
    good = _save(tmp_path, "good.pth", {"model": rmt_t_state})
    data = good.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        rmt.create_model("rmt_t", checkpoint=cut)
    assert "truncated or corrupt" in _single_line(e.value)
    assert "If you are seeing this error" not in str(e.value)  # torch's paragraph of advice is cut


def test_html_page(tmp_path):
    page = tmp_path / "RMT_S.pth"
    page.write_text("<!DOCTYPE html>\n<html><head><title>百度网盘</title></head><body>login</body></html>")
    with pytest.raises(CheckpointError) as e:
        rmt.create_model("rmt_s", checkpoint=page)
    assert "HTML page, not a checkpoint" in _single_line(e.value)


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        rmt.create_model("rmt_t", checkpoint=empty)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        rmt.create_model("rmt_t", checkpoint=tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a directory"):
        rmt.create_model("rmt_t", checkpoint=tmp_path)


def test_not_a_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="not a dict of tensors"):
        rmt.create_model("rmt_t", checkpoint=_save(tmp_path, "list.pth", [1, 2, 3]))
    with pytest.raises(CheckpointError, match="not a tensor"):
        rmt.create_model("rmt_t", checkpoint=_save(tmp_path, "nested.pth", {"model": {"w": "text"}}))


def test_tensors_that_are_no_weights_are_refused(tmp_path, rmt_t_state):
    meta = {k: torch.empty(v.shape, device="meta") for k, v in rmt_t_state.items()}
    with pytest.raises(CheckpointError, match="is a tensor without data \\(saved from the meta device\\)"):
        rmt.create_model("rmt_t", checkpoint=_save(tmp_path, "meta.pth", meta))
    with pytest.raises(CheckpointError, match="checkpoint entry model: 1 has a key of type int, not a parameter name"):
        rmt.create_model("rmt_t", checkpoint=_save(tmp_path, "int_key.pth", {"model": {1: torch.zeros(1)}}))
    complex_state = {**rmt_t_state, "head.bias": rmt_t_state["head.bias"].to(torch.complex64)}
    with pytest.raises(CheckpointError, match="'head.bias' holds complex64 numbers: not model weights"):
        rmt.create_model("rmt_t", checkpoint=_save(tmp_path, "complex.pth", complex_state))
    with pytest.raises(CheckpointError, match="without data"):  # a timm model's file goes through the same reader
        rmt.zoo.create_model("test_resnet", checkpoint=_save(tmp_path, "meta_resnet.pth", {
            k: torch.empty(v.shape, device="meta") for k, v in timm.create_model("test_resnet").state_dict().items()}))


def test_ema_required_but_absent(tmp_path, rmt_t_state):
    path = _save(tmp_path, "plain.pth", {"model": rmt_t_state, "epoch": 3})
    with pytest.raises(CheckpointError, match="no EMA weights"):
        rmt.create_model("rmt_t", checkpoint=path, ema=True)


def test_unknown_model_suggests_close_names():
    with pytest.raises(rmt.UnknownModelError, match="did you mean rmt_s"):
        rmt.create_model("rmt_ss")


def test_cli_convert_reports_one_line(tmp_path, rmt_t_state):
    page = tmp_path / "page.pth"
    page.write_text("<html>nope</html>")
    result = subprocess.run(
        [sys.executable, "-m", "rmt_cli.main", "convert", "rmt_t", str(page), str(tmp_path / "out.pth")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.pth").exists()


def test_cli_convert_refuses_an_empty_source(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rmt_cli.main", "convert", "rmt_t", "", str(tmp_path / "out.pth")],
                            capture_output=True, text=True)  # not read as the current folder
    assert result.returncode == 2 and result.stderr == "error: the source checkpoint was given an empty path\n"
    assert not (tmp_path / "out.pth").exists()


def test_cli_convert_round_trip(tmp_path, rmt_t_state):
    src = _save(tmp_path, "deit.pth", {"model": rmt_t_state, "epoch": 1})
    ours, back = tmp_path / "[bold]ours.pth", tmp_path / "official.pth"  # a path is printed as it is, not as markup
    for args in (["rmt_t", str(src), str(ours), "--to", "rmt"], ["rmt_t", str(ours), str(back), "--to", "official"]):
        result = subprocess.run([sys.executable, "-m", "rmt_cli.main", "convert", *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "14,334,216 parameters" in result.stdout and f"wrote {args[2]} (" in result.stdout
    restored = torch.load(back, weights_only=True)
    assert set(restored) == {"model"}  # what the official scripts read
    restored = restored["model"]
    assert set(restored) == set(rmt_t_state)
    assert all(torch.equal(restored[k].to(v.dtype), v) for k, v in rmt_t_state.items())


def test_a_file_is_read_by_its_content_not_its_name(tmp_path, rmt_t_state):
    """torch.load takes any path ending in .safetensors for safetensors (SafetensorError: header too large)."""
    from safetensors.torch import save_file

    pickled = _save(tmp_path, "x.safetensors", {"model": rmt_t_state})
    model = rmt.create_model("rmt_t", checkpoint=pickled)
    assert torch.equal(rmt.export_official_state_dict(model)["head.weight"], rmt_t_state["head.weight"])
    real = tmp_path / "real.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(real))
    assert torch.equal(rmt.create_model("rmt_t", checkpoint=real).head.fc.weight, model.head.fc.weight)
    for name, data in (("cut.safetensors", real.read_bytes()[: real.stat().st_size // 2]),
                       ("cut.pth", real.read_bytes()[:5000])):
        cut = tmp_path / name
        cut.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            rmt.create_model("rmt_t", checkpoint=cut)
        assert _single_line(e.value).startswith(f"{cut} is not a readable safetensors file ({len(data):,} bytes; truncated or corrupt)")


def test_cli_convert_reads_a_misnamed_file_and_writes_no_misnamed_one(tmp_path, rmt_t_state):
    src = _save(tmp_path, "x.safetensors", {"model": rmt_t_state})
    result = subprocess.run([sys.executable, "-m", "rmt_cli.main", "convert", "rmt_t", str(src), str(tmp_path / "out.pth")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with pytest.raises(CheckpointError, match="writes torch.save checkpoints, not safetensors; give the destination a .pth name"):
        convert_checkpoint_file("rmt_t", tmp_path / "out.pth", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_convert_refuses_a_folder_destination_before_reading(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rmt_cli.main", "convert", "rmt_t", str(tmp_path / "missing.pth"),
                             str(tmp_path / "converted") + "/"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == f"error: cannot write {tmp_path / 'converted'}/: it names a folder; give a file name\n"
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_a_destination_that_is_the_source_through_a_link(tmp_path, rmt_t_state):
    src = _save(tmp_path, "t.pth", {"model": rmt_t_state})
    before = src.read_bytes()
    (tmp_path / "tlink.pth").symlink_to(src)
    os.link(src, tmp_path / "thard.pth")
    for destination in (tmp_path / "tlink.pth", tmp_path / "thard.pth", tmp_path / "sub" / ".." / "t.pth"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(CheckpointError, match="destination is the source file"):
            convert_checkpoint_file("rmt_t", src, destination)
    assert (tmp_path / "tlink.pth").is_symlink() and src.read_bytes() == before
