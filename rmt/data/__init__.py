"""ImageNet validation data: layouts, label files, class indices, evaluation preprocessing."""

from rmt.data.imagenet import IMAGE_EXTENSIONS, LAYOUTS, EvalImageDataset, ImageNetVal, scan_imagenet_val
from rmt.data.labels import (
    NUM_CLASSES,
    imagenet_wnids,
    read_caffe_labels,
    read_devkit_labels,
    read_devkit_meta,
    read_kaggle_labels,
    read_labels_file,
    read_real_labels,
    real_label_sets,
    val_image_number,
    wnid_to_index,
)
from rmt.data.transforms import build_eval_transform, load_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "NUM_CLASSES",
    "EvalImageDataset",
    "ImageNetVal",
    "build_eval_transform",
    "imagenet_wnids",
    "load_rgb",
    "read_caffe_labels",
    "read_devkit_labels",
    "read_devkit_meta",
    "read_kaggle_labels",
    "read_labels_file",
    "read_real_labels",
    "real_label_sets",
    "scan_imagenet_val",
    "val_image_number",
    "wnid_to_index",
]
