"""The ImageNet validation set in the layouts it is really found in, and a Dataset over it.

:func:`scan_imagenet_val` detects the layout of a folder and pairs every image with its class
index (the position of its wnid in the sorted ImageNet-1k list, never the order of folders on
disk). Images are listed in file-name order, the same for every layout, so ``limit`` and the
distributed shards select the same images whichever layout holds them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from rmt.data.labels import (
    CAFFE_LABELS,
    DEVKIT_DIR,
    DEVKIT_LABELS,
    KAGGLE_LABELS,
    NUM_CLASSES,
    PathLike,
    is_decimal,
    read_labels_file,
    wnid_to_index,
)
from rmt.data.transforms import load_rgb
from rmt.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

LAYOUTS = {
    "imagefolder": "ImageFolder (wnid folders)",
    "flat-caffe": "flat folder, Caffe val.txt",
    "flat-kaggle": "flat folder, Kaggle LOC_val_solution.csv",
    "flat-devkit": "flat folder, ILSVRC2012 devkit ground truth",
    "imagenet-v2": "ImageNet-V2 (class-index folders)",
}

# searched for in the data folder, then in its parent, in this order
_LABEL_FILES = (CAFFE_LABELS, KAGGLE_LABELS, DEVKIT_LABELS, DEVKIT_DIR)


@dataclass(frozen=True)
class ImageNetVal:
    """The labelled images of one ImageNet validation folder."""

    root: Path
    layout: str  # a key of LAYOUTS
    labels_file: Optional[Path]  # None when the folder names carry the labels
    paths: tuple[str, ...]
    targets: tuple[int, ...]

    @property
    def description(self) -> str:
        """The layout in words, with the labels file when there is one."""
        text = LAYOUTS[self.layout]
        return f"{text} ({self.labels_file})" if self.labels_file else text

    @property
    def stems(self) -> list[str]:
        return [Path(p).stem for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def head(self, limit: Optional[int]) -> "ImageNetVal":
        """The first ``limit`` images (file-name order); all of them when ``limit`` is None."""
        if limit is None:
            return self
        if limit < 1:
            raise DatasetError(f"limit must be at least 1, got {limit}")
        return replace(self, paths=self.paths[:limit], targets=self.targets[:limit])


def scan_imagenet_val(root: PathLike, labels: Optional[PathLike] = None) -> ImageNetVal:
    """Detect the layout of ``root`` and label every image in it.

    Layouts: wnid folders (ImageFolder); class-index folders ``0`` .. ``999`` (ImageNet-V2); a flat
    folder of images with a labels file (``labels``, or found in ``root`` or its parent: Caffe
    ``val.txt``, Kaggle ``LOC_val_solution.csv``, the devkit's ground truth with its ``meta.mat``).
    Anything else raises DatasetError listing the accepted layouts.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"data path {root} is a file; pass the folder that holds the validation images")
    folders, images = _list_folder(root)
    for layout, is_class, class_of in (("imagefolder", _is_wnid, _wnid_class), ("imagenet-v2", is_decimal, _index_class)):
        classes = [f for f in folders if is_class(f.name)]
        if classes and len(classes) == len(folders):
            return _scan_class_folders(root, folders, labels, layout, class_of)
        if len(classes) > len(folders) / 2:  # a stray folder (lost+found, a backup) among the class folders
            others = [f.name for f in folders if not is_class(f.name)]
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise DatasetError(
                f"{root} has {len(classes):,} {LAYOUTS[layout]} class folders and {len(others):,} other folder(s): "
                f"{shown}; move them out, or pass a folder holding only the class folders"
            )
    if images:
        return _scan_flat(root, images, labels)
    raise DatasetError(_no_layout_message(root, folders))


def _list_folder(root: Path) -> tuple[list[Path], list[Path]]:
    folders, images = [], []
    try:
        entries = os.scandir(root)
    except OSError as e:
        raise DatasetError(f"cannot read {root}: {e.strerror or e}") from None
    with entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                folders.append(Path(entry.path))
            elif _is_image(entry.name):
                images.append(Path(entry.path))
    return sorted(folders), images


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_wnid(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and is_decimal(name[1:])


def _wnid_class(folder: Path) -> int:
    index = wnid_to_index().get(folder.name)
    if index is None:
        raise DatasetError(f"{folder}: {folder.name} is not one of the 1000 ImageNet-1k classes (an ImageNet-21k folder?)")
    return index


def _index_class(folder: Path) -> int:
    index = int(folder.name)
    if not 0 <= index < NUM_CLASSES:
        raise DatasetError(f"{folder}: an ImageNet-V2 class folder must be named 0 .. {NUM_CLASSES - 1}")
    return index


def _scan_class_folders(
    root: Path, folders: list[Path], labels: Optional[PathLike], layout: str, class_of: Callable[[Path], int]
) -> ImageNetVal:
    if labels is not None:
        raise DatasetError(f"{root} is an {LAYOUTS[layout]} layout, whose folder names are the labels: drop the labels file {labels}")
    samples = []
    for folder in folders:
        target = class_of(folder)
        for directory, _, files in os.walk(folder):
            samples += [(os.path.join(directory, f), target) for f in files if _is_image(f) and not f.startswith(".")]
    return _labelled(root, layout, None, samples)


def _scan_flat(root: Path, images: list[Path], labels: Optional[PathLike]) -> ImageNetVal:
    labels_path = Path(labels) if labels is not None else _find_labels_file(root)
    if labels_path is None:
        raise DatasetError(
            f"{root} is a flat folder of {len(images):,} images but no labels file was given (--labels) or found in it "
            f"or its parent: give {CAFFE_LABELS} ('ILSVRC2012_val_00000001.JPEG 65'), {KAGGLE_LABELS} (Kaggle) or the "
            f"devkit's {DEVKIT_LABELS} with its meta.mat"
        )
    kind, by_stem = read_labels_file(labels_path)
    samples, unlabelled = [], []
    for image in images:
        target = by_stem.get(image.stem)
        if target is None:
            unlabelled.append(image.name)
        else:
            samples.append((str(image), target))
    if unlabelled:
        raise DatasetError(
            f"{len(unlabelled):,} of {len(images):,} images in {root} have no label in {labels_path} "
            f"(first: {min(unlabelled)}): is it the labels file of these images?"
        )
    return _labelled(root, f"flat-{kind}", labels_path, samples)


def _find_labels_file(root: Path) -> Optional[Path]:
    for folder in (root, root.parent):
        for name in _LABEL_FILES:
            if (folder / name).exists():
                return folder / name
    return None


def _labelled(root: Path, layout: str, labels_file: Optional[Path], samples: list[tuple[str, int]]) -> ImageNetVal:
    if not samples:
        raise DatasetError(f"{root} ({LAYOUTS[layout]}) holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    samples.sort(key=lambda s: (os.path.basename(s[0]), s[0]))
    paths, targets = zip(*samples)
    return ImageNetVal(root=root, layout=layout, labels_file=labels_file, paths=paths, targets=targets)


def _no_layout_message(root: Path, folders: list[Path]) -> str:
    if folders:
        shown = ", ".join(f.name for f in folders[:5]) + (", ..." if len(folders) > 5 else "")
        found = f"it has folders {shown} and no images"
    else:
        found = "it holds no images and no folders"
    hint = f" (did you mean {root / 'val'}?)" if (root / "val").is_dir() else ""
    return (
        f"{root} is not an ImageNet validation folder{hint}: {found}; accepted layouts: "
        f"ImageFolder, wnid folders (n01440764/ILSVRC2012_val_00000293.JPEG) | "
        f"flat folder + labels file given with --labels or found in it or its parent "
        f"(ILSVRC2012_val_00000001.JPEG with {CAFFE_LABELS} 'ILSVRC2012_val_00000001.JPEG 65', "
        f"{KAGGLE_LABELS} 'ILSVRC2012_val_00000001,n01751748 ...', or the devkit's {DEVKIT_LABELS} + meta.mat) | "
        f"ImageNet-V2, class-index folders (0/7e5b4c3d.jpeg .. 999/)"
    )


class EvalImageDataset(Dataset):
    """Decoded, preprocessed images with their class index and position.

    An unreadable image does not raise here (a DataLoader worker would wrap the error in a
    traceback): the sample comes back as zeros with the error text, and the evaluation loop
    decides whether to fail or skip.
    """

    def __init__(self, paths: tuple[str, ...], targets: tuple[int, ...], transform: Callable, image_shape: tuple[int, int, int]) -> None:
        self.paths = paths
        self.targets = targets
        self.transform = transform
        self.image_shape = image_shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str]:
        path = self.paths[index]
        try:
            image = self.transform(load_rgb(path))
        except UnidentifiedImageError:  # its message repeats the path inside a file object's repr
            return torch.zeros(self.image_shape), self.targets[index], index, f"cannot read image {path}: not an image format PIL can decode"
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # truncated or corrupt data
            return torch.zeros(self.image_shape), self.targets[index], index, f"cannot read image {path}: {e}"
        return image, self.targets[index], index, ""
