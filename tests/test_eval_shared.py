"""The 1300 real validation images of ../shared in every layout: the same exact numbers each time."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from rmt.data import EvalImageDataset, build_eval_transform, load_rgb, read_real_labels, real_label_sets, scan_imagenet_val
from rmt.eval import evaluate

from conftest import SHARED, write_val_layouts

SHARED_VAL = SHARED / "data" / "imagenet-val-1300"
pytestmark = pytest.mark.skipif(not (SHARED_VAL / "val.txt").is_file(), reason="../shared is absent")

# small and cheap: the model below only needs each image's preprocessed bytes to recognise it
PREPROCESSING = {"input_size": (3, 64, 64), "interpolation": "bilinear", "crop_pct": 1.0, "mean": (0.5,) * 3, "std": (0.5,) * 3}


def fingerprint(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def ranking(number: int, target: int) -> list[int]:
    """The top-5 the model answers: right for numbers 0 mod 4, second for 1 mod 4, absent otherwise."""
    others = [(target + k) % 1000 for k in range(1, 6)]
    if number % 4 == 0:
        return [target] + others[:4]
    if number % 4 == 1:
        return others[:1] + [target] + others[1:4]
    return others


class FingerprintModel(nn.Module):
    """Recognises every validation image by its preprocessed pixels and ranks classes as told."""

    def __init__(self, rankings: dict[str, list[int]]) -> None:
        super().__init__()
        self.rankings = rankings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 1000)
        for row, image in zip(logits, x):
            row[self.rankings[fingerprint(image)]] = torch.arange(5.0, 0.0, -1.0)
        return logits


@pytest.fixture(scope="module")
def shared_val(tmp_path_factory):
    """(labels by image number read straight from val.txt, the model, {layout: folder})."""
    labels = {}
    for line in (SHARED_VAL / "val.txt").read_text().split("\n"):
        if line:
            name, index = line.split()
            labels[int(name[len("ILSVRC2012_val_") : -len(".JPEG")])] = int(index)
    images = {n: SHARED_VAL / "images" / f"ILSVRC2012_val_{n:08d}.JPEG" for n in labels}
    transform = build_eval_transform(PREPROCESSING)
    rankings = {fingerprint(transform(load_rgb(str(images[n])))): ranking(n, t) for n, t in labels.items()}
    assert len(rankings) == len(labels) == 1300  # every image recognisable
    layouts = write_val_layouts(tmp_path_factory.mktemp("shared_layouts"), images, labels)
    layouts["shared as distributed"] = SHARED_VAL / "images"
    return labels, FingerprintModel(rankings), layouts


@pytest.mark.parametrize("layout", ["shared as distributed", "imagefolder", "flat-caffe", "flat-kaggle", "flat-devkit", "imagenet-v2"])
def test_every_layout_gives_the_same_exact_numbers(shared_val, layout):
    labels, model, layouts = shared_val
    if layout not in layouts:
        pytest.skip("the devkit layout needs scipy to write its meta.mat")
    val = scan_imagenet_val(layouts[layout])
    dataset = EvalImageDataset(val.paths, val.targets, build_eval_transform(PREPROCESSING), PREPROCESSING["input_size"])
    counts = evaluate(model, dataset, batch_size=100, workers=0)
    assert counts.images == 1300
    assert counts.top1_correct == sum(1 for n in labels if n % 4 == 0)
    assert counts.top5_correct == sum(1 for n in labels if n % 4 in (0, 1))


def test_real_top1_on_the_1300_image_subset(shared_val):
    labels, model, layouts = shared_val
    val = scan_imagenet_val(layouts["shared as distributed"])
    dataset = EvalImageDataset(val.paths, val.targets, build_eval_transform(PREPROCESSING), PREPROCESSING["input_size"])
    real = read_real_labels()
    counts = evaluate(model, dataset, batch_size=100, workers=0, real_labels=real_label_sets(val.stems, real))
    labelled = [n for n in labels if real[n - 1]]
    assert counts.real_images == len(labelled) and 1000 < len(labelled) < 1300
    assert counts.real_top1_correct == sum(ranking(n, labels[n])[0] in real[n - 1] for n in labelled)
