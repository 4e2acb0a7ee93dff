"""Evaluation preprocessing: image decoding and the resize / center-crop / normalize pipeline."""

from __future__ import annotations

import math
import os
import stat
from typing import Any, Mapping

from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from rmt.errors import ConfigError


def load_rgb(path: str) -> Image.Image:
    """Decode an image as 8-bit RGB, whatever its mode (grayscale, CMYK, palette, RGBA) or container.

    PIL picks the decoder from the content, so PNG data saved under a .JPEG name (ImageNet has
    one) decodes too. This is torchvision's ``pil_loader``, the loader of the official evaluation.
    """
    # O_NONBLOCK: opening a named pipe (or a device) under an image's name would wait forever for a writer
    with open(path, "rb", opener=lambda name, flags: os.open(name, flags | getattr(os, "O_NONBLOCK", 0))) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("not a regular file (a named pipe, socket or device)")
        image = Image.open(f)
        return image.convert("RGB")


def build_eval_transform(preprocessing: Mapping[str, Any]) -> transforms.Compose:
    """The evaluation pipeline of a model's preprocessing config.

    ``preprocessing`` holds ``input_size`` (C, H, W), ``interpolation``, ``crop_pct``, ``mean``, ``std``
    and optionally timm's ``crop_mode`` (default ``center``).
    The shorter side is resized to ``int(size / crop_pct)`` with PIL, the center ``size`` is cropped,
    then the tensor is normalized: for a square input exactly the official RMT / DeiT evaluation
    (``Resize(int(224 / 0.875)) = Resize(256)``, ``CenterCrop(224)``, bicubic). The timm models
    evaluated with ``squash`` (both sides resized, aspect ratio not kept) or ``border`` (longest
    side resized, padded with the mean) get timm's own pipeline for that mode.
    """
    crop_mode = preprocessing.get("crop_mode") or "center"
    if crop_mode not in ("center", "squash", "border"):
        raise ConfigError(f"crop_mode must be center, squash or border, got {crop_mode!r}")
    try:
        _, height, width = (int(v) for v in preprocessing["input_size"])
        crop_pct = float(preprocessing["crop_pct"])
        interpolation = InterpolationMode(str(preprocessing["interpolation"]))
        mean = tuple(float(v) for v in preprocessing["mean"])
        std = tuple(float(v) for v in preprocessing["std"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"bad preprocessing config {dict(preprocessing)!r}: {e}") from None
    if not 0.0 < crop_pct <= 1.0:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if crop_mode != "center":
        from timm.data import create_transform

        return create_transform((3, height, width), is_training=False, interpolation=interpolation.value,
                                mean=mean, std=std, crop_pct=crop_pct, crop_mode=crop_mode)
    if height == width:
        # an int size resizes the shorter side and keeps the aspect ratio, as the official code does
        resize = transforms.Resize(int(height / crop_pct), interpolation=interpolation)
    else:
        resize = _CoverResize((math.floor(height / crop_pct), math.floor(width / crop_pct)), interpolation)
    return transforms.Compose(
        [resize, transforms.CenterCrop((height, width)), transforms.ToTensor(), transforms.Normalize(mean, std)]
    )


class _CoverResize:
    """Resize, keeping the aspect ratio, to the smallest size that covers (height, width)."""

    def __init__(self, size: tuple[int, int], interpolation: InterpolationMode) -> None:
        self.size = size
        self.interpolation = interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        scale = max(self.size[0] / image.height, self.size[1] / image.width)
        size = [round(image.height * scale), round(image.width * scale)]
        return transforms.functional.resize(image, size, interpolation=self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value})"
