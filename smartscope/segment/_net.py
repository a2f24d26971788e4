"""The built-in network: a compact U-Net with a three-class head.

Each pixel is classified as background, object interior or object boundary
(the "3-class U-Net" of Caicedo et al., 2019, which separates touching
nuclei through the boundary class). Instances come from the interior
components grown over the foreground (see `_postprocess`).

Built for CPU latency: strided-convolution downsampling instead of max
pooling, additive skip connections instead of concatenation (both were the
slowest operators at 512² in profiling), only 8 channels at full resolution,
a sub-pixel (pixel-shuffle) upsampling to full resolution, channels-last.
`for_inference` gives the same network with the last upsampling and skip
addition fused for channels-last memory (identical outputs, fewer passes over
the full-resolution tensors).
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

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's half-resolution output and the stem's full-resolution one."""
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
        return x, x0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, x0 = self.features(x)
        return self.out(self.head(x) + x0)


class _InferenceUNet(nn.Module):
    """`SmartUNet` with its sub-pixel head fused into the skip addition.

    ``PixelShuffle`` then ``+ x0`` makes two full-resolution passes (a
    permuting copy and an addition) and, in channels-last memory, the shuffle
    gathers every 4th channel. Here the head's 1x1 convolution emits its
    channels in (row, column, channel) order instead of (channel, row,
    column), so each output pixel's channels are one contiguous block, and the
    shuffle is a strided view added straight into the stem's output: one
    pass. The arithmetic is the same, so the outputs are identical.
    """

    def __init__(self, net: SmartUNet) -> None:
        super().__init__()
        self.net = net
        conv = net.head[0]
        assert isinstance(conv, nn.Conv2d) and conv.bias is not None
        c = conv.out_channels // 4
        order = torch.arange(4 * c).reshape(c, 2, 2).permute(1, 2, 0).reshape(-1)
        self.head = nn.Conv2d(conv.in_channels, 4 * c, 1)
        with torch.no_grad():
            self.head.weight.copy_(conv.weight[order])
            self.head.bias.copy_(conv.bias[order])  # type: ignore[union-attr]
        self.channels = c
        logits = net.out[1]
        assert isinstance(logits, nn.Conv2d)
        self.last_block = net.out[0]
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, x0 = self.net.features(x)
        b, _, h, w = x.shape
        c = self.channels
        # (b, h, w, [i, j, c]) -> (b, h, i, w, j, c): pixel (2y+i, 2x+j), channel c
        sub = self.head(x).permute(0, 2, 3, 1).reshape(b, h, w, 2, 2, c)
        sub = sub.permute(0, 1, 3, 2, 4, 5)
        full = x0.permute(0, 2, 3, 1).reshape(b, h, 2, w, 2, c) + sub
        x = self.last_block(full.reshape(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2))
        # the 8 -> 3 class convolution may be kept in float32 in a bf16 graph
        # (`keep_logits_fp32`): faster than bf16 with 3 output channels
        return self.logits(x.to(self.logits.weight.dtype))


def keep_logits_fp32(net: nn.Module) -> nn.Module:
    """`net` (from `for_inference`, cast to bf16) with its last convolution in float32.

    The final 8 -> 3 channel convolution is slow in bf16 on this project's
    CPU host: in float32 the whole 512² call is ~3 ms (~20 %) faster on 2
    cores (measured, docs/benchmarks.md), and the logits are not rounded to
    bf16.
    """
    assert isinstance(net, _InferenceUNet)
    net.logits.float()
    return net


def for_inference(net: SmartUNet) -> nn.Module:
    """The same network (same outputs) laid out for fast channels-last inference.

    The result shares `net`'s layers, with a re-ordered copy of its head.
    Inference only: model files and exports keep `SmartUNet`'s layout.
    """
    return _InferenceUNet(net).eval()
