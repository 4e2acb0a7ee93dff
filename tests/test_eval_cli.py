"""``rmt eval`` end to end: exact numbers, JSON, the CI gate's exit codes, refusals, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rmt.data import read_real_labels

from conftest import TINY_VAL, code_ranking, code_red, run_rmt, tiny_val_expected

TOP1, TOP5 = (100.0 * n / len(TINY_VAL) for n in tiny_val_expected())


def rmt_eval(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``rmt eval ARGS`` in this process: (exit code, stdout, stderr)."""
    return run_rmt(capsys, monkeypatch, "eval", *args)


def one_line_error(code: int, err: str) -> str:
    """The error of a refused run, asserting exit code 2, one error line, no traceback."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_killing_group(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a launcher; on timeout kill it and every worker it started (they would outlive it)."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=Path(__file__).parents[1],
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{command[0]} timed out after {timeout} s: {err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.fixture
def colour(colour_checkpoint):
    """Arguments that evaluate the colour-code classifier (known predictions) on one CPU process."""
    return ["test_resnet", "--checkpoint", colour_checkpoint, "--device", "cpu", "--workers", "0", "--batch-size", "4"]


def test_known_predictions_give_exact_numbers_and_json(monkeypatch, capsys, tiny_val, colour, tmp_path):
    out_json = tmp_path / "result.json"
    code, out, err = rmt_eval(monkeypatch, capsys, *colour, "--data", tiny_val["imagefolder"], "--json", out_json)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    assert result["model"] == "test_resnet" and result["images"] == 13
    assert result["top1"] == pytest.approx(TOP1) and result["top5"] == pytest.approx(TOP5)
    assert result["layout"] == "imagefolder" and result["weights"] == "checkpoint" and result["skipped"] == 0
    assert result["seconds"] > 0 and result["real_top1"] is None
    assert set(result["env"]) >= {"device", "torch", "timm", "rmt"} and result["env"]["device"].startswith("cpu")
    assert f"{TOP1:.3f} %" in out and f"{TOP5:.3f} %" in out and "ImageFolder" in out
    assert "13 images, layout: ImageFolder (wnid folders)" in err
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_limit_and_real_labels(monkeypatch, capsys, tiny_val, colour, tmp_path):
    code, out, err = rmt_eval(monkeypatch, capsys, *colour, "--data", tiny_val["flat-caffe"], "--limit", "6", "--real-labels", "--json", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    first = sorted(TINY_VAL)[:6]  # file-name order = image-number order
    real = read_real_labels()
    labelled = [n for n, *_ in first if real[n - 1]]
    predicted = {n: code_ranking(code_red(c))[0] for n, _, c, _, _ in first}
    assert result["images"] == 6 and result["layout"] == "flat-caffe"
    assert result["top1"] == pytest.approx(100.0 * tiny_val_expected(first)[0] / 6)
    assert result["real_images"] == len(labelled)
    assert result["real_top1"] == pytest.approx(100.0 * sum(predicted[n] in real[n - 1] for n in labelled) / len(labelled))
    assert "ReaL top-1" in out


@pytest.mark.parametrize("expected, tolerance, exit_code", [(TOP1 + 0.5, "0.6", 0), (TOP1 + 0.5, None, 1)])
def test_expect_top1_gate_exit_codes(monkeypatch, capsys, tiny_val, colour, tmp_path, expected, tolerance, exit_code):
    gate = ["--expect-top1", f"{expected:.4f}"] + (["--tolerance", tolerance] if tolerance else [])
    code, out, err = rmt_eval(monkeypatch, capsys, *colour, "--data", tiny_val["flat-kaggle"], *gate, "--json", tmp_path / "r.json")
    assert code == exit_code, err
    assert ("gate failed: top-1" in err) == (exit_code == 1) and ("gate passed" in err) == (exit_code == 0)
    assert json.loads((tmp_path / "r.json").read_text())["images"] == 13  # written either way


def test_random_weights_are_refused_unless_asked_for(monkeypatch, capsys, tiny_val, tmp_path):
    data = ["--data", tiny_val["flat-kaggle"], "--device", "cpu", "--workers", "0", "--json", tmp_path / "r.json"]
    code, _, err = rmt_eval(monkeypatch, capsys, "rmt_t", *data)
    one_line_error(code, err)
    assert not (tmp_path / "r.json").exists()
    code, out, err = rmt_eval(monkeypatch, capsys, "rmt_t", *data, "--limit", "2", "--random-weights")
    assert code == 0, err
    assert "random weights: this accuracy says nothing" in err and "RANDOM" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["weights"] == "random" and result["images"] == 2


def test_reparam_folds_the_model_and_says_so(monkeypatch, capsys, tiny_val, colour, tmp_path):
    data = ["--data", tiny_val["flat-kaggle"], "--device", "cpu", "--workers", "0", "--reparam", "--json", tmp_path / "r.json"]
    code, out, err = rmt_eval(monkeypatch, capsys, "rmt_t", *data, "--limit", "2", "--random-weights")
    assert code == 0, err
    assert "folded for inference" in out
    assert json.loads((tmp_path / "r.json").read_text())["reparameterized"] is True
    code, out, err = rmt_eval(monkeypatch, capsys, *colour, *data)  # a timm ResNet: nothing to fold
    assert code == 0, err
    assert "test_resnet has nothing to fold for inference: evaluated as built" in err and "folded" not in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["reparameterized"] is False and result["top1"] == pytest.approx(TOP1)


def test_the_json_never_replaces_an_input(monkeypatch, capsys, tiny_val, colour, colour_checkpoint, tmp_path):
    checkpoint = tmp_path / "weights.pth"
    shutil.copy(colour_checkpoint, checkpoint)
    data = tmp_path / "flat"
    shutil.copytree(tiny_val["flat-kaggle"], data)
    before = {p: p.read_bytes() for p in (checkpoint, *data.iterdir())}
    args = [colour[0], "--checkpoint", checkpoint, *colour[3:], "--data", data]
    for target, what in ((checkpoint, "the checkpoint file"), (data / "LOC_val_solution.csv", "the labels file"),
                         (next(data.glob("*.JPEG")), "one of the validation images")):
        code, _, err = rmt_eval(monkeypatch, capsys, *args, "--json", target)
        assert f"the report path {target} is {what}: write it elsewhere" in one_line_error(code, err)
    assert {p: p.read_bytes() for p in before} == before
    for _ in range(2):  # a report of its own in the data folder is no input, the second time either
        code, _, err = rmt_eval(monkeypatch, capsys, *args, "--json", data / "results.json")
        assert code == 0, err


def test_a_batch_larger_than_the_data_set_is_the_data_set(monkeypatch, capsys, tiny_val, colour, tmp_path):
    code, _, err = rmt_eval(monkeypatch, capsys, *colour[:-1], "99999999999999999999", "--data", tiny_val["flat-caffe"],
                            "--json", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["top1"] == pytest.approx(TOP1) and result["batch_size"] == 99999999999999999999


@pytest.mark.parametrize(
    "args, message",
    [
        (["--random-weights"], "give either a checkpoint or --random-weights, not both"),
        (["--tolerance", "0.5"], "--tolerance needs --expect-top1"),
        (["--json", "/nonexistent/folder/r.json"], "folder /nonexistent/folder does not exist"),
        (["--amp", "fp8"], "amp must be one of none, bf16, fp16"),
        (["--device", "tpu"], "device must be auto, cuda or cpu"),
        (["--expect-top1", "nan"], "the expected top-1 must be a percentage from 0 to 100, got nan"),
        (["--expect-top1", "500"], "the expected top-1 must be a percentage from 0 to 100, got 500"),
    ],
)
def test_bad_options_are_one_line(monkeypatch, capsys, tiny_val, colour, args, message):
    code, _, err = rmt_eval(monkeypatch, capsys, *colour, "--data", tiny_val["flat-kaggle"], *args)
    assert message in one_line_error(code, err)


def test_bad_data_is_one_line(monkeypatch, capsys, tiny_val, colour, tmp_path):
    for option in ("--data", "--labels", "--checkpoint", "--real-labels-file"):  # not the current directory
        code, _, err = rmt_eval(monkeypatch, capsys, *colour, "--data", tmp_path, option, "")
        assert f"{option} was given an empty path" in one_line_error(code, err)
    code, _, err = rmt_eval(monkeypatch, capsys, *colour, "--data", tmp_path)
    line = one_line_error(code, err)
    assert "accepted layouts: ImageFolder" in line and "ImageNet-V2" in line
    flat = tmp_path / "flat"
    shutil.copytree(tiny_val["flat-kaggle"], flat, ignore=shutil.ignore_patterns("*.csv"))
    code, _, err = rmt_eval(monkeypatch, capsys, *colour, "--data", flat)
    assert "no labels file was given (--labels) or found" in one_line_error(code, err)
    code, _, err = rmt_eval(monkeypatch, capsys, *colour, "--data", flat, "--labels", tmp_path / "val.txt")
    assert "val.txt does not exist" in one_line_error(code, err)


def test_unknown_model_and_unfit_checkpoint(monkeypatch, capsys, tiny_val, colour_checkpoint):
    data = ["--data", tiny_val["flat-kaggle"], "--device", "cpu"]
    code, _, err = rmt_eval(monkeypatch, capsys, "rmt_xxl", *data, "--random-weights")
    assert "rmt_xxl" in one_line_error(code, err)
    code, _, err = rmt_eval(monkeypatch, capsys, "resnet18", *data, "--checkpoint", colour_checkpoint)
    one_line_error(code, err)


def test_bad_image_fails_naming_it_or_is_skipped_and_reported(monkeypatch, capsys, tiny_val, colour, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_val["flat-kaggle"], data)
    bad = data / "ILSVRC2012_val_00000003.JPEG"
    bad.unlink()
    bad.write_bytes(b"<html>login page</html>")
    code, _, err = rmt_eval(monkeypatch, capsys, *colour, "--data", data)
    assert f"cannot read image {bad}" in one_line_error(code, err)
    code, out, err = rmt_eval(monkeypatch, capsys, *colour, "--data", data, "--skip-bad", "--json", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["images"] == 12 and result["skipped"] == 1 and result["skipped_files"] == [str(bad)]
    assert result["skipped_errors"] == [f"cannot read image {bad}: not an image format PIL can decode"]
    assert "1 unreadable, skipped" in out and f"skipped: cannot read image {bad}" in err
    assert result["top1"] == pytest.approx(100.0 * tiny_val_expected(TINY_VAL[1:])[0] / 12)


def test_no_readable_image_is_no_accuracy(monkeypatch, capsys, tiny_val, colour, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_val["flat-kaggle"], data)
    for image in data.glob("*.JPEG"):
        image.write_bytes(b"<html>login page</html>")
    code, out, err = rmt_eval(monkeypatch, capsys, *colour, "--data", data, "--skip-bad", "--expect-top1", "0",
                              "--json", tmp_path / "r.json")
    assert "none of the 13 images could be read" in one_line_error(code, err)
    assert "gate passed" not in err and not (tmp_path / "r.json").exists()


def test_many_skipped_images_and_relative_paths(monkeypatch, capsys, tiny_val, colour, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_val["flat-kaggle"], data)
    for image in sorted(data.glob("*.JPEG"))[:11]:
        image.write_bytes(b"<html>login page</html>")
    monkeypatch.chdir(tmp_path)
    code, _, err = rmt_eval(monkeypatch, capsys, *colour, "--data", "data", "--skip-bad")
    assert code == 0 and "... and 1 more unreadable images skipped (--json FILE lists them all)" in err
    code, _, err = rmt_eval(monkeypatch, capsys, *colour, "--data", "data", "--skip-bad", "--json", "r.json")
    assert code == 0 and "(all of them are in the --json file)" in err
    result = json.loads((tmp_path / "r.json").read_text())
    # absolute, so that the report can be read from anywhere
    assert all(Path(f).is_absolute() and Path(f).exists() for f in result["skipped_files"])
    assert all(str(data) in e for e in result["skipped_errors"])


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_the_json_is_written_before_the_table(tiny_val, colour_checkpoint, tmp_path):
    """A full or closed standard output must not lose the result of an evaluation."""
    with open("/dev/full", "w") as full:
        run = subprocess.run(
            [sys.executable, "-m", "rmt_cli.main", "eval", "test_resnet", "--checkpoint", str(colour_checkpoint),
             "--device", "cpu", "--workers", "0", "--data", str(tiny_val["flat-kaggle"]), "--json", str(tmp_path / "r.json")],
            stdout=full, stderr=subprocess.PIPE, text=True)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert json.loads((tmp_path / "r.json").read_text())["images"] == 13


def test_torchrun_two_processes_count_every_image_once(tiny_val, colour_checkpoint, tmp_path):
    """13 images on 2 gloo ranks (7 + 6): the numbers and the count of one process, rank 0 alone writes."""
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not on PATH")
    out_json = tmp_path / "r.json"
    command = [
        torchrun, "--standalone", "--nproc-per-node", "2", "-m", "rmt_cli.main", "eval", "test_resnet",
        "--checkpoint", str(colour_checkpoint), "--data", str(tiny_val["imagefolder"]), "--device", "cpu",
        "--workers", "0", "--batch-size", "4", "--real-labels", "--json", str(out_json),
    ]
    run = run_killing_group(command, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["env"]["world_size"] == 2
    assert result["images"] == 13  # not 14: the odd shard is not padded
    assert result["top1"] == pytest.approx(TOP1) and result["top5"] == pytest.approx(TOP5)
    real = read_real_labels()
    assert result["real_images"] == sum(1 for n, *_ in TINY_VAL if real[n - 1])
    assert run.stdout.count("test_resnet on ImageNet val") == 1  # one table: rank 0 prints


def test_torchrun_an_unreadable_image_on_one_rank_stops_every_rank_in_one_line(tiny_val, colour_checkpoint, tmp_path):
    """Rank 1 meets the bad image; rank 0 must not be left in a collective (a gloo error, or a hang on NCCL)."""
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not on PATH")
    data = tmp_path / "data"
    shutil.copytree(tiny_val["flat-kaggle"], data)
    bad = data / "ILSVRC2012_val_00000008.JPEG"  # position 1: rank 1's shard
    bad.write_bytes(b"<html>login page</html>")
    command = [
        torchrun, "--standalone", "--nproc-per-node", "2", "-m", "rmt_cli.main", "eval", "test_resnet",
        "--checkpoint", str(colour_checkpoint), "--data", str(data), "--device", "cpu", "--workers", "0",
        "--batch-size", "2", "--json", str(tmp_path / "r.json"),
    ]
    run = run_killing_group(command, timeout=120)
    assert run.returncode != 0 and not (tmp_path / "r.json").exists()
    assert run.stderr.count(f"error: cannot read image {bad}") == 2, run.stderr[-3000:]  # one line from each rank
    assert "exitcode  : 2" in run.stderr  # torchrun's report of each failed rank
    assert "exitcode  : 1" not in run.stderr and "Connection closed" not in run.stderr


def test_real_labels_takes_an_optional_file():
    from rmt_cli.evaluate import optional_real_labels_file

    assert optional_real_labels_file(["eval", "m", "--real-labels", "real.json", "--data", "v"]) == [
        "eval", "m", "--real-labels", "--real-labels-file", "real.json", "--data", "v"]
    bare = ["eval", "m", "--real-labels", "--data", "v"]
    assert optional_real_labels_file(bare) == bare
    assert optional_real_labels_file(["eval", "--real-labels"]) == ["eval", "--real-labels"]
