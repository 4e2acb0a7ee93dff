"""``rmt list / info / download``: tables for people, JSON for programs, one line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest



from conftest import run_rmt as run_cli


def _one_error_line(err: str) -> str:
    """The error: one line, the last one (status lines such as retries may come before it)."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def test_list_table_and_json(zoo_home, capsys, monkeypatch, tmp_path, rmt_t_checkpoint_bytes):
    code, out, _ = run_cli(capsys, monkeypatch, "list")
    assert code == 0
    row = next(line for line in out.splitlines() if " rmt_b " in line)
    for cell in ("rmt", "54.15", "10.414", "9.70", "85.0", "by hand (Baidu)"):
        assert cell in row
    assert "swin_t" in out and "baseline" in out
    source = tmp_path / "RMT_T.pth"
    source.write_bytes(rmt_t_checkpoint_bytes)
    assert run_cli(capsys, monkeypatch, "download", "rmt_t", "--from", str(source))[0] == 0
    code, out, _ = run_cli(capsys, monkeypatch, "list", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and len(rows) == 12
    assert rows["rmt_t"]["cache"]["status"] == "cached" and rows["rmt_s"]["cache"]["status"] == "missing"
    assert rows["rmt_s"]["measured"] == {"params": 26967240, "gmacs": 4.8}
    assert rows["rmt_s_tl"]["preprocessing"]["crop_pct"] == 0.96
    assert rows["convnext_t"]["timm_name"] == "convnext_tiny.fb_in1k"


def test_info_says_where_the_weights_come_from_and_how_to_get_them(zoo_home, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "info", "rmt_s_tl")
    assert not [line for line in out.splitlines() if line.endswith(" ")]  # no padding to the log's width
    out = " ".join(out.split())  # the table folds long values
    assert code == 0
    for text in ("https://pan.baidu.com/s/1Xjgko9_-rokfvP39uiwTqQ?pwd=q37r", "extraction code q37r",
                 "rmt download rmt_s_tl --from PATH/TO/RMT_S_TL.pth", "model_ema", "27,480,240 params",
                 "4.825 GMACs", "crop_pct 0.96", "not cached"):
        assert text in out, text
    code, out, _ = run_cli(capsys, monkeypatch, "info", "swin_t", "--json")
    info = json.loads(out)
    assert code == 0 and info["how_to_get"]["command"] == "rmt download swin_t"
    assert info["how_to_get"]["url"] == "https://huggingface.co/timm/swin_tiny_patch4_window7_224.ms_in1k/resolve/main/model.safetensors"
    code, out, _ = run_cli(capsys, monkeypatch, "info", "resnet18", "--json")
    assert code == 0 and json.loads(out)["family"] == "timm"


def test_download_of_a_baidu_entry_prints_the_manual_steps(zoo_home, capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, "download", "rmt_b")
    assert code == 2 and "Traceback" not in err  # nothing downloaded: not CI's 1, "regression"
    assert "https://pan.baidu.com/s/1ZDNl_broia_fvvlEoTaFhA?pwd=yzge" in out and "yzge" in out
    assert "rmt download rmt_b --from PATH/TO/RMT_B.pth" in out
    code, out, _ = run_cli(capsys, monkeypatch, "download", "rmt_b", "--json")
    assert code == 2 and json.loads(out)["code"] == "yzge"


def test_download_from_a_url_with_json_output(zoo_home, zoo_server, capsys, monkeypatch, rmt_t_checkpoint_bytes):
    url = zoo_server.add("RMT_T.pth", rmt_t_checkpoint_bytes, mode="drop-once")
    code, out, _ = run_cli(capsys, monkeypatch, "download", "rmt_t", "--url", url, "--json")
    result = json.loads(out)
    assert code == 0 and result["action"] == "downloaded" and result["params"] == 14_334_216
    assert result["trusted_on_first_use"] and result["state_dict"] == "model"
    code, out, _ = run_cli(capsys, monkeypatch, "download", "rmt_t", "--url", url)
    assert code == 0 and "already cached" in out


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, ["download", "rmt_ss"], "did you mean rmt_s"),
        (None, ["info", "swinn_t"], "did you mean swin_t"),
        ("404", ["download", "rmt_t", "--url", "{url}"], "HTTP 404"),
        ("500", ["download", "rmt_t", "--url", "{url}"], "HTTP 500"),
        ("html", ["download", "rmt_t", "--url", "{url}"], "HTML page"),
        ("ok", ["download", "rmt_s", "--url", "{url}"], "it looks like a rmt_t checkpoint"),
        ("ok", ["download", "rmt_t", "--url", "{url}", "--sha256", "0" * 64], "sha256 mismatch"),
        (None, ["download", "rmt_t", "--from", "/no/such/RMT_T.pth"], "no such file"),
        (None, ["download", "rmt_t", "--from", ""], "--from was given an empty path"),
        (None, ["download", "rmt_t", "--url", " "], "--url was given an empty URL"),
        (None, ["download", "rmt_t", "--from", "/dev/null"], "--from /dev/null: is a device or other special file"),
        (None, ["download", "rmt_t", "--url", "http://[bad/x"], "'http://[bad/x' is not a valid URL"),
        (None, ["info", "resnet18.nonexistent_tag"], "timm's resnet18 has no pretrained tag 'nonexistent_tag' (its tags: a1_in1k"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(zoo_home, zoo_server, capsys, monkeypatch, rmt_t_checkpoint_bytes, setup, args, message):
    url = zoo_server.add("RMT_T.pth", rmt_t_checkpoint_bytes, mode=setup) if setup else ""
    code, _, err = run_cli(capsys, monkeypatch, *[a.format(url=url) for a in args])
    assert code == 2 and message in _one_error_line(err)
    assert not (zoo_home / "weights").exists() or not any((zoo_home / "weights").rglob("*.pth"))


def test_info_shows_a_crop_mode_other_than_center(zoo_home, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "info", "convnext_base.fb_in22k_ft_in1k_384")
    assert code == 0 and "crop_pct 1.0, crop_mode squash, mean" in " ".join(out.split())
    code, out, _ = run_cli(capsys, monkeypatch, "info", "convnext_base.fb_in22k_ft_in1k_384", "--json")
    assert code == 0 and json.loads(out)["preprocessing"]["crop_mode"] == "squash"
    code, out, _ = run_cli(capsys, monkeypatch, "info", "resnet18")
    assert code == 0 and "crop_pct 0.95, mean" in " ".join(out.split())  # center: not said


def test_a_cache_root_that_is_a_file_is_named(zoo_home, capsys, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for home, problem in ((blocker, "is a file, not a folder"), (blocker / "rmt", f"cannot be a folder: {blocker} is a file")):
        monkeypatch.setenv("RMT_HOME", str(home))
        code, _, err = run_cli(capsys, monkeypatch, "list")
        line = _one_error_line(err)
        assert code == 2 and f"RMT_HOME {home} {problem}; set RMT_HOME to a folder" in line, line


@pytest.mark.parametrize("field, value", [("size", "big"), ("sha256", None), ("model", 3), ("size", -1)])
def test_a_hand_damaged_manifest_record_is_one_line(zoo_home, capsys, monkeypatch, tmp_path, rmt_t_checkpoint_bytes, field, value):
    source = tmp_path / "RMT_T.pth"
    source.write_bytes(rmt_t_checkpoint_bytes)
    assert run_cli(capsys, monkeypatch, "download", "rmt_t", "--from", str(source))[0] == 0
    manifest = zoo_home / "manifest.json"
    document = json.loads(manifest.read_text())
    document["files"]["rmt_t/RMT_T.pth"][field] = value
    manifest.write_text(json.dumps(document))
    for command in ("list", "info"):
        code, _, err = run_cli(capsys, monkeypatch, command, *(["rmt_t"] if command == "info" else []))
        line = _one_error_line(err)
        assert code == 2 and f"is corrupt (its record 'rmt_t/RMT_T.pth' has {field} {value!r}" in line, line
        assert "fix that or delete the manifest" in line


def test_a_corrupt_zoo_file_is_one_line(zoo_home, capsys, monkeypatch, tmp_path):
    bad = tmp_path / "zoo.yaml"
    bad.write_text("version: 1\nmodels:\n  rmt_t: {family: rmt, timm_name: rmt_t\n")
    monkeypatch.setenv("RMT_ZOO_FILE", str(bad))
    code, _, err = run_cli(capsys, monkeypatch, "list")
    assert code == 2 and "is not valid YAML" in _one_error_line(err)


def test_the_installed_command_reports_errors_without_a_traceback(zoo_home, tmp_path):
    page = tmp_path / "RMT_B.pth"
    page.write_text("<!DOCTYPE html><html><body>百度网盘 login</body></html>")
    result = subprocess.run(
        [sys.executable, "-m", "rmt_cli.main", "download", "rmt_b", "--from", str(page)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "HTML page, not a checkpoint" in _one_error_line(result.stderr)
    assert not (zoo_home / "weights").exists() or not any((zoo_home / "weights").rglob("*"))


@pytest.mark.parametrize("args, text", [
    (["eval", "rmt_t"], "Missing option '--data'. (see 'rmt eval --help')"),
    (["nosuch"], "No such command 'nosuch'"),
    (["profile", "rmt_t", "--batch", "abc"], "Invalid value for '--batch'"),
    (["eval", "rmt_t", "--data", ".", "--limit", "0"], "Invalid value for '--limit'"),
], ids=["missing", "command", "type", "range"])
def test_argument_errors_are_one_line(capsys, monkeypatch, args, text):
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert code == 2 and text in _one_error_line(err)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["eval", "--help"], ["bench", "--bogus"]],
                         ids=["help", "version", "command-help", "usage-error"])
def test_help_version_and_usage_errors_do_not_import_torch(args):
    """torch and timm take seconds to import; none of these needs them."""
    script = ("import sys; sys.argv = ['rmt', *sys.argv[1:]]\n"
              "from rmt_cli.main import main\n"
              "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
              "print(sorted(name for name in ('torch', 'timm', 'rmt') if name in sys.modules), code)")
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1] == f"[] {2 if args[-1] == '--bogus' else 0}", result.stdout + result.stderr
    if args == ["--version"]:
        from importlib.metadata import version

        assert result.stdout.splitlines()[0] == f"rmt {version('rmt')}"


@pytest.mark.parametrize("error, code, text", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 120000000000 bytes"), 2, "out of memory ([enforce fail"),
    (OSError(36, "File name too long", "/tmp/" + "a" * 300), 2, "a: File name too long"),
    (OverflowError("Python int too large to convert to C long"), 2, "a number is too large: Python int too large"),
    (RuntimeError("DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's "
                  "workers are out of shared memory."), 2, "try fewer --workers, or --workers 0"),
    (ImportError("libcudart.so.12: cannot open shared object file", name="torch._C"), 2,
     "cannot load torch._C (libcudart.so.12: cannot open shared object file): check the torch and timm installs"),
    (KeyError("stage"), 3, "internal error, a bug in rmt"),
], ids=["memory", "path", "number", "workers", "dependency", "bug"])
def test_errors_no_command_turned_into_an_rmt_error(zoo_home, capsys, monkeypatch, error, code, text):
    """The machine's limits and bad paths are still one line (exit 2); a bug shows its traceback and
    exits 3, never 1, which CI reads as a regression or a missed accuracy gate."""
    def fail():
        raise error

    monkeypatch.setattr("rmt.zoo.list_entries", fail)
    exit_code, _, err = run_cli(capsys, monkeypatch, "list")
    assert exit_code == code
    if code == 2:
        assert text in _one_error_line(err)
    else:
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith(f"error: {text}")


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["list", "--json"], ["--version"]], ids=["command", "version"])
def test_a_failing_standard_output_is_one_line(zoo_home, args):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "rmt_cli.main", *args], stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    assert result.returncode == 2 and "cannot write the output: No space left on device" in _one_error_line(result.stderr)


def test_a_reader_that_goes_away_ends_with_sigpipes_code(zoo_home):
    """`rmt list | head -1` under pipefail: 141, as for a tool SIGPIPE ended (click itself would exit 1)."""
    process = subprocess.Popen([sys.executable, "-m", "rmt_cli.main", "list", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before it writes: its first write fails with EPIPE
    assert process.wait(timeout=120) == 141 and process.stderr.read() == ""
