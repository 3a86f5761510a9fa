"""Karpathy's llama2.c formats: the legacy checkpoint (.bin) and the tokenizer (tok*.bin).

Checkpoint: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
positive vocab_size means the classifier is tied to the token embedding), then float32 arrays:
tok_embeddings [V, D], rms_att [L, D], wq/wk/wv/wo [L, D, D] (out, in), rms_ffn [L, D],
w1 [L, H, D], w2 [L, D, H], w3 [L, H, D], rms_final [D], freq_cis_real/imag [S, hd/2] (unused).
Tokenizer: int32 max_token_len, then per token: float32 score, int32 length, bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BOS, EOS = 1, 2


@dataclass
class Llama2cConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool


def load_checkpoint(path: str | Path) -> tuple[Llama2cConfig, dict[str, np.ndarray]]:
    data = Path(path).read_bytes()
    header = struct.unpack("7i", data[:28])
    config = Llama2cConfig(*header[:5], abs(header[5]), header[6], header[5] > 0)
    d, h, n, v, s = config.dim, config.hidden_dim, config.n_layers, config.vocab_size, config.seq_len
    kv_dim = d * config.n_kv_heads // config.n_heads
    head = d // config.n_heads
    shapes = [("tok_embeddings", (v, d)), ("rms_att", (n, d)), ("wq", (n, d, d)), ("wk", (n, kv_dim, d)),
              ("wv", (n, kv_dim, d)), ("wo", (n, d, d)), ("rms_ffn", (n, d)), ("w1", (n, h, d)),
              ("w2", (n, d, h)), ("w3", (n, h, d)), ("rms_final", (d,)),
              ("freq_cis_real", (s, head // 2)), ("freq_cis_imag", (s, head // 2))]
    if not config.shared_classifier:
        shapes.append(("wcls", (v, d)))
    weights, offset = {}, 28
    for name, shape in shapes:
        count = int(np.prod(shape))
        weights[name] = np.frombuffer(data, np.float32, count, offset).reshape(shape)
        offset += 4 * count
    if offset != len(data):
        raise ValueError(f"{path}: {len(data)} bytes, the header implies {offset}")
    return config, weights


def load_tokenizer(path: str | Path, vocab_size: int) -> list[bytes]:
    data = Path(path).read_bytes()
    offset, pieces = 4, []
    for _ in range(vocab_size):
        _score, length = struct.unpack_from("fi", data, offset)
        pieces.append(data[offset + 8: offset + 8 + length])
        offset += 8 + length
    return pieces


def decode(pieces: list[bytes], tokens) -> str:
    text = b"".join(pieces[t] for t in tokens if t not in (BOS, EOS))
    return text.decode("utf-8", errors="replace").lstrip()
