"""CIFAR-shaped VGG-16 with BatchNorm (13 Convs 64-512 wide, 32x32 input, 10 classes).

The plain-chain CNN of the latency benchmark: no residual stream, so every Conv's input comes
from a Conv that feeds nothing else and every GKP Gather at G = 1 can fold into its producer.
It is the model classic filter pruning was first shown on (Li et al., "Pruning Filters for
Efficient ConvNets", ICLR 2017). Random weights (seeded), enough for latency work.
"""

from __future__ import annotations

import torch
from torch import nn

LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, layers=LAYERS, classes: int = 10):
        super().__init__()
        blocks, channels = [], 3
        for spec in layers:
            if spec == "M":
                blocks.append(nn.MaxPool2d(2))
            else:
                blocks += [nn.Conv2d(channels, spec, 3, padding=1, bias=False), nn.BatchNorm2d(spec), nn.ReLU()]
                channels = spec
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16(seed: int = 0) -> VGG:
    torch.manual_seed(seed)
    model = VGG()
    for module in model.modules():  # BatchNorm statistics that fold into non-trivial Conv scales
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.normal_(0.0, 0.1)
    return model.eval()
