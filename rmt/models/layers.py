"""Small layers shared by RMT's blocks and its attention."""

from __future__ import annotations

from torch import Tensor, nn


class DepthwiseConvNHWC(nn.Conv2d):
    """Depthwise conv on (B, H, W, C) tokens (a channels-last view, so no copy either way)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
