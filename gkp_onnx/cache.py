"""The on-disk cache shared by the slow steps (cost-model measurements, clustering).

Location: $GKP_ONNX_CACHE, else ~/.cache/gkp-onnx. Entries are written atomically; a cache that
cannot be written only costs the next run the work again.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "GKP_ONNX_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gkp-onnx")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename; errors are ignored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        pass
