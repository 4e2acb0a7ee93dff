"""Class indices and the ImageNet label file formats (Caffe, Kaggle, devkit, ReaL)."""

from __future__ import annotations

import json
import sys

import pytest
from timm.data import ImageNetInfo

from rmt.data import (
    imagenet_wnids,
    read_caffe_labels,
    read_devkit_labels,
    read_kaggle_labels,
    read_labels_file,
    read_real_labels,
    real_label_sets,
    val_image_number,
    wnid_to_index,
)
from rmt.errors import DatasetError

from conftest import write_devkit_meta

WNIDS = ImageNetInfo().label_names()


def test_class_index_is_the_sorted_wnid_position():
    assert imagenet_wnids() == tuple(WNIDS) == tuple(sorted(WNIDS))
    assert wnid_to_index()["n01440764"] == 0 and wnid_to_index()["n15075141"] == 999
    assert wnid_to_index()["n02119789"] == WNIDS.index("n02119789")


def test_val_image_number():
    assert val_image_number("ILSVRC2012_val_00000042") == 42
    assert val_image_number("ILSVRC2012_val_00050000") == 50_000
    assert val_image_number("7e5b4c3d") is None
    assert val_image_number("ILSVRC2012_val_42") is None


def test_caffe_labels(tmp_path):
    path = tmp_path / "val.txt"
    path.write_text("ILSVRC2012_val_00000001.JPEG 65\n\nILSVRC2012_val_00000002.JPEG 970\n")
    assert read_caffe_labels(path) == {"ILSVRC2012_val_00000001": 65, "ILSVRC2012_val_00000002": 970}
    assert read_labels_file(path) == ("caffe", read_caffe_labels(path))


@pytest.mark.parametrize(
    "text, message",
    [
        ("ILSVRC2012_val_00000001.JPEG 1000\n", "val.txt:1: class index 1000 is outside 0..999"),
        ("ILSVRC2012_val_00000001.JPEG 1\nILSVRC2012_val_00000002.JPEG\n", "val.txt:2: expected 'FILE CLASS_INDEX'"),
        ("ILSVRC2012_val_00000001.JPEG n01440764\n", "val.txt:1: expected 'FILE CLASS_INDEX'"),
        ("ILSVRC2012_val_00000001.JPEG \u00b2\n", "val.txt:1: expected 'FILE CLASS_INDEX'"),  # isdigit, but not int
        ("ILSVRC2012_val_00000001.JPEG 5\nILSVRC2012_val_00000001.JPEG 7\n", "val.txt:2: ILSVRC2012_val_00000001 is listed again with class 7, after class 5"),
        ("\n\n", "labels file .* is empty"),
    ],
)
def test_caffe_labels_errors(tmp_path, text, message):
    path = tmp_path / "val.txt"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_caffe_labels(path)


def test_kaggle_labels(tmp_path):
    path = tmp_path / "LOC_val_solution.csv"
    path.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295 \n"
        "ILSVRC2012_val_00000001,n01751748 111 108 441 193 \n"
    )
    labels = read_kaggle_labels(path)
    assert labels == {"ILSVRC2012_val_00008726": WNIDS.index("n02119789"), "ILSVRC2012_val_00000001": WNIDS.index("n01751748")}
    assert read_labels_file(path) == ("kaggle", labels)
    path.write_text("\ufeff" + path.read_text(), encoding="utf-8")  # saved by a spreadsheet: a byte-order mark
    assert read_labels_file(path) == ("kaggle", labels)


@pytest.mark.parametrize(
    "text, message",
    [
        ("ImageId,Label\nx,n01440764\n", "expected the Kaggle header"),
        ("ImageId,PredictionString\nILSVRC2012_val_00000001,\n", r"\.csv:2: expected 'ImageId,WNID"),
        ("ImageId,PredictionString\nILSVRC2012_val_00000001,n99999999 1 2 3 4\n", "'n99999999' is not an ImageNet-1k wnid"),
        ("ImageId,PredictionString\nILSVRC2012_val_00000001," + "x" * 200_000 + "\n", r"\.csv:2: not a Kaggle CSV row \(field larger"),
        ("ImageId," + "x" * 200_000 + "\n", r"\.csv:1: not a Kaggle CSV row \(field larger"),
    ],
)
def test_kaggle_labels_errors(tmp_path, text, message):
    path = tmp_path / "LOC_val_solution.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_kaggle_labels(path)


def test_devkit_ground_truth_maps_ids_through_meta(tmp_path):
    id_to_wnid = write_devkit_meta(tmp_path / "meta.mat")
    ids = [490, 361, 171, 822, 297]  # the first ILSVRC2012_IDs of the real ground-truth file
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ids))
    labels = read_devkit_labels(tmp_path / "ILSVRC2012_validation_ground_truth.txt")
    expected = {f"ILSVRC2012_val_{n:08d}": WNIDS.index(id_to_wnid[i]) for n, i in enumerate(ids, start=1)}
    assert labels == expected
    assert labels != {k: i - 1 for k, i in zip(expected, ids)}  # ids are not class indices
    # the devkit folder works as well as the file, and the format is recognised from the content
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True)
    for name in ("meta.mat", "ILSVRC2012_validation_ground_truth.txt"):
        (tmp_path / name).rename(devkit / "data" / name)
    assert read_labels_file(devkit) == ("devkit", expected)
    assert read_labels_file(devkit / "data" / "ILSVRC2012_validation_ground_truth.txt") == ("devkit", expected)


def test_devkit_errors(tmp_path):
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("490\n361\n")
    with pytest.raises(DatasetError, match=r"need the devkit's id-to-wnid table meta.mat \(ILSVRC2012_devkit_t12/data/meta.mat\)"):
        read_devkit_labels(gt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is a folder but not the ILSVRC2012 devkit"):
        read_labels_file(tmp_path / "empty")
    write_devkit_meta(tmp_path / "meta.mat")
    gt.write_text("490\n1001\n")  # an inner node's id is not a class
    with pytest.raises(DatasetError, match="ground_truth.txt:2: expected an ILSVRC2012_ID from 1 to 1000, got '1001'"):
        read_devkit_labels(gt)
    (tmp_path / "meta.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match="not the devkit's meta.mat"):
        read_devkit_labels(gt)


def test_devkit_without_scipy_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "meta.mat").write_bytes(b"")
    (tmp_path / "gt.txt").write_text("1\n")
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io now fails
    with pytest.raises(DatasetError, match="reading the devkit's meta.mat needs scipy: pip install scipy"):
        read_devkit_labels(tmp_path / "gt.txt", tmp_path / "meta.mat")


def test_missing_labels_file(tmp_path):
    with pytest.raises(DatasetError, match="labels file .*nope.txt does not exist"):
        read_labels_file(tmp_path / "nope.txt")


def test_real_labels_on_a_subset():
    real = read_real_labels()
    assert len(real) == 50_000 and real[1] == [970, 795]
    sets = real_label_sets(["ILSVRC2012_val_00000002", "ILSVRC2012_val_00000001", "ILSVRC2012_val_00050000"], real)
    assert sets == [frozenset({970, 795}), frozenset(), frozenset(real[49_999])]
    with pytest.raises(DatasetError, match="'7e5b4c3d' is not one"):
        real_label_sets(["7e5b4c3d"], real)


def test_real_labels_file(tmp_path):
    path = tmp_path / "real.json"
    path.write_text(json.dumps([[i % 1000] for i in range(50_000)]))
    assert read_real_labels(path)[1234] == [234]
    path.write_text(json.dumps([[1]] * 10))
    with pytest.raises(DatasetError, match="expected ReaL labels, a JSON list of 50,000 lists"):
        read_real_labels(path)
    path.write_text("{")
    with pytest.raises(DatasetError, match="not a JSON file"):
        read_real_labels(path)
    path.write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python's recursion
    with pytest.raises(DatasetError, match="expected ReaL labels"):
        read_real_labels(path)
    for entry in (["a"], [1000], [True], "7"):
        path.write_text(json.dumps([entry] + [[1]] * 49_999))
        with pytest.raises(DatasetError, match=r"lists of class indices \(0 to 999\)"):
            read_real_labels(path)
