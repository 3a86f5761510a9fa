"""A Whisper-style audio encoder (whisper-tiny widths: 80 mel bins, dim 384, 6 heads, MLP 1536).

Random weights (seeded): the topology users bring from speech models, not accuracy. Two Conv1d
(the second with stride 2) and GELU turn [batch, 80, frames] into [batch, frames / 2, dim]; then
pre-LayerNorm blocks with Whisper's attention (separate q / k / v projections, k without bias, q
and k each scaled by head_width^-0.25) and a GELU MLP; a final LayerNorm. Depth defaults to 2,
frames to 300 (3 s of audio at Whisper's 10 ms hop).
"""

from __future__ import annotations

import torch
from torch import nn


class AudioBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.attn_ln, self.mlp_ln = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_ln(x)
        scale = (d // self.heads) ** -0.25
        q = self.query(h).view(b, t, self.heads, -1).permute(0, 2, 1, 3) * scale
        k = self.key(h).view(b, t, self.heads, -1).permute(0, 2, 3, 1) * scale
        v = self.value(h).view(b, t, self.heads, -1).permute(0, 2, 1, 3)
        attn = torch.softmax(q @ k, dim=-1)
        x = x + self.out((attn @ v).permute(0, 2, 1, 3).flatten(start_dim=2))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.mlp_ln(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, mels: int = 80, frames: int = 300, dim: int = 384, depth: int = 2, heads: int = 6,
                 mlp: int = 1536):
        super().__init__()
        self.conv1 = nn.Conv1d(mels, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)
        self.pos = nn.Parameter(torch.randn(1, frames // 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[AudioBlock(dim, heads, mlp) for _ in range(depth)])
        self.ln_post = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.gelu(self.conv2(torch.nn.functional.gelu(self.conv1(x))))
        return self.ln_post(self.blocks(x.transpose(1, 2) + self.pos))


def whisper_tiny_encoder(seed: int = 0, depth: int = 2) -> WhisperEncoder:
    torch.manual_seed(seed)
    return WhisperEncoder(depth=depth).eval()
