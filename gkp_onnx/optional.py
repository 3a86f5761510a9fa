"""Optional dependencies: torch serves reconstruction, recovery and the demo's export only, so that
optimize, inspect, compare and bench run without it."""

from __future__ import annotations

import importlib.util

from gkp_onnx.errors import GkpError


def require_torch(what: str) -> None:
    """A one-line error naming `what` when torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        raise GkpError(f"{what} needs torch: pip install torch==2.13.0 'gkp-onnx[recover]'")
