"""Layout detection: every layout pairs each image with the same class index; bad folders say why."""

from __future__ import annotations

import shutil

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from rmt.data import LAYOUTS, EvalImageDataset, build_eval_transform, load_rgb, scan_imagenet_val
from rmt.errors import DatasetError

from conftest import TINY_VAL, code_red, write_code_image

EXPECTED = {f"ILSVRC2012_val_{n:08d}": target for n, target, *_ in TINY_VAL}


def labelled(val) -> dict[str, int]:
    """{image number stem: class index}, following symlinks back to the generated source file."""
    return {f"ILSVRC2012_val_{int(Path(os.path.realpath(p)).stem):08d}": t for p, t in zip(val.paths, val.targets)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_labels_every_image_the_same(tiny_val, layout):
    if layout not in tiny_val:
        pytest.skip("the devkit layout needs scipy to write its meta.mat")
    val = scan_imagenet_val(tiny_val[layout])
    assert val.layout == layout
    assert labelled(val) == EXPECTED
    assert len(val) == len(TINY_VAL)
    assert LAYOUTS[layout] in val.description
    names = [Path(p).name for p in val.paths]
    assert names == sorted(names)  # file-name order, whatever the folder structure


def test_labels_file_found_in_the_folder_or_its_parent_or_given(tiny_val, tmp_path):
    assert scan_imagenet_val(tiny_val["flat-caffe"]).labels_file == tiny_val["flat-caffe"].parent / "val.txt"
    assert scan_imagenet_val(tiny_val["flat-kaggle"]).labels_file == tiny_val["flat-kaggle"] / "LOC_val_solution.csv"
    given = scan_imagenet_val(tiny_val["flat-caffe"], labels=tiny_val["flat-kaggle"] / "LOC_val_solution.csv")
    assert given.layout == "flat-kaggle" and labelled(given) == EXPECTED


def test_head_takes_the_first_images_in_file_name_order(tiny_val):
    for layout in ("imagefolder", "flat-kaggle"):
        val = scan_imagenet_val(tiny_val[layout]).head(4)
        assert list(labelled(val)) == sorted(EXPECTED)[:4]
    with pytest.raises(DatasetError, match="limit must be at least 1"):
        scan_imagenet_val(tiny_val["flat-kaggle"]).head(0)


def test_unknown_layout_lists_the_accepted_ones(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError) as error:
        scan_imagenet_val(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert f"did you mean {tmp_path / 'val'}?" in message
    assert "it has folders train, val and no images" in message
    for example in ("n01440764/ILSVRC2012_val_00000293.JPEG", "val.txt 'ILSVRC2012_val_00000001.JPEG 65'", "LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt + meta.mat", "0/7e5b4c3d.jpeg .. 999/"):
        assert example in message


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: None, "holds no images and no folders"),
        (lambda root: (root / "x.txt").write_text("hi"), "holds no images and no folders"),
        (lambda root: (root / "n01440764").mkdir(), r"ImageFolder \(wnid folders\) layout\) holds no images|holds no images"),
        (lambda root: (root / "n99999999").mkdir(), "n99999999 is not one of the 1000 ImageNet-1k classes"),
        (lambda root: (root / "1000").mkdir(), "an ImageNet-V2 class folder must be named 0 .. 999"),
        (lambda root: write_code_image(root / "ILSVRC2012_val_00000001.JPEG", 10), "flat folder of 1 images but no labels file was given"),
    ],
)
def test_bad_folders(tmp_path, make, message):
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    with pytest.raises(DatasetError, match=message):
        scan_imagenet_val(root)


def test_a_stray_folder_among_class_folders_is_named(tiny_val, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_val["imagefolder"], data)
    (data / "lost+found").mkdir()
    with pytest.raises(DatasetError, match=r"has \d+ ImageFolder \(wnid folders\) class folders and 1 other folder\(s\): lost\+found; move them out"):
        scan_imagenet_val(data)


def test_bad_paths(tmp_path):
    with pytest.raises(DatasetError, match="data folder .*missing does not exist"):
        scan_imagenet_val(tmp_path / "missing")
    (tmp_path / "file.JPEG").write_bytes(b"")
    with pytest.raises(DatasetError, match="is a file; pass the folder"):
        scan_imagenet_val(tmp_path / "file.JPEG")


def test_images_without_a_label_are_refused(tiny_val, tmp_path):
    (tmp_path / "val.txt").write_text("ILSVRC2012_val_00000003.JPEG 0\n")
    with pytest.raises(DatasetError, match=r"12 of 13 images in .* have no label in .*val.txt \(first: ILSVRC2012_val_00000008.JPEG\)"):
        scan_imagenet_val(tiny_val["flat-kaggle"], labels=tmp_path / "val.txt")


def test_labels_file_with_class_folders_is_refused(tiny_val):
    with pytest.raises(DatasetError, match="whose folder names are the labels: drop the labels file"):
        scan_imagenet_val(tiny_val["imagefolder"], labels=tiny_val["flat-caffe"].parent / "val.txt")


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "JPEG")])
def test_every_image_mode_decodes_to_rgb(tmp_path, mode, fmt):
    path = tmp_path / "ILSVRC2012_val_00000001.JPEG"  # the extension says JPEG whatever the content
    write_code_image(path, code_red(5), mode=mode, fmt=fmt)
    image = load_rgb(str(path))
    assert image.mode == "RGB" and image.size == (64, 48)
    red, green, blue = image.getpixel((10, 10))
    assert abs(red - code_red(5)) <= 2 and (mode == "L" or abs(green - 128) <= 2)


def test_unreadable_image_comes_back_as_an_error_naming_it(tmp_path):
    good, bad, truncated = tmp_path / "good.JPEG", tmp_path / "bad.JPEG", tmp_path / "truncated.JPEG"
    write_code_image(good, 100, size=(300, 200))
    bad.write_bytes(b"<html>not an image</html>")
    truncated.write_bytes(good.read_bytes()[:400])
    preprocessing = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.875, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    dataset = EvalImageDataset((str(good), str(bad), str(truncated)), (1, 2, 3), build_eval_transform(preprocessing), (3, 32, 32))
    image, target, index, error = dataset[0]
    assert image.shape == (3, 32, 32) and (target, index, error) == (1, 0, "")
    for i, path in ((1, bad), (2, truncated)):
        image, target, index, error = dataset[i]
        assert error.startswith(f"cannot read image {path}: ") and "\n" not in error
        assert torch.equal(image, torch.zeros(3, 32, 32)) and index == i


def test_png_data_in_a_jpeg_file_is_read_by_content(tmp_path):
    path = tmp_path / "n02105855_2933.JPEG"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path, format="PNG")
    assert Image.open(path).format == "PNG"
    assert load_rgb(str(path)).getpixel((0, 0)) == (1, 2, 3)
