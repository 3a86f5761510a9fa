"""ImageNet-shaped MobileNetV2 (and a MobileNetV3-Large-style variant), 224x224 input, 1000 classes.

MobileNetV2 (Sandler et al., 2018), width multiplier 1.0: a 3x3 stride-2 stem (32), the inverted
residual blocks of the standard stage table below (1x1 expand -> BN -> ReLU6 -> 3x3 depthwise ->
BN -> ReLU6 -> 1x1 project -> BN, with a residual Add where stride is 1 and the widths match; no
expand Conv where the expansion is 1), a 1x1 Conv to 1280, global average pool and Linear(1000).
ReLU6 exports as Clip(0, 6). The depthwise Convs (group = channels) are not prunable by GKP: the
expand and project 1x1 Convs, the stem and the last 1x1 Conv are.

`mobilenet_v3` is MobileNetV3-Large-shaped: HardSwish / ReLU, squeeze-excite (pool -> 1x1 Conv ->
ReLU -> 1x1 Conv -> HardSigmoid -> Mul) on some blocks, 3x3 and 5x5 depthwise kernels, a
960-wide last Conv and a Linear(1280) -> HardSwish -> Linear(1000) head.

Random weights (seeded): the graph and the layer shapes are those of the torchvision models,
which cannot be imported here. The BatchNorm statistics are calibrated on one batch of random
inputs (so activations keep their scale through the depth, as in a trained net), then the model is
put in eval mode, so the ONNX export folds BatchNorm into the Convs.
"""

from __future__ import annotations

import torch
from torch import nn

# expansion t, output channels c, blocks n, stride of the first block s
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))

# kernel, expanded width, output width, squeeze-excite, activation (RE: ReLU, HS: HardSwish), stride
V3_LARGE = ((3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
            (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
            (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
            (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
            (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn(in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU6) -> nn.Sequential:
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(out_ch)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        layers = [conv_bn(in_ch, hidden)] if expansion != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, out_ch, act=None)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        in_ch = make_divisible(32 * width)
        last = make_divisible(1280 * max(1.0, width))
        layers = [conv_bn(3, in_ch, 3, 2)]
        for t, c, n, s in V2_STAGES:
            out_ch = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(conv_bn(in_ch, last))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        squeeze = make_divisible(channels // 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidualV3(nn.Module):
    def __init__(self, in_ch: int, kernel: int, hidden: int, out_ch: int, se: bool, act: str, stride: int):
        super().__init__()
        activation = nn.Hardswish if act == "HS" else nn.ReLU
        layers = [conv_bn(in_ch, hidden, act=activation)] if hidden != in_ch else []
        layers.append(conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=activation))
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(conv_bn(hidden, out_ch, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV3(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        in_ch = 16
        layers = [conv_bn(3, in_ch, 3, 2, act=nn.Hardswish)]
        for kernel, hidden, out_ch, se, act, stride in V3_LARGE:
            layers.append(InvertedResidualV3(in_ch, kernel, hidden, out_ch, se, act, stride))
            in_ch = out_ch
        layers.append(conv_bn(in_ch, 6 * in_ch, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * in_ch, 1280), nn.Hardswish(), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _seeded(model: nn.Module, seed: int, size: int = 224) -> nn.Module:
    """torchvision's initialisation, random BatchNorm affine terms, statistics from one random batch."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.0)
            nn.init.normal_(module.bias, 0.0, 0.1)
            module.momentum = None  # cumulative average: one batch sets the statistics
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def mobilenet_v2(seed: int = 0) -> MobileNetV2:
    torch.manual_seed(seed)
    return _seeded(MobileNetV2(), seed)


def mobilenet_v3(seed: int = 0) -> MobileNetV3:
    torch.manual_seed(seed)
    return _seeded(MobileNetV3(), seed)
