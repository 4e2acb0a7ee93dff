"""The evaluation loop: exact counts from a model whose predictions are known, shards, OOM, bad images."""

from __future__ import annotations

import json
import os
import stat

import pytest
import timm
import torch
from torch import nn

from rmt.data import EvalImageDataset, build_eval_transform, read_real_labels, real_label_sets, scan_imagenet_val
from rmt.errors import ConfigError, DatasetError, EvalError, RMTError
from rmt.eval import (
    DistributedContext,
    ShardSampler,
    context_from_env,
    evaluate,
    process_group,
    resolve_device,
    top1_gate,
    write_json_atomic,
)
from rmt.zoo import fold_for_inference

from conftest import TINY_VAL, code_ranking, code_red, colour_code_state_dict, tiny_val_expected

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def colour_model() -> nn.Module:
    model = timm.create_model("test_resnet")
    model.load_state_dict(colour_code_state_dict())
    return model.eval()


def dataset_of(folder, model: nn.Module, labels=None, extra_paths=()) -> EvalImageDataset:
    val = scan_imagenet_val(folder, labels)
    cfg = model.pretrained_cfg
    preprocessing = {k: cfg[k] for k in ("input_size", "interpolation", "crop_pct", "mean", "std")}
    paths = val.paths + tuple(str(p) for p in extra_paths)
    targets = val.targets + (0,) * len(extra_paths)
    return EvalImageDataset(paths, targets, build_eval_transform(preprocessing), tuple(cfg["input_size"]))


def test_the_expected_counts_are_not_trivial():
    top1, top5 = tiny_val_expected()
    assert (top1, top5) == (7, 11)  # by hand: 7 images drawn in their class's code, 4 more within 5 ranks


@pytest.mark.parametrize("layout", ["imagefolder", "flat-caffe", "flat-kaggle", "flat-devkit", "imagenet-v2"])
def test_known_predictions_score_exactly_in_every_layout(tiny_val, colour_model, layout):
    if layout not in tiny_val:
        pytest.skip("the devkit layout needs scipy to write its meta.mat")
    counts = evaluate(colour_model, dataset_of(tiny_val[layout], colour_model), batch_size=4, workers=0)
    top1, top5 = tiny_val_expected()
    assert (counts.images, counts.top1_correct, counts.top5_correct) == (13, top1, top5)
    assert counts.top1 == pytest.approx(100 * top1 / 13) and counts.top5 == pytest.approx(100 * top5 / 13)
    assert counts.skipped == [] and counts.real_top1 is None and counts.seconds > 0


def test_workers_and_channels_last_change_no_count(tiny_val, colour_model):
    counts = evaluate(colour_model, dataset_of(tiny_val["flat-kaggle"], colour_model), batch_size=5, workers=2, channels_last=True)
    assert (counts.images, counts.top1_correct, counts.top5_correct) == (13, *tiny_val_expected())


@pytest.mark.parametrize("length, world", [(13, 2), (13, 3), (3, 4), (50_000, 8), (50_000, 7)])
def test_shards_are_disjoint_complete_and_unpadded(length, world):
    shards = [list(ShardSampler(length, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    assert [len(ShardSampler(length, rank, world)) for rank in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_rank_totals_add_up_to_one_process(tiny_val, colour_model):
    dataset = dataset_of(tiny_val["imagefolder"], colour_model)
    ranks = [evaluate(colour_model, dataset, batch_size=2, workers=0, context=DistributedContext(rank, 3)) for rank in range(3)]
    assert [r.images for r in ranks] == [5, 4, 4]
    assert sum(r.top1_correct for r in ranks) == tiny_val_expected()[0]
    assert sum(r.top5_correct for r in ranks) == tiny_val_expected()[1]


def test_out_of_memory_halves_the_batch_and_retries(tiny_val, colour_model, monkeypatch):
    forward = colour_model.forward
    seen = []

    def forward_that_fits_three(x):
        seen.append(len(x))
        if len(x) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(x)

    monkeypatch.setattr(colour_model, "forward", forward_that_fits_three)
    messages = []
    counts = evaluate(colour_model, dataset_of(tiny_val["flat-kaggle"], colour_model), batch_size=8, workers=0, on_message=messages.append)
    assert messages == ["out of memory at batch size 8; retrying with batch size 4", "out of memory at batch size 4; retrying with batch size 2"]
    assert seen[:3] == [8, 4, 2] and max(seen[3:]) == 2  # the smaller size sticks for later batches
    assert (counts.images, counts.top1_correct, counts.top5_correct) == (13, *tiny_val_expected())


def test_out_of_memory_with_one_image_is_an_error(tiny_val, colour_model, monkeypatch):
    def never_fits(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(colour_model, "forward", never_fits)
    with pytest.raises(EvalError, match="out of memory with a batch of one image"):
        evaluate(colour_model, dataset_of(tiny_val["flat-kaggle"], colour_model), batch_size=2, workers=0)


def test_unreadable_image_fails_naming_it_or_is_skipped(tiny_val, colour_model, tmp_path):
    bad = tmp_path / "ILSVRC2012_val_00000099.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    dataset = dataset_of(tiny_val["flat-kaggle"], colour_model, extra_paths=[bad])
    with pytest.raises(DatasetError, match=f"cannot read image {bad}: .*--skip-bad skips unreadable images"):
        evaluate(colour_model, dataset, batch_size=4, workers=0)
    counts = evaluate(colour_model, dataset, batch_size=4, workers=0, skip_bad=True)
    assert (counts.images, counts.top1_correct, counts.top5_correct) == (13, *tiny_val_expected())
    assert len(counts.skipped) == 1 and counts.skipped[0].startswith(f"cannot read image {bad}")


def test_real_top1_on_a_subset(tiny_val, colour_model):
    dataset = dataset_of(tiny_val["flat-caffe"], colour_model)
    stems = [os.path.basename(p).split(".")[0] for p in dataset.paths]
    real = read_real_labels()
    counts = evaluate(colour_model, dataset, batch_size=4, workers=0, real_labels=real_label_sets(stems, real))
    predicted = {n: code_ranking(code_red(code))[0] for n, _, code, _, _ in TINY_VAL}
    labelled = [n for n in predicted if real[n - 1]]
    assert counts.real_images == len(labelled) > 0
    assert counts.real_top1_correct == sum(predicted[n] in real[n - 1] for n in labelled)
    # a real-label set the model hits: the top-1 prediction of every image
    hits = [frozenset({predicted[int(s[-8:])]}) for s in stems]
    assert evaluate(colour_model, dataset, batch_size=4, workers=0, real_labels=hits).real_top1 == 100.0


class _Recorder(nn.Module):
    """Records what the loop hands the model: autocast dtype and memory format."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 1000)
        self.seen: list[tuple] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.conv(x).mean((2, 3)))
        self.seen.append((y.dtype, x.is_contiguous(memory_format=torch.channels_last)))
        return y


@pytest.mark.parametrize("amp, dtype", [("none", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_and_channels_last_reach_the_model(tiny_val, colour_model, amp, dtype):
    recorder = _Recorder()
    dataset = dataset_of(tiny_val["flat-kaggle"], colour_model)
    counts = evaluate(recorder, dataset, batch_size=13, workers=0, amp=amp, channels_last=amp != "none")
    assert recorder.seen == [(dtype, amp != "none")] and counts.images == 13


def test_a_folded_rmt_keeps_every_prediction(tiny_val):
    torch.manual_seed(0)
    model = timm.create_model("rmt_t").eval()
    dataset = dataset_of(tiny_val["flat-kaggle"], model)
    with torch.inference_mode():
        logits = torch.cat([model(dataset[i][0][None]) for i in range(len(dataset))])
    top2 = logits.topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-4  # far above folding's float32 rounding
    # labels that only this model's predictions match: 13 of 13 both ways, or a prediction moved
    known = EvalImageDataset(dataset.paths, tuple(logits.argmax(1).tolist()), dataset.transform, dataset.image_shape)
    assert evaluate(model, known, batch_size=5, workers=0).top1 == 100.0
    assert fold_for_inference(model, "rmt_t")
    assert evaluate(model, known, batch_size=5, workers=0).top1 == 100.0


def test_a_fold_that_fails_is_one_clear_error():
    class Unfoldable(nn.Module):
        def reparameterize(self) -> None:
            raise ValueError("branch shapes differ\nsecond line")

    assert not fold_for_inference(nn.Sequential(nn.Linear(2, 2)), "plain")
    with pytest.raises(RMTError, match="^cannot fold mine for inference: branch shapes differ$"):
        fold_for_inference(nn.Sequential(Unfoldable()), "mine")


def test_model_must_output_imagenet_logits(tiny_val, colour_model):
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    with pytest.raises(EvalError, match=r"the model outputs shape \(4, 10\); ImageNet-1k evaluation needs \(batch, 1000\) logits"):
        evaluate(model, dataset_of(tiny_val["flat-kaggle"], colour_model), batch_size=4, workers=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"amp": "fp8"}, "amp must be one of none, bf16, fp16"), ({"batch_size": 0}, "batch size must be at least 1"), ({"real_labels": [frozenset()]}, "1 ReaL label sets for 13 images")],
)
def test_bad_arguments(tiny_val, colour_model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        evaluate(colour_model, dataset_of(tiny_val["flat-kaggle"], colour_model), **kwargs)


def test_torchrun_environment_with_one_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    context = context_from_env()
    assert context == DistributedContext(0, 1, 0, 1) and context.is_main and not context.initialized
    with process_group(context, CPU) as inside:  # one process: no process group to join
        assert inside is context and not torch.distributed.is_initialized()
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ConfigError, match="bad torchrun environment: RANK=3, LOCAL_RANK=0, WORLD_SIZE=1"):
        context_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="bad torchrun environment"):
        context_from_env()


def test_device_choice():
    assert resolve_device("cpu", DistributedContext()) == CPU
    assert resolve_device("auto", DistributedContext()) == (torch.device("cuda", 0) if torch.cuda.is_available() else CPU)
    with pytest.raises(ConfigError, match="device must be auto, cuda or cpu"):
        resolve_device("tpu", DistributedContext())
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="torch sees no CUDA device"):
            resolve_device("cuda", DistributedContext())


def test_world_size_without_the_rest_of_torchruns_environment_is_one_line(monkeypatch):
    from rmt.eval.distributed import DistributedContext, process_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"cannot join the torchrun process group \(.*MASTER_ADDR.*\): start with torchrun"):
        with process_group(DistributedContext(rank=0, world_size=2), torch.device("cpu")):
            pass


def test_top1_gate():
    assert top1_gate(82.40, 82.45, 0.1) is None
    assert top1_gate(82.40, 82.30, 0.1) is None
    assert top1_gate(82.00, 82.45, 0.1) == "top-1 82.000 misses the expected 82.450 by -0.450 points (tolerance 0.1)"
    assert top1_gate(83.00, 82.45, 0.1).endswith("by +0.550 points (tolerance 0.1)")  # too good is suspect too
    with pytest.raises(ConfigError, match="tolerance must be a number at least 0"):
        top1_gate(1.0, 1.0, -1)


def test_json_is_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    write_json_atomic(path, {"top1": 81.5})
    assert json.loads(path.read_text()) == {"top1": 81.5}
    assert os.listdir(tmp_path) == ["result.json"]  # no temporary file left
    with pytest.raises(RMTError, match=f"cannot write {tmp_path / 'missing' / 'r.json'}"):
        write_json_atomic(tmp_path / "missing" / "r.json", {})
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(RMTError, match="cannot write .*folder.json"):
        write_json_atomic(tmp_path / "folder.json", {"top1": 1.0})
    assert sorted(os.listdir(tmp_path)) == ["folder.json", "result.json"]


def test_files_written_atomically_get_the_permissions_of_any_new_file(tmp_path):
    """Not the private 0600 of the temporary file: CI steps and other users read reports."""
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "new.json", {})
        assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o644
        (tmp_path / "kept.json").write_text("{}")
        os.chmod(tmp_path / "kept.json", 0o640)
        write_json_atomic(tmp_path / "kept.json", {"top1": 1.0})  # overwriting keeps the file's own mode
        assert stat.S_IMODE(os.stat(tmp_path / "kept.json").st_mode) == 0o640
    finally:
        os.umask(old)


def test_random_weights_are_the_same_on_every_run_and_rank(tiny_val, monkeypatch):
    import rmt.zoo
    from rmt.eval import run_imagenet_eval

    built = []
    create_model = rmt.zoo.create_model
    monkeypatch.setattr(rmt.zoo, "create_model", lambda *a, **k: built.append(create_model(*a, **k)) or built[-1])
    for _ in range(2):
        torch.randn(3)  # whatever the global generator's state
        # real_labels=None: not asked for, as False
        report = run_imagenet_eval("test_resnet", tiny_val["flat-kaggle"], random_weights=True, device="cpu", workers=0, limit=1,
                                   real_labels=None)
        assert report.weights == "random" and report.counts.images == 1 and not report.real_labels
    first, second = (model.state_dict() for model in built)
    assert all(torch.equal(first[k], second[k]) for k in first)
