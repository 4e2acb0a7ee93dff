"""Getting weights into the cache: verified, locked, trusted on first use, never half-written."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import timm
import torch

import rmt
from rmt import zoo
from rmt.errors import CheckpointError, DownloadError, WeightsNotCachedError, ZooError


def _files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def _nothing_cached(home: Path) -> bool:
    """No weights file, no partial file, and no manifest record were left behind."""
    manifest = home / "manifest.json"
    records = json.loads(manifest.read_text())["files"] if manifest.exists() else {}
    return _files_under(home / "weights") == [] and _files_under(home / "partial") == [] and records == {}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- the good paths


def test_manual_entry_says_how_to_get_it_and_makes_no_request(zoo_home, zoo_server):
    with pytest.raises(WeightsNotCachedError) as e:
        zoo.download("rmt_b")
    text = str(e.value)
    assert "\n" not in text
    assert "https://pan.baidu.com/s/1ZDNl_broia_fvvlEoTaFhA?pwd=yzge" in text and "extraction code yzge" in text
    assert "`rmt download rmt_b --from PATH/TO/RMT_B.pth`" in text
    assert e.value.instructions["code"] == "yzge" and e.value.instructions["command"].startswith("rmt download rmt_b --from")
    assert zoo_server.requests == [] and _nothing_cached(zoo_home)


def test_import_with_from_checks_the_architecture_and_trusts_on_first_use(zoo_home, tmp_path, rmt_t_checkpoint_bytes):
    source = tmp_path / "Downloads" / "RMT_T (1).pth"
    source.parent.mkdir()
    source.write_bytes(rmt_t_checkpoint_bytes)
    fetched = zoo.download("rmt_t", source_file=source)
    assert fetched.action == "imported" and fetched.params == 14_334_216
    assert fetched.state_dict == "model"  # the zoo uses RMT-T's plain weights although the file has EMA ones
    assert fetched.trusted_on_first_use and fetched.sha256 == _sha(rmt_t_checkpoint_bytes)
    assert fetched.path == zoo_home / "weights" / "rmt_t" / "RMT_T.pth" and fetched.path.read_bytes() == rmt_t_checkpoint_bytes
    assert source.exists()  # imports copy, they do not move the user's file
    record = json.loads((zoo_home / "manifest.json").read_text())["files"]["rmt_t/RMT_T.pth"]
    assert record["sha256"] == fetched.sha256 and record["size"] == len(rmt_t_checkpoint_bytes)
    assert record["source"] == source.resolve().as_uri() and record["added"].endswith("+00:00")
    assert zoo.weights_path("rmt_t") == fetched.path
    again = zoo.download("rmt_t", source_file=source)
    assert again.action == "cached" and not again.trusted_on_first_use
    assert _files_under(zoo_home / "partial") == []
    other = tmp_path / "other" / "RMT_T.pth"  # another file is not silently ignored
    other.parent.mkdir()
    other.write_bytes(rmt_t_checkpoint_bytes + b"\0")
    with pytest.raises(ZooError, match="rmt_t is already cached .* is another file: nothing was imported; add --force"):
        zoo.download("rmt_t", source_file=other)
    assert fetched.path.read_bytes() == rmt_t_checkpoint_bytes


def test_pretrained_uses_the_cache_with_the_zoos_state_dict_choice(zoo_home, tmp_path, rmt_t_checkpoint_bytes):
    with pytest.raises(WeightsNotCachedError) as e:
        rmt.create_model("rmt_t", pretrained=True)
    with pytest.raises(WeightsNotCachedError, match="no weights for rmt_t in the cache"):
        timm.create_model("rmt_t", pretrained=True)
    assert "no weights for rmt_t in the cache" in str(e.value) and "pwd=vsyv" in str(e.value)
    assert "rmt download rmt_t --from" in str(e.value) and "\n" not in str(e.value)
    source = tmp_path / "RMT_T.pth"
    source.write_bytes(rmt_t_checkpoint_bytes)
    zoo.download("rmt_t", source_file=source)
    saved = torch.load(io.BytesIO(rmt_t_checkpoint_bytes), weights_only=True)
    model = rmt.create_model("rmt_t", pretrained=True)
    assert torch.equal(model.head.fc.weight, saved["model"]["head.weight"])  # plain, not EMA, for RMT-T
    # timm's own factory takes the same file (timm has no URL for Baidu-only weights)
    assert torch.equal(timm.create_model("rmt_t", pretrained=True).head.fc.weight, saved["model"]["head.weight"])
    backbone = timm.create_model("rmt_t", pretrained=True, features_only=True)
    assert torch.equal(backbone.state_dict()["model.stem.0.weight"], model.stem[0].weight)
    # a file named to timm is loaded by rmt's loader, not taken from the cache
    other = tmp_path / "other.pth"
    torch.save(saved["model_ema"], other)
    named = timm.create_model("rmt_t", pretrained=True, pretrained_cfg_overlay={"file": str(other)})
    assert torch.equal(named.head.fc.weight, saved["model_ema"]["head.weight"])
    # with the same rule for a training file holding both: plain for RMT-T (timm's loader took the EMA)
    named = timm.create_model("rmt_t", pretrained=True, pretrained_cfg_overlay={"file": str(source)})
    assert torch.equal(named.head.fc.weight, saved["model"]["head.weight"])
    ema_model = zoo.create_model("rmt_t", pretrained=True, ema=True)  # an explicit choice wins
    assert torch.equal(ema_model.head.fc.weight, saved["model_ema"]["head.weight"])
    # another number of classes, as timm's pretrained models: every weight but the classifier's
    for tuned in (rmt.create_model("rmt_t", pretrained=True, num_classes=10),
                  timm.create_model("rmt_t", pretrained=True, num_classes=10)):
        assert tuned.num_classes == 10 and tuned.head.fc.weight.shape == (10, 1024)
        assert torch.equal(tuned.head.proj.weight, model.head.proj.weight)
        assert torch.equal(tuned.stem[0].weight, model.stem[0].weight)
    headless = rmt.create_model("rmt_t", pretrained=True, num_classes=0).eval()
    with torch.no_grad():
        assert headless(torch.randn(1, 3, 64, 64)).shape == (1, 1024)  # the head's pooled features


def test_mirror_serves_manual_entries_over_http(zoo_home, zoo_server, monkeypatch, rmt_t_checkpoint_bytes):
    zoo_server.add("mirror/rmt_t/RMT_T.pth", rmt_t_checkpoint_bytes)
    monkeypatch.setenv("RMT_ZOO_MIRROR", zoo_server.url("mirror") + "/")
    assert zoo.source_url(zoo.get_entry("rmt_t")) == zoo_server.url("mirror/rmt_t/RMT_T.pth")
    seen = []
    fetched = zoo.download("rmt_t", progress=lambda done, total: seen.append(done))
    assert fetched.action == "downloaded" and fetched.source == zoo_server.url("mirror/rmt_t/RMT_T.pth")
    assert seen[-1] == len(rmt_t_checkpoint_bytes)
    assert zoo.weights_path("rmt_t").read_bytes() == rmt_t_checkpoint_bytes


def test_a_dropped_download_resumes_and_lands_verified(zoo_home, zoo_server, rmt_t_checkpoint_bytes):
    url = zoo_server.add("RMT_T.pth", rmt_t_checkpoint_bytes, mode="drop-once")
    notes = []
    fetched = zoo.download("rmt_t", url=url, notify=notes.append)
    assert fetched.sha256 == _sha(rmt_t_checkpoint_bytes)
    assert [r[1] for r in zoo_server.gets("RMT_T.pth")] == [None, f"bytes={len(rmt_t_checkpoint_bytes) // 2}-"]
    assert any("resuming" in n for n in notes) and _files_under(zoo_home / "partial") == []


def test_download_interrupted_for_good_is_resumed_by_the_next_command(zoo_home, zoo_server, rmt_t_checkpoint_bytes):
    url = zoo_server.add("RMT_T.pth", rmt_t_checkpoint_bytes, mode="drop")
    with pytest.raises(DownloadError) as e:
        zoo.download("rmt_t", url=url)
    assert e.value.resumable and "run the same command again to resume" in str(e.value)
    assert _files_under(zoo_home / "weights") == [] and zoo.weights_path("rmt_t") is None
    zoo_server.modes["RMT_T.pth"] = "ok"
    assert zoo.download("rmt_t", url=url).action == "downloaded"
    assert zoo_server.gets("RMT_T.pth")[-1][1] is not None  # the last request resumed
    assert _files_under(zoo_home / "partial") == []


def test_concurrent_downloads_of_one_file_transfer_it_once(zoo_home, zoo_server, rmt_t_checkpoint_bytes):
    url = zoo_server.add("RMT_T.pth", rmt_t_checkpoint_bytes, mode="slow")
    results, errors, notes = [], [], []

    def fetch_it():
        try:
            results.append(zoo.download("rmt_t", url=url, notify=notes.append))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch_it) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.action for r in results) == ["cached", "downloaded"]
    assert len(zoo_server.gets("RMT_T.pth")) == 1
    assert any("waiting for another process" in n for n in notes)
    assert zoo.weights_path("rmt_t").read_bytes() == rmt_t_checkpoint_bytes


def test_a_second_process_waits_for_the_first_and_finds_the_file(zoo_home, zoo_server, rmt_t_checkpoint_bytes):
    url = zoo_server.add("RMT_T.pth", rmt_t_checkpoint_bytes, mode="slow")
    script = f"from rmt import zoo; print(zoo.download('rmt_t', url={url!r}).action)"
    other = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not zoo_server.gets("RMT_T.pth") and time.monotonic() < deadline and other.poll() is None:
            time.sleep(0.02)  # until the other process is transferring (and so holds the lock)
        notes = []
        ours = zoo.download("rmt_t", url=url, notify=notes.append)
        out, errors = other.communicate(timeout=60)
    finally:
        other.kill()
    assert other.returncode == 0, errors
    assert out.strip() == "downloaded" and ours.action == "cached"
    assert any("waiting for another process" in n for n in notes)
    assert len(zoo_server.gets("RMT_T.pth")) == 1
    assert zoo.weights_path("rmt_t").read_bytes() == rmt_t_checkpoint_bytes


def test_trust_on_first_use_then_enforced(zoo_home, zoo_server, rmt_t_checkpoint_bytes):
    url = zoo_server.add("RMT_T.pth", rmt_t_checkpoint_bytes)
    first = zoo.download("rmt_t", url=url)
    assert first.trusted_on_first_use
    tampered = rmt_t_checkpoint_bytes[:-1] + bytes([rmt_t_checkpoint_bytes[-1] ^ 1])
    zoo_server.add("RMT_T.pth", tampered)
    with pytest.raises(ZooError) as e:
        zoo.download("rmt_t", url=url, force=True)
    text = str(e.value)
    assert "sha256 mismatch" in text and "recorded when the file was first stored" in text
    assert f"--sha256 {_sha(tampered)}" in text and "\n" not in text
    assert zoo.weights_path("rmt_t").read_bytes() == rmt_t_checkpoint_bytes  # the trusted file stays
    assert _files_under(zoo_home / "partial") == []
    # the cached file itself changes on disk: reported, never used
    first.path.write_bytes(tampered)
    for use in (lambda: zoo.weights_path("rmt_t"), lambda: rmt.create_model("rmt_t", pretrained=True),
                lambda: zoo.download("rmt_t", url=url)):
        with pytest.raises(ZooError, match="no longer matches its manifest record") as e:
            use()
        # Baidu-only weights: `--force` alone would print the Baidu steps, which import nothing
        assert str(e.value).endswith("fetch it again with `rmt download rmt_t --from PATH/TO/RMT_T.pth --force`")
    assert zoo.cache_report(zoo.get_entry("rmt_t"), verify=True)["status"] == "changed"
    # --force fetches it again, and must match the trusted hash
    zoo_server.add("RMT_T.pth", rmt_t_checkpoint_bytes)
    assert zoo.download("rmt_t", url=url, force=True).sha256 == first.sha256
    assert zoo.weights_path("rmt_t").read_bytes() == rmt_t_checkpoint_bytes


def test_a_known_sha256_is_checked(zoo_home, zoo_server, rmt_t_checkpoint_bytes):
    url = zoo_server.add("RMT_T.pth", rmt_t_checkpoint_bytes)
    with pytest.raises(ZooError) as e:
        zoo.download("rmt_t", url=url, sha256="0" * 64)
    assert "sha256 mismatch" in str(e.value) and "given with --sha256" in str(e.value)
    assert _nothing_cached(zoo_home)
    with pytest.raises(ZooError, match="64 hexadecimal digits"):
        zoo.download("rmt_t", url=url, sha256="abc")
    fetched = zoo.download("rmt_t", url=url, sha256=_sha(rmt_t_checkpoint_bytes).upper())
    assert not fetched.trusted_on_first_use


def test_a_sha256_in_zoo_yaml_is_enforced(zoo_home, zoo_server, monkeypatch, tmp_path, rmt_t_checkpoint_bytes):
    import yaml

    document = yaml.safe_load(zoo.zoo_file().read_text())
    document["models"]["rmt_t"]["weights"]["sha256"] = "ab" * 32
    custom = tmp_path / "zoo.yaml"
    custom.write_text(yaml.safe_dump(document))
    monkeypatch.setenv("RMT_ZOO_FILE", str(custom))
    assert zoo.get_entry("rmt_t").weights["sha256"] == "ab" * 32
    url = zoo_server.add("RMT_T.pth", rmt_t_checkpoint_bytes)
    with pytest.raises(ZooError, match="listed in zoo.yaml"):
        zoo.download("rmt_t", url=url)
    with pytest.raises(ZooError, match="conflicts with the sha256 zoo.yaml gives"):
        zoo.download("rmt_t", url=url, sha256="cd" * 32)
    assert _nothing_cached(zoo_home)


def test_a_pinned_sha256_is_enforced_on_a_file_already_cached(zoo_home, zoo_server, monkeypatch, tmp_path, rmt_t_checkpoint_bytes):
    import yaml

    url = zoo_server.add("RMT_T.pth", rmt_t_checkpoint_bytes)
    cached = zoo.download("rmt_t", url=url).path  # trusted on first use, before any pin
    with pytest.raises(ZooError) as e:
        zoo.download("rmt_t", url=url, sha256="cd" * 32)
    assert "rmt_t is already cached with sha256" in str(e.value) and "not the --sha256 cdcdcdcdcdcdcdcd... given" in str(e.value)
    assert str(e.value).endswith("nothing was fetched; to replace it with the file that has that hash, add --force")
    with pytest.raises(ZooError, match=f"--force --sha256 {'cd' * 32}`$"):
        zoo.download("rmt_t", sha256="cd" * 32)  # Baidu-only: the command names --from
    document = yaml.safe_load(zoo.zoo_file().read_text())
    document["models"]["rmt_t"]["weights"]["sha256"] = "ab" * 32
    custom = tmp_path / "zoo.yaml"
    custom.write_text(yaml.safe_dump(document))
    monkeypatch.setenv("RMT_ZOO_FILE", str(custom))
    for use in (lambda: zoo.weights_path("rmt_t"), lambda: rmt.create_model("rmt_t", pretrained=True),
                lambda: zoo.download("rmt_t", url=url)):
        with pytest.raises(ZooError) as e:
            use()
        text = str(e.value)
        assert f"the cached {cached} has sha256 {_sha(rmt_t_checkpoint_bytes)[:16]}..., not the abababababababab..." in text
        assert f"that {custom} pins for rmt_t: it was not used" in text
        assert text.endswith("`rmt download rmt_t --from PATH/TO/RMT_T.pth --force`")
    entry = zoo.get_entry("rmt_t")
    assert zoo.cache_report(entry)["status"] == "changed" and zoo.cache_report(entry, verify=True)["status"] == "changed"
    assert cached.read_bytes() == rmt_t_checkpoint_bytes  # reported, not deleted


# ----------------------------------------------------------------------------- bad input: one line, nothing left


def test_another_architectures_checkpoint_is_refused(zoo_home, zoo_server, rmt_t_checkpoint_bytes):
    url = zoo_server.add("RMT_S.pth", rmt_t_checkpoint_bytes)
    with pytest.raises(CheckpointError) as e:
        zoo.download("rmt_s", url=url)
    text = str(e.value)
    assert text.startswith(f"{url}: checkpoint does not fit rmt_s") and "it looks like a rmt_t checkpoint" in text and "\n" not in text
    assert _nothing_cached(zoo_home)


def test_a_truncated_file_is_refused(zoo_home, zoo_server, rmt_t_checkpoint_bytes):
    url = zoo_server.add("RMT_T.pth", rmt_t_checkpoint_bytes[: len(rmt_t_checkpoint_bytes) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        zoo.download("rmt_t", url=url)
    assert _nothing_cached(zoo_home)


@pytest.mark.parametrize("cut", [0, 1000], ids=["empty", "truncated"])
def test_a_refused_file_is_named_as_the_user_gave_it(zoo_home, zoo_server, tmp_path, rmt_t_checkpoint_bytes, cut):
    """The check reads the cache's temporary copy, deleted right after: messages name the user's file or URL."""
    content = rmt_t_checkpoint_bytes[:cut]
    source = tmp_path / "Downloads" / "RMT_T.pth"
    source.parent.mkdir()
    source.write_bytes(content)
    url = zoo_server.add("RMT_T.pth", content)
    for given, kwargs in ((str(source), {"source_file": source}), (url, {"url": url}), (source.as_uri(), {"url": source.as_uri()})):
        with pytest.raises(CheckpointError) as e:
            zoo.download("rmt_t", **kwargs)
        assert str(e.value).startswith(f"{given} is ") and "partial" not in str(e.value) and "incomplete" not in str(e.value)
        assert _nothing_cached(zoo_home)


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_without_running(zoo_home, zoo_server, tmp_path):
    marker = tmp_path / "pwned"
    url = zoo_server.add("RMT_T.pth", pickle.dumps({"model": _RunsCode(str(marker))}))
    with pytest.raises(CheckpointError) as e:
        zoo.download("rmt_t", url=url)
    assert "would run code" in str(e.value) and "system" in str(e.value)
    assert not marker.exists() and _nothing_cached(zoo_home)


def test_an_html_page_and_http_errors_leave_nothing(zoo_home, zoo_server):
    for mode, message in (("html", "HTML page"), ("404", "HTTP 404"), ("500", "HTTP 500")):
        url = zoo_server.add(f"{mode}/RMT_T.pth", b"x" * 1000, mode=mode)
        with pytest.raises(DownloadError, match=message):
            zoo.download("rmt_t", url=url)
        assert _nothing_cached(zoo_home)


def test_offline_mode_says_what_to_do(zoo_home, zoo_server, monkeypatch, tmp_path, rmt_t_checkpoint_bytes):
    monkeypatch.setenv("RMT_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", zoo_server.base)
    with pytest.raises(DownloadError) as e:
        zoo.download("swin_t")
    text = str(e.value)
    assert "RMT_OFFLINE is set" in text and "`rmt download swin_t --from PATH/TO/model.safetensors`" in text
    assert "RMT_ZOO_MIRROR" in text and zoo_server.requests == []
    with pytest.raises(WeightsNotCachedError, match="RMT_OFFLINE is set"):
        zoo.create_model("swin_t", pretrained=True)
    source = tmp_path / "RMT_T.pth"  # imports work offline
    source.write_bytes(rmt_t_checkpoint_bytes)
    assert zoo.download("rmt_t", source_file=source).action == "imported"


def test_a_cache_that_cannot_be_written(zoo_home, monkeypatch, tmp_path, rmt_t_checkpoint_bytes):
    source = tmp_path / "RMT_T.pth"
    source.write_bytes(rmt_t_checkpoint_bytes)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache should be")
    monkeypatch.setenv("RMT_HOME", str(blocker / "rmt"))  # as unwritable for root as for anyone
    with pytest.raises(ZooError) as e:
        zoo.download("rmt_t", source_file=source)
    assert "cannot write to the weights cache" in str(e.value) and "set RMT_HOME" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_full_disk_leaves_nothing(zoo_home, tmp_path, rmt_t_checkpoint_bytes):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    source = tmp_path / "RMT_T.pth"
    source.write_bytes(rmt_t_checkpoint_bytes)
    partial = zoo.WeightsCache().partial_path(zoo.get_entry("rmt_t"))
    partial.parent.mkdir(parents=True)
    partial.symlink_to("/dev/full")  # every write there fails with ENOSPC
    with pytest.raises(ZooError) as e:
        zoo.download("rmt_t", source_file=source)
    assert "no space left in the weights cache" in str(e.value)
    assert not partial.exists() and not partial.is_symlink() and _nothing_cached(zoo_home)


def test_bad_arguments(zoo_home, tmp_path):
    with pytest.raises(ZooError, match="either --url or --from"):
        zoo.download("rmt_t", url="http://127.0.0.1:1/x", source_file=tmp_path)
    with pytest.raises(ZooError, match="no such file"):
        zoo.download("rmt_t", source_file=tmp_path / "missing.pth")
    with pytest.raises(ZooError, match="is a directory"):
        zoo.download("rmt_t", source_file=tmp_path)
    with pytest.raises(ZooError, match="^--from /dev/null: is a device or other special file, not a regular file$"):
        zoo.download("rmt_t", source_file="/dev/null")
    (tmp_path / "dangling.pth").symlink_to(tmp_path / "gone.pth")
    with pytest.raises(ZooError, match=f"is a broken symbolic link \\(to {tmp_path / 'gone.pth'}\\)$"):
        zoo.download("rmt_t", source_file=tmp_path / "dangling.pth")
    with pytest.raises(ZooError, match="^--from was given an empty path: give the file to import$"):
        zoo.download("rmt_t", source_file="")
    with pytest.raises(rmt.UnknownModelError, match="did you mean rmt_b"):
        zoo.download("rmt_bb")


def test_a_corrupt_manifest_is_reported(zoo_home, tmp_path, rmt_t_checkpoint_bytes):
    source = tmp_path / "RMT_T.pth"
    source.write_bytes(rmt_t_checkpoint_bytes)
    zoo.download("rmt_t", source_file=source)
    (zoo_home / "manifest.json").write_text("{not json")
    with pytest.raises(ZooError, match="manifest .* is corrupt"):
        zoo.weights_path("rmt_t")


# ----------------------------------------------------------------------------- timm models


@pytest.fixture
def test_vit_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("test_vit").state_dict()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return state, path


def test_a_timm_model_through_the_hub_url(zoo_home, zoo_server, monkeypatch, test_vit_weights):
    state, path = test_vit_weights
    zoo_server.add("timm/test_vit.r160_in1k/resolve/main/model.safetensors", path.read_bytes())
    monkeypatch.setenv("HF_ENDPOINT", zoo_server.base)
    fetched = zoo.download("test_vit")
    assert fetched.action == "downloaded" and fetched.params == sum(v.numel() for k, v in state.items())
    model = zoo.create_model("test_vit", pretrained=True)
    assert torch.equal(model.head.weight, state["head.weight"])
    adapted = zoo.create_model("test_vit", pretrained=True, num_classes=7)  # timm adapts the classifier
    assert adapted.head.weight.shape == (7, state["head.weight"].shape[1])


def test_a_timm_training_checkpoint_loads_but_is_not_cached_as_safetensors(zoo_home, tmp_path, test_vit_weights):
    """The cache names test_vit's file model.safetensors (the hub's name, what timm and torch.load read
    as safetensors): a torch.save file stored there was reported verified, then never loaded."""
    state, _ = test_vit_weights
    source = tmp_path / "test_vit_ema.pth"
    torch.save({"state_dict": state, "state_dict_ema": {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}}, source)
    model = zoo.create_model("test_vit", checkpoint=source)
    assert torch.equal(model.head.weight, state["head.weight"] + 1)
    with pytest.raises(CheckpointError) as e:
        zoo.download("test_vit", source_file=source)
    assert str(e.value).startswith(f"{source} is a torch.save checkpoint, but test_vit's weights are cached as model.safetensors")
    assert "safetensors.torch.save_file(state_dict, 'model.safetensors')" in str(e.value) and "\n" not in str(e.value)
    assert _nothing_cached(zoo_home)


def test_a_safetensors_file_is_not_cached_under_a_pth_name(zoo_home, tmp_path):
    from safetensors.torch import save_file

    source = tmp_path / "RMT_T.safetensors"
    save_file({k: v.contiguous() for k, v in rmt.create_model("rmt_t").state_dict().items()}, str(source))
    assert rmt.create_model("rmt_t", checkpoint=source).num_classes == 1000  # readable as it is
    with pytest.raises(CheckpointError, match=f"^{source} is a safetensors file, but rmt_t's weights are cached as RMT_T.pth"):
        zoo.download("rmt_t", source_file=source)
    assert _nothing_cached(zoo_home)


def test_a_neighbouring_swin_variant_does_not_fit(zoo_home, tmp_path, monkeypatch):
    """timm's swin filter raised AttributeError on a block the model lacks (a Swin-S file for Swin-T)."""
    from safetensors.torch import save_file

    state = timm.create_model("swin_tiny_patch4_window7_224").state_dict()
    state["layers.2.blocks.6.attn.relative_position_bias_table"] = torch.zeros(169, 12)  # Swin-S has 18 blocks there
    source = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(source))
    monkeypatch.chdir(tmp_path)
    source = source.rename("swin_tiny_patch4_window7_224.ms_in1k")  # named as given, although the message holds the name
    for use, named in ((lambda: zoo.download("swin_t", source_file=source), f"{source}: "),
                       (lambda: zoo.create_model("swin_t", checkpoint=source), "")):
        with pytest.raises(CheckpointError) as e:
            use()
        assert str(e.value).startswith(f"{named}checkpoint does not fit swin_tiny_patch4_window7_224.ms_in1k")
        assert "1 unexpected key(s): layers.2.blocks.6.attn.relative_position_bias_table" in str(e.value)
    assert _nothing_cached(zoo_home)


def test_a_malformed_mirror_is_one_line(zoo_home, monkeypatch):
    monkeypatch.setenv("RMT_ZOO_MIRROR", "http://[bad")
    with pytest.raises(ZooError, match=r"^RMT_ZOO_MIRROR='http://\[bad' is not a valid URL \(Invalid IPv6 URL\)"):
        zoo.download("rmt_t")
    assert _nothing_cached(zoo_home)


def test_a_timm_file_of_another_model_or_truncated_is_refused(zoo_home, tmp_path, test_vit_weights):
    _, path = test_vit_weights
    with pytest.raises(CheckpointError, match="checkpoint does not fit test_vit2"):
        zoo.download("test_vit2", source_file=path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        zoo.download("test_vit", source_file=cut)
    assert _nothing_cached(zoo_home)


def test_a_checkpoint_in_our_own_layout_is_accepted(zoo_home, tmp_path):
    import rmt

    source = tmp_path / "rmt_t_ours.pth"
    torch.save(rmt.create_model("rmt_t").state_dict(), source)
    fetched = zoo.download("rmt_t", source_file=source)
    assert fetched.params == 14_334_216 and fetched.state_dict == ""


def test_timms_own_hub_download_failing_is_one_line(zoo_home, monkeypatch, tmp_path):
    import huggingface_hub.constants

    # Hugging Face's own offline mode with an empty hub cache: timm's download fails at once
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(DownloadError) as e:
        zoo.create_model("test_vit", pretrained=True)
    assert "timm could not fetch the weights of test_vit" in str(e.value) and "rmt download test_vit" in str(e.value)
    assert "\n" not in str(e.value)


def test_an_unreachable_hub_fails_at_once_or_serves_hugging_faces_cache(zoo_home, monkeypatch, tmp_path, test_vit_weights):
    """huggingface_hub retries a host it cannot reach for about a minute; rmt asks first (the
    .invalid domain never resolves), and a copy in Hugging Face's own cache still serves."""
    import time

    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(DownloadError) as e:
        zoo.create_model("test_vit", pretrained=True)
    assert time.monotonic() - start < 10 and "cannot resolve hub.invalid" in str(e.value)
    assert "rmt download test_vit" in str(e.value) and "\n" not in str(e.value)

    state, path = test_vit_weights
    repo = tmp_path / "hf" / "models--timm--test_vit.r160_in1k"
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "snapshots" / "0123abc" / "model.safetensors").write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    model = zoo.create_model("test_vit", pretrained=True)
    assert torch.equal(model.head.weight, state["head.weight"])


@pytest.mark.parametrize("variable", ["https_proxy", "ALL_PROXY"])
def test_behind_a_proxy_the_hub_is_not_probed(monkeypatch, variable):
    """The proxy resolves the host: a machine without DNS of its own may still reach the hub."""
    from rmt.zoo.transfer import unreachable

    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert unreachable("https://hub.invalid", 5).startswith("cannot resolve hub.invalid")
    monkeypatch.setenv(variable, "http://proxy.invalid:3128")
    assert unreachable("https://hub.invalid", 5) is None


def test_wrong_relpos_buffers_are_refused_at_import(zoo_home, tmp_path, schema):
    from conftest import official_state_dict

    state = official_state_dict(schema["rmt_t"])
    state["layers.1.Relpos.decay"] = state["layers.1.Relpos.decay"] * 2
    source = tmp_path / "rmt_t_other_decay.pth"
    torch.save({"model": state}, source)
    with pytest.raises(CheckpointError, match=r"layers\.1\.Relpos\.decay differs"):
        zoo.download("rmt_t", source_file=source)
    assert _nothing_cached(zoo_home)


def test_checkpoint_path_takes_the_state_dict_the_zoo_names(tmp_path, schema):
    """rmt_t's published accuracy is the plain model's: --checkpoint takes 'model', not 'model_ema'."""
    from conftest import official_state_dict

    import rmt

    plain, ema = official_state_dict(schema["rmt_t"], seed=1), official_state_dict(schema["rmt_t"], seed=2)
    source = tmp_path / "RMT_T.pth"
    torch.save({"model": plain, "model_ema": ema}, source)
    model = zoo.create_model("rmt_t", checkpoint=source)
    assert torch.equal(rmt.export_official_state_dict(model)["head.weight"], plain["head.weight"])
