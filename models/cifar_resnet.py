"""CIFAR-10 ResNets of He et al. 2016 (6n+2 layers, option-A shortcuts), as in akamaster's
pytorch_resnet_cifar10, so the published checkpoints load with strict=True.

Stem 3x3 conv (16) + BN + ReLU, three stages of n BasicBlocks (16, 32, 64 channels; the first
block of stages 2 and 3 has stride 2), global average pooling, linear 64 -> 10. A downsampling
block's shortcut is x[:, :, ::2, ::2] zero-padded with planes // 4 channels on each side.
Input: RGB in [0, 1] normalised with the ImageNet mean/std, NCHW 32x32.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes, layers = 16, []
        for stage, width in enumerate((16, 32, 64)):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(planes, width, stride))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(name: str) -> CifarResNet:
    if name not in DEPTHS:
        raise ValueError(f"unknown CIFAR ResNet {name!r} (choose from {', '.join(DEPTHS)})")
    return CifarResNet(DEPTHS[name])


def load_akamaster(name: str, checkpoint: str) -> CifarResNet:
    """The model with the weights of an akamaster checkpoint ({'state_dict'} with 'module.' keys)."""
    model = cifar_resnet(name)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    return model.eval()


def preprocess(images_nhwc_uint8: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW normalised as the checkpoints were trained."""
    x = images_nhwc_uint8.astype(np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(0, 3, 1, 2).copy()
