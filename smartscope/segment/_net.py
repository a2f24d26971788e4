"""The built-in network: a compact U-Net with a three-class head.

Each pixel is classified as background, object interior or object boundary
(the "3-class U-Net" of Caicedo et al., 2019, which separates touching
nuclei through the boundary class). Instances come from the interior
components grown over the foreground (see `_postprocess`).

Built for CPU latency: strided-convolution downsampling instead of max
pooling, additive skip connections instead of concatenation (both were the
slowest operators at 512² in profiling), only 8 channels at full resolution,
a sub-pixel (pixel-shuffle) upsampling to full resolution, channels-last.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

N_CLASSES = 3  # background, interior, boundary
DEFAULT_WIDTHS = (8, 16, 32, 64, 128)
DEFAULT_DEPTH = 2


def _cbr(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmartUNet(nn.Module):
    """U-Net: ``(B, 1, Y, X)`` normalised image → ``(B, 3, Y, X)`` class logits.

    Y and X must be multiples of ``2 ** (len(widths) - 1)`` (the inference
    engine pads).
    """

    def __init__(
        self, widths: tuple[int, ...] = DEFAULT_WIDTHS, depth: int = DEFAULT_DEPTH
    ) -> None:
        super().__init__()
        w = tuple(widths)
        self.widths = w
        self.depth = depth
        self.multiple: int = 1 << (len(w) - 1)  # input sides must be multiples
        self.stem = _cbr(1, w[0])
        self.down = nn.ModuleList(
            nn.Sequential(
                _cbr(w[i], w[i + 1], 2),
                *[_cbr(w[i + 1], w[i + 1]) for _ in range(depth - 1)],
            )
            for i in range(len(w) - 1)
        )
        levels = list(reversed(range(1, len(w) - 1)))
        self.proj = nn.ModuleList(nn.Conv2d(w[i + 1], w[i], 1) for i in levels)
        self.up = nn.ModuleList(_cbr(w[i], w[i]) for i in levels)
        self.head = nn.Sequential(nn.Conv2d(w[1], w[0] * 4, 1), nn.PixelShuffle(2))
        self.out = nn.Sequential(_cbr(w[0], w[0]), nn.Conv2d(w[0], N_CLASSES, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.stem(x)
        x = x0
        skips: list[torch.Tensor] = []
        for down in self.down:
            skips.append(x)
            x = down(x)
        skips = skips[1:]
        for proj, up in zip(self.proj, self.up, strict=False):
            skip = skips.pop()
            x = up(F.interpolate(proj(x), size=skip.shape[-2:], mode="nearest") + skip)
        return self.out(self.head(x) + x0)
