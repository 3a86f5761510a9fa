"""A Llama-style decoder with a KV cache as ONNX inputs and outputs (random weights, seeded).

Per layer: RMSNorm, grouped-query attention (separate q / k / v projections, H query heads sharing
H_kv key/value heads) whose keys and values are the cache given (`past_key_L`, `past_value_L`:
[batch, H_kv, past, head_width]) followed by the new tokens', returned as `present_key_L` /
`present_value_L`; a SwiGLU MLP. Causal over the new tokens, all of the past visible. This is the
interface a generation loop feeds back step by step, so an optimized model must keep it working:

    python -m gkp_onnx.models.llama_kv out.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


class CachedBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int):
        super().__init__()
        self.heads, self.kv_heads, self.width = heads, kv_heads, dim // heads
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.width, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.width, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, past_key, past_value):
        b, t, d = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(b, t, self.heads, self.width).transpose(1, 2)
        key = torch.cat([past_key, self.wk(h).view(b, t, self.kv_heads, self.width).transpose(1, 2)], dim=2)
        value = torch.cat([past_value, self.wv(h).view(b, t, self.kv_heads, self.width).transpose(1, 2)], dim=2)
        repeat = self.heads // self.kv_heads
        k, v = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        scores = q @ k.transpose(-2, -1) / self.width ** 0.5
        past = key.shape[2] - t
        visible = torch.ones(t, key.shape[2], dtype=torch.bool).tril(diagonal=past)
        scores = scores.masked_fill(~visible, float("-inf"))
        x = x + self.wo((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.w2(nn.functional.silu(self.w1(h)) * self.w3(h)), key, value


class CachedLlama(nn.Module):
    def __init__(self, vocab: int = 512, dim: int = 64, depth: int = 2, heads: int = 4, kv_heads: int = 2,
                 hidden: int = 172):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(CachedBlock(dim, heads, kv_heads, hidden) for _ in range(depth))
        self.norm, self.head = RMSNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids, *cache):
        x, present = self.embed(input_ids), []
        for i, block in enumerate(self.blocks):
            x, key, value = block(x, cache[2 * i], cache[2 * i + 1])
            present += [key, value]
        return (self.head(self.norm(x)), *present)


def export_llama_kv(path: str | Path, seed: int = 0, depth: int = 2, past: int = 3) -> Path:
    torch.manual_seed(seed)
    model = CachedLlama(depth=depth).eval()
    block = model.blocks[0]
    cache = [torch.randn(1, block.kv_heads, past, block.width) for _ in range(2 * depth)]
    names = [f"past_{kind}_{i}" for i in range(depth) for kind in ("key", "value")]
    outputs = ["logits"] + [name.replace("past", "present") for name in names]
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    dynamic |= {name: {0: "batch", 2: "past"} for name in names}
    dynamic |= {name: {0: "batch", 2: "total"} for name in outputs[1:]}
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(1, 2, dtype=torch.int64), *cache), str(path), opset_version=17,
                          dynamo=False, input_names=["input_ids"] + names, output_names=outputs,
                          dynamic_axes=dynamic)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gkp_onnx.models.llama_kv", description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args(argv)
    print(export_llama_kv(args.output, args.seed, args.depth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
