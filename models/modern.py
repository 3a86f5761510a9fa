"""Random-weight CNNs in the shapes users bring beyond ResNet and MobileNet, one per family of
graph patterns the compiler must get through (issue: any real ONNX model in).

- `efficientnet_b0`: EfficientNet-B0's stage table: MBConv blocks with SiLU (exported as
  x * sigmoid(x)), squeeze-excite (pool -> 1x1 Conv -> SiLU -> 1x1 Conv -> Sigmoid -> Mul),
  depthwise 3x3 / 5x5 Convs, residual Adds; 224x224, 1000 classes.
- `resnext26`: ResNeXt bottlenecks (32 groups x 4 wide at the first stage) with two blocks per stage:
  grouped 3x3 Convs between prunable 1x1 Convs, projection shortcuts; 224x224, 1000 classes.
- `unet`: a U-Net with four levels: two 3x3 Conv-BN-ReLU per level, MaxPool down, ConvTranspose
  (2x2, stride 2) and bilinear Resize up, Concat skips, a 1x1 Conv to 2 classes; 256x256.
- `yolo_style`: a YOLOv8n-shaped backbone and neck: Conv-BN-SiLU, C2f blocks (Split on the channel
  axis, bottlenecks with residuals, Concat), SPPF (three MaxPools, Concat), nearest Resize up and
  Concat in the neck, a 1x1 head Conv per scale; 320x320.

BatchNorm statistics are calibrated on one random batch and the models are exported in eval mode,
so the Convs carry folded BatchNorm, as trained models do (models.mobilenet's `_seeded`).
"""

from __future__ import annotations

import torch
from torch import nn

from gkp_onnx.models.mobilenet import _seeded


def _conv(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: nn.Module | None = None):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act) if act is not None else nn.Sequential(*layers)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int, kernel: int):
        super().__init__()
        hidden = cin * expansion
        squeezed = max(1, cin // 4)
        self.expand = _conv(cin, hidden, act=nn.SiLU()) if expansion != 1 else nn.Identity()
        self.depthwise = _conv(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU())
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, squeezed, 1), nn.SiLU(),
                                     nn.Conv2d(squeezed, hidden, 1), nn.Sigmoid())
        self.project = _conv(hidden, cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(self.expand(x))
        y = self.project(y * self.squeeze(y))
        return x + y if self.residual else y


# expansion, output channels, blocks, stride of the first, kernel (EfficientNet-B0)
B0_STAGES = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
             (6, 192, 4, 2, 5), (6, 320, 1, 1, 3))


class EfficientNet(nn.Module):
    def __init__(self, classes: int = 1000, stages: tuple = B0_STAGES):
        super().__init__()
        blocks, cin = [_conv(3, 32, 3, 2, act=nn.SiLU())], 32
        for expansion, cout, count, stride, kernel in stages:
            for i in range(count):
                blocks.append(MBConv(cin, cout, expansion, stride if i == 0 else 1, kernel))
                cin = cout
        blocks.append(_conv(cin, 1280, act=nn.SiLU()))
        self.features, self.classifier = nn.Sequential(*blocks), nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class ResNeXtBlock(nn.Module):
    def __init__(self, cin: int, width: int, cout: int, stride: int, groups: int = 32):
        super().__init__()
        self.body = nn.Sequential(_conv(cin, width, act=nn.ReLU()), _conv(width, width, 3, stride, groups, nn.ReLU()),
                                  _conv(width, cout))
        self.shortcut = _conv(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


RESNEXT_STAGES = ((128, 256), (256, 512), (512, 1024), (1024, 2048))  # (grouped width, output) per stage


class ResNeXt(nn.Module):
    def __init__(self, blocks: int = 2, classes: int = 1000, stages: tuple = RESNEXT_STAGES):
        super().__init__()
        layers, cin = [_conv(3, 64, 7, 2, act=nn.ReLU()), nn.MaxPool2d(3, 2, 1)], 64
        for stage, (width, cout) in enumerate(stages):
            for i in range(blocks):
                layers.append(ResNeXtBlock(cin, width, cout, 2 if i == 0 and stage > 0 else 1))
                cin = cout
        self.features, self.classifier = nn.Sequential(*layers), nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def _double(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_conv(cin, cout, 3, act=nn.ReLU()), _conv(cout, cout, 3, act=nn.ReLU()))


class UNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), classes: int = 2):
        super().__init__()
        self.down = nn.ModuleList([_double(cin, cout) for cin, cout in zip((3,) + widths[:-1], widths)])
        self.pool = nn.MaxPool2d(2)
        # the deepest step up by ConvTranspose, the others by bilinear Resize + a 1x1 Conv
        pairs = list(zip(widths[:0:-1], widths[-2::-1]))
        self.up = nn.ModuleList([nn.ConvTranspose2d(hi, lo, 2, 2) if i == 0 else
                                 nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), _conv(hi, lo))
                                 for i, (hi, lo) in enumerate(pairs)])
        self.merge = nn.ModuleList([_double(2 * lo, lo) for _, lo in pairs])
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, skips[-2::-1]):
            x = merge(torch.cat([up(x), skip], 1))
        return self.head(x)


def _silu(cin: int, cout: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    return _conv(cin, cout, kernel, stride, act=nn.SiLU())


class Bottleneck(nn.Module):
    def __init__(self, channels: int, residual: bool):
        super().__init__()
        self.body, self.residual = nn.Sequential(_silu(channels, channels, 3), _silu(channels, channels, 3)), residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class C2f(nn.Module):
    def __init__(self, cin: int, cout: int, count: int = 1, residual: bool = True):
        super().__init__()
        self.half = cout // 2
        self.first = _silu(cin, 2 * self.half)
        self.blocks = nn.ModuleList([Bottleneck(self.half, residual) for _ in range(count)])
        self.last = _silu((2 + count) * self.half, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.first(x).chunk(2, 1))  # exported as Split on the channel axis
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.last(torch.cat(parts, 1))


class SPPF(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.first, self.last, self.pool = _silu(cin, cin // 2), _silu(2 * cin, cout), nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.first(x)]
        for _ in range(3):
            parts.append(self.pool(parts[-1]))
        return self.last(torch.cat(parts, 1))


class YoloStyle(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128, 256), outputs: int = 144):
        super().__init__()
        w = widths
        self.stem = nn.Sequential(_silu(3, w[0], 3, 2), _silu(w[0], w[1], 3, 2), C2f(w[1], w[1]))
        self.p3 = nn.Sequential(_silu(w[1], w[2], 3, 2), C2f(w[2], w[2], 2))
        self.p4 = nn.Sequential(_silu(w[2], w[3], 3, 2), C2f(w[3], w[3], 2))
        self.p5 = nn.Sequential(_silu(w[3], w[4], 3, 2), C2f(w[4], w[4]), SPPF(w[4], w[4]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.neck4, self.neck3 = C2f(w[4] + w[3], w[3], residual=False), C2f(w[3] + w[2], w[2], residual=False)
        self.heads = nn.ModuleList([nn.Conv2d(c, outputs, 1) for c in (w[2], w[3], w[4])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        n4 = self.neck4(torch.cat([self.up(p5), p4], 1))
        n3 = self.neck3(torch.cat([self.up(n4), p3], 1))
        return torch.cat([head(f).flatten(2) for head, f in zip(self.heads, (n3, n4, p5))], 2)


def efficientnet_b0(seed: int = 0) -> EfficientNet:
    torch.manual_seed(seed)
    return _seeded(EfficientNet(), seed)


def resnext26(seed: int = 0) -> ResNeXt:
    torch.manual_seed(seed)
    return _seeded(ResNeXt(), seed)


def unet(seed: int = 0, size: int = 256) -> UNet:
    torch.manual_seed(seed)
    return _seeded(UNet(), seed, size)


def yolo_style(seed: int = 0, size: int = 320) -> YoloStyle:
    torch.manual_seed(seed)
    return _seeded(YoloStyle(), seed, size)
