"""ImageNet-1k class indices and the label files the validation set is distributed with.

The class index of an image is the position of its wnid in the sorted list of the 1000 ImageNet-1k
wnids (the order every published ImageNet classifier uses; timm ships the list). Every reader here
returns labels keyed by the image's file stem (``ILSVRC2012_val_00000001``), so the same image gets
the same label whichever file format or extension it arrived with.
"""

from __future__ import annotations

import csv
import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Union

from rmt.errors import DatasetError

PathLike = Union[str, Path]

NUM_CLASSES = 1000
NUM_VAL_IMAGES = 50_000

CAFFE_LABELS = "val.txt"
KAGGLE_LABELS = "LOC_val_solution.csv"
DEVKIT_LABELS = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"

_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})$")


def _timm_info_file(name: str) -> str:
    return (resources.files("timm.data") / "_info" / name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order (sorted)."""
    wnids = tuple(line.strip() for line in _timm_info_file("imagenet_synsets.txt").splitlines() if line.strip())
    # the class index *is* the sorted position: guard against a reordered or truncated copy
    assert len(wnids) == NUM_CLASSES and list(wnids) == sorted(wnids), "timm's imagenet_synsets.txt is not the sorted 1k list"
    return wnids


@lru_cache(maxsize=1)
def wnid_to_index() -> dict[str, int]:
    """``{"n01440764": 0, ...}``: the class index of each ImageNet-1k wnid."""
    return {wnid: i for i, wnid in enumerate(imagenet_wnids())}


def val_image_number(stem: str) -> Optional[int]:
    """The 1-based number of an official validation file (``ILSVRC2012_val_00000042`` -> 42), else None."""
    match = _VAL_NAME.match(stem)
    return int(match.group(1)) if match else None


def is_decimal(text: str) -> bool:
    """Digits 0-9 only (``str.isdigit`` also takes superscripts, which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def read_caffe_labels(path: PathLike) -> dict[str, int]:
    """Caffe-style ``val.txt``: ``ILSVRC2012_val_00000001.JPEG 65`` per line, 0-based class index."""
    labels: dict[str, int] = {}
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not is_decimal(fields[1]):
            raise DatasetError(f"{path}:{number}: expected 'FILE CLASS_INDEX' (Caffe val.txt), got {line.strip()!r}")
        _add_label(labels, Path(fields[0]).stem, _check_index(int(fields[1]), path, number), path, number)
    return _non_empty(labels, path)


def _add_label(labels: dict[str, int], image: str, index: int, path: PathLike, number: int) -> None:
    """One image's label; an image listed again is fine with the same class, an error with another
    (which of the two would be right?)."""
    if labels.setdefault(image, index) != index:
        raise DatasetError(f"{path}:{number}: {image} is listed again with class {index}, after class {labels[image]}")


def read_kaggle_labels(path: PathLike) -> dict[str, int]:
    """Kaggle ``LOC_val_solution.csv``: ``ImageId,PredictionString``; the first token of the prediction is the wnid."""
    indices = wnid_to_index()
    rows = csv.reader(_read_text(path).splitlines())
    labels: dict[str, int] = {}
    try:
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise DatasetError(f"{path}: expected the Kaggle header 'ImageId,PredictionString', got {','.join(header or [])!r}")
        for number, row in enumerate(rows, start=2):
            if not row:
                continue
            tokens = row[1].split() if len(row) >= 2 else []
            if not tokens:
                raise DatasetError(f"{path}:{number}: expected 'ImageId,WNID x0 y0 x1 y1 ...', got {','.join(row)!r}")
            if tokens[0] not in indices:
                raise DatasetError(f"{path}:{number}: {tokens[0]!r} is not an ImageNet-1k wnid")
            _add_label(labels, Path(row[0].strip()).stem, indices[tokens[0]], path, number)
    except csv.Error as e:  # a field over the csv module's limit, a NUL byte
        raise DatasetError(f"{path}:{rows.line_num}: not a Kaggle CSV row ({e})") from None
    return _non_empty(labels, path)


def read_devkit_labels(ground_truth: PathLike, meta: Optional[PathLike] = None) -> dict[str, int]:
    """The devkit's ``ILSVRC2012_validation_ground_truth.txt`` (line n: ILSVRC2012_ID of val image n).

    ILSVRC2012_IDs are 1-based positions in ``meta.mat``, not class indices: ``meta`` (default: beside
    the ground-truth file) maps each id to its wnid. Reading it needs scipy.
    """
    ground_truth = Path(ground_truth)
    meta = Path(meta) if meta is not None else ground_truth.with_name(DEVKIT_META)
    if not meta.is_file():
        raise DatasetError(
            f"{ground_truth} holds ILSVRC2012_IDs, which need the devkit's id-to-wnid table {meta.name} "
            f"(ILSVRC2012_devkit_t12/data/{DEVKIT_META}): put it beside the ground-truth file or pass the devkit folder"
        )
    id_to_class = read_devkit_meta(meta)
    labels: dict[str, int] = {}
    for number, line in enumerate(_read_text(ground_truth).splitlines(), start=1):
        if not line.strip():
            continue
        token = line.strip()
        if not is_decimal(token) or int(token) not in id_to_class:
            raise DatasetError(f"{ground_truth}:{number}: expected an ILSVRC2012_ID from 1 to {NUM_CLASSES}, got {token!r}")
        labels[f"ILSVRC2012_val_{number:08d}"] = id_to_class[int(token)]
    return _non_empty(labels, ground_truth)


def read_devkit_meta(path: PathLike) -> dict[int, int]:
    """``{ILSVRC2012_ID: class index}`` for the 1000 leaf synsets of the devkit's ``meta.mat``."""
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise DatasetError(f"reading the devkit's {Path(path).name} needs scipy: pip install scipy") from None
    try:
        synsets = loadmat(str(path), squeeze_me=True)["synsets"]
        ids = [int(i) for i in synsets["ILSVRC2012_ID"]]
        wnids = [str(w) for w in synsets["WNID"]]
        children = [int(c) for c in synsets["num_children"]]
    except (MatReadError, OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise DatasetError(f"{path}: not the devkit's meta.mat (a 'synsets' table with ILSVRC2012_ID, WNID, num_children): {e}") from None
    indices = wnid_to_index()
    # the leaves (no children) are the 1000 classes; inner WordNet nodes have ids above 1000
    table = {i: indices.get(w, -1) for i, w, c in zip(ids, wnids, children) if c == 0}
    if sorted(table) != list(range(1, NUM_CLASSES + 1)) or -1 in table.values():
        raise DatasetError(f"{path}: expected ILSVRC2012_IDs 1..{NUM_CLASSES} for the ImageNet-1k wnids, found {len(table)} leaf synsets")
    return table


def read_labels_file(path: PathLike) -> tuple[str, dict[str, int]]:
    """Read any supported labels file or devkit folder; returns (format, labels by file stem).

    The format comes from the content, not the name: a folder is a devkit, a CSV with the Kaggle
    header is Kaggle, one integer per line is the devkit ground truth, ``FILE INDEX`` is Caffe.
    """
    path = Path(path)
    if path.is_dir():
        ground_truth = next((p for p in (path / "data" / DEVKIT_LABELS, path / DEVKIT_LABELS) if p.is_file()), None)
        if ground_truth is None:
            raise DatasetError(f"{path} is a folder but not the ILSVRC2012 devkit: it has no data/{DEVKIT_LABELS}")
        return "devkit", read_devkit_labels(ground_truth)
    first = next((line for line in _read_text(path).splitlines() if line.strip()), "")
    if first.startswith("ImageId"):
        return "kaggle", read_kaggle_labels(path)
    if is_decimal(first.strip()):
        return "devkit", read_devkit_labels(path)
    return "caffe", read_caffe_labels(path)


def read_real_labels(path: Optional[PathLike] = None) -> list[list[int]]:
    """ImageNet-ReaL labels: entry n-1 lists the valid classes of ``ILSVRC2012_val_{n:08d}`` (may be empty).

    Default: the copy timm ships (``timm/data/_info/imagenet_real_labels.json``).
    """
    text = _timm_info_file("imagenet_real_labels.json") if path is None else _read_text(path)
    where = path or "timm's imagenet_real_labels.json"
    try:
        real = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not a JSON file ({e})") from None
    except (RecursionError, ValueError):  # nested too deeply; an integer of over 4,300 digits
        real = None  # not ReaL labels either way
    if not isinstance(real, list) or len(real) != NUM_VAL_IMAGES or not all(map(_is_class_list, real)):
        raise DatasetError(
            f"{where}: expected ReaL labels, a JSON list of {NUM_VAL_IMAGES:,} lists of class indices (0 to {NUM_CLASSES - 1})"
        )
    return real


def _is_class_list(labels: object) -> bool:
    return isinstance(labels, list) and all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c < NUM_CLASSES for c in labels
    )


def real_label_sets(stems: Sequence[str], real: Sequence[Sequence[int]]) -> list[frozenset[int]]:
    """The ReaL classes of each image (by stem), for any subset of the 50,000 validation files."""
    sets = []
    for stem in stems:
        number = val_image_number(stem)
        if number is None or not 1 <= number <= len(real):
            raise DatasetError(
                f"ReaL labels are indexed by the official validation file names (ILSVRC2012_val_00000001 .. "
                f"ILSVRC2012_val_{NUM_VAL_IMAGES:08d}); {stem!r} is not one"
            )
        sets.append(frozenset(real[number - 1]))
    return sets


def _read_text(path: PathLike) -> str:
    try:
        # utf-8-sig: a labels file saved by a spreadsheet on Windows starts with a byte-order mark
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"labels file {path} does not exist") from None
    except IsADirectoryError:
        raise DatasetError(f"{path} is a folder, expected a labels file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read labels file {path}: {e}") from None


def _check_index(index: int, path: PathLike, number: int) -> int:
    if not 0 <= index < NUM_CLASSES:
        raise DatasetError(f"{path}:{number}: class index {index} is outside 0..{NUM_CLASSES - 1}")
    return index


def _non_empty(labels: dict[str, int], path: PathLike) -> dict[str, int]:
    if not labels:
        raise DatasetError(f"labels file {path} is empty")
    return labels
