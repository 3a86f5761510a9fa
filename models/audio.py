"""A Conv1d speech model in the style of Jasper / Wav2Letter (dense 1-D convolutions over time).

Random weights (seeded): the topology users bring from speech and time-series models, not
accuracy. [batch, 64 mel bins, frames] -> a stride-2 Conv1d (kernel 11) -> residual blocks of two
Conv1d (kernels 11, 13, 17, BatchNorm folded into the Convs on export, ReLU) -> two 1x1 Conv1d ->
per-frame logits over 29 characters (CTC), [batch, 29, frames / 2]. Frames default to 400 (4 s
at a 10 ms hop).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm1d(cout))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, kernel: int):
        super().__init__()
        self.first, self.second = _conv(width, width, kernel), _conv(width, width, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.second(torch.relu(self.first(x))))


class SpeechConv1d(nn.Module):
    def __init__(self, mels: int = 64, width: int = 256, kernels: tuple[int, ...] = (11, 13, 17), classes: int = 29):
        super().__init__()
        self.stem = _conv(mels, width, 11, stride=2)
        self.blocks = nn.Sequential(*[ResidualBlock(width, k) for k in kernels])
        self.head = nn.Sequential(_conv(width, 2 * width, 1), nn.ReLU(), nn.Conv1d(2 * width, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.relu(self.stem(x))))


def speech_conv1d(seed: int = 0) -> SpeechConv1d:
    torch.manual_seed(seed)
    model = SpeechConv1d()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as a trained model has
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()
