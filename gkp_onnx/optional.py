"""Optional dependencies: torch serves reconstruction, recovery and the demo's export only, so that
optimize, inspect, compare and bench run without it."""

from __future__ import annotations

import importlib

from gkp_onnx.errors import GkpError


def require_torch(what: str) -> None:
    """A one-line error naming `what` when torch cannot be imported (its import is paid once, here)."""
    try:
        importlib.import_module("torch")
    except ImportError:
        raise GkpError(f"{what} needs torch: pip install torch==2.13.0 'gkp-onnx[recover]'") from None
