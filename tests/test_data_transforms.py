"""Evaluation preprocessing is the official RMT evaluation's, pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from rmt.data import build_eval_transform, load_rgb
from rmt.errors import ConfigError

from conftest import SHARED

SHARED_IMAGES = SHARED / "data" / "imagenet-val-1300" / "images"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the official code's eval_crop_ratio: 0.875 in the plain release, 0.96 in the token-labelling one
RMT_CROP_PCT = {"plain": 0.875, "token-labelling": 0.96}


def official_eval_transform(input_size: int, eval_crop_ratio: float) -> transforms.Compose:
    """``build_transform(is_train=False)`` of the official RMT code (DeiT's), written out."""
    size = int(input_size / eval_crop_ratio)
    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=InterpolationMode.BICUBIC),  # interpolation=3 there
            transforms.CenterCrop(input_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def rmt_preprocessing(crop_pct: float) -> dict:
    return {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": crop_pct, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def sample_images(tmp_path: Path) -> list[Path]:
    """Real validation JPEGs when ../shared is there, plus generated photos of awkward sizes."""
    images = sorted(SHARED_IMAGES.glob("*.JPEG"))[:: 1300 // 12] if SHARED_IMAGES.is_dir() else []
    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(500, 375), (333, 500), (257, 255), (1024, 97)]):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        path = tmp_path / f"generated_{i}.JPEG"
        Image.fromarray(pixels).save(path, quality=90)
        images.append(path)
    return images


@pytest.mark.parametrize("crop_pct", RMT_CROP_PCT.values(), ids=RMT_CROP_PCT.keys())
def test_matches_the_official_evaluation_pixel_for_pixel(tmp_path, crop_pct):
    ours = build_eval_transform(rmt_preprocessing(crop_pct))
    official = official_eval_transform(224, crop_pct)
    for path in sample_images(tmp_path):
        expected = official(datasets.folder.default_loader(str(path)))  # ImageFolder's loader
        actual = ours(load_rgb(str(path)))
        assert actual.shape == (3, 224, 224)
        assert torch.equal(actual, expected), path


def test_resize_is_int_size_over_crop_pct():
    assert build_eval_transform(rmt_preprocessing(0.875)).transforms[0].size == 256
    assert build_eval_transform(rmt_preprocessing(0.96)).transforms[0].size == 233  # int(233.33)


@pytest.mark.skipif(not SHARED_IMAGES.is_dir(), reason="../shared is absent")
def test_real_jpegs_are_not_all_alike():
    # guards the pixel test above against comparing blank images
    a, b = (build_eval_transform(rmt_preprocessing(0.875))(load_rgb(str(p))) for p in sorted(SHARED_IMAGES.glob("*.JPEG"))[:2])
    assert a.std() > 0.1 and not torch.equal(a, b)


def test_non_square_input_covers_then_crops(tmp_path):
    path = tmp_path / "wide.JPEG"
    Image.new("RGB", (400, 100), (200, 10, 10)).save(path)
    preprocessing = dict(rmt_preprocessing(1.0), input_size=(3, 64, 128))
    image = build_eval_transform(preprocessing)(load_rgb(str(path)))
    assert image.shape == (3, 64, 128)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"crop_pct": 0.0}, r"crop_pct must be in \(0, 1\]"),
        ({"crop_pct": 1.5}, r"crop_pct must be in \(0, 1\]"),
        ({"interpolation": "magic"}, "bad preprocessing config"),
        ({"input_size": (224, 224)}, "bad preprocessing config"),
    ],
)
def test_bad_preprocessing(change, message):
    with pytest.raises(ConfigError, match=message):
        build_eval_transform(dict(rmt_preprocessing(0.875), **change))


@pytest.mark.parametrize("crop_mode", ["squash", "border"])
def test_timm_crop_modes_are_timms_own_pipeline(tmp_path, crop_mode):
    from timm.data import create_transform

    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(path)
    preprocessing = dict(rmt_preprocessing(0.9), crop_mode=crop_mode)
    ours = build_eval_transform(preprocessing)(load_rgb(str(path)))
    timms = create_transform((3, 224, 224), interpolation="bicubic", mean=preprocessing["mean"], std=preprocessing["std"],
                             crop_pct=0.9, crop_mode=crop_mode)(load_rgb(str(path)))
    center = build_eval_transform(rmt_preprocessing(0.9))(load_rgb(str(path)))
    assert torch.equal(ours, timms) and not torch.equal(ours, center)
    with pytest.raises(ConfigError, match="crop_mode must be center, squash or border, got 'zoom'"):
        build_eval_transform(dict(preprocessing, crop_mode="zoom"))


@pytest.mark.parametrize("variant", ["rmt_t", "rmt_s", "rmt_b", "rmt_l", "rmt_s_tl", "rmt_b_tl", "rmt_l_tl"])
def test_the_zoo_preprocessing_of_every_variant_is_the_official_one(tmp_path, variant):
    from rmt.zoo import get_entry

    crop_pct = RMT_CROP_PCT["token-labelling" if variant.endswith("_tl") else "plain"]
    ours = build_eval_transform(get_entry(variant).preprocessing)
    official = official_eval_transform(224, crop_pct)
    for path in sample_images(tmp_path)[-2:]:  # the generated 257x255 and 1024x97 photos
        assert torch.equal(ours(load_rgb(str(path))), official(datasets.folder.default_loader(str(path))))


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_under_an_image_name_is_unreadable_not_a_hang(tmp_path):
    import os
    import threading

    pipe = tmp_path / "ILSVRC2012_val_00000001.JPEG"
    os.mkfifo(pipe)  # opening it for reading would wait for a writer
    errors = []

    def load() -> None:
        try:
            load_rgb(str(pipe))
        except ValueError as e:
            errors.append(str(e))

    reader = threading.Thread(target=load, daemon=True)  # a hang fails the test instead of the suite
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive() and errors and "not a regular file" in errors[0]
    Image.new("RGB", (8, 6), (200, 10, 10)).save(tmp_path / "red.png")
    assert load_rgb(str(tmp_path / "red.png")).getpixel((0, 0)) == (200, 10, 10)
